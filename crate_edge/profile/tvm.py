"""TVM: the Relax VM's instrument hook (VirtualMachine.set_instrument, called before and after
every Call instruction; TVM 0.27 has no VM profiler): the wall time of every compiled kernel
(PrimFunc) call in order, attributed to blocks by call order (attribution.py). VM builtins
(allocation, shape checks, views) are not kernels; their time, the VM's own and the hook's are the
remainder (block "other"). Each timed call includes the hook's own cost (reported in the notes as
the fastest builtin call timed the same way), so the profiled total is above the unprofiled
latency, which the report gives beside it. On CUDA the device is synchronized around every call.

Op classes (_tvm_class) come from the PrimFunc's name: fused_matmul1_add2_relu1_prepacked is a
float GEMM, a qgemm an int8 one (mssa_attention_int8 int8 attention), a name made of layout tokens only is layout.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from ..errors import CrateEdgeError
from ..runtimes import TVM_LIBRARY
from .report import Kernel, float_kernel_class

_LAYOUT_TOKENS = frozenset(
    "reshape transpose permute concatenate concat cat strided slice take gather broadcast to squeeze unsqueeze expand dims copy split view select pad flatten layout transform".split()
)


def _tvm_class(sym: str) -> tuple[str, str]:
    """(class, engine) of a TVM kernel from its PrimFunc name, e.g. fused_matmul1_add2_relu1_prepacked."""
    s = sym.lower()
    if "qgemm" in s:
        return "gemm", "int8"
    if "attention_int8" in s:  # attention.py's int8 kernel (both products on vpdpbusd)
        return "attention", "int8"
    if c := float_kernel_class(s):  # "dequantize" contains "quantize"
        return c
    if re.search(r"matmul|dense|gemm|conv", s):
        return "gemm", "float"
    tokens = [re.sub(r"\d+$", "", t) for t in s.split("_")]
    # one-letter tokens are shape tags (permute_pad_n197_h6_d64: the attention's packed keys)
    tokens = [t for t in tokens if len(t) > 1 and t not in ("fused", "prepacked")]
    if tokens and all(t in _LAYOUT_TOKENS for t in tokens):
        return "layout", "float"
    return "elementwise", "float"


def _profile_tvm(path: Path, m: dict, x: np.ndarray, iters: int, warmup: int, threads, tick):
    import tvm

    from ..runtimes import tvm_vm_runner

    device = m["backend"].get("device", "cpu")
    run = tvm_vm_runner(path / TVM_LIBRARY, device, threads)  # the project's VM (threads, library lifetime)
    vm = run._keep[1]
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    sync = dev.sync if device == "cuda" else None
    main = vm["main"]
    inp = tvm.runtime.tensor(x, dev)
    for _ in range(warmup):
        main(inp)
    clock = time.perf_counter_ns
    calls: list[tuple[str, int]] = []
    t0 = [0]

    def hook(func, sym, before, ret, *args):
        if before:
            if sync is not None:
                sync()
            t0[0] = clock()
        else:
            if sync is not None:
                sync()
            calls.append((str(sym), clock() - t0[0]))
        return 0

    vm.set_instrument(hook)
    seqs, totals = [], []
    try:
        for _ in range(iters):
            calls.clear()
            a = clock()
            main(inp)
            if sync is not None:
                sync()
            totals.append((clock() - a) / 1e3)
            seqs.append(list(calls))
            tick()
    finally:
        vm.set_instrument(lambda *a: 0)
    builtins = [ns for seq in seqs for s, ns in seq if s.startswith("vm.builtin.")]
    kern = [[(s, ns) for s, ns in seq if not s.startswith("vm.builtin.")] for seq in seqs]
    if any([s for s, _ in k] != [s for s, _ in kern[0]] for k in kern):
        raise CrateEdgeError("the Relax VM called different kernels on identical runs; cannot aggregate them by call order")
    ks = []
    for i, (sym, _) in enumerate(kern[0]):
        ks.append(Kernel(sym, re.sub(r"\d+(_prepacked)?$", "", sym), *_tvm_class(sym), per_run=[k[i][1] / 1e3 for k in kern]))
    notes = []
    if builtins:
        notes.append(
            f"each timed TVM call includes the instrument hook's own cost, about {min(builtins) / 1e3:.2f} us "
            f"(the fastest VM builtin call timed the same way); {len(kern[0])} kernel calls per run"
        )
    desc = f"TVM {tvm.__version__} Relax VM instrument hook (VirtualMachine.set_instrument), wall time per kernel call ({device})"
    return ks, [], totals, desc, notes
