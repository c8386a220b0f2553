"""TVMBackend: options, import, optional int8 rewrite and tuning, build, and the CPU twin of a
CUDA build for the parity check on a GPU-less host."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ... import isa
from ...errors import BackendUnavailable, CrateEdgeError
from ...quantize import INT8_ATTENTION
from ...runtimes import TVM_LIBRARY, tvm_vm_runner
from ..base import Availability, Backend, Capabilities, Compiled, device_of, precision_map
from .attention import fuse_attention
from .gemm import handwritten_gemms
from .lower import _batch_var, _import, _op_inventory, build, fused
from .metaschedule import tune
from .quant import quantize_module
from .schedule import cpu_rules
from .target import _say, cross_compiler, make_target

LIBRARY = TVM_LIBRARY
CPU_TWIN = "model_cpu_reference.so"  # cuda builds on a GPU-less host, cross builds: the same Relax module for this CPU
TUNING_DB = "tuning_db"
ATTENTION = {  # options.attention: how MSSA's attention is lowered on a CPU (llvm) target
    "fused": "one hand-written kernel per head and row tile: scores, softmax, product with V (attention.py)",
    "matmul": "the imported matmul -> softmax -> matmul, each product through the GEMM schedule",
}
GEMM = {  # options.gemm: how an fp32 matmul with a constant weight is lowered on a CPU (llvm) target
    "handwritten": "on AVX-512, gemm.py's 14 x 32 kernel with its bias / residual / ReLU epilogue (elsewhere the schedule)",
    "schedule": "the GEMM schedule rule (schedule.py), fused with its elementwise consumers by TVM",
}


def _has_gpu() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


vm_runner = tvm_vm_runner  # the Relax VM runner lives in crate_edge.runtimes (torch-free)


class TVMBackend(Backend):
    name = "tvm"
    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        precisions=("fp32", "int8"),
        quant_schemes={"int8": "symmetric"},
        quant_attention=True,
        compile_needs=("tvm",),
        run_needs=("tvm",),
        distributions=("apache-tvm", "apache-tvm-ffi"),
        extra="tvm",
    )

    def available(self, target=None, run: bool = False, manifest: dict | None = None) -> Availability:
        """Runs CPU artifacts wherever the TVM runtime imports; CUDA artifacts also need a GPU
        (pass the manifest to ask about one artifact, or the target for what it would build)."""
        ok = super().available(target, run, manifest)
        device = device_of(target, manifest)
        if ok and run and device == "cuda" and not _has_gpu():
            return Availability(False, "this artifact was built for CUDA and there is no CUDA GPU here")
        return ok

    def compile(self, exported, target, out: Path, quant=None) -> Compiled:
        module, ep = exported.module, exported.program
        opts = target.options
        tgt = make_target(opts.get("target", {"kind": "llvm"}), target.isa)
        device = "cuda" if tgt.kind.name == "cuda" else "cpu"
        if device == "cpu" and tgt.kind.name != "llvm":
            raise CrateEdgeError(f"tvm: target kind {tgt.kind.name!r} is not supported (llvm or cuda)")
        trials = int(opts.get("tune_trials", 0))
        reuse = Path(os.path.expanduser(str(opts["tuning_db"]))) if opts.get("tuning_db") else None
        if reuse is not None and not reuse.is_dir():
            raise CrateEdgeError(f"tvm: tuning_db {reuse} is not a directory")
        if trials and device == "cuda":
            raise CrateEdgeError("tvm: tune_trials on a cuda target needs that GPU to measure on; tune on the GPU host and pass tuning_db")
        if quant is not None and (trials or reuse is not None):
            raise CrateEdgeError("tvm: tune_trials and tuning_db are not supported with [quantize] (the int8 kernels are hand-scheduled)")
        attention = str(opts.get("attention", "fused"))
        if attention not in ATTENTION:
            raise CrateEdgeError(f"tvm: options.attention = {attention!r}; known: {', '.join(ATTENTION)}")
        gemm = str(opts.get("gemm", "handwritten"))
        if gemm not in GEMM:
            raise CrateEdgeError(f"tvm: options.gemm = {gemm!r}; known: {', '.join(GEMM)}")
        if trials and target.dynamic_batch is not None:
            raise CrateEdgeError("tvm: tune_trials needs a static batch (input.dynamic_batch = false): MetaSchedule tunes concrete shapes")

        if device == "cuda" and not (
            shutil.which("nvcc") or os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
        ):
            raise BackendUnavailable("backend tvm unavailable: a cuda target compiles its kernels with nvcc, which is not on PATH")
        cross = cross_compiler(target.isa) if device == "cpu" else None  # before any work: the linker is there
        t0 = time.time()
        mod, how = _import(ep)
        batch = _batch_var(mod)
        pinned = None
        info = {"device": device, "target": str(tgt), "import": how, "relax_ops": _op_inventory(mod)}
        att_precision = quant.config.attention if quant is not None else "float"
        if att_precision == "int8" and not (device == "cpu" and attention == "fused"):
            raise CrateEdgeError('tvm: quantize.attention = "int8" needs a CPU (llvm) target with options.attention = "fused"')
        if device == "cpu" and attention == "fused":
            mod, info["attention"] = fuse_attention(mod, tgt, att_precision)
            if "int8_refused" in info["attention"]:
                _say(f"attention stays float32: {info['attention']['int8_refused']}")
        sites = {}
        if quant is not None:
            _say(f"int8: calibrating {len(quant.sites)} sites on {len(quant.calibration)} images, rewriting their GEMMs")
            mod, info["quantization"] = quantize_module(mod, module, quant, tgt)
            sites = {
                s: f"int8 GEMM (weights int8 {quant.config.weights} symmetric, activations int8 per_tensor symmetric static) -> int32, dequantized to fp32"
                for s in quant.sites
            }
        if device == "cpu" and gemm == "handwritten":
            mod, info["gemm_f32"] = handwritten_gemms(mod, tgt)
        if target.dynamic_batch is not None and isinstance(batch, int):
            pinned = (batch, batch)  # crate_edge.runtime.Runner pads/splits to this batch
            info["batch"] = f"static {batch}: the Relax importer did not keep the dynamic batch"
        else:
            info["batch"] = f"dynamic {list(target.dynamic_batch)}" if target.dynamic_batch else f"static {batch}"
        files = [LIBRARY]
        db_dir = None
        if trials or reuse is not None:
            db_dir = out / TUNING_DB
            info["tuning"] = tune(fused(mod, tgt), tgt, trials, db_dir, reuse, cpu_rules() if device == "cpu" else [])
            files.append(TUNING_DB)
        t1 = time.time()
        _say(f"building for {tgt.kind.name} ({tgt.attrs.get('mcpu', tgt.attrs.get('arch', ''))})")
        build(mod, tgt, db_dir).export_library(str(out / LIBRARY), fcompile=cross)
        info["build_s"] = round(time.time() - t1, 1)
        info["compile_s"] = round(time.time() - t0, 1)
        verified, not_verified = {}, {}
        if device == "cuda" and not _has_gpu():
            # what the parity check can run here: the same Relax module built for this CPU
            build(mod, make_target({"kind": "llvm"}, target.isa)).export_library(str(out / CPU_TWIN))
            files.append(CPU_TWIN)
            not_verified["execution"] = "no CUDA GPU here: the CUDA library was built, not run"
            verified["numerics"] = "the same Relax module built by TVM for this CPU (llvm)"
        elif cross is not None:
            # an x86-64-v3 twin where this host meets it, so that the stand-in runs on most x86 hosts
            twin = "x86-64-v3" if isa.level_of_host() != "native" else "native"
            build(mod, make_target({"kind": "llvm"}, twin)).export_library(str(out / CPU_TWIN))
            files.append(CPU_TWIN)
            not_verified["execution"] = (
                f"a {target.isa} library ({tgt.attrs.get('mtriple')}): built and linked here, not run (this host is {isa.host_arch()})"
            )
            verified["numerics"] = f"the same Relax module built by TVM for this CPU (llvm, isa {twin})"
        else:
            verified["execution"] = f"TVM Relax VM ({device}) on this machine"
        detail = {}
        if info.get("attention", {}).get("precision", {}).get("int8"):
            on = "AMX tdpbusd, VNNI vpdpbusd for the last rows" if "amx" in info["attention"].get("tile", {}) else "vpdpbusd"
            detail[INT8_ATTENTION] = (
                f"int8 ({on}): w per token for w w^T, softmax weights as u8 255ths x w per column for A w, scales at run time"
            )
        return Compiled(
            files=files,
            precision=precision_map("fp32", sites, **detail),
            batch_range=pinned,
            verified=verified,
            not_verified=not_verified,
            info=info,
            isa=target.isa if device == "cpu" else None,  # a cuda library's host code is generic llvm
        )

    def reference_runner(self, art_dir: Path, manifest: dict):
        be = manifest["backend"]
        if not (art_dir / CPU_TWIN).exists():
            return None
        what = "the CUDA library" if be.get("device") == "cuda" else f"the {manifest['target']['definition'].get('isa')} library"
        return vm_runner(art_dir / CPU_TWIN, "cpu"), f"TVM llvm build of the same Relax module on this CPU, not {what}"
