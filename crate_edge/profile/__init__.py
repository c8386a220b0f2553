"""Per-block and per-op-kind latency of a compiled artifact from its runtime's own profiler,
beside the same blocks' numerical fidelity.

    report = crate_edge.profile.profile("artifacts/onnxruntime", batch=1, iters=20)
    print(report.table())
    report.write("out/profile")         # profile.json, profile.md, profile.png

The artifact is loaded with crate_edge.runtime.load (its files are verified first); `iters` runs
on `batch` real images of `data` then go through the runtime's own profiler, after `warmup` runs
outside it. Every time is per run, the mean over the faster half of the runs by the runtime's own
total: on a shared machine a preempted run is many times slower (measured: 0.46-0.5 ms runs
beside 5-17 ms ones), and one such run would dominate any kernel it hit. The report also gives the
mean over all runs and the median latency of the same artifact without the profiler.

What each runtime's profiler gives, and how kernels are attributed to blocks (the runtime's module
says more):
  onnxruntime  SessionOptions.enable_profiling: one `kernel_time` event per node per run, and per
               run `model_run`, the total; a node is attributed by the module path in the name
               scope of its exported node, fused and unscoped nodes by their neighbours in the
               graph (onnxruntime.py).
  executorch   ETDump read by executorch.devtools.Inspector: per run, Method::execute, each
               delegate call, each portable kernel and each XNNPACK operator. They carry no module
               path, so blocks come from the call order (below); a delegate call's time outside
               its operators is block "delegate" (executorch.py).
  tvm          the Relax VM's instrument hook: the wall time of every compiled kernel (PrimFunc)
               call in order, blocks from the call order; VM builtins, the VM's own time and the
               hook's are block "other" (tvm.py).
Call-order attribution (ExecuTorch, TVM; attribution.py): the last 2 * depth + 1 LayerNorms in
call order start layer0.mssa, layer0.ista, ..., layer{L-1}.ista and the head; everything before is
the embedding. The result is checked: exactly one softmax (or fused attention) in every MSSA block
and none elsewhere. Where that fails, nothing is guessed: kernels are reported under "delegate"
(XNNPACK) or "other" with their op kinds, and a note says why.

Op kinds, one vocabulary for every runtime (KINDS):
  embed, head        the embedding's and the classifier's kernels (other than the three below)
  mssa_projection    the qkv and output-projection GEMMs with their epilogues (bias, and the residual add
                     where it is fused in or, in call order, directly follows the projection)
  attention          w w^T, its scale, softmax and A w, or one fused Attention/SDPA kernel
  ista               the ISTA GEMM(s), ReLU and threshold
  layernorm          every LayerNorm (fused residual adds included)
  quant              QuantizeLinear/DequantizeLinear, XNNPACK Convert, TVM quantize_act, int8 casts
  layout             reshape, transpose, concat, slice, gather, pad, copies
  other              what is none of those (residual adds left unfused) and the runtime's remainder
Engines (ENGINES): int8 (integer-arithmetic kernels: MatMulIntegerToFloat, QGemm, QLinear*,
ConvInteger, XNNPACK QS8/QD8 operators, TVM qgemm_int8), quant (the conversions above), delegate
(float XNNPACK operators), float (float kernels the runtime runs itself), overhead (run time
outside every kernel). `outside_ms` is the float engine: time outside delegated and integer
kernels and their conversions.

Fidelity (with `fidelity`): crate_edge.parity.parity on `fidelity_images` images of `data`
against `reference`. A probe build gives, per layer l: on layer{l}.mssa the MSSA features
w_l = U^T LN1(Z^l) (mean cosine, and the relative coding-rate difference R^c, which is w_l's),
on layer{l}.ista its output z_l (mean cosine and ISTA support IoU); any build gives the logits
(mean cosine, top-1 agreement) on the head. Other builds: "not a probe build".

Limits: Core ML, TensorRT and AOTInductor artifacts are refused (their runtimes' profilers are
not driven here). GPU (CUDA) artifacts profile with a device synchronize around every kernel
(TVM) or through ORT's CUDA events, which this code has not been run with.

The package: this module is the entry point (profile(): load, run under the runtime's profiler,
attribute, keep the faster half of the runs); report.py holds Kernel and ProfileReport (table,
Markdown, JSON, chart); attribution.py the op kinds and the call-order segmentation;
onnxruntime.py, executorch.py and tvm.py each drive one runtime's profiler and class its kernels.
The runtimes themselves (onnx, onnxruntime, ExecuTorch, TVM) are imported only inside the
functions that drive them.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..data import open_inputs
from ..errors import CrateEdgeError
from ..family import config_from_dict
from ..manifest import read_manifest
from ..runtime import Runner, load
from .attribution import _segment, _unattributed
from .executorch import _profile_executorch
from .onnxruntime import _profile_onnxruntime
from .report import ENGINES, KINDS, NOT_PROBE, Kernel, ProfileReport
from .tvm import _profile_tvm, _tvm_class

__all__ = [
    "profile",
    "ProfileReport",
    "Kernel",
    "KINDS",
    "ENGINES",
    "PROFILED",
    "NOT_PROBE",
    "_segment",  # the call-order attribution and a TVM classifier, for tests/test_profile.py
    "_tvm_class",
]

PROFILED = ("onnxruntime", "executorch", "tvm")
_OVERHEAD = ("other", "other", "overhead")  # block, kind, engine of a remainder row


def profile(
    artifact,
    data: str = "embedded",
    batch: int = 1,
    iters: int = 20,
    threads: int | None = None,
    reference=None,
    fidelity: bool = True,
    fidelity_images: int = 64,
    warmup: int = 3,
    progress: bool = True,
) -> ProfileReport:
    """Profile `artifact` (a directory) with its runtime's profiler: `iters` runs on `batch` images
    of `data` (any crate_edge.data spec, test split; repeated when it holds fewer) after `warmup`
    runs; `threads` overrides the target's thread setting. With `fidelity`, the per-block fidelity
    against `reference` (a model path, a CRATE module, or None for the embedded model, which must
    then be the artifact's source) on `fidelity_images` images of `data`. See the module docstring."""
    for what, v, lo in (("batch", batch, 1), ("iters", iters, 1), ("warmup", warmup, 0), ("fidelity_images", fidelity_images, 1)):
        if not isinstance(v, int) or v < lo:
            raise CrateEdgeError(f"{what} must be an integer of at least {lo}, got {v!r}")
    path = Path(artifact)
    m = read_manifest(path)
    be = m["backend"]["name"]
    if be not in PROFILED:
        raise CrateEdgeError(
            f"cannot profile {m['target']['name']} ({be}) artifacts: crate-edge profile reads the profilers of "
            f"{', '.join(PROFILED)} only, not {_OTHER_PROFILERS.get(be, be)}'s"
        )
    runner = load(path, threads=threads)
    lo, hi = runner.batch_range
    if not lo <= batch <= hi:
        raise CrateEdgeError(f"batch {batch} is outside {path}'s batch range [{lo}, {hi}]")
    cfg = config_from_dict(m["source_model"]["config"])
    x = open_inputs(data, cfg, "test").first(batch).tensors()[0].numpy()
    if len(x) < batch:
        x = np.concatenate([x] * -(-batch // len(x)))[:batch]
    x = np.ascontiguousarray(x, dtype=np.float32)

    fid = _fidelity(runner, reference, data, fidelity_images, progress) if fidelity else None
    unprofiled = _unprofiled_ms(runner, x, warmup, iters)
    opts = m["target"]["definition"].get("options", {})
    n_threads = threads or opts.get("threads")
    tick, done = _progress(iters, f"profile {path.name}", progress)
    try:
        kernels, extra, totals, desc, notes = _PROFILERS[be](path, m, x, iters, warmup, n_threads, tick)
    finally:
        done()
    depth = int(cfg.depth)
    if be == "onnxruntime":
        attributed = True
        how = "module path of each node's name scope in the ONNX export (module docstring)"
    else:
        attributed = _segment(kernels, depth)
        if attributed:
            how = f"call order: the last {2 * depth + 1} LayerNorms start the layer blocks and the head (module docstring)"
        else:
            _unattributed(kernels, be)
            how = "none: call-order attribution did not verify"
            notes.append(
                f"could not attribute kernels to blocks by call order: expected {2 * depth + 1} LayerNorms from the end with one "
                f"softmax in each MSSA block; kernels are listed under {'delegate/other' if be == 'executorch' else 'other'}"
            )
    kernels += extra
    rest = _remainder_row(kernels, totals)
    if rest is not None:
        kernels.append(rest)
    # preemption (a busy machine, other processes' threads) inflates a few runs many-fold: every time
    # is the mean over the faster half of the runs by the runtime's own total
    used = sorted(np.argsort(totals, kind="stable")[: max(1, -(-iters // 2))].tolist())
    for k in kernels:
        k.us = float(sum(k.per_run[i] for i in used))
    if rest is not None:
        # block other holds the profiler's own cost too (TVM's Python hook runs around every VM
        # instruction): the unprofiled latency bounds what really lies outside the kernels
        inside = sum(k.us for k in kernels if k is not rest) / 1e3 / len(used)
        notes.append(
            f"the kernels' times sum to {inside:.3f} ms per run and the run without the profiler takes {unprofiled:.3f} ms, "
            f"so about {max(0.0, unprofiled - inside):.3f} ms of it lies outside every kernel; the rest of block other "
            f"({rest.us / 1e3 / len(used):.3f} ms) is the profiler's own cost"
        )
    if fid is not None and not fid["probe"]:
        notes.append(NOT_PROBE)
    return ProfileReport(
        artifact=str(path),
        target=m["target"]["name"],
        backend=be,
        executor=f"{runner.executor}" + (f" ({runner.detail})" if runner.detail else ""),
        batch=batch,
        iters=iters,
        runs_used=len(used),
        threads=n_threads,
        profiler=desc,
        total_ms=float(sum(totals[i] for i in used)) / 1e3 / len(used),
        all_runs_ms=float(sum(totals)) / 1e3 / iters,
        unprofiled_ms=unprofiled,
        kernels=kernels,
        depth=depth,
        attribution=how,
        attributed=attributed,
        notes=notes,
        fidelity=fid,
    )


_OTHER_PROFILERS = {"coreml": "Core ML (Xcode Instruments)", "tensorrt": "TensorRT (trtexec/nsys)", "aoti": "AOTInductor (torch.profiler)"}


def _remainder_row(kernels: list[Kernel], totals: list[float]) -> Kernel | None:
    """Per run, the runtime's total minus its kernels: block other, kind other, engine overhead."""
    rest = [max(0.0, t - sum(k.per_run[i] for k in kernels)) for i, t in enumerate(totals)]
    if not any(rest):
        return None
    b, kd, e = _OVERHEAD
    return Kernel("(run time outside every kernel)", "runtime", "other", e, per_run=rest, block=b, kind=kd)


def _progress(iters: int, desc: str, on: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    if not on:
        return (lambda: None), (lambda: None)
    try:
        from tqdm import tqdm

        bar = tqdm(total=iters, desc=desc, unit="run", file=sys.stderr, leave=False, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        return (lambda: bar.update(1)), bar.close
    except ImportError:
        print(f"{desc}: {iters} runs", file=sys.stderr)
        return (lambda: None), (lambda: None)


def _unprofiled_ms(runner: Runner, x: np.ndarray, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        runner.outputs(x)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.outputs(x)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def _fidelity(runner: Runner, reference, data: str, limit: int, progress: bool) -> dict:
    from ..parity import parity

    rep = parity([runner], reference=reference, data=data, limit=limit, progress=progress)
    r = rep.results[0]
    keys = ("layer", "z_cos_mean", "w_cos_mean", "support_iou_mean", "coding_rate_rel", "z_sqnr_db", "w_sqnr_db")
    return {
        "data": rep.data,
        "n": rep.n,
        "reference": rep.reference["name"],
        "probe": r.probe,
        "logits": {k: r.logits[k] for k in ("mean_cosine", "min_cosine", "top1_agreement", "max_abs") if k in r.logits},
        "layers": None if r.layers is None else [{k: d[k] for k in keys} for d in r.layers],
        "note": None if r.probe else NOT_PROBE,
    }


_PROFILERS = {"onnxruntime": _profile_onnxruntime, "executorch": _profile_executorch, "tvm": _profile_tvm}
