"""Legalisation overrides and the llvm (CPU) schedule rules: a register-tiled GEMM for every
matmul, dlight's GEMV, and row-by-row reductions for softmax and LayerNorm."""

from __future__ import annotations

import math

MR, NR = 6, 16  # GEMM micro-kernel: MR rows x NR columns of accumulators (AVX2: 12 ymm registers)
# by the target CPU's widest vectors: AVX-512 has twice the lanes and twice the registers, and a
# 6x16 tile there is 6 zmm accumulators, too few to cover the FMA latency. The tile must stay
# under 1 KiB (TVM puts larger per-task buffers on the heap, out of registers), and NR a power
# of two. CRATE-Tiny/16@224 fp32, batch 1, 2 threads, Zen 5 (AVX-512), ms: 6x16 15.2-16.3,
# 6x32 12.4-13.0, 7x32 11.6-11.7, 8x32 11.6-12.2, 4x64 11.7-12.2, 10x32 13.1-16.5, 5x48 148.
TILES = {"avx512f": (7, 32), "avx2": (MR, NR)}
ROW_BLOCK = 16  # micro-kernels per parallel row block (96 rows)
PARALLEL_MIN = 1 << 14  # elements: the smallest elementwise kernel the Injective rule spreads across threads
HANDWRITTEN = "crate_edge.handwritten"  # PrimFunc attribute: a kernel written as loops, not blocks


def gemm_tile(target) -> tuple[int, int]:
    """(rows, columns) of the fp32 GEMM micro-kernel for this llvm target."""
    from tvm.target import codegen

    return next((t for f, t in TILES.items() if codegen.target_has_features(f, target)), (MR, NR))


def vector_lanes(target) -> int:
    """fp32 lanes of the target's widest vectors."""
    from tvm.target import codegen

    return 16 if codegen.target_has_features("avx512f", target) else 8


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
                return self._schedule(sch, red[0], func, *gemm_tile(target))
            except Exception:  # a matmul-like kernel this template does not fit stays as it was
                return None

        def _schedule(self, sch, main, func, MR, NR):
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
                last = sch.get_loops(b)[-1]
                # only a constant extent: when MR divides the rows' static factor (7 and a 7x7 patch
                # grid's batch * 49 rows), the write-back's last loop can be the row tail, whose
                # extent depends on the batch, and TVM cannot vectorise that on a fixed-width CPU
                if isinstance(get_extent(sch, last), int):
                    _try(sch.vectorize, last)
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

    class Injective(dl.ScheduleRule):
        """Kernels of spatial loops only (layout transposes, concatenations, elementwise ops the
        GEMM kernels could not absorb), which no rule above takes and which otherwise run as
        serial loops on one thread: producers inlined, the innermost loop in vectors where the
        lanes divide its extent, the loops outside it fused and split across the threads.
        CRATE-Tiny/16@224 tvm-int8, batch 1, 2 threads, AMX Xeon: the two patch rearranges
        42 and 49 us, the cls concatenation and position add 35 us (a 600 KB and a 300 KB pass)."""

        def apply(self, func, target, _tunable):
            from tvm.s_tir.dlight.analysis import normalize_prim_func
            from tvm.s_tir.dlight.base import try_inline

            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None or any(set(b.dom_kind()) - {"S"} for b in infos):
                return None
            infos = try_inline(sch, infos)
            lanes = vector_lanes(target)
            for b in infos:
                loops = sch.get_loops(b.block_rv)
                if not loops:
                    continue
                ext = [get_extent(sch, lp) for lp in loops]
                if isinstance(ext[-1], int) and ext[-1] % lanes == 0:
                    o, v = sch.split(loops[-1], [None, lanes])
                    sch.vectorize(v)
                    outer = loops[:-1] + [o]
                else:
                    outer = loops[:-1] or loops  # a short or odd inner loop stays for LLVM
                # elements at the smallest batch (a symbolic extent counted as 1): below
                # PARALLEL_MIN a thread-pool launch (about 1.3 us here) costs more than the loop
                if math.prod(e for e in ext if isinstance(e, int)) >= PARALLEL_MIN:
                    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            return sch

    return [GEMM(), dl.cpu.GEMV(), RowReduction(), Injective()]
