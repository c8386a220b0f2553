"""Relax: import of the ExportedProgram, the legalise/fuse passes, and the build into an
executable (our CPU schedules, or TVM's default CUDA pipeline)."""

from __future__ import annotations

from pathlib import Path

from ...errors import CrateEdgeError
from .metaschedule import winners
from .schedule import HANDWRITTEN, cpu_rules, legalize_map


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
