"""MSSA's attention as one hand-written CPU kernel (llvm targets): softmax(w wᵀ · s) w per head,
read from and written to the token-major [B, N, H, D] layout the projections use.

The imported program computes it as permute -> permute -> matmul -> multiply -> softmax ->
matmul -> permute, six kernels and three copies per layer, each product through the generic
GEMM schedule: on CRATE-Tiny (197 tokens, 6 heads x 64) the wwᵀ product ran at 118 GFLOP/s and
the whole attention took 0.43 ms per layer on two Zen 5 cores, half of tvm-int8's time. Here one
kernel per row tile of one head computes the scores tile (Kᵀ packed once per head by a small
kernel, as the GEMM schedule packs its B operand), the softmax on that tile while it is in L1,
and its product with V. q = k = v is what lets one input serve all three.
"""

from __future__ import annotations

from .schedule import HANDWRITTEN, gemm_tile, vector_lanes
from .target import VNNI, amx_tile_config, has_amx, kernel_for
from .target import amx as _amx

# rows per parallel task: ATT_RB tiles of 7 rows (28: 8 tasks per head at 197 tokens), the fp32
# kernel's 14-row tiles in pairs. CRATE-Tiny's fp32 layer alone, 2 threads, AMX Xeon: 7-row tiles
# 320-329 us, 14-row tiles (two 7-row accumulator groups) 305-311 us, same output.
ATT_RB = 4
NEG = -3.0e38  # scores of the padding columns: exp gives exactly 0 (_fast_exp clamps, 2^-127 -> 0; vscalefps underflows)


def _pow2(n, VL: int):
    """2^n as float32xVL for a float32xVL n of whole numbers: n + 127 in the exponent bits (exact
    for -126..127; -127 gives 0, which _fast_exp's clamp at -88.38 relies on)."""
    from tvm import tirx

    bits = tirx.shift_left(
        tirx.Cast(f"int32x{VL}", n) + tirx.Broadcast(tirx.const(127, "int32"), VL), tirx.Broadcast(tirx.const(23, "int32"), VL)
    )
    return tirx.call_intrin(f"float32x{VL}", "tirx.reinterpret", bits)


def _fast_exp(v, VL: int):
    """topi.fast_exp on a float32xVL vector (the softmax legalisation's exp): clamp, 2^n by the
    exponent bits, a degree-7 polynomial for the rest (relative error ~1e-7); exactly 0 below -88.38."""
    from tvm import tirx

    c = lambda x: tirx.Broadcast(tirx.const(x, "float32"), VL)  # noqa: E731
    x = tirx.max(tirx.min(v, c(88.3762626647950)), c(-88.3762626647949))
    n = tirx.floor(x * c(1.44269504088896341) + c(0.5))
    f = x - n * c(0.6931471805599453)
    p = c(1.9875691500e-4)
    for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * f + c(k)
    y = p * f * f + f + c(1.0)
    return _pow2(n, VL) * y


def reduce_lanes(v, VL: int, op=None):
    """op (default max) over the lanes of a VL-lane vector as a tree of halves: log2 VL vector
    ops on shuffles, where a lane-by-lane loop is a chain of VL - 1 (and llvm.vector.reduce.fmax
    also orders NaNs, a compare and a blend each step). Sums in this order, not lane order."""
    from tvm import tirx

    op = op or tirx.max
    while VL > 1:
        VL //= 2
        v = op(tirx.Shuffle([v], list(range(VL))), tirx.Shuffle([v], list(range(VL, 2 * VL))))
    return v


def round_i32(v):
    """float32x16 -> int32x16 rounded half to even in one vcvtps2dq (AVX-512), where T.round and
    a cast are a two-uop vrndscaleps and a vcvttps2dq."""
    from tvm import tirx

    z = tirx.Broadcast(tirx.const(0, "int32"), 16)
    return tirx.call_llvm_pure_intrin(
        "int32x16", "llvm.x86.avx512.mask.cvtps2dq.512", v, z, tirx.const(-1, "int16"), tirx.const(4, "int32")
    )


def quantize_u8(v, inv: float):
    """float32x16 -> uint8x16: clip(round(v * inv), -127, 127) + 128, the VNNI kernels' unsigned
    operand (round half to even), in four AVX-512 instructions and a multiply: vmaxps at -127,
    vcvtps2dq (rounds), vpmovsdb (saturates at 127), and + 128 as xor 0x80; T.round, two clamps,
    a truncating convert and vpmovdb were 8 uops on ports 0 and 5."""
    from tvm import tirx

    c = lambda x, t="float32": tirx.Broadcast(tirx.const(x, t), 16)  # noqa: E731
    r = round_i32(tirx.max(v * c(inv), c(-127.0)))
    b = tirx.call_llvm_pure_intrin("int8x16", "llvm.x86.avx512.mask.pmovs.db.512", r, c(0, "int8"), tirx.const(-1, "int16"))
    return tirx.call_intrin("uint8x16", "tirx.reinterpret", tirx.bitwise_xor(b, c(-128, "int8")))


LOG2E = 1.4426950408889634
LOG2_255 = 7.994353436858858


# 2^f on [-1/2, 1/2], Taylor in f ln 2, highest power first: degree 7 for the fp32 softmax
# (truncation 5e-9, below float rounding), degree 4 for the u8 weights (5.6e-5, 0.01 of a u8 step)
EXP2_F32 = (1.5252733804e-5, 1.5403530393e-4, 1.3333558146e-3, 9.6181291076e-3, 5.5504108665e-2, 2.4022650696e-1, 6.9314718056e-1, 1.0)
EXP2_U8 = (9.6181291076e-3, 5.5504108665e-2, 2.4022650696e-1, 6.9314718056e-1, 1.0)


def exp2_avx512(t, coeffs=EXP2_F32):
    """2^t as float32x16, AVX-512: f = t - round(t) (vreduceps), a polynomial for 2^f, times
    2^round(t) by vscalefps. 2^n by the exponent bits (_pow2) took a clamp, a round, two converts,
    a shift and an add for what these do in three; vscalefps gives 0 for the padding keys' -3e38
    without a clamp (and the exact 2^n down to the subnormals)."""
    from tvm import tirx

    c = lambda x: tirx.Broadcast(tirx.const(x, "float32"), 16)  # noqa: E731
    m16, cur = tirx.const(-1, "int16"), tirx.const(4, "int32")  # all lanes; the current (nearest-even) rounding
    f = tirx.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.mask.reduce.ps.512", t, tirx.const(0, "int32"), c(0.0), m16, cur)
    p = c(coeffs[0])
    for k in coeffs[1:]:
        p = p * f + c(k)
    return tirx.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.mask.scalef.ps.512", p, t - f, c(0.0), m16, cur)


