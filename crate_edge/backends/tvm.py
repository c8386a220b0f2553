"""Apache TVM (Relax): torch.export -> Relax (from_exported_program, dynamic batch kept) -> one
shared library run by the Relax VM, for a CPU (llvm) or a CUDA target.

TVM's default CPU pipeline schedules nothing (measured ~30x slower than eager), and
this wheel's dlight CPU rules have no matmul. So the CPU build schedules every kernel itself:

  * every matmul (linear layers and both attention matmuls) as a register-tiled GEMM: a 6x16
    micro-kernel (12 AVX2 accumulators), B packed into 16-column panels, epilogues (bias, ReLU,
    residual) fused into the tile write-back, tiles in parallel; constant weights are packed
    once at compile time (SplitLayoutRewritePreproc + FoldConstant), not on every call;
  * softmax and LayerNorm row by row (dlight's CPU Reduction, minus the predicated vector splits
    TVM would scalarise), with softmax's exp as a polynomial LLVM can vectorise (topi.fast_exp);
  * the llvm target gets fast-math-reassoc/nsz unless it says otherwise, so LLVM vectorises the
    row reductions (sums in a different order; no NaN/Inf assumptions).

Reduced precision (target tvm-int8, [quantize] scheme = "int8", llvm with AVX2): the quantization
policy's site GEMMs become hand-written int8 x int8 -> int32 kernels (vpmaddwd), see "reduced
precision" below; the rest of the program is the fp32 build above.

MetaSchedule tuning is optional on top (options tune_trials, tuning_db); its records only replace
a kernel's default schedule where they measured faster.

Options (target.options):
  target       TVM target as a table, e.g. {kind = "llvm", mcpu = "native"} ("native": this CPU)
               or {kind = "cuda", arch = "sm_90"}; TVM 0.27 rejects the old string form
  tune_trials  MetaSchedule trials on this machine (0: none; needs input.dynamic_batch = false)
  tuning_db    a MetaSchedule database directory to reuse (its records are copied into the
               artifact's tuning_db/, where new records are also written)
  threads      runtime threads (default: TVM's, one per core)
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..calibration import feed_site_inputs
from ..errors import BackendUnavailable, CrateEdgeError
from ..runtimes import TVM_LIBRARY, tvm_vm_runner
from .base import Backend, Compiled

LIBRARY = TVM_LIBRARY
CPU_TWIN = "model_cpu_reference.so"  # cuda builds on a GPU-less host: the same Relax module for llvm
TUNING_DB = "tuning_db"
MR, NR = 6, 16  # GEMM micro-kernel: MR rows x NR columns of accumulators (12 ymm registers)
ROW_BLOCK = 16  # micro-kernels per parallel row block (96 rows)


def _say(msg: str) -> None:
    print(f"[tvm] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ targets


def make_target(spec):
    """tvm.target.Target from the target table; llvm mcpu "native" becomes this CPU's name."""
    import tvm
    from tvm.target import codegen

    if not isinstance(spec, dict) or "kind" not in spec:
        raise CrateEdgeError(
            f'tvm: options.target must be a table such as {{kind = "llvm", mcpu = "native"}}, got {spec!r} '
            "(TVM 0.27 rejects target strings)"
        )
    spec = dict(spec)
    host = spec.pop("host", None)
    if spec["kind"] == "llvm":
        if spec.get("mcpu") == "native":
            spec["mcpu"] = codegen.llvm_get_system_cpu()
        # lets LLVM vectorise the LayerNorm/softmax row sums; the GEMMs are vectorised by hand
        spec.setdefault("fast-math-reassoc", True)
        spec.setdefault("fast-math-nsz", True)
    elif host is None:
        host = {"kind": "llvm"}
    try:
        return tvm.target.Target(spec, host=host) if host else tvm.target.Target(spec)
    except Exception as e:  # TVM's message names the bad key
        raise CrateEdgeError(f"tvm: invalid target {spec}: {str(e).splitlines()[0]}") from None


# ------------------------------------------------------------------ CPU schedules


def _softmax_legalize(bb, call):
    """softmax with topi.fast_exp: the default te.exp becomes a scalar expf call per element."""
    from tvm import topi

    axis = int(call.attrs.axis)

    def f(x):
        e = topi.fast_exp(topi.subtract(x, topi.max(x, axis=axis, keepdims=True)))
        return topi.divide(e, topi.sum(e, axis=axis, keepdims=True))

    return bb.call_te(f, call.args[0], primfunc_name_hint="softmax")


def _take_clip(bb, call):
    """take with bounds clipping: the importer's "fast" mode makes TVM warn that out-of-bounds
    indices segfault (CRATE only takes the cls token, index 0)."""
    from tvm import topi

    return bb.call_te(topi.take, call.args[0], call.args[1], call.attrs.axis, mode="clip")


