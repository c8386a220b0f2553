"""Optional MetaSchedule tuning (options tune_trials, tuning_db): tuning the fused module's
kernels into a JSON database, and the database of the records that beat our default schedules."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ...errors import CrateEdgeError
from .schedule import HANDWRITTEN, cpu_rules
from .target import _say


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


def _handwritten(mod) -> bool:
    return any(f.attrs is not None and HANDWRITTEN in f.attrs for _, f in mod.functions_items())


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
    # hand-written kernels (int8 GEMMs, the fused attention) are scheduled already
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, mst) if not _handwritten(t.dispatched[0])]
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
