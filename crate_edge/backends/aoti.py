"""AOTInductor: torch.export -> a compiled .pt2 package (C++ on CPU here, CUDA on a GPU host)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import isa
from ..errors import CrateEdgeError
from ..export import export
from .base import Availability, Backend, Capabilities, Compiled, device_of, precision_map

PACKAGE = "model.pt2"


# Inductor's vector-ISA flags (torch._inductor.cpu_vec_isa) as /proc/cpuinfo names them
_FLAG_NAMES = {
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "amx-tile": "amx_tile",
    "amx-bf16": "amx_bf16",
    "amx-int8": "amx_int8",
}


def _cpu_level(level: str) -> tuple[str, tuple[str, ...], dict]:
    """Inductor settings for a CPU level (crate_edge.isa): "native" is Inductor's default (-march=native
    and the widest vector ISA it finds); x86-64-v3 compiles with -march=x86-64-v3 and 256-bit
    vectors (AVX2), x86-64-v4 with -march=x86-64-v4 and 512-bit vectors. Returns the level, the
    features Inductor's vector ISA adds beyond it, and the inductor_configs."""
    from torch._inductor import cpu_vec_isa

    if isa.LEVEL_ARCH.get(level, isa.host_arch()) != isa.host_arch():
        raise CrateEdgeError(f"aoti: isa {level} is another architecture; AOTInductor compiles for this host's ({isa.host_arch()})")
    opts = {} if level == "native" else {"cpp.march": level, "cpp.simdlen": 256 if level == "x86-64-v3" else 512}
    if level == "native":
        return level, (), opts
    vec = next((v for v in cpu_vec_isa.valid_vec_isa_list() if v.bit_width() == opts["cpp.simdlen"]), None)
    if vec is None:
        raise CrateEdgeError(f"aoti: this host cannot compile {opts['cpp.simdlen']}-bit vector code for isa {level}")
    flags = [f[2:] for f in vec.build_arch_flags().split() if f.startswith("-m")]
    return level, tuple(sorted({_FLAG_NAMES.get(f, f) for f in flags})), opts


class AOTIBackend(Backend):
    name = "aoti"
    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        precisions=("fp32",),
        compile_needs=("torch",),
        run_needs=("torch",),
        distributions=("torch",),
        extra="test",
    )

    def available(self, target=None, run: bool = False, manifest: dict | None = None) -> Availability:
        """AOTInductor compiles C++ (a compiler on PATH); a CUDA package is compiled and run on a
        CUDA host."""
        import shutil

        if not run and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return Availability(False, "no C++ compiler on PATH (AOTInductor compiles C++)")
        device = device_of(target, manifest)
        if device == "cuda" and not torch.cuda.is_available():
            what = "runs" if run else "compiles"
            return Availability(False, f"AOTInductor {what} a CUDA package on a CUDA host, and there is no CUDA GPU here")
        return super().available(target, run, manifest)

    def compile(self, exported, target, out: Path, quant=None) -> Compiled:
        module, ep, example = exported.module, exported.program, exported.example
        if quant is not None:
            raise CrateEdgeError(f"backend {self.name} has no reduced-precision path yet")
        device = target.device  # compile() has asked available(target): a cuda target means a GPU here
        if device == "cuda":
            module = module.cuda()

            ep = export(module, example.cuda(), target.dynamic_batch)
        isa, extra, opts = None, (), {}
        if device == "cpu":
            isa, extra, opts = _cpu_level(target.isa)
        torch._inductor.aoti_compile_and_package(ep, package_path=str(out / PACKAGE), inductor_configs=opts or None)
        return Compiled(
            files=[PACKAGE],
            precision=precision_map("fp32"),
            info={"device": device, **({"inductor_configs": opts} if opts else {})},
            verified={"execution": f"AOTInductor ({device}) on this machine"},
            isa=isa,
            isa_extra=extra,
        )

    def runner(self, art_dir: Path, manifest: dict, threads: int | None = None):
        device = manifest["backend"].get("device", "cpu")
        if threads:  # the package's CPU kernels run on torch's intra-op pool
            torch.set_num_threads(int(threads))
        runner = torch._inductor.aoti_load_package(str(art_dir / PACKAGE))

        def call(x: torch.Tensor):
            with torch.no_grad():
                out = runner(x)
            return out if isinstance(out, (list, tuple)) else [out]

        def run(x: np.ndarray):
            return [o.cpu().numpy() for o in call(torch.from_numpy(x).to(device))]

        if device == "cuda":
            run.device_call = (device, call)  # for `bench`: time the GPU on GPU-resident inputs
        return run