def legalize_map(target) -> dict:
    m = {"relax.take": _take_clip}
    if target.kind.name == "llvm":
        m["relax.nn.softmax"] = _softmax_legalize
    return m


def _try(f, *args) -> bool:
    try:
        f(*args)
        return True
    except Exception:  # a schedule primitive that does not apply leaves the schedule unchanged
        return False


def cpu_rules():
    """dlight-style schedule rules for the llvm target, tried in order per PrimFunc."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.base import get_extent
    from tvm.s_tir.dlight.gpu.matmul import get_index_map, get_reduction_blocks

    class GEMM(dl.ScheduleRule):
        """C[S, I, J] += A[S, I, K] * B[S, J, K] (any matmul after normalisation), I padded to
        MR and J to NR; loops (S, I/96, J/NR) parallel, then I/MR, K, MR unrolled, NR vector."""

        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            red = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
            if red is None or get_index_map(sch.get(red[0])) is None:
                return None
            try:
                return self._schedule(sch, red[0], func)
            except Exception:  # a matmul-like kernel this template does not fit stays as it was
                return None

        def _schedule(self, sch, main, func):
            a_re = sch.reindex(main, ("read", 0))
            b_re = sch.reindex(main, ("read", 1))
            rc = sch.reindex(main, ("write", 0))
            mm, am, bm, cm = get_index_map(sch.get(main))
            sch.transform_layout(a_re, ("write", 0), am)
            sch.transform_layout(b_re, ("write", 0), bm)
            sch.transform_layout(rc, ("read", 0), cm)
            sch.transform_block_layout(main, mm)
            sch.pad_einsum(main, [1, MR, NR, 1])
            for p in sch.get_producers(main):  # one copy per operand: reindex folded into the pad
                for q in sch.get_producers(p):
                    _try(sch.compute_inline, q)
            # B as [S, J/NR, K, NR]: the micro-kernel reads NR contiguous floats per k
            sch.transform_layout(main, ("read", 1), lambda s, j, k: (s, j // NR, k, j % NR))
            bsrc = sch.get(main).reads[1].source
            bp = next(p for p in sch.get_producers(main) if sch.get(p).writes[0].source.same_as(bsrc))
            j, k = sch.get_loops(bp)[-2:]
            jo, ji = sch.split(j, [None, NR])
            sch.reorder(jo, k, ji)
            sch.vectorize(ji)
            free = [func.params[int(i)] for i in (func.attrs.get("layout_free_buffers", []) if func.attrs else [])]
            srcs = [r.source for r in sch.get(bp).reads]
            if len(srcs) == 1 and any(srcs[0].same_as(p) for p in free):
                # a constant weight: SplitLayoutRewritePreproc + FoldConstant pack it at compile time
                sch.annotate(bp, "meta_schedule.layout_rewrite_preproc", True)
            # consumers: pad removal, reindex and the elementwise epilogue become one write-back
            wb = sch.get_consumers(main)[0]
            while True:
                cs = sch.get_consumers(wb)
                if not cs or not _try(sch.reverse_compute_inline, cs[0]):
                    break
            s, i, j, k = sch.get_loops(main)
            io, im, ii = sch.split(i, [None, ROW_BLOCK, MR])
            jo, ji = sch.split(j, [None, NR])
            sch.reorder(s, io, jo, im, k, ii, ji)
            # "global" scope: a small buffer LLVM keeps in registers ("local" gets a heap workspace)
            acc = sch.cache_write(main, 0, "global")
            sch.reverse_compute_at(acc, im, preserve_unit_loops=True)
            sch.reverse_compute_at(wb, im, preserve_unit_loops=True)
            sch.parallel(sch.fuse(s, io, jo))  # many chunks, so threads stay balanced at batch 1
            sch.unroll(ii)
            sch.vectorize(ji)
            sch.decompose_reduction(main, k)
            for b in (acc, wb):
                _try(sch.vectorize, sch.get_loops(b)[-1])
            return sch

    class RowReduction(dl.cpu.Reduction):
        """dlight's CPU Reduction (rows in parallel, each stage computed per row), except that
        inner loops the vector width does not divide stay plain loops for LLVM to vectorise:
        a split there leaves a predicate, and TVM scalarises predicated vector loops."""

        @staticmethod
        def _vectorize_inner(sch, block_rv, vec_lanes):
            loops = sch.get_loops(block_rv)
            if len(loops) > 1:
                ext = get_extent(sch, loops[-1])
                if isinstance(ext, int) and ext % vec_lanes == 0:
                    sch.vectorize(sch.split(loops[-1], [None, vec_lanes])[1])

        @staticmethod
        def _unroll_reduction_inner(sch, block_rv, vec_lanes):
            pass  # LLVM vectorises the row sums (fast-math-reassoc)

    return [GEMM(), dl.cpu.GEMV(), RowReduction()]


# ------------------------------------------------------------------ MetaSchedule


def _ms_target(target):
    import tvm

    if target.kind.name != "llvm":
        return target
    cfg = dict(target.export())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cfg.setdefault("num-cores", cores)  # MetaSchedule requires it on CPUs
    for k in ("keys", "tag", "host"):
        cfg.pop(k, None)
    return tvm.target.Target(cfg)


def _import_tensor_intrin():
    """TuneContext imports tvm.s_tir.tensor_intrin, which parses hundreds of TVMScript functions,
    each calling inspect.stack(); that resolves every frame's module through a scan of sys.modules
    (~100 s of CPU here). A stack built straight from the frames gives the parser the same
    frames and source lines in a few seconds."""
    import inspect
    import linecache

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return

    def fast_stack(context=1):
        out, f = [], sys._getframe(1)
        while f is not None:
            fn, ln = f.f_code.co_filename, f.f_lineno
            line = linecache.getline(fn, ln) if context else ""
            out.append(inspect.FrameInfo(f, fn, ln, f.f_code.co_name, [line] if line else None, 0 if line else None))
            f = f.f_back
        return out

    orig, inspect.stack = inspect.stack, fast_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = orig


def _measure(sch, target) -> list[float] | None:
    """Run secs of one scheduled kernel on random inputs, timed as MetaSchedule's LocalRunner
    times its trials (3 runs per repeat, at least 100 ms), but in this process: a runner worker
    would first spend tens of seconds importing TVM."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    try:
        with tvm.transform.PassContext(opt_level=3, config={"s_tir.LoopPartition": {"partition_const_loop": True}}):
            lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target=target).jit()
        rng = np.random.default_rng(0)
        args = [
            tvm.runtime.tensor(rng.uniform(size=[int(d) for d in a.shape]).astype(a.dtype))
            for a in ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])
        ]
        return [float(lib.time_evaluator("main", tvm.cpu(), number=3, repeat=1, min_repeat_ms=100)(*args).mean)]
    except Exception:  # a kernel we cannot time keeps MetaSchedule's record
        return None


