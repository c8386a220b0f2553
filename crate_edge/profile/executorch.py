"""ExecuTorch: the ExecuTorch runtime with ETDump on (Runtime.load_program(enable_etdump=True)),
read back with executorch.devtools.Inspector: Method::execute per run, each DELEGATE_CALL, each
portable kernel (native_call_*), and, because this XNNPACK build profiles its operators, one event
per XNNPACK operator in execution order, named by XNNPACK ("Fully Connected (NC, F32) GEMM #3").
They carry no module path (XNNPACK names its operators, not the graph's debug handles, and an
artifact ships no ETRecord), so blocks come from the call order (attribution.py), once
crate_edge.rewrites.LinearLayerNorm's nine XNNPACK operators (FC mean, subtract, square, FC
variance, add eps, rsqrt, multiply, multiply weight, add bias), found by their rsqrt, are marked
as a LayerNorm. XNNPACK's operator timer ticks in whole microseconds; the difference between each
delegate call and its operators' sum is listed as block "delegate".

Op classes: XNNPACK operators by name (_xnnpack_class: QS8/QD8/... operators are int8, Convert is
quant, the rest delegate), portable kernels by their op (_portable_class).
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..errors import CrateEdgeError
from .report import Kernel, float_kernel_class

_XNN_INT8 = re.compile(r"\b(QS8|QD8|QC8|QU8|QP8|QC4|QB4)\b")


def _xnnpack_class(name: str) -> tuple[str, str]:
    """(class, engine) of an XNNPACK operator from its name, e.g. 'Fully Connected (NC, QD8, F32, QC8W) GEMM #2'."""
    base = name.split(" #")[0]
    if base.startswith(("Convert", "Quantize", "Dequantize")):
        return "quant", "quant"
    engine = "int8" if _XNN_INT8.search(base) else "delegate"
    if base.startswith(("Fully Connected", "Batch Matrix Multiply", "Convolution", "Deconvolution", "Dynamic Fully Connected")):
        return "gemm", engine
    if base.startswith("Softmax"):
        return "softmax", engine
    if "Layer Norm" in base or "LayerNorm" in base:
        return "layernorm", engine
    if base.startswith(("Static Reshape", "Transpose", "Constant Pad", "Copy", "Concatenate", "Slice", "Static Slice", "Even Split")):
        return "layout", engine
    return "elementwise", engine


def _portable_class(op: str) -> tuple[str, str]:
    """(class, engine) of an ExecuTorch portable kernel (native_call_<op>.<overload>)."""
    s = op.split(".")[0].lower()
    if c := float_kernel_class(s):
        return c
    if s in ("mm", "bmm", "addmm", "linear", "convolution", "matmul"):
        return "gemm", "float"
    if re.sub(r"_copy$", "", s) in ("view", "permute", "select", "slice", "expand", "cat", "unsqueeze", "squeeze", "clone", "transpose"):
        return "layout", "float"
    if s in ("cat", "constant_pad_nd", "index_select", "gather", "split_with_sizes"):
        return "layout", "float"
    return "elementwise", "float"


def _xnnpack_layernorms(ks: list[Kernel]) -> None:
    """Mark crate_edge.rewrites.LinearLayerNorm's nine XNNPACK operators (mean FC, subtract,
    square, variance FC, add eps, rsqrt, multiply, multiply weight, add bias) as LayerNorms."""
    for r, k in enumerate(ks):
        if not k.op.startswith("Reciprocal Square Root") or r < 5 or r + 3 >= len(ks):
            continue
        if ks[r - 5].cls == "gemm" and ks[r - 4].op.startswith("Subtract") and ks[r - 2].cls == "gemm":
            for j in range(r - 5, r + 4):
                ks[j].cls = "layernorm"
            ks[r - 5].ln_start = True


def _profile_executorch(path: Path, m: dict, x: np.ndarray, iters: int, warmup: int, threads, tick):
    import torch
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    from ..backends.executorch import PROGRAM, set_threads

    if threads:
        set_threads(int(threads))
    rt = Runtime.get()
    # From bytes, as the backend's runner loads it (by path, a delegated program crashes in 1.5.1)
    program = rt.load_program((path / PROGRAM).read_bytes(), enable_etdump=True)
    method = program.load_method("forward")
    inp = [torch.from_numpy(x)]
    for _ in range(warmup):
        method.execute(inp)
    for _ in range(iters):
        method.execute(inp)
        tick()
    with tempfile.TemporaryDirectory(prefix="crate-edge-profile-") as td:
        etdp = Path(td) / "run.etdp"
        program.write_etdump_result_to_file(str(etdp), str(Path(td) / "debug.bin"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Output Buffer not found": no debug buffer was asked for
            insp = Inspector(etdump_path=str(etdp))
    blocks = [eb for eb in insp.event_blocks if eb.name == "Execute"]
    if not blocks:
        raise CrateEdgeError("the ExecuTorch ETDump holds no Execute events (a runtime built without the event tracer?)")
    events = blocks[0].events
    n_runs = warmup + iters

    def last(ev) -> list[float]:  # ms per run, the profiled runs only
        raw = list(ev.perf_data.raw) if ev.perf_data is not None else []
        if len(raw) != n_runs:
            raise CrateEdgeError(f"ETDump event {ev.name!r} has {len(raw)} samples for {n_runs} runs")
        return raw[-iters:]

    ks: list[Kernel] = []
    totals = np.zeros(iters)
    delegate = np.zeros(iters)
    zeros = samples = 0
    for ev in events:
        if ev.perf_data is None:
            continue
        if ev.name == "Method::execute":
            totals += 1e3 * np.array(last(ev))
        elif ev.name == "DELEGATE_CALL":
            delegate += 1e3 * np.array(last(ev))
        elif ev.is_delegated_op:
            vals = [1e3 * v for v in last(ev)]
            zeros += sum(1 for v in vals if v == 0)
            samples += len(vals)
            ks.append(Kernel(ev.name, ev.name.split(" #")[0], *_xnnpack_class(ev.name), per_run=vals))
        elif ev.name.startswith("native_call_"):
            op = ev.name[len("native_call_") :]
            ks.append(Kernel(ev.name, op, *_portable_class(op), per_run=[1e3 * v for v in last(ev)]))
    if not totals.any():
        raise CrateEdgeError("the ExecuTorch ETDump holds no Method::execute events")
    _xnnpack_layernorms(ks)
    in_ops = np.array([sum(k.per_run[i] for k in ks if not k.name.startswith("native_call_")) for i in range(iters)])
    rest = np.maximum(0.0, delegate - in_ops)
    notes = []
    if delegate.any() and samples:
        notes.append(
            f"XNNPACK's operator timer ticks in whole microseconds ({zeros} of {samples} operator samples read 0); "
            "the part of each delegate call outside its operators' events is block delegate"
        )
    elif delegate.any():
        notes.append("the XNNPACK delegate reported no per-operator events: its time is block delegate, not split by layer")
    extra = []
    if rest.any():  # block "delegate" whatever the attribution: it is no operator's
        extra.append(
            Kernel("(XNNPACK delegate time outside its operator events)", "DELEGATE_CALL", "other", "overhead", per_run=rest.tolist())
        )
        extra[-1].block = "delegate"
    from executorch.version import __version__ as et_version

    desc = f"ExecuTorch {et_version} ETDump (Runtime.load_program(enable_etdump=True)) read by executorch.devtools.Inspector"
    return ks, extra, totals.tolist(), desc, notes
