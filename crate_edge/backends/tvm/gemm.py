"""The fp32 GEMM with a constant weight, hand-written for AVX-512 targets, and the Relax rewrite
that puts it in place of matmul(x, permute_dims(W)) with its bias, residual add and ReLU.

Why by hand: the schedule rule (schedule.py GEMM) keeps its micro-kernel's accumulators in one
buffer, and TVM puts a buffer of 1 KiB or more on the heap (runtime kMaxStackAlloca), so its
tile stops at 7 rows x 32 columns (14 zmm). Here the tile is 14 x 32 in two 7-row buffers of
896 B each, 28 zmm accumulators that LLVM keeps in registers: per k step two 16-float loads of W
and 14 broadcasts of A feed 28 FMAs. One task per (block of rows, panel of 32 columns), the
panels fastest; at least two row blocks, so that at batch 1 each of two threads takes the rows
the kernel before it wrote on that core. CRATE-Tiny's 36 layer GEMMs with their LayerNorms as
one Relax chain (197 x 384 x 384, 2 threads, AMX Xeon family 6 model 167, one process): the
schedule rule 255-269 us per GEMM, this kernel 216-238 (one core: 431-449 against 415-424).
Tried and no faster: the panels split across the threads instead of the rows (250-254 us in
the chain), k in blocks of 128 or 192 kept in L1 (within noise of whole K).
"""

from __future__ import annotations

import functools

import numpy as np

from .schedule import HANDWRITTEN

NR = 32  # columns per panel: two zmm
G = 7  # rows per accumulator buffer: 7 x 32 fp32 = 896 B, under TVM's 1 KiB stack limit
MR = 2 * G  # rows per micro-kernel
ROWS = 16 * MR  # the most rows per task (larger batches: blocks of up to 224 rows)
# W's rows k + PF ahead prefetched (llvm.prefetch, both 64-byte lines of a panel row): a panel is
# 48 KiB, twelve 4 KiB pages, and the hardware prefetchers stop at each page, so the first row
# tile of a block waited on L3 there. 197 x 384 x 384 with 40 weights in turn (cold), 2 threads,
# AMX Xeon: 216-226 us without, PF 8 198-203, 16 188-190, 32 186-190, 64 194-195, 128 198-202;
# CRATE-Tiny b1 13.68-13.81 -> 12.76-12.84 ms in one process.
PF = 32
EPILOGUES = ("", "bias", "bias_relu", "residual", "residual_relu")  # what the write-back adds


def fits(K: int, N: int, target) -> bool:
    """Whether a (K -> N) GEMM takes this kernel on `target`: AVX-512 and whole panels."""
    from tvm.target import codegen

    return target.kind.name == "llvm" and codegen.target_has_features("avx512f", target) and N % NR == 0 and K > 0