def tune(mod, target, trials: int, db_dir: Path, reuse: Path | None, rules) -> dict:
    """MetaSchedule over the fused module's kernels, records in db_dir (a JSON database).

    Kernels already in the database (copied from `reuse`) are not tuned again. The budget goes to
    the heaviest kernels first (FLOPs x occurrences). For every kernel tuned here our default
    schedule is measured the same way and recorded too, so applying the database keeps whichever
    is faster. Returns a summary for the manifest."""
    from tvm.s_tir import meta_schedule as ms

    db_dir.mkdir(parents=True, exist_ok=True)
    if reuse is not None:
        for f in ("database_workload.json", "database_tuning_record.json"):
            if not (reuse / f).is_file():
                raise CrateEdgeError(f"tvm: tuning_db {reuse} has no {f} (expected a MetaSchedule JSON database directory)")
            shutil.copyfile(reuse / f, db_dir / f)
    db = ms.database.JSONDatabase(work_dir=str(db_dir))
    mst = _ms_target(target)
    tasks = ms.relax_integration.extract_tasks(mod, mst)
    todo = [t for t in tasks if not db.has_workload(t.dispatched[0])]
    summary = {"tasks": len(tasks), "reused": len(tasks) - len(todo), "trials": trials, "tuned": 0}
    if trials > 0 and todo:
        summary.update(_run_tuning(db, mst, todo, trials, db_dir, rules, summary["reused"]))
    wdb = winners(db_dir, target)
    summary["kernels_from_metaschedule"] = sum(wdb.has_workload(t.dispatched[0]) for t in tasks)
    return summary