def _exp2_u8(t):
    """round(2^t) as int32x16 for t <= log2 255 (softmax_u8's weights), AVX-512, rounded by
    vcvtps2dq."""
    return round_i32(exp2_avx512(t, EXP2_U8))


def _swap_blocks(A, B, b: int, second: bool):
    """One step of a 16 x 16 transpose on two rows i and i + b (i & b == 0) of 16 floats: the
    first row keeps its lanes k with k & b == 0 and takes B's lanes k - b for the others, the
    second takes A's lanes k + b and keeps its own; b = 8, 4, 2, 1 in turn transposes the block."""
    from tvm import tirx

    if second:
        idx = [k + b if (k & b) == 0 else 16 + k for k in range(16)]
    else:
        idx = [k if (k & b) == 0 else 16 + k - b for k in range(16)]
    return tirx.Shuffle([A, B], [tirx.IntImm("int32", v) for v in idx])


def pack_keys(N: int, H: int, D: int, NR: int, name: str, VL: int = 0):
    """TIR: X [B, N, H, D] -> KT [B, H, NP, D, NR], each head's keys transposed into panels of
    NR tokens (zero past N): the scores micro-kernel reads NR contiguous keys per d. With VL = 16
    (AVX-512) and D, NR multiples of 16, blocks of 16 tokens x 16 features go through registers:
    16 row loads, four steps of 16 two-row shuffles (_swap_blocks), 16 column stores, where the
    element loop moved one float at a time (CRATE-Tiny: 32 us a layer, 0.39 ms of tvm's 13)."""
    from tvm.script import tirx as T

    NP = (N + NR - 1) // NR
    blocks = VL == 16 and D % 16 == 0 and NR % 16 == 0

    @T.macro
    def step(src, dst, bs):
        for q in T.unroll(8):
            i = q // bs * 2 * bs + q % bs
            dst[T.ramp(i * 16, 1, 16)] = _swap_blocks(src[T.ramp(i * 16, 1, 16)], src[T.ramp((i + bs) * 16, 1, 16)], bs, False)
            dst[T.ramp((i + bs) * 16, 1, 16)] = _swap_blocks(src[T.ramp(i * 16, 1, 16)], src[T.ramp((i + bs) * 16, 1, 16)], bs, True)

    @T.macro
    def by_blocks(X, KT, t):
        R0 = T.alloc_buffer((256,), "float32")  # the block, row by row, and the
        R1 = T.alloc_buffer((256,), "float32")  # other of each step's two buffers
        for g in range(NR // 16):
            for c in range(D // 16):
                for i in T.unroll(16):
                    n = t % NP * NR + g * 16 + i
                    R0[T.ramp(i * 16, 1, 16)] = T.if_then_else(
                        n < N,
                        X.vload([t // (H * NP), T.min(n, N - 1), t // NP % H, c * 16], "float32x16"),
                        T.broadcast(T.float32(0), 16),
                    )
                step(R0, R1, 8)
                step(R1, R0, 4)
                step(R0, R1, 2)
                step(R1, R0, 1)
                for k in T.unroll(16):
                    KT[t // (H * NP), t // NP % H, t % NP, c * 16 + k, T.ramp(g * 16, 1, 16)] = R0[T.ramp(k * 16, 1, 16)]

    @T.macro
    def by_elements(X, KT, t):
        for j in range(NR):
            for d in range(D):
                n = t % NP * NR + j
                KT[t // (H * NP), t // NP % H, t % NP, d, j] = T.if_then_else(
                    n < N, X[t // (H * NP), T.min(n, N - 1), t // NP % H, d], T.float32(0)
                )

    panel = by_blocks if blocks else by_elements

    @T.prim_func(s_tir=True)
    def pack(x: T.handle, kt: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "global_symbol": name, HANDWRITTEN: True})
        b = T.int64()
        X = T.match_buffer(x, (b, N, H, D), "float32")
        KT = T.match_buffer(kt, (b, H, NP, D, NR), "float32")
        with T.sblock("root"):
            with T.sblock("pack"):
                T.reads(X[0:b, 0:N, 0:H, 0:D])
                T.writes(KT[0:b, 0:H, 0:NP, 0:D, 0:NR])
                for t in T.parallel(b * H * NP):
                    panel(X, KT, t)

    return pack


def mssa_attention(N: int, H: int, D: int, scale: float, name: str, MR: int, NR: int, VL: int, NV: int, VV: int):
    """TIR: O[b, :, h, :] = softmax(X_h X_hᵀ * scale) X_h, X_h = X[b, :, h, :] ([B, N, H, D]).
    Tasks: (batch, head, block of rows); per tile of rows the scores (rows x NPAD, in a per-task
    buffer), each row's softmax (max, exp, sum; 1/sum applied to the output), then the product
    with V in panels of NV columns (vectors of VV lanes, VL for the scores). A tile is two groups
    of MR rows on AVX-512 (VL = 16: 32 zmm hold both groups' accumulators), one group on AVX2;
    each group's accumulators (MR x NR and MR x NV floats) stay under 1 KiB, so LLVM keeps them in
    registers (see gemm.py); ATT_RB's comment has what the second group bought."""
    from tvm.script import tirx as T

    NP = (N + NR - 1) // NR
    NPAD = NP * NR
    NC = NPAD // VL  # score vectors per row
    G2 = MR if VL == 16 else 0  # rows of the second group
    TR = MR + G2  # rows per tile
    RB = max(1, ATT_RB * MR // TR) * TR  # rows per task
    NRB = (N + RB - 1) // RB
    hz, vz = NR // VL, NV // VV
    # AVX-512: scores in base-2 units (scale * log2 e), so the softmax's exp is exp2_avx512's
    # power of 2 (9 instructions a vector against _fast_exp's 17); AVX2 keeps _fast_exp
    b2 = VL == 16
    sc = float(scale) * (LOG2E if b2 else 1.0)
    exp = exp2_avx512 if b2 else (lambda v: _fast_exp(v, VL))

    @T.macro
    def tile(X, KT, O, S, a0, a1, red, bb, hh, i0, r1, r2):
        """rows i0 .. i0 + r1 + r2 of head hh: r1 (<= MR) in group a0, r2 (<= MR) in a1"""
        # scores: S[r, :] = (X[i0 + r] . KT panels) * scale
        for p in range(NP):
            for r in T.unroll(r1):
                for z in T.unroll(hz):
                    a0[T.ramp(r * NR + z * VL, 1, VL)] = T.broadcast(T.float32(0), VL)
            for r in T.unroll(r2):
                for z in T.unroll(hz):
                    a1[T.ramp(r * NR + z * VL, 1, VL)] = T.broadcast(T.float32(0), VL)
            for d in range(D):
                for r in T.unroll(r1):
                    for z in T.unroll(hz):
                        a0[T.ramp(r * NR + z * VL, 1, VL)] = a0[T.ramp(r * NR + z * VL, 1, VL)] + T.broadcast(
                            X[bb, i0 + r, hh, d], VL
                        ) * KT.vload([bb, hh, p, d, z * VL], f"float32x{VL}")
                for r in T.unroll(r2):
                    for z in T.unroll(hz):
                        a1[T.ramp(r * NR + z * VL, 1, VL)] = a1[T.ramp(r * NR + z * VL, 1, VL)] + T.broadcast(
                            X[bb, i0 + r1 + r, hh, d], VL
                        ) * KT.vload([bb, hh, p, d, z * VL], f"float32x{VL}")
            for r in T.unroll(r1):
                for z in T.unroll(hz):
                    S[T.ramp(r * NPAD + p * NR + z * VL, 1, VL)] = a0[T.ramp(r * NR + z * VL, 1, VL)] * T.broadcast(T.float32(sc), VL)
            for r in T.unroll(r2):
                for z in T.unroll(hz):
                    S[T.ramp((r1 + r) * NPAD + p * NR + z * VL, 1, VL)] = a1[T.ramp(r * NR + z * VL, 1, VL)] * T.broadcast(
                        T.float32(sc), VL
                    )
        for r in range(r1 + r2):
            for j in range(NPAD - N):
                S[r * NPAD + N + j] = T.float32(NEG)
            # row max
            red[T.ramp(0, 1, VL)] = S[T.ramp(r * NPAD, 1, VL)]
            for c in range(1, NC):
                red[T.ramp(0, 1, VL)] = T.max(red[T.ramp(0, 1, VL)], S[T.ramp(r * NPAD + c * VL, 1, VL)])
            red[0] = reduce_lanes(red[T.ramp(0, 1, VL)], VL)
            # exp(s - max) in place, and the row sum
            red[T.ramp(VL, 1, VL)] = T.broadcast(T.float32(0), VL)
            for c in range(NC):
                S[T.ramp(r * NPAD + c * VL, 1, VL)] = exp(S[T.ramp(r * NPAD + c * VL, 1, VL)] - T.broadcast(red[0], VL))
                red[T.ramp(VL, 1, VL)] = red[T.ramp(VL, 1, VL)] + S[T.ramp(r * NPAD + c * VL, 1, VL)]
            red[VL] = reduce_lanes(red[T.ramp(VL, 1, VL)], VL, lambda a, b: a + b)
            red[2 * VL + r] = T.float32(1) / red[VL]
        # O[i0 + r] = (P[r] . V) / sum
        for q in range(D // NV):
            for r in T.unroll(r1):
                for z in T.unroll(vz):
                    a0[T.ramp(r * NV + z * VV, 1, VV)] = T.broadcast(T.float32(0), VV)
            for r in T.unroll(r2):
                for z in T.unroll(vz):
                    a1[T.ramp(r * NV + z * VV, 1, VV)] = T.broadcast(T.float32(0), VV)
            for k in range(N):
                for r in T.unroll(r1):
                    for z in T.unroll(vz):
                        a0[T.ramp(r * NV + z * VV, 1, VV)] = a0[T.ramp(r * NV + z * VV, 1, VV)] + T.broadcast(
                            S[r * NPAD + k], VV
                        ) * X.vload([bb, k, hh, q * NV + z * VV], f"float32x{VV}")
                for r in T.unroll(r2):
                    for z in T.unroll(vz):
                        a1[T.ramp(r * NV + z * VV, 1, VV)] = a1[T.ramp(r * NV + z * VV, 1, VV)] + T.broadcast(
                            S[(r1 + r) * NPAD + k], VV
                        ) * X.vload([bb, k, hh, q * NV + z * VV], f"float32x{VV}")
            for r in T.unroll(r1):
                for z in T.unroll(vz):
                    O[bb, i0 + r, hh, T.ramp(q * NV + z * VV, 1, VV)] = a0[T.ramp(r * NV + z * VV, 1, VV)] * T.broadcast(
                        red[2 * VL + r], VV
                    )
            for r in T.unroll(r2):
                for z in T.unroll(vz):
                    O[bb, i0 + r1 + r, hh, T.ramp(q * NV + z * VV, 1, VV)] = a1[T.ramp(r * NV + z * VV, 1, VV)] * T.broadcast(
                        red[2 * VL + r1 + r], VV
                    )

    @T.prim_func(s_tir=True)
    def attn(x: T.handle, kt: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "global_symbol": name, HANDWRITTEN: True})
        b = T.int64()
        X = T.match_buffer(x, (b, N, H, D), "float32")
        KT = T.match_buffer(kt, (b, H, NP, D, NR), "float32")
        O = T.match_buffer(o, (b, N, H, D), "float32")
        with T.sblock("root"):
            with T.sblock("mssa_attention"):
                T.reads(X[0:b, 0:N, 0:H, 0:D], KT[0:b, 0:H, 0:NP, 0:D, 0:NR])
                T.writes(O[0:b, 0:N, 0:H, 0:D])
                for t in T.parallel(b * H * NRB):
                    S = T.alloc_buffer((TR * NPAD,), "float32")  # this task's score rows (a heap workspace)
                    a0 = T.alloc_buffer((MR * max(NR, NV),), "float32")
                    a1 = T.alloc_buffer((MR * max(NR, NV),), "float32")
                    red = T.alloc_buffer((2 * VL + TR,), "float32")
                    for it in range(RB // TR):
                        i0 = t % NRB * RB + it * TR
                        if i0 + TR <= N:
                            tile(X, KT, O, S, a0, a1, red, t // (H * NRB), t // NRB % H, i0, MR, G2)
                        elif G2 > 0 and i0 + MR <= N:  # one group, then row by row
                            tile(X, KT, O, S, a0, a1, red, t // (H * NRB), t // NRB % H, i0, MR, 0)
                            for i in range(N - i0 - MR):
                                tile(X, KT, O, S, a0, a1, red, t // (H * NRB), t // NRB % H, i0 + MR + i, 1, 0)
                        elif i0 < N:
                            for i in range(N - i0):
                                tile(X, KT, O, S, a0, a1, red, t // (H * NRB), t // NRB % H, i0 + i, 1, 0)

    return attn


# int8 attention ([quantize] attention = "int8", AVX-512 VNNI): both products on vpdpbusd.
# Scores: w quantized per token (per head, symmetric, scale a_n = max_d |w_nd| / 127), the row
# operand as u8 (q + 128), the keys as s8 packed [NP, D/4, NR x 4]; the +128 is undone with
# 128 * each key's sum of q. Product with V: exp(s - max) in [0, 1] as u8 round(255 e), V
# quantized per column (scale v_d = max_n |w_nd| / 127) as s8 packed [N/4, D x 4 tokens], the
# output divided by the row's sum of the u8 weights (so they still sum to one). Simulated on the
# embedded model (2,000 test images, the rest of the network fp32): top-1 unchanged, min logit
# cosine 0.9998 against fp32 attention.
IMR, INZ, IVZ = 6, 2, 2  # rows per tile, zmm per score row (32 keys), zmm per output row (32 columns): 768 B of accumulators each


def value_quads(N: int, amx: bool = False) -> int:
    """Rows of VQ (quads of tokens): (N + 3) // 4, padded with zeros to whole AMX k steps (16
    quads, 64 tokens) for the AMX kernel."""
    n4 = (N + 3) // 4
    return (n4 + 15) // 16 * 16 if amx else n4


def amx_attention_fits(D: int) -> bool:
    """The AMX attention takes heads of width D: one k step of D bytes, or whole steps of 64."""
    return D % 16 == 0 and (D <= 64 or D % 64 == 0)


def int8_operands(N: int, H: int, D: int, NR: int = 16 * INZ, amx: bool = False) -> list[tuple[tuple[int, ...], str]]:
    """(shape after the batch axis, dtype) of quantize_heads' outputs, mssa_attention_int8's
    inputs, in order: U, A, KQ, CS, VQ, VS (the two kernels' buffers declare the same)."""
    NP = (N + NR - 1) // NR
    NPAD, N4 = NP * NR, value_quads(N, amx)
    return [
        ((H, N, D), "uint8"),
        ((H, NPAD), "float32"),
        ((H, NP, D // 4, NR), "int32"),
        ((H, NPAD), "int32"),
        ((H, N4, D), "int32"),
        ((H, D), "float32"),
    ]


def quantize_heads(N: int, H: int, D: int, NR: int, name: str, amx: bool = False):
    """TIR: X [B, N, H, D] -> the int8 attention kernel's operands, per (batch, head):
    U [B, H, N, D] u8 (q + 128), A [B, H, NPAD] row scales, KQ [B, H, NP, D/4, NR*4] s8 keys,
    CS [B, H, NPAD] int32 (128 * sum_d q), VQ [B, H, N4V, D*4] s8 values (value_quads), VS [B, H, D] column
    scales; zero past N."""
    from tvm.script import tirx as T

    NP = (N + NR - 1) // NR
    NPAD, N4, DQ, DV = NP * NR, (N + 3) // 4, D // 4, D // 16
    N4V = value_quads(N, amx)
    TINY = 1e-30

    def clip127(v):
        return T.max(T.min(v, T.broadcast(T.float32(127), 16)), T.broadcast(T.float32(-127), 16))

    def vbyte(X, inv, bb, hh, n, c):
        """Token n's columns c*16.. quantized by 127 / column max, as the low byte of int32 lanes (0 past N)."""
        q = round_i32(clip127(X.vload([bb, T.min(n, N - 1), hh, c * 16], "float32x16") * inv[T.ramp(c * 16, 1, 16)]))
        return T.if_then_else(n < N, q, T.broadcast(T.int32(0), 16)) & T.broadcast(T.int32(255), 16)

    @T.prim_func(s_tir=True)
    def quant(x: T.handle, u: T.handle, a: T.handle, kq: T.handle, cs: T.handle, vq: T.handle, vs: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "global_symbol": name, HANDWRITTEN: True})
        b = T.int64()
        X = T.match_buffer(x, (b, N, H, D), "float32")
        U = T.match_buffer(u, (b, H, N, D), "uint8")
        A = T.match_buffer(a, (b, H, NPAD), "float32")
        KQ = T.match_buffer(kq, (b, H, NP, DQ, NR), "int32")
        CS = T.match_buffer(cs, (b, H, NPAD), "int32")
        VQ = T.match_buffer(vq, (b, H, N4V, D), "int32")
        VS = T.match_buffer(vs, (b, H, D), "float32")
        with T.sblock("root"):
            with T.sblock("quantize_heads"):
                T.reads(X[0:b, 0:N, 0:H, 0:D])
                T.writes(
                    U[0:b, 0:H, 0:N, 0:D],
                    A[0:b, 0:H, 0:NPAD],
                    KQ[0:b, 0:H, 0:NP, 0:DQ, 0:NR],
                    CS[0:b, 0:H, 0:NPAD],
                    VQ[0:b, 0:H, 0:N4V, 0:D],
                    VS[0:b, 0:H, 0:D],
                )
                for t in T.parallel(b * H):
                    cm = T.alloc_buffer((D,), "float32")  # per column max |w|, then 127 / it (V's scales)
                    red = T.alloc_buffer((16,), "float32")
                    iv = T.alloc_buffer((16,), "int32")
                    qb = T.alloc_buffer((D,), "int8")  # one row quantized, before its scattered stores
                    for c in T.unroll(DV):
                        cm[T.ramp(c * 16, 1, 16)] = T.broadcast(T.float32(0), 16)
                    for n in range(N):
                        red[T.ramp(0, 1, 16)] = T.broadcast(T.float32(0), 16)
                        for c in T.unroll(DV):
                            red[T.ramp(0, 1, 16)] = T.max(red[T.ramp(0, 1, 16)], T.abs(X.vload([t // H, n, t % H, c * 16], "float32x16")))
                            cm[T.ramp(c * 16, 1, 16)] = T.max(
                                cm[T.ramp(c * 16, 1, 16)], T.abs(X.vload([t // H, n, t % H, c * 16], "float32x16"))
                            )
                        red[0] = reduce_lanes(red[T.ramp(0, 1, 16)], 16)
                        A[t // H, t % H, n] = T.max(red[0], T.float32(TINY)) / T.float32(127)
                        red[1] = T.float32(127) / T.max(red[0], T.float32(TINY))
                        iv[T.ramp(0, 1, 16)] = T.broadcast(T.int32(0), 16)
                        for c in T.unroll(DV):
                            # clipping before rounding: the same, the bounds are whole
                            qv = round_i32(clip127(X.vload([t // H, n, t % H, c * 16], "float32x16") * T.broadcast(red[1], 16)))
                            U[t // H, t % H, n, T.ramp(c * 16, 1, 16)] = T.cast(qv + T.broadcast(T.int32(128), 16), "uint8x16")
                            qb[T.ramp(c * 16, 1, 16)] = T.cast(qv, "int8x16")
                            iv[T.ramp(0, 1, 16)] = iv[T.ramp(0, 1, 16)] + qv
                        CS[t // H, t % H, n] = T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add", iv[T.ramp(0, 1, 16)]) * 128
                        for k in range(DQ):
                            KQ[t // H, t % H, n // NR, k, n % NR] = T.reinterpret("int32", qb.vload([k * 4], "int8x4"))
                    for n in range(N, NPAD):
                        A[t // H, t % H, n] = T.float32(0)
                        CS[t // H, t % H, n] = 0
                        for k in range(DQ):
                            KQ[t // H, t % H, n // NR, k, n % NR] = 0
                    for c in T.unroll(DV):
                        VS[t // H, t % H, T.ramp(c * 16, 1, 16)] = T.max(
                            cm[T.ramp(c * 16, 1, 16)], T.broadcast(T.float32(TINY), 16)
                        ) / T.broadcast(T.float32(127), 16)
                        cm[T.ramp(c * 16, 1, 16)] = T.broadcast(T.float32(127), 16) / T.max(
                            cm[T.ramp(c * 16, 1, 16)], T.broadcast(T.float32(TINY), 16)
                        )
                    # four tokens' bytes of each column in one int32 (the P x V operand), 16 columns at a time
                    for n4 in range(N4):
                        for c in T.unroll(DV):
                            VQ[t // H, t % H, n4, T.ramp(c * 16, 1, 16)] = (
                                vbyte(X, cm, t // H, t % H, n4 * 4, c)
                                | T.shift_left(vbyte(X, cm, t // H, t % H, n4 * 4 + 1, c), T.broadcast(T.int32(8), 16))
                                | T.shift_left(vbyte(X, cm, t // H, t % H, n4 * 4 + 2, c), T.broadcast(T.int32(16), 16))
                                | T.shift_left(vbyte(X, cm, t // H, t % H, n4 * 4 + 3, c), T.broadcast(T.int32(24), 16))
                            )
                    for n4 in range(N4, N4V):
                        for c in T.unroll(DV):
                            VQ[t // H, t % H, n4, T.ramp(c * 16, 1, 16)] = T.broadcast(T.int32(0), 16)

    return quant


ATTENTION_INT8 = "crate_edge.mssa_attention_int8"  # PrimFunc attribute: its N, H, D, scale, amx|vnni (quant.py re-emits it)


def mssa_attention_int8(
    N: int, H: int, D: int, scale: float, name: str, MR: int = IMR, NZ: int = INZ, out_scale: float | None = None, amx: bool = False
):
    """TIR, AVX-512 VNNI: O[b, :, h, :] = softmax(w_h w_hᵀ * scale) w_h from quantize_heads'
    operands (the int8 note above), D a multiple of 16. Tiles and tasks as mssa_attention.
    out_scale: write O as the next site's u8 activations instead, clip(round(o / out_scale),
    -127, 127) + 128 (quant.py, when the out map is an int8 site: one pass fewer).
    amx: both products on AMX tiles (amx_attention_fits(D); quantize_heads with amx), one task
    per (batch, head) over its 16-row tiles, the last N % 16 rows on the VNNI micro-kernel:
    the scores tile of a 16-row tile is one tdpbusd per 16 keys (w_h's D bytes per row, the keys'
    16 quads x 16 tokens of a KQ panel), the product with V one per 64 keys and 16 columns (the
    u8 weights padded with zeros to whole 64-key steps, VQ's 16 quads x 16 columns)."""
    from tvm.script import tirx as T

    odt = "float32" if out_scale is None else "uint8"

    def store(v):
        return v if out_scale is None else quantize_u8(v, 1.0 / out_scale)

    if amx and not (amx_attention_fits(D) and NZ == 2):
        raise ValueError(f"the AMX attention takes heads of width <= 64 or a multiple of 64 and NZ = 2, not D = {D}, NZ = {NZ}")
    VZ = IVZ if D % (16 * IVZ) == 0 else 1
    NR, NV = 16 * NZ, 16 * VZ
    NP = (N + NR - 1) // NR
    NPAD, N4, DQ = NP * NR, (N + 3) // 4, D // 4
    N4V = value_quads(N, amx)
    NK, DS = N4V * 4, min(D, 64)  # AMX: keys of the A.w product (whole 64-key steps), bytes of w per scores k step
    KS, DT = D // DS, D // 16  # AMX: scores k steps, output tiles of 16 columns
    tile_config = amx_tile_config()
    NCV = (N + 15) // 16  # score vectors per row that hold a key
    RB = ATT_RB * MR
    NRB = (N + RB - 1) // RB
    NT = N // 16  # whole 16-row AMX tiles
    TR = max(MR, 16)  # rows of the per-task buffers
    sc = float(scale) * LOG2E  # scores in base-2 units: the softmax's exp is a power of 2

    def dot(acc_vec, a_u8x4, b_s8x64):
        # LLVM 22 takes both byte operands as <64 x i8> (quant.py's VNNI kernel)
        return T.call_llvm_pure_intrin(
            "int32x16", VNNI, acc_vec, T.reinterpret("int8x64", T.broadcast(T.reinterpret("int32", a_u8x4), 16)), b_s8x64
        )

    @T.macro
    def zero(acc, rows, width):
        for r in T.unroll(rows):
            for z in T.unroll(width // 16):
                acc[T.ramp(r * width + z * 16, 1, 16)] = T.broadcast(T.int32(0), 16)

    @T.macro
    def row_weights(S, P8, red, r, ps):
        """score row r of S (base-2 units, scores * log2 e; its max vector in red[0:16]) to u8
        weights round(255 2^(s - max)) in P8 (row stride ps), 1 / their sum in red[32 + r];
        columns past the row's last score vector are not written (the callers zero the weights
        there where their products read them)"""
        # the max lands on 255 exactly: 2^(s - max + log2 255)
        red[16] = reduce_lanes(red[T.ramp(0, 1, 16)], 16) - T.float32(LOG2_255)
        isum = T.alloc_buffer((16,), "int32")
        isum[T.ramp(0, 1, 16)] = T.broadcast(T.int32(0), 16)
        for c in range(NCV):
            w = _exp2_u8(S[T.ramp(r * NPAD + c * 16, 1, 16)] - T.broadcast(red[16], 16))
            isum[T.ramp(0, 1, 16)] = isum[T.ramp(0, 1, 16)] + w
            P8[T.ramp(r * ps + c * 16, 1, 16)] = T.cast(w, "uint8x16")
        red[32 + r] = T.float32(1) / T.cast(T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add", isum[T.ramp(0, 1, 16)]), "float32")

    def keys_only(c, v):
        """v, the score vector c of a row, with NEG on the padding keys (past N)"""
        return T.Select(T.ramp(c * 16, 1, 16) < T.broadcast(N, 16), v, T.broadcast(T.float32(NEG), 16))

    @T.macro
    def softmax_u8(S, P8, red, rows, ps):
        """row_weights of each of the first rows score rows of S"""
        for r in range(rows):
            last = r * NPAD + (NCV - 1) * 16
            S[T.ramp(last, 1, 16)] = keys_only(NCV - 1, S[T.ramp(last, 1, 16)])
            red[T.ramp(0, 1, 16)] = S[T.ramp(r * NPAD, 1, 16)]
            for c in range(1, NCV):
                red[T.ramp(0, 1, 16)] = T.max(red[T.ramp(0, 1, 16)], S[T.ramp(r * NPAD + c * 16, 1, 16)])
            row_weights(S, P8, red, r, ps)

    def score(dots, CS, A, bb, hh, i, j):
        """the scores of row i with keys j..j+16 from their u8 x s8 dot products (int32x16):
        (q_i . q_j + 128 sum_j - 128 sum_j) * a_i * a_j * scale"""
        return (
            T.cast(dots - CS.vload([bb, hh, j], "int32x16"), "float32x16")
            * A.vload([bb, hh, j], "float32x16")
            * T.broadcast(A[bb, hh, i] * T.float32(sc), 16)
        )

    def tile_score(SI, CS, A, bb, hh, i0, r, c):
        """score vector c of row i0 + r from the AMX scores tile SI"""
        return score(SI[T.ramp(r * NPAD + c * 16, 1, 16)], CS, A, bb, hh, i0 + r, c * 16)

    @T.macro
    def keep_score(S, red, r, c, v):
        """v as score vector c of row r, and into the row's running max"""
        S[T.ramp(r * NPAD + c * 16, 1, 16)] = v
        red[T.ramp(0, 1, 16)] = T.max(red[T.ramp(0, 1, 16)], S[T.ramp(r * NPAD + c * 16, 1, 16)])

    @T.macro
    def amx_tile(U, A, KQ, CS, VQ, VS, O, S, SI, P8, OI, red, bb, hh, i0):
        """rows i0..i0+16 of head hh on AMX (the tile configuration loaded by the task)"""
        if KS == 1:
            _amx("tileloadd64", T.int8(2), T.address_of(U[bb, hh, i0, 0]), T.int64(D))
        for pp in range(NPAD // 32):  # scores, a key panel (32 keys) at a time: tmm0, 1 += tmm2 (w rows) x tmm3, 4 (keys)
            _amx("tilezero", T.int8(0))
            _amx("tilezero", T.int8(1))
            for ks in range(KS):
                if KS > 1:
                    _amx("tileloadd64", T.int8(2), T.address_of(U[bb, hh, i0, ks * DS]), T.int64(D))
                _amx("tileloadd64", T.int8(3), T.address_of(KQ[bb, hh, pp, ks * DS // 4, 0]), T.int64(NR * 4))
                _amx("tileloadd64", T.int8(4), T.address_of(KQ[bb, hh, pp, ks * DS // 4, 16]), T.int64(NR * 4))
                _amx("tdpbusd", T.int8(0), T.int8(2), T.int8(3))
                _amx("tdpbusd", T.int8(1), T.int8(2), T.int8(4))
            _amx("tilestored64", T.int8(0), T.address_of(SI[pp * 32]), T.int64(NPAD * 4))
            _amx("tilestored64", T.int8(1), T.address_of(SI[pp * 32 + 16]), T.int64(NPAD * 4))
        for r in range(16):  # the scores of a row and their max in one pass, then its weights
            red[T.ramp(0, 1, 16)] = T.broadcast(T.float32(NEG), 16)
            for c in range(NCV - 1):  # whole vectors of keys; the last one masked past N
                keep_score(S, red, r, c, tile_score(SI, CS, A, bb, hh, i0, r, c))
            keep_score(S, red, r, NCV - 1, keys_only(NCV - 1, tile_score(SI, CS, A, bb, hh, i0, r, NCV - 1)))
            row_weights(S, P8, red, r, NK)
        for g in T.unroll((DT + 1) // 2):  # output columns 32 at a time: tmm0, 1 += tmm5 (weights) x tmm6, 7 (values)
            _amx("tilezero", T.int8(0))
            _amx("tilezero", T.int8(1))
            for ks in range(NK // 64):
                _amx("tileloadd64", T.int8(5), T.address_of(P8[ks * 64]), T.int64(NK))
                _amx("tileloadd64", T.int8(6), T.address_of(VQ[bb, hh, ks * 16, g * 32]), T.int64(D * 4))
                _amx("tdpbusd", T.int8(0), T.int8(5), T.int8(6))
                if g * 2 + 1 < DT:
                    _amx("tileloadd64", T.int8(7), T.address_of(VQ[bb, hh, ks * 16, g * 32 + 16]), T.int64(D * 4))
                    _amx("tdpbusd", T.int8(1), T.int8(5), T.int8(7))
            _amx("tilestored64", T.int8(0), T.address_of(OI[g * 32]), T.int64(D * 4))
            if g * 2 + 1 < DT:
                _amx("tilestored64", T.int8(1), T.address_of(OI[g * 32 + 16]), T.int64(D * 4))
        for r in range(16):
            for q in range(D // 16):
                O[bb, i0 + r, hh, T.ramp(q * 16, 1, 16)] = store(
                    T.cast(OI[T.ramp(r * D + q * 16, 1, 16)], "float32x16")
                    * VS.vload([bb, hh, q * 16], "float32x16")
                    * T.broadcast(red[32 + r], 16)
                )

    @T.macro
    def tile(U, A, KQ, CS, VQ, VS, O, S, P8, acc, red, bb, hh, i0, rows):
        for p in range(NP):
            zero(acc, rows, NR)
            for k in range(DQ):
                for r in T.unroll(rows):
                    for z in T.unroll(NZ):
                        acc[T.ramp(r * NR + z * 16, 1, 16)] = dot(
                            acc[T.ramp(r * NR + z * 16, 1, 16)],
                            U.vload([bb, hh, i0 + r, k * 4], "uint8x4"),
                            T.reinterpret("int8x64", KQ.vload([bb, hh, p, k, z * 16], "int32x16")),
                        )
            for r in T.unroll(rows):
                for z in T.unroll(NZ):
                    S[T.ramp(r * NPAD + p * NR + z * 16, 1, 16)] = score(
                        acc[T.ramp(r * NR + z * 16, 1, 16)], CS, A, bb, hh, i0 + r, p * NR + z * 16
                    )
        softmax_u8(S, P8, red, rows, NPAD)
        # O[i0 + r] = (P8[r] . VQ) * v / sum
        for q in range(D // NV):
            zero(acc, rows, NV)
            for k in range(N4):
                for r in T.unroll(rows):
                    for z in T.unroll(VZ):
                        acc[T.ramp(r * NV + z * 16, 1, 16)] = dot(
                            acc[T.ramp(r * NV + z * 16, 1, 16)],
                            P8.vload([r * NPAD + k * 4], "uint8x4"),
                            T.reinterpret("int8x64", VQ.vload([bb, hh, k, q * NV + z * 16], "int32x16")),
                        )
            for r in T.unroll(rows):
                for z in T.unroll(VZ):
                    O[bb, i0 + r, hh, T.ramp(q * NV + z * 16, 1, 16)] = store(
                        T.cast(acc[T.ramp(r * NV + z * 16, 1, 16)], "float32x16")
                        * VS.vload([bb, hh, q * NV + z * 16], "float32x16")
                        * T.broadcast(red[32 + r], 16)
                    )

    @T.macro
    def vnni_tasks(U, A, KQ, CS, VQ, VS, O, b):
        for t in T.parallel(b * H * NRB):
            S = T.alloc_buffer((MR * NPAD,), "float32")
            P8 = T.alloc_buffer((MR * NPAD,), "uint8")
            acc = T.alloc_buffer((MR * max(NR, NV),), "int32")
            red = T.alloc_buffer((32 + MR,), "float32")
            for it in range(ATT_RB):
                i0 = t % NRB * RB + it * MR
                if i0 + MR <= N:
                    tile(U, A, KQ, CS, VQ, VS, O, S, P8, acc, red, t // (H * NRB), t // NRB % H, i0, MR)
                elif i0 < N:
                    for i in range(N - i0):
                        tile(U, A, KQ, CS, VQ, VS, O, S, P8, acc, red, t // (H * NRB), t // NRB % H, i0 + i, 1)

    @T.macro
    def amx_tasks(U, A, KQ, CS, VQ, VS, O, b):
        for t in T.parallel(b * H):  # a head per task: its buffers and the tile configuration once
            cfg = T.alloc_buffer((64,), "uint8", align=64)
            S = T.alloc_buffer((TR * NPAD,), "float32")
            SI = T.alloc_buffer((16 * NPAD,), "int32", align=64)
            P8 = T.alloc_buffer((max(TR * NPAD, 16 * NK),), "uint8", align=64)
            OI = T.alloc_buffer((16 * D,), "int32", align=64)
            acc = T.alloc_buffer((MR * max(NR, NV),), "int32")
            red = T.alloc_buffer((32 + TR,), "float32")
            tile_config(cfg)  # every tile 16 rows x 64 bytes but tmm2 (DS bytes of w) and tmm3, 4 (DS / 4 key quads)
            cfg[20] = T.uint8(DS)
            cfg[51] = T.uint8(DS // 4)
            cfg[52] = T.uint8(DS // 4)
            _amx("ldtilecfg", T.address_of(cfg[0]))
            for r in range(16):  # no weight on the padding keys of the last k step (row_weights writes the keys' vectors only)
                for j in range(NK - NCV * 16):
                    P8[r * NK + NCV * 16 + j] = T.uint8(0)
            for it in range(NT):
                amx_tile(U, A, KQ, CS, VQ, VS, O, S, SI, P8, OI, red, t // H, t % H, it * 16)
            _amx("tilerelease")
            if 0 < N - NT * 16 <= MR:  # the rows past the last whole AMX tile as one VNNI tile (static)
                tile(U, A, KQ, CS, VQ, VS, O, S, P8, acc, red, t // H, t % H, NT * 16, N - NT * 16)
            else:
                for i in range(N - NT * 16):
                    tile(U, A, KQ, CS, VQ, VS, O, S, P8, acc, red, t // H, t % H, NT * 16 + i, 1)

    tasks = amx_tasks if amx else vnni_tasks

    @T.prim_func(s_tir=True)
    def attn(u: T.handle, a: T.handle, kq: T.handle, cs: T.handle, vq: T.handle, vs: T.handle, o: T.handle):
        T.func_attr(
            {
                "tir.noalias": True,
                "tirx.is_scheduled": True,
                "global_symbol": name,
                HANDWRITTEN: True,
                ATTENTION_INT8: f"{N} {H} {D} {scale!r} {'amx' if amx else 'vnni'}",
            }
        )
        b = T.int64()
        U = T.match_buffer(u, (b, H, N, D), "uint8")
        A = T.match_buffer(a, (b, H, NPAD), "float32")
        KQ = T.match_buffer(kq, (b, H, NP, DQ, NR), "int32")
        CS = T.match_buffer(cs, (b, H, NPAD), "int32")
        VQ = T.match_buffer(vq, (b, H, N4V, D), "int32")
        VS = T.match_buffer(vs, (b, H, D), "float32")
        O = T.match_buffer(o, (b, N, H, D), odt)
        with T.sblock("root"):
            with T.sblock("mssa_attention_int8"):
                T.reads(
                    U[0:b, 0:H, 0:N, 0:D],
                    A[0:b, 0:H, 0:NPAD],
                    KQ[0:b, 0:H, 0:NP, 0:DQ, 0:NR],
                    CS[0:b, 0:H, 0:NPAD],
                    VQ[0:b, 0:H, 0:N4V, 0:D],
                    VS[0:b, 0:H, 0:D],
                )
                T.writes(O[0:b, 0:N, 0:H, 0:D])
                tasks(U, A, KQ, CS, VQ, VS, O, b)

    return attn


def kernel_shape(D: int, target) -> tuple[int, int, int, int, int] | None:
    """(MR, NR, VL, NV, VV) for heads of width D on this target: the scores tile (MR rows x NR
    keys, VL-lane vectors) and the value panel (NV of the D columns, VV-lane vectors, the widest
    of VL, 8, 4 that divides D); None when D is not a multiple of 4 (the matmuls stay)."""
    MR, NR = gemm_tile(target)
    VL = vector_lanes(target)
    VV = next((v for v in (VL, 8, 4) if v <= VL and D % v == 0), None)
    if VV is None:
        return None
    NV = max(v for v in range(VV, NR + 1, VV) if D % v == 0)
    return MR, NR, VL, NV, VV


def int8_attention(D: int, target) -> str | None:
    """Why the int8 attention kernel cannot serve heads of width D on this target, or None."""
    if kernel_for(target) != "avx512vnni":
        return "the int8 attention kernel needs AVX-512 VNNI, which this target's CPU level lacks"
    if D % 16:
        return f"heads of width {D}: the int8 attention kernel takes widths divisible by 16"
    return None


def fuse_attention(mod, target, precision: str = "float"):
    """Rewrite each MSSA attention of the imported module, permute_dims(matmul(softmax(matmul(w,
    permute_dims(w)) * s), w)) with w = permute_dims(x) and x [B, N, H, D], into pack_keys and
    mssa_attention on x, or with precision "int8" ([quantize] attention = "int8") into
    quantize_heads and mssa_attention_int8 where int8_attention allows (else the fp32 kernel,
    and the summary says why). Returns (module, summary); heads kernel_shape cannot take keep the
    matmuls (the summary says how many were fused, and why not)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op = {n: tvm.ir.Op.get(f"relax.{n}") for n in ("matmul", "permute_dims", "multiply")}
    op["softmax"] = tvm.ir.Op.get("relax.nn.softmax")
    found = {"fused": 0, "kept": [], "precision": {}}

    def axes(call):
        a = call.attrs.axes
        return None if a is None else [int(i) for i in a]

    @mutator
    class Rewriter(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.kernels = {}

        def bound(self, e, name):
            """The call bound to var e if it is op `name`, else None."""
            v = self.lookup_binding(e) if isinstance(e, relax.Var) else None
            return v if isinstance(v, relax.Call) and v.op.same_as(op[name]) else None

        def match(self, call):
            """x and the scale of the pattern rooted at the outer permute_dims call, or None."""
            if not call.op.same_as(op["permute_dims"]) or axes(call) != [0, 2, 1, 3]:
                return None
            pv = self.bound(call.args[0], "matmul")
            p = None if pv is None else self.bound(pv.args[0], "softmax")
            if p is None or int(p.attrs.axis) not in (-1, 3):
                return None
            mul = self.bound(p.args[0], "multiply")
            if mul is None:
                return None
            qk, s = mul.args if isinstance(mul.args[1], tvm.ir.expr.Constant) else mul.args[::-1]
            qk = self.bound(qk, "matmul")
            if qk is None or not isinstance(s, tvm.ir.expr.Constant) or s.value.numpy().size != 1:
                return None
            kt = self.bound(qk.args[1], "permute_dims")
            w = qk.args[0]
            if kt is None or axes(kt) != [0, 1, 3, 2] or not (kt.args[0].same_as(w) and pv.args[1].same_as(w)):
                return None  # q = k = v: one tensor serves all three (MSSA)
            wp = self.bound(w, "permute_dims")
            if wp is None or axes(wp) != [0, 2, 1, 3]:
                return None
            return wp.args[0], float(s.value.numpy().reshape(()))

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            m = self.match(call) if isinstance(call.op, tvm.ir.Op) else None
            if m is None:
                return call
            x, scale = m
            shape = list(x.ty.shape.values)
            N, H, D = (int(d) for d in shape[1:])
            ks = kernel_shape(D, target)
            if ks is None or x.ty.dtype != "float32":
                found["kept"].append(f"heads of width {D} ({x.ty.dtype}): fp32 heads of a width divisible by 4 only")
                return call
            why_not = int8_attention(D, target) if precision == "int8" else None
            kind = "int8" if precision == "int8" and why_not is None else "float32"
            found["precision"][kind] = found["precision"].get(kind, 0) + 1
            if why_not:
                found["int8_refused"] = why_not  # printed by the backend, and in the manifest
            if kind == "int8":
                found["fused"] += 1
                amx = has_amx(target) and amx_attention_fits(D)
                if amx:
                    found["tile"] = {
                        "amx": "16-row tiles on AMX, the last N % 16 rows on VNNI",
                        "rows": 16,
                        "key_panel": 16,
                        "value_panel": 16,
                    }
                else:
                    found["tile"] = {
                        "rows": IMR,
                        "key_panel": 16 * INZ,
                        "value_panel": 16 * (IVZ if D % (16 * IVZ) == 0 else 1),
                        "lanes": 16,
                    }
                return self.int8(x, shape, N, H, D, scale, amx)
            MR, NR, VL, NV, VV = ks
            key = (N, H, D, round(scale, 12))
            if key not in self.kernels:
                tag = f"n{N}_h{H}_d{D}"
                pk = self.builder_.add_func(pack_keys(N, H, D, NR, f"permute_pad_{tag}", VL), f"permute_pad_{tag}")
                at = self.builder_.add_func(
                    mssa_attention(N, H, D, scale, f"mssa_attention_{tag}", MR, NR, VL, NV, VV), f"mssa_attention_{tag}"
                )
                self.kernels[key] = pk, at
            pk, at = self.kernels[key]
            NP = (N + NR - 1) // NR
            kt = self.builder_.emit(relax.call_tir(pk, [x], relax.TensorType([shape[0], H, NP, D, NR], "float32")))
            found["fused"] += 1
            found["tile"] = {"rows": MR, "key_panel": NR, "value_panel": NV, "lanes": VL, "value_lanes": VV}
            return relax.call_tir(at, [x, kt], relax.TensorType(shape, "float32"))

        def int8(self, x, shape, N, H, D, scale, amx):
            key = ("int8", N, H, D, round(scale, 12))
            NR = 16 * INZ
            if key not in self.kernels:
                tag = f"n{N}_h{H}_d{D}"
                qh = self.builder_.add_func(quantize_heads(N, H, D, NR, f"quantize_heads_{tag}", amx), f"quantize_heads_{tag}")
                at = self.builder_.add_func(
                    mssa_attention_int8(N, H, D, scale, f"mssa_attention_int8_{tag}", amx=amx), f"mssa_attention_int8_{tag}"
                )
                self.kernels[key] = qh, at
            qh, at = self.kernels[key]
            outs = [relax.TensorType([shape[0], *dims], dt) for dims, dt in int8_operands(N, H, D, NR, amx)]
            q = self.builder_.emit(relax.call_tir(qh, [x], outs))
            ops = [self.builder_.emit(relax.TupleGetItem(q, i)) for i in range(len(outs))]
            return relax.call_tir(at, ops, relax.TensorType(shape, "float32"))

    rw = Rewriter(mod)
    gv = mod.get_global_var("main")
    rw.builder_.update_func(gv, rw.visit_expr(mod["main"]))
    out = relax.transform.DeadCodeElimination()(rw.builder_.get())
    found["kept"] = sorted(set(found["kept"]))
    return out, found
