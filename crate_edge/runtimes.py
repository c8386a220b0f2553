"""The artifact runners that import no torch: ONNX Runtime, the TVM runtime and Core ML. A
device that has only one of these runtimes runs crate-edge artifacts through them
(crate_edge.runtime.load picks the runner by the manifest's backend); the backends reuse them."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from . import isa
from .errors import BackendUnavailable

ONNX_FILE = "model.onnx"  # the files each of these backends writes into an artifact
TVM_LIBRARY = "model.so"
COREML_PACKAGE = "model.mlpackage"


def provider_gap(providers: list[str] | None) -> str | None:
    """Why ONNX Runtime here cannot honour a provider list that names no CPUExecutionProvider
    (a GPU-only list); None when it can (any list with the CPU provider can)."""
    if not providers or "CPUExecutionProvider" in providers:
        return None
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if set(providers) & set(avail):
        return None
    return f"onnxruntime here has none of {', '.join(providers)} (available: {', '.join(avail)}; install onnxruntime-gpu)"


def ort_session(path: Path, threads: int | None = None, providers: list[str] | None = None, disabled_optimizers: list[str] | None = None):
    """An ONNX Runtime session on the first available of `providers` (default: CUDA where
    present, else CPU). A list without the CPU provider is strict: none of it available is an
    error, and no node may fall back to the CPU (a "CUDA" number must be a CUDA number).
    `disabled_optimizers`: ONNX Runtime graph transformers not to run (by name, e.g.
    "SkipLayerNormFusion"; a target's options.disabled_optimizers)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    want = list(providers or ["CUDAExecutionProvider", "CPUExecutionProvider"])
    gap = provider_gap(want)
    if gap:
        raise BackendUnavailable(gap)
    if "CPUExecutionProvider" not in want:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    avail = ort.get_available_providers()
    use = [p for p in want if p in avail] or ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), so, providers=use, disabled_optimizers=list(disabled_optimizers or []) or None)


def _tvm_threads(tvm, threads: int | None) -> None:
    """Size TVM's CPU thread pool. TVM caps it at TVM_NUM_THREADS (else OMP_NUM_THREADS, else
    half the hardware threads, assuming SMT): on a 2-vCPU machine that is one thread, and
    runtime.config_threadpool cannot go above the cap. So the cap is raised first (it is read
    again on every reconfiguration); with no `threads` and no user setting, the pool takes every
    CPU this process may run on. Workers are not pinned to cores (TVM_BIND_THREADS=0 unless set):
    a pinned worker that shares its core with a busy process spins in sched_yield for minutes
    when the pool shuts down at exit (measured on a 2-core machine with the other core busy)."""
    n = int(threads) if threads else None
    if n is None and not (os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n is None:
        return
    os.environ["TVM_NUM_THREADS"] = str(n)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    f = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if f is not None:
        f(0, n)


def tvm_vm_runner(lib_path: Path, device: str, threads: int | None = None):
    """numpy float32 NCHW -> [logits, ...] through the Relax VM (TVM runtime only), one call per
    batch (crate_edge.runtime.Runner fits batches to the artifact's batch range)."""
    import tvm
    from tvm.runtime import vm as rvm

    _tvm_threads(tvm, threads)
    isa.request_amx()  # a native library on an AMX host may hold AMX GEMMs (backends/tvm/quant.py)
    lib = tvm.runtime.load_module(str(lib_path))
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    vm = rvm.VirtualMachine(lib, dev)
    main = vm["main"]

    def once(x):
        out = main(tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), dev))
        outs = [out[i] for i in range(len(out))] if not hasattr(out, "numpy") else [out]
        return [o.numpy() for o in outs]

    def run(x: np.ndarray):
        return once(x)

    run._keep = (lib, vm)  # the VM must not outlive its library
    return run


def _options(manifest: dict) -> dict:
    return manifest["target"]["definition"].get("options", {})


def onnxruntime_runner(art_dir: Path, manifest: dict, threads: int | None = None):
    """(run, detail): an ONNX Runtime session on the artifact's model.onnx with the target's providers."""
    opts = _options(manifest)
    sess = ort_session(Path(art_dir) / ONNX_FILE, threads or opts.get("threads"), opts.get("providers"), opts.get("disabled_optimizers"))
    return _ort_run(sess), sess.get_providers()[0]


def ort_runner(path: Path, threads: int | None = None, providers: list[str] | None = None):
    """numpy float32 NCHW -> [outputs] through an ONNX Runtime session on any .onnx file."""
    return _ort_run(ort_session(path, threads, providers))


def _ort_run(sess):
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})


def tvm_runner(art_dir: Path, manifest: dict, threads: int | None = None):
    """(run, detail): the Relax VM on the artifact's library; a CUDA build needs a CUDA GPU."""
    import tvm

    be = manifest["backend"]
    device = be.get("device", "cpu")
    if device == "cuda" and not tvm.cuda(0).exist:
        raise BackendUnavailable(
            f"{art_dir} is a TVM CUDA build and this machine has no CUDA GPU (run it on a GPU host with the TVM runtime)"
        )
    run = tvm_vm_runner(Path(art_dir) / TVM_LIBRARY, device, threads or _options(manifest).get("threads"))
    return run, f"Relax VM ({device})"


def coreml_runner(art_dir: Path, manifest: dict, threads: int | None = None):
    """(run, detail): Core ML on the artifact's .mlpackage (macOS only)."""
    if platform.system() != "Darwin":
        raise BackendUnavailable("Core ML predictions run only on macOS")
    import coremltools as ct

    units = manifest["backend"].get("compute_units", "ALL")
    mlmodel = ct.models.MLModel(str(Path(art_dir) / COREML_PACKAGE), compute_units=getattr(ct.ComputeUnit, units))
    names = manifest["backend"]["io"]["outputs"]

    def run(x: np.ndarray):
        out = mlmodel.predict({"images": np.ascontiguousarray(x, dtype=np.float32)})
        return [np.asarray(out[n], dtype=np.float32) for n in names]

    return run, f"Core ML ({units})"


# backend name -> torch-free runner (the other backends' Python bindings need torch)
RUNNERS = {"onnxruntime": onnxruntime_runner, "tvm": tvm_runner, "coreml": coreml_runner}