def _run_tuning(db, mst, todo, trials: int, db_dir: Path, rules, reused: int) -> dict:
    """Tune `todo` into `db`, then record our default schedule of each tuned kernel beside it."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import analysis
    from tvm.s_tir import meta_schedule as ms

    def cost(t):
        try:
            return analysis.estimate_tir_flops(t.dispatched[0]) * t.weight
        except Exception:
            return 0.0

    todo.sort(key=cost, reverse=True)
    _import_tensor_intrin()
    logs = db_dir.parent / ".tvm_tuning_logs"  # MetaSchedule's logs stay out of the artifact
    # few trials: random replay (the evolutionary search's cost model has nothing to learn from)
    strategy = "replay-trace" if trials < 128 else "evolutionary"
    _say(f"MetaSchedule ({strategy}): {trials} trials over {len(todo)} kernels, heaviest first ({reused} kernels reused from the database)")
    # MetaSchedule logs every step to stdout; our progress lines on stderr replace that
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    level = ms_log.level
    ms_log.setLevel(logging.ERROR)
    try:
        ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(todo, work_dir=str(logs), strategy=strategy, num_threads=1)
        # each build starts a worker that imports TVM (and its tensor intrinsics: see above)
        builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=600, initializer=_import_tensor_intrin)
        runner = ms.runner.LocalRunner(timeout_sec=600)
        seen = {"n": 0, "t0": time.time()}

        @derived_object
        class Progress(ms.measure_callback.PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                for r in runner_results:
                    seen["n"] += 1
                    ok = r.run_secs and not r.error_msg
                    t = f"{1e3 * float(np.mean([float(s) for s in r.run_secs])):.3f} ms" if ok else "failed"
                    _say(f"trial {seen['n']}/{trials} {ctxs[task_id].task_name}: {t} ({time.time() - seen['t0']:.0f} s)")

        ms.tune_tasks(
            tasks=ctxs,
            task_weights=weights,
            work_dir=str(logs),
            max_trials_global=trials,
            num_trials_per_iter=min(64, trials),
            builder=builder,
            runner=runner,
            database=db,
            measure_callbacks=list(ms.measure_callback.MeasureCallback.create("default")) + [Progress()],
        )
    finally:
        ms_log.setLevel(level)
        shutil.rmtree(logs, ignore_errors=True)
    # our default schedule for the kernels tuned here, recorded next to MetaSchedule's best
    kernels, tuned = {}, 0
    for t in todo:
        m = t.dispatched[0]
        if not db.has_workload(m):
            continue
        tuned += 1
        wl = db.commit_workload(m)
        best = db.get_top_k(wl, 1)
        ms_s = float(np.mean([float(x) for x in best[0].run_secs])) if best and best[0].run_secs else None
        ms_ok = ms_s is not None and ms_s < 1e9  # failed trials are recorded as 1e10 s
        sch = next((s for s in (r.apply(m["main"], mst, False) for r in rules) if s is not None), None)
        mine = _measure(sch, mst) if sch is not None else None
        if mine is not None:
            db.commit_tuning_record(ms.database.TuningRecord(sch.trace, wl, mine, mst, ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])))
        d_s = float(np.mean(mine)) if mine else None
        kernels[t.task_name] = {
            "metaschedule_ms": round(1e3 * ms_s, 4) if ms_ok else None,
            "default_ms": round(1e3 * d_s, 4) if d_s else None,
            "kept": "metaschedule" if ms_ok and (d_s is None or ms_s < d_s) else "default",
        }
    _say(
        f"MetaSchedule: {sum(k['kept'] == 'metaschedule' for k in kernels.values())} of {len(kernels)} tuned kernels "
        "beat the default schedule"
    )
    return {"tuned": tuned, "kernels": kernels}


def winners(db_dir: Path, target):
    """An in-memory database of the kernels where a MetaSchedule record is the fastest (for this
    kind of device). Where our
    default schedule's own record wins, the kernel is left to the default rules, which also pack
    constant weights at compile time (a replayed trace would pack them on every call)."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    src = ms.database.JSONDatabase(work_dir=str(db_dir))
    out = ms.database.MemoryDatabase()
    rules = cpu_rules() if target.kind.name == "llvm" else []
    seen = set()
    for rec in src.get_all_tuning_records():
        key = tvm_ffi.structural_hash(rec.workload.mod)
        if key in seen:
            continue
        seen.add(key)
        best = src.get_top_k(rec.workload, 1)
        if not best or not best[0].run_secs or min(float(x) for x in best[0].run_secs) >= 1e9:
            continue  # only failed trials (MetaSchedule records those as 1e10 s)
        if best[0].target is not None and best[0].target.kind.name != target.kind.name:
            continue  # a schedule for another kind of device
        func = rec.workload.mod["main"]
        mine = next((sc for sc in (r.apply(func, target, False) for r in rules) if sc is not None), None)
        if mine is not None and str(mine.trace) == str(best[0].trace):
            continue
        wl = out.commit_workload(rec.workload.mod)
        out.commit_tuning_record(ms.database.TuningRecord(best[0].trace, wl, best[0].run_secs, best[0].target, best[0].args_info))
    return out