def pack_weight(w: np.ndarray) -> np.ndarray:
    """W [N, K] -> [N/32, K, 32]: a panel's 32 columns contiguous per k."""
    N, K = w.shape
    return np.ascontiguousarray(w.astype(np.float32).reshape(N // NR, NR, K).transpose(0, 2, 1))


def gemm_f32(K: int, N: int, name: str, epilogue: str = ""):
    """TIR: C[m, N] = A[m, K] @ W^T, W packed [N/32, K, 32] (pack_weight), then the epilogue:
    bias: + bias[n]; residual: + bias[n] + R[m, n]; *_relu: max(0, that)."""
    from tvm.script import tirx as T

    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue {epilogue!r}")
    if N % NR:
        raise ValueError(f"N = {N} is not a multiple of {NR}")
    NP = N // NR

    def out(v, bias, R, i, n):
        if bias is None:  # the plain kernel (every prim_func below is parsed, whichever is returned)
            return v
        v = v + bias.vload([n], "float32x16")
        if R is not None:
            v = v + R.vload([i, n], "float32x16")
        return T.max(v, T.broadcast(T.float32(0), 16)) if epilogue.endswith("relu") else v

    def lane(r, h):
        return T.ramp(r * NR + h * 16, 1, 16)

    @T.macro
    def tile(a0, a1, A, W, bias, R, C, i0, p, r1, r2):
        """rows i0 .. i0 + r1 + r2 of panel p: r1 rows in a0, r2 in a1 (r1, r2 <= G)"""
        for r in T.unroll(r1):
            for h in T.unroll(2):
                a0[lane(r, h)] = T.broadcast(T.float32(0), 16)
        for r in T.unroll(r2):
            for h in T.unroll(2):
                a1[lane(r, h)] = T.broadcast(T.float32(0), 16)
        for k in range(K):
            for h in T.unroll(2):
                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(W[p, T.min(k + PF, K - 1), h * 16]), 0, 3, 1))
            for r in T.unroll(r1):
                for h in T.unroll(2):
                    a0[lane(r, h)] = a0[lane(r, h)] + T.broadcast(A[i0 + r, k], 16) * W.vload([p, k, h * 16], "float32x16")
            for r in T.unroll(r2):
                for h in T.unroll(2):
                    a1[lane(r, h)] = a1[lane(r, h)] + T.broadcast(A[i0 + r1 + r, k], 16) * W.vload([p, k, h * 16], "float32x16")
        for r in T.unroll(r1):
            for h in T.unroll(2):
                C[i0 + r, T.ramp(p * NR + h * 16, 1, 16)] = out(a0[lane(r, h)], bias, R, i0 + r, p * NR + h * 16)
        for r in T.unroll(r2):
            for h in T.unroll(2):
                C[i0 + r1 + r, T.ramp(p * NR + h * 16, 1, 16)] = out(a1[lane(r, h)], bias, R, i0 + r1 + r, p * NR + h * 16)

    @T.macro
    def tasks(A, W, bias, R, C, m):
        # rows in nb blocks of br (at least two, so that at batch 1 each of two threads takes one
        # block, its panels in turn: the rows the previous kernel wrote on that core)
        nb = T.max(T.int64(2), (m + ROWS - 1) // ROWS)
        br = (m + nb - 1) // nb
        for t in T.parallel(nb * NP):
            a0 = T.alloc_buffer((G * NR,), "float32")
            a1 = T.alloc_buffer((G * NR,), "float32")
            e = T.min(m, t // NP * br + br)  # the block's end
            for it in range((br + MR - 1) // MR):
                i0 = t // NP * br + it * MR
                if i0 + MR <= e:
                    tile(a0, a1, A, W, bias, R, C, i0, t % NP, G, G)
                elif i0 + G <= e:  # the block's last rows: one 7-row buffer, then row by row
                    tile(a0, a1, A, W, bias, R, C, i0, t % NP, G, 0)
                    for i in range(e - i0 - G):
                        tile(a0, a1, A, W, bias, R, C, i0 + G + i, t % NP, 1, 0)
                elif i0 < e:
                    for i in range(e - i0):
                        tile(a0, a1, A, W, bias, R, C, i0 + i, t % NP, 1, 0)

    attrs = {"tir.noalias": True, "tirx.is_scheduled": True, "global_symbol": name, HANDWRITTEN: True}

    @T.prim_func(s_tir=True)
    def plain(a: T.handle, W: T.Buffer((NP, K, NR), "float32"), c: T.handle):
        T.func_attr(attrs)
        m = T.int64()
        A = T.match_buffer(a, (m, K), "float32")
        C = T.match_buffer(c, (m, N), "float32")
        with T.sblock("root"):
            with T.sblock("gemm"):
                T.reads(A[0:m, 0:K], W[0:NP, 0:K, 0:NR])
                T.writes(C[0:m, 0:N])
                tasks(A, W, None, None, C, m)

    @T.prim_func(s_tir=True)
    def biased(a: T.handle, W: T.Buffer((NP, K, NR), "float32"), bias: T.Buffer((N,), "float32"), c: T.handle):
        T.func_attr(attrs)
        m = T.int64()
        A = T.match_buffer(a, (m, K), "float32")
        C = T.match_buffer(c, (m, N), "float32")
        with T.sblock("root"):
            with T.sblock("gemm"):
                T.reads(A[0:m, 0:K], W[0:NP, 0:K, 0:NR], bias[0:N])
                T.writes(C[0:m, 0:N])
                tasks(A, W, bias, None, C, m)

    @T.prim_func(s_tir=True)
    def residual(a: T.handle, W: T.Buffer((NP, K, NR), "float32"), bias: T.Buffer((N,), "float32"), res: T.handle, c: T.handle):
        T.func_attr(attrs)
        m = T.int64()
        A = T.match_buffer(a, (m, K), "float32")
        R = T.match_buffer(res, (m, N), "float32")
        C = T.match_buffer(c, (m, N), "float32")
        with T.sblock("root"):
            with T.sblock("gemm"):
                T.reads(A[0:m, 0:K], W[0:NP, 0:K, 0:NR], bias[0:N], R[0:m, 0:N])
                T.writes(C[0:m, 0:N])
                tasks(A, W, bias, R, C, m)

    return residual if epilogue.startswith("residual") else biased if epilogue else plain


def use_counts(func) -> dict:
    """Relax var -> how many bindings of func (and its result) use it."""
    from tvm import relax

    uses: dict = {}
    for block in func.body.blocks:
        for b in block.bindings:
            for v in relax.analysis.free_vars(b.value):
                uses[v] = uses.get(v, 0) + 1
    for v in relax.analysis.free_vars(func.body.body):
        uses[v] = uses.get(v, 0) + 1
    return uses


@functools.cache
def use_tracking():
    """A PyExprMutator base for the epilogue fusions (here and quant.fuse_epilogues), which may
    fold a call into its consumer only where nothing else reads it: once(v) says whether the
    input graph's var behind v (recorded as each use site is visited) has one use, or v is a
    call this pass emitted (self.fresh); bound(e, op) is e's binding when that is a call of op."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator

    class UseTracking(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.uses, self.old, self.fresh = use_counts(mod["main"]), {}, set()

        def visit_var_(self, var):
            new = super().visit_var_(var)
            self.old[new] = var
            return new

        def visit_dataflow_var_(self, var):
            new = super().visit_dataflow_var_(var)
            self.old[new] = var
            return new

        def once(self, v) -> bool:
            return isinstance(v, relax.Var) and (v in self.fresh or self.uses.get(self.old.get(v, v), 0) == 1)

        def bound(self, e, op):
            v = self.lookup_binding(e) if isinstance(e, relax.Var) else None
            return v if isinstance(v, relax.Call) and v.op.same_as(op) else None

    return UseTracking


def linear_site(rw, call):
    """(x, W as a numpy [N, K] array) if call is matmul(x, permute_dims(W)) with a constant 2-D W,
    the form the Relax importer gives nn.Linear (here and quant.quantize_module), else None."""
    import tvm
    from tvm import relax

    if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(tvm.ir.Op.get("relax.matmul"))):
        return None
    x, wt = call.args
    p = rw.lookup_binding(wt) if isinstance(wt, relax.Var) else None
    if not (isinstance(p, relax.Call) and p.op.same_as(tvm.ir.Op.get("relax.permute_dims"))):
        return None
    c = p.args[0]
    if not isinstance(c, tvm.ir.expr.Constant) or len(c.value.shape) != 2:
        return None
    return x, c.value.numpy()


def as_rows(x):
    """(x's leading dims, their product): x as a (rows, features) matrix."""
    lead = list(x.ty.shape.values[:-1])
    m = lead[0]
    for d in lead[1:]:
        m = m * d
    return lead, m


def handwritten_gemms(mod, target):
    """Rewrite main: each matmul(x, permute_dims(W)) with a constant fp32 W [N, K] that fits
    becomes reshape -> gemm_f32 (W packed at compile time) -> reshape; then, where each
    intermediate has that one use, add(that, bias) -> the bias epilogue, add(that, R) -> residual,
    relu(that) -> *_relu. Returns (module, {epilogue: kernel calls})."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op = {n: tvm.ir.Op.get(f"relax.{n}") for n in ("add", "reshape", "call_tir")}
    op["relu"] = tvm.ir.Op.get("relax.nn.relu")
    made: dict = {}  # GlobalVar -> (K, N, epilogue) of every kernel added, for both passes
    by_key: dict = {}  # the same, inverted

    def kernel(bb, K, N, epi):
        if (K, N, epi) not in by_key:
            name = f"gemm_f32_k{K}_n{N}" + (f"_{epi}" if epi else "")
            gv = bb.add_func(gemm_f32(K, N, name, epi), name)
            by_key[K, N, epi], made[gv] = gv, (K, N, epi)
        return by_key[K, N, epi]

    @mutator
    class Gemms(PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            site = linear_site(self, call)
            if site is None:
                return call
            x, w = site
            if str(w.dtype) != "float32" or getattr(x.ty, "dtype", None) != "float32" or len(x.ty.shape.values) < 2:
                return call
            N, K = w.shape
            if not fits(K, N, target):
                return call
            lead, m = as_rows(x)
            x2 = self.builder_.emit(relax.op.reshape(x, relax.ShapeExpr([m, K])))
            w = relax.const(pack_weight(w))
            y = self.builder_.emit(relax.call_tir(kernel(self.builder_, K, N, ""), [x2, w], relax.TensorType([m, N], "float32")))
            return relax.op.reshape(y, relax.ShapeExpr(lead + [N]))

    rw = Gemms(mod)
    gv = mod.get_global_var("main")
    rw.builder_.update_func(gv, rw.visit_expr(mod["main"]))
    mod = relax.transform.DeadCodeElimination()(rw.builder_.get())

    counts = {e: 0 for e in EPILOGUES}
    with_relu = {"bias": "bias_relu", "residual": "residual_relu"}

    @mutator
    class Epilogues(use_tracking()):
        def gemm(self, y):
            """(call_tir, K, N, epilogue) if y = reshape(gemm_f32 call), each used once, else None."""
            r = self.bound(y, op["reshape"]) if self.once(y) else None
            g = self.bound(r.args[0], op["call_tir"]) if r is not None and self.once(r.args[0]) else None
            if g is None or g.args[0] not in made:
                return None
            return (g, *made[g.args[0]])

        def emit(self, g, K, N, epi, extra, shape):
            args = list(g.args[1].fields) + extra
            m = args[0].ty.shape.values[0]
            y = self.builder_.emit(relax.call_tir(kernel(self.builder_, K, N, epi), args, relax.TensorType([m, N], "float32")))
            self.fresh.add(y)
            return relax.op.reshape(y, relax.ShapeExpr(shape))

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            if call.op.same_as(op["relu"]):
                f = self.gemm(call.args[0])
                if f is not None and f[3] in with_relu:
                    g, K, N, epi = f
                    return self.emit(g, K, N, with_relu[epi], [], list(call.args[0].ty.shape.values))
                return call
            if not call.op.same_as(op["add"]):
                return call
            for y, other in (call.args, call.args[::-1]):
                f = self.gemm(y)
                if f is None:
                    continue
                g, K, N, epi = f
                shape = list(y.ty.shape.values)
                if (
                    epi == ""
                    and isinstance(other, tvm.ir.expr.Constant)
                    and tuple(other.value.shape) == (N,)
                    and str(other.value.dtype) == "float32"
                ):
                    return self.emit(g, K, N, "bias", [other], shape)
                if (
                    epi == "bias"
                    and isinstance(other, relax.Var)
                    and getattr(other.ty, "dtype", None) == "float32"
                    and [str(d) for d in other.ty.shape.values] == [str(d) for d in shape]
                ):
                    m = g.args[1].fields[0].ty.shape.values[0]
                    r2 = self.builder_.emit(relax.op.reshape(other, relax.ShapeExpr([m, N])))
                    return self.emit(g, K, N, "residual", [r2], shape)
            return call

    rw = Epilogues(mod)
    rw.builder_.update_func(gv, rw.visit_expr(mod["main"]))
    mod = relax.transform.DeadCodeElimination()(rw.builder_.get())

    def count(e):
        if isinstance(e, relax.Call) and e.op.same_as(op["call_tir"]) and e.args[0] in made:
            counts[made[e.args[0]][2]] += 1

    relax.analysis.post_order_visit(mod["main"], count)
    return mod, counts