# ------------------------------------------------------------------ reduced precision (CPU)
#
# [quantize] scheme = "int8" on the llvm target: the plan's site GEMMs (crate_edge.quantize
# policy) become int8 x int8 -> int32 GEMMs; everything else stays in the fp32 pipeline above.
# Measured on this AVX2 CPU (AMD EPYC, no VNNI/AVX512, 197x384x384, one core): our vpmaddwd
# kernel 0.63 ms against 1.02 ms for the fp32 GEMM schedule; the same kernel template with int8
# weights dequantized in the loop (weight-only) or fp16 weights (F16C) took 1.04-1.16 ms: at
# 197 rows a GEMM is compute-bound, so halving weight bytes buys nothing.
#
# Per site: activations per tensor (static scale, calibrated on plan.calibration), quantized to
# int16 pairs holding int8 values (one small elementwise kernel); weights per output channel
# (int8, packed at compile time as [N/16, K/2, 16 columns x 2 k]); the micro-kernel (6 rows x 16
# columns, 12 int32 ymm accumulators) sign-extends 16 weights (vpmovsxbw), broadcasts a pair of
# activations and multiplies with vpmaddwd (16 products summed pairwise into 8 int32 lanes; exact,
# unlike vpmaddubsw, which saturates int16); the int32 tile is dequantized (x s_a * s_w[n]) as it
# is written back. The bias add, residual add, ReLU/threshold, LayerNorm and softmax stay float.

QUANT_SCHEMES = {"int8": "int8 weights (per channel) x int8 activations (per tensor, static) -> int32, AVX2 vpmaddwd"}
QMR, QRB = 6, 16  # int8 micro-kernel rows, micro-kernels per parallel row block
HANDWRITTEN = "crate_edge.handwritten"  # PrimFunc attribute: a kernel written as loops, not blocks


def _qgemm_int8(K: int, N: int, name: str):
    """TIR: C[m, NPAD] = float(A @ W^T) * s. A: int32 [m, K/2] (pairs of int16 holding int8
    values), W: int8 [NPAD/16, K/2, 32], s: float32 [NPAD]. Rows in parallel blocks of QRB*QMR
    (x NPAD/16 column panels); the last rows of a block run a one-row kernel."""
    from tvm.script import tirx as T

    NP, KP, mr, rb = (N + 15) // 16, K // 2, QMR, QRB
    NPAD = NP * 16
    PMADD = "llvm.x86.avx2.pmadd.wd"

    @T.macro
    def tile(acc, A, W, s, C, i0, p, rows):
        for r in T.unroll(rows):
            for h in T.unroll(2):
                acc[T.ramp(r * 16 + h * 8, 1, 8)] = T.broadcast(T.int32(0), 8)
        for kp in range(KP):
            for r in T.unroll(rows):
                for h in T.unroll(2):
                    acc[T.ramp(r * 16 + h * 8, 1, 8)] = acc[T.ramp(r * 16 + h * 8, 1, 8)] + T.call_llvm_pure_intrin(
                        "int32x8",
                        PMADD,
                        T.reinterpret("int16x16", T.broadcast(A[i0 + r, kp], 8)),
                        T.cast(W.vload([p, kp, h * 16], "int8x16"), "int16x16"),
                    )
        for r in T.unroll(rows):
            for h in T.unroll(2):
                C[i0 + r, T.ramp(p * 16 + h * 8, 1, 8)] = T.cast(acc[T.ramp(r * 16 + h * 8, 1, 8)], "float32x8") * s.vload(
                    [p * 16 + h * 8], "float32x8"
                )

    @T.prim_func(s_tir=True)
    def qgemm(a: T.handle, W: T.Buffer((NP, KP, 32), "int8"), s: T.Buffer((NPAD,), "float32"), c: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "global_symbol": name, HANDWRITTEN: True})
        m = T.int64()
        A = T.match_buffer(a, (m, KP), "int32")
        C = T.match_buffer(c, (m, NPAD), "float32")
        # Relax's SplitLayoutRewritePreproc wants every kernel as a root block holding a compute block
        with T.sblock("root"):
            with T.sblock("qgemm"):
                T.reads(A[0:m, 0:KP], W[0:NP, 0:KP, 0:32], s[0:NPAD])
                T.writes(C[0:m, 0:NPAD])
                for t in T.parallel((m + rb * mr - 1) // (rb * mr) * NP):
                    acc = T.alloc_buffer((mr * 16,), "int32")  # per task: 12 ymm accumulators
                    for it in range(rb):
                        i0 = t // NP * (rb * mr) + it * mr
                        if i0 + mr <= m:
                            tile(acc, A, W, s, C, i0, t % NP, mr)
                        elif i0 < m:
                            for i in range(m - i0):
                                tile(acc, A, W, s, C, i0 + i, t % NP, 1)

    return qgemm


def _quantize_act(x, scale: float):
    """te: float32 [m, K] -> int32 [m, K/2]: round(x / scale) clipped to [-127, 127], two int16 per int32."""
    from tvm import te, tirx

    m, K = x.shape
    inv = tirx.const(1.0 / scale, "float32")

    def q(v):
        r = tirx.round(v * inv)  # round half to even (llvm.nearbyint)
        return tirx.Cast("int32", tirx.max(tirx.min(r, tirx.const(127.0, "float32")), tirx.const(-127.0, "float32")))

    return te.compute((m, K // 2), lambda i, j: (q(x[i, 2 * j]) & 0xFFFF) | (q(x[i, 2 * j + 1]) << 16), name="quantize_act")


def pack_int8_weight(w: np.ndarray, per_channel: bool = True):
    """float [N, K] -> (int8 [NPAD/16, K/2, 32] in the kernel's layout, scale float32 [NPAD],
    int8 [N, K] as quantized). Symmetric, scale = max|w| / 127 per output channel (or tensor)."""
    N, K = w.shape
    NP = (N + 15) // 16
    amax = np.abs(w).max(1) if per_channel else np.full(N, np.abs(w).max())
    sw = (amax / 127.0).astype(np.float64)
    sw[sw == 0] = 1.0
    q = np.clip(np.rint(w / sw[:, None]), -127, 127).astype(np.int8)
    qp = np.zeros((NP * 16, K), np.int8)
    qp[:N] = q
    packed = qp.reshape(NP, 16, K // 2, 2).transpose(0, 2, 1, 3).reshape(NP, K // 2, 32)
    s = np.ones(NP * 16, np.float64)
    s[:N] = sw
    return np.ascontiguousarray(packed), s, q


def calibrate(module, plan) -> dict[str, float]:
    """Per-tensor activation scale (amax / 127) of every site's input, from the eager module on
    plan.calibration: amax = max |x| ("max") or the config's percentile of |x| ("percentile")."""
    import math

    import torch

    qc = plan.config
    if qc.calibration not in ("max", "percentile"):
        raise CrateEdgeError(f"tvm: quantize.calibration = {qc.calibration!r} is not implemented by the TVM backend (max or percentile)")
    x = plan.calibration
    bs = 32
    nb = max(1, math.ceil(len(x) / bs))
    tops: dict[str, list] = {s: [] for s in plan.sites}
    counts = dict.fromkeys(plan.sites, 0)
    frac = 1.0 - float(qc.percentile) / 100.0 if qc.calibration == "percentile" else 0.0

    def observe(site, x):
        a = x.abs().flatten().float()
        counts[site] += a.numel()
        k = min(a.numel(), int(math.ceil(a.numel() * nb * frac)) + 1)
        tops[site].append(torch.topk(a, k).values)

    feed_site_inputs(module, plan.sites, x, observe, bs)
    scales = {}
    for s in plan.sites:
        v = torch.sort(torch.cat(tops[s]), descending=True).values
        amax = float(v[min(len(v) - 1, int(math.floor(counts[s] * frac)))])
        scales[s] = (amax if amax > 0 else 1.0) / 127.0
    return scales


def quantize_module(mod, module, plan, target):
    """Rewrite the imported Relax module: each site's matmul(x, permute_dims(W)) becomes
    quantize(x) -> int8 GEMM kernel (W packed as an int8 constant) -> float [.., N]. Returns the
    module and a summary (scales, bytes of int8 and float32 weight constants left)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator
    from tvm.target import codegen

    qc = plan.config
    if qc.scheme not in QUANT_SCHEMES:
        raise CrateEdgeError(
            f"tvm: quantize.scheme = {qc.scheme!r} is not implemented by the TVM backend (implemented: "
            f"{', '.join(QUANT_SCHEMES)}; int8_weights and fp16/bf16 storage measured no faster than fp32 "
            "on an AVX2 CPU, see crate_edge/backends/tvm.py)"
        )
    if qc.activations != "static":
        raise CrateEdgeError('tvm: scheme int8 needs quantize.activations = "static"')
    if qc.nbits != 8:
        raise CrateEdgeError(f"tvm: quantize.nbits = {qc.nbits}; the int8 kernel takes 8")
    if target.kind.name != "llvm":
        raise CrateEdgeError(f"tvm: [quantize] is implemented for the llvm (CPU) target only, not {target.kind.name}")
    if not codegen.target_has_features("avx2", target):
        raise CrateEdgeError(f"tvm: the int8 kernel needs AVX2 and target {target} has none (x86-64 with AVX2 only)")

    scales = calibrate(module, plan)
    by_hash: dict[bytes, list[str]] = {}
    for site, path in plan.sites.items():
        w = module.get_submodule(path).weight.detach().float().contiguous().numpy()
        by_hash.setdefault(w.tobytes(), []).append(site)
    matmul, permute = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.permute_dims")
    per_channel = qc.weights == "per_channel"
    found: dict[str, dict] = {}

    @mutator
    class Rewriter(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.kernels = {}

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(matmul)):
                return call
            x, wt = call.args
            bound = self.lookup_binding(wt) if isinstance(wt, relax.Var) else None
            if bound is None or not isinstance(bound, relax.Call) or not bound.op.same_as(permute):
                return call
            c = bound.args[0]
            if not isinstance(c, tvm.ir.expr.Constant) or len(c.value.shape) != 2:
                return call
            w = c.value.numpy()
            names = by_hash.get(np.ascontiguousarray(w, np.float32).tobytes())
            if not names:
                return call
            site = names.pop(0)
            N, K = (int(d) for d in w.shape)
            if K % 2:
                raise CrateEdgeError(f"tvm: site {site} has an odd input width {K}; the int8 kernel takes pairs")
            packed, sw, _ = pack_int8_weight(w.astype(np.float64), per_channel)
            sa = scales[site]
            key = (K, N)
            if key not in self.kernels:
                self.kernels[key] = self.builder_.add_func(_qgemm_int8(K, N, f"qgemm_int8_k{K}_n{N}"), f"qgemm_int8_k{K}_n{N}")
            lead = list(x.ty.shape.values[:-1])
            m = lead[0]
            for d in lead[1:]:
                m = m * d
            x2 = self.builder_.emit(relax.op.reshape(x, relax.ShapeExpr([m, K])))
            xq = self.builder_.emit(self.builder_.call_te(_quantize_act, x2, sa, primfunc_name_hint="quantize_act"))
            npad = packed.shape[0] * 16
            y = self.builder_.emit(
                relax.call_tir(
                    self.kernels[key],
                    [xq, relax.const(packed), relax.const((sw * sa).astype(np.float32))],
                    relax.TensorType([m, npad], "float32"),
                )
            )
            if npad != N:
                y = self.builder_.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[N]))
            found[site] = {"k": K, "n": N, "activation_scale": sa}
            return relax.op.reshape(y, relax.ShapeExpr(lead + [N]))

    rw = Rewriter(mod)
    gv = mod.get_global_var("main")
    rw.builder_.update_func(gv, rw.visit_expr(mod["main"]))
    out = relax.transform.DeadCodeElimination()(rw.builder_.get())
    missing = sorted(set(plan.sites) - set(found))
    if missing:
        raise CrateEdgeError(f"tvm: no matmul with the weight of site(s) {', '.join(missing)} in the imported program")
    return out, {"kernel": QUANT_SCHEMES[qc.scheme], "sites": found, "weight_constants": _const_bytes(out)}


def _const_bytes(mod) -> dict[str, int]:
    """Bytes of the main function's tensor constants by dtype (what the library embeds)."""
    import tvm
    from tvm import relax

    by: dict[str, int] = {}

    def visit(e):
        if isinstance(e, tvm.ir.expr.Constant) and hasattr(e, "value") and hasattr(e.value, "shape"):
            a = e.value
            n = int(np.prod([int(d) for d in a.shape])) if len(a.shape) else 1
            by[str(a.dtype)] = by.get(str(a.dtype), 0) + n * tvm.DataType(str(a.dtype)).bits // 8

    relax.analysis.post_order_visit(mod["main"], visit)
    return dict(sorted(by.items()))


# ------------------------------------------------------------------ build


def _import(ep):
    """Relax module from the ExportedProgram. Without torch's decompositions SDPA arrives as one
    R.nn.attention and the import takes a second rather than ~35 s; fall back if an op needs them."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        return from_exported_program(ep, run_ep_decomposition=False), "no decomposition"
    except Exception as e:
        first = str(e).splitlines()[0][:160]
    try:
        return from_exported_program(ep, run_ep_decomposition=True), f"torch decompositions ({first})"
    except Exception as e:
        raise CrateEdgeError(f"tvm: the Relax importer cannot take this program: {str(e).splitlines()[0][:200]}") from None


def _batch_var(mod):
    """The symbolic batch of main's input, or its static batch as an int."""
    from tvm import tirx

    d = mod["main"].params[0].ty.shape.values[0]
    return d if isinstance(d, tirx.Var) else int(d)


def _op_inventory(mod) -> dict[str, int]:
    import tvm
    from tvm import relax

    counts: dict[str, int] = {}

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            counts[e.op.name] = counts.get(e.op.name, 0) + 1

    relax.analysis.post_order_visit(mod["main"], visit)
    return dict(sorted(counts.items()))


def _fuse_passes(target):
    from tvm import relax

    return [
        relax.transform.LegalizeOps(legalize_map(target)),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def _unmark_handwritten():
    """Hand-written kernels take weights packed at compile time already: keep the layout-rewrite
    machinery (AttachAttrLayoutFreeBuffers marks every kernel with constant arguments) off them."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="UnmarkHandwritten")
    def f(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if (
                isinstance(func, tirx.PrimFunc)
                and func.attrs is not None
                and HANDWRITTEN in func.attrs
                and "layout_free_buffers" in func.attrs
            ):
                mod[gv] = func.without_attr("layout_free_buffers")
        return mod

    return f


def build(mod, target, db_dir: Path | None = None):
    """Relax module -> executable. llvm: our schedules (after any tuning records); cuda: TVM's
    default CUDA pipeline (dlight GPU rules)."""
    import contextlib

    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    cfg = {"s_tir.LoopPartition": {"partition_const_loop": True}} if target.kind.name == "llvm" else {}
    db = winners(db_dir, target) if db_dir is not None else contextlib.nullcontext()
    with tvm.transform.PassContext(opt_level=3, config=cfg), db, target:
        if target.kind.name == "llvm":
            from tvm.relax.backend.cpu_generic import pipeline as cpu

            passes = _fuse_passes(target)
            if db_dir is not None:  # tuned kernels first; they are then marked scheduled
                passes.append(relax.transform.MetaScheduleApplyDatabase())
            passes += [
                relax.transform.AttachAttrLayoutFreeBuffers(),
                _unmark_handwritten(),
                dl.ApplyDefaultSchedule(*cpu_rules()),
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.FoldConstant(),
            ]
            passes += cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
            pipeline = tvm.transform.Sequential(passes)
        else:
            pre = [relax.transform.LegalizeOps(legalize_map(target))]
            if db_dir is not None:
                pre = _fuse_passes(target) + [relax.transform.MetaScheduleApplyDatabase()]
            pipeline = tvm.transform.Sequential(pre + [relax.get_default_pipeline(target)])
        return tvm.compile(mod, target=target, relax_pipeline=pipeline)


def fused(mod, target):
    """The module as MetaSchedule sees it: legalised and fused, nothing scheduled yet."""
    import tvm

    with target:
        return tvm.transform.Sequential(_fuse_passes(target))(mod)


def _has_gpu() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


vm_runner = tvm_vm_runner  # the Relax VM runner lives in crate_edge.runtimes (torch-free)


class TVMBackend(Backend):
    name = "tvm"
    packages = ("tvm",)
    extra = "tvm"

    def dists(self):
        return ["apache-tvm", "apache-tvm-ffi"]

    def can_run(self, manifest: dict | None = None):
        """Runs CPU artifacts wherever the TVM runtime imports; CUDA artifacts also need a GPU
        (pass the manifest to ask about one artifact)."""
        ok, why = super().can_run()
        if ok and manifest is not None and manifest.get("backend", {}).get("device") == "cuda" and not _has_gpu():
            return False, "this artifact was built for CUDA and there is no CUDA GPU here"
        return ok, why

    def compile(self, module, ep, example, target, out: Path, quant=None) -> Compiled:
        opts = target.options
        tgt = make_target(opts.get("target", {"kind": "llvm", "mcpu": "native"}))
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
        if trials and target.dynamic_batch is not None:
            raise CrateEdgeError("tvm: tune_trials needs a static batch (input.dynamic_batch = false): MetaSchedule tunes concrete shapes")

        if device == "cuda" and not (
            shutil.which("nvcc") or os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
        ):
            raise BackendUnavailable("backend tvm unavailable: a cuda target compiles its kernels with nvcc, which is not on PATH")
        t0 = time.time()
        mod, how = _import(ep)
        batch = _batch_var(mod)
        info = {"device": device, "target": str(tgt), "import": how, "relax_ops": _op_inventory(mod)}
        precision = {"*": "fp32"}
        if quant is not None:
            _say(f"int8: calibrating {len(quant.sites)} sites on {len(quant.calibration)} images, rewriting their GEMMs")
            mod, info["quantization"] = quantize_module(mod, module, quant, tgt)
            precision.update({s: "int8 x int8 -> int32 (dequantized to fp32)" for s in quant.sites})
        if target.dynamic_batch is not None and isinstance(batch, int):
            info["static_batch"] = batch  # the runner pads/splits to this batch
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
        build(mod, tgt, db_dir).export_library(str(out / LIBRARY))
        info["build_s"] = round(time.time() - t1, 1)
        info["compile_s"] = round(time.time() - t0, 1)
        verified, not_verified = {}, {}
        if device == "cuda" and not _has_gpu():
            # what the parity check can run here: the same Relax module built for this CPU
            build(mod, make_target({"kind": "llvm", "mcpu": "native"})).export_library(str(out / CPU_TWIN))
            files.append(CPU_TWIN)
            not_verified["execution"] = "no CUDA GPU here: the CUDA library was built, not run"
            verified["numerics"] = "the same Relax module built by TVM for this CPU (llvm)"
        else:
            verified["execution"] = f"TVM Relax VM ({device}) on this machine"
        return Compiled(files=files, precision=precision, verified=verified, not_verified=not_verified, info=info)

    def reference_runner(self, art_dir: Path, manifest: dict):
        be = manifest["backend"]
        if be.get("device") != "cuda" or not (art_dir / CPU_TWIN).exists():
            return None
        return (
            vm_runner(art_dir / CPU_TWIN, "cpu", be.get("static_batch")),
            "TVM llvm build of the same Relax module on this CPU, not the CUDA library",
        )
