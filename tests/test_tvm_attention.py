"""TVM's fused MSSA attention (crate_edge/backends/tvm/attention.py): the kernel against float64
numpy on each CPU level this host runs (row tails, key padding, batch > 1, narrow heads), the
Relax rewrite on a real CRATE (every layer fused, same logits as the unfused matmuls), and the
target option."""

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'crate-edge[tvm]')")

from crate_edge import CrateEdgeError, load_model  # noqa: E402
from crate_edge import isa as isa_mod  # noqa: E402
from crate_edge.backends.tvm import attention as att  # noqa: E402
from crate_edge.backends.tvm.target import has_amx, make_target  # noqa: E402
from crate_edge.compiler import compile  # noqa: E402

QUIET = dict(log=lambda s: None)
LEVELS = [lv for lv in ("x86-64-v3", "x86-64-v4") if not isa_mod.missing(isa_mod.requirement(lv))]


def _reference(x, scale):
    xh = x.transpose(0, 2, 1, 3).astype(np.float64)
    s = xh @ xh.transpose(0, 1, 3, 2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True) @ xh).transpose(0, 2, 1, 3)


def _run(level, B, N, H, D, scale):
    tgt = make_target({"kind": "llvm"}, level)
    shape = att.kernel_shape(D, tgt)
    assert shape is not None
    MR, NR, VL, NV, VV = shape
    NP = (N + NR - 1) // NR
    pk = tvm.compile(tvm.IRModule({"main": att.pack_keys(N, H, D, NR, "main", VL)}), target=tgt)
    at = tvm.compile(tvm.IRModule({"main": att.mssa_attention(N, H, D, scale, "main", MR, NR, VL, NV, VV)}), target=tgt)
    x = np.random.default_rng(N + D).standard_normal((B, N, H, D)).astype(np.float32) * 2
    dev = tvm.cpu()
    xt = tvm.runtime.tensor(x, dev)
    kt = tvm.runtime.tensor(np.full((B, H, NP, D, NR), np.nan, np.float32), dev)  # padding must be written, not assumed
    o = tvm.runtime.tensor(np.full((B, N, H, D), np.nan, np.float32), dev)
    pk(xt, kt)
    at(xt, kt, o)
    return o.numpy(), _reference(x, scale), shape


@pytest.mark.parametrize("level", LEVELS or ["native"])
@pytest.mark.parametrize(
    "B,N,H,D",
    [
        (1, 197, 6, 64),  # CRATE-Tiny/16@224: 28 full 7-row tiles, a one-row tail, 27 padded keys
        (2, 50, 4, 32),  # the embedded model's heads, batch 2, fewer rows than one task's block
        (3, 5, 2, 16),  # fewer tokens than one tile and than one key panel
        (1, 65, 3, 48),  # a head width the 32-column value panel does not divide (16-column panels)
        (2, 65, 4, 24),  # narrower than a zmm: 8-lane value vectors
        (1, 9, 3, 20),  # 4-lane value vectors
    ],
)
def test_kernel_matches_float64_softmax_attention(level, B, N, H, D):
    got, ref, shape = _run(level, B, N, H, D, D**-0.5)
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 2e-5 * max(1.0, np.abs(ref).max()), (shape, np.abs(got - ref).max())


@pytest.mark.parametrize("level", LEVELS or ["native"])
@pytest.mark.parametrize("B,N,H,D", [(1, 197, 6, 64), (2, 5, 2, 16), (1, 65, 4, 24)])
def test_pack_keys_layout(level, B, N, H, D):
    """KT[b, h, p, d, j] = X[b, p NR + j, h, d], zero past N: the 16 x 16 register transposes
    (AVX-512, widths of 16) and the element loop (AVX2, other widths) alike."""
    tgt = make_target({"kind": "llvm"}, level)
    MR, NR, VL, NV, VV = att.kernel_shape(D, tgt)
    NP = (N + NR - 1) // NR
    pk = tvm.compile(tvm.IRModule({"main": att.pack_keys(N, H, D, NR, "main", VL)}), target=tgt)
    x = np.random.default_rng(N).standard_normal((B, N, H, D)).astype(np.float32)
    kt = tvm.runtime.tensor(np.full((B, H, NP, D, NR), np.nan, np.float32), tvm.cpu())
    pk(tvm.runtime.tensor(x, tvm.cpu()), kt)
    xp = np.zeros((B, NP * NR, H, D), np.float32)
    xp[:, :N] = x
    want = xp.reshape(B, NP, NR, H, D).transpose(0, 3, 1, 4, 2)
    np.testing.assert_array_equal(kt.numpy(), want)


def test_large_scores_do_not_overflow():
    # scores of ~+-400: exp without the max subtraction overflows; the padded keys must still count as 0
    got, ref, _ = _run("native", 1, 33, 1, 16, 4.0)
    assert np.isfinite(got).all() and np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_head_width_the_vectors_do_not_divide_keeps_the_matmuls():
    assert att.kernel_shape(18, make_target({"kind": "llvm"}, "native")) is None


@pytest.fixture(scope="module")
def ref(ref_ckpt):
    return load_model(ref_ckpt, heads=4)


def _target(tmp_path, attention):
    p = tmp_path / f"tvm-{attention}.toml"
    p.write_text(f'backend = "tvm"\nrewrites = ["shift_patch_norm", "fold_ista"]\n[options]\nattention = "{attention}"\n')
    return p


def test_every_layer_is_fused_and_agrees_with_the_matmuls(ref, tmp_path):
    fused = compile(ref, _target(tmp_path, "fused"), out=tmp_path / "f", parity_limit=100, **QUIET)
    plain = compile(ref, _target(tmp_path, "matmul"), out=tmp_path / "m", parity_limit=100, **QUIET)
    info = fused.manifest["backend"]["attention"]
    assert info["fused"] == ref.cfg.depth and info["kept"] == [], info
    assert "attention" not in plain.manifest["backend"]
    assert fused.manifest["parity"]["passed"] and fused.manifest["parity"]["max_abs"] <= 1e-4
    x = torch.randn(3, *ref.cfg.input_shape, generator=torch.Generator().manual_seed(1)).numpy()
    assert np.abs(fused(x) - plain(x)).max() <= 1e-5


def test_unknown_attention_option(ref, tmp_path):
    with pytest.raises(CrateEdgeError, match="options.attention = 'flash'; known: fused, matmul"):
        compile(ref, _target(tmp_path, "flash"), out=tmp_path / "a", parity_limit=20, **QUIET)
    assert not (tmp_path / "a").exists()


# ---- int8 attention ([quantize] attention = "int8"): AVX-512 VNNI only
VNNI = {"avx512f", "avx512bw", "avx512_vnni"} <= isa_mod.host_flags()


def _run_int8(B, N, H, D, scale, x=None, amx=False):
    tgt = make_target({"kind": "llvm"}, "native")
    if amx:
        if not has_amx(tgt):
            pytest.skip("this CPU has no AMX int8 tiles (amx_tile, amx_int8)")
        isa_mod.request_amx()
    NR = 16 * att.INZ
    qh = tvm.compile(tvm.IRModule({"main": att.quantize_heads(N, H, D, NR, "main", amx=amx)}), target=tgt)
    at = tvm.compile(tvm.IRModule({"main": att.mssa_attention_int8(N, H, D, scale, "main", amx=amx)}), target=tgt)
    if x is None:
        x = np.random.default_rng(N + D).standard_normal((B, N, H, D)).astype(np.float32) * 2
    dev = tvm.cpu()
    shapes = [((B, *dims), dt) for dims, dt in att.int8_operands(N, H, D, amx=amx)]
    # garbage where the quantizer must write (its padding included), so nothing is assumed zero
    ops = [tvm.runtime.tensor(np.full(s, 7, d), dev) for s, d in shapes]
    o = tvm.runtime.tensor(np.full((B, N, H, D), np.nan, np.float32), dev)
    qh(tvm.runtime.tensor(x, dev), *ops)
    at(*ops, o)
    return o.numpy(), _reference(x, scale), [t.numpy() for t in ops]


@pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI: the int8 attention kernel cannot run here")
@pytest.mark.parametrize(
    "B,N,H,D",
    [
        (1, 197, 6, 64),  # CRATE-Tiny/16@224: a one-row tail, 27 padded keys, N not a multiple of 4
        (2, 50, 4, 32),  # the embedded model's heads, batch 2
        (3, 5, 2, 16),  # fewer tokens than one tile; one 16-column value panel
        (1, 65, 3, 48),  # a width the 32-column value panel does not divide
        (1, 40, 2, 128),  # two AMX k steps per score and two 64-column output groups
    ],
)
@pytest.mark.parametrize("amx", [False, True], ids=["vnni", "amx"])
def test_int8_kernel_is_close_to_float64_attention(B, N, H, D, amx):
    """AMX: 16-row tiles on the tiles, the rest (N % 16 rows: all of N = 5) on the VNNI kernel."""
    got, ref, ops = _run_int8(B, N, H, D, D**-0.5, amx=amx)
    assert np.isfinite(got).all()
    cos = (got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref)
    # int8 error, not exactness: ~1% of the largest output, cosine near 1 (and far from a broken kernel's)
    assert cos > 0.9999 and np.abs(got - ref).max() <= 0.02 * np.abs(ref).max(), (cos, np.abs(got - ref).max())
    u, a, kq, cs, vq, vs = ops
    # the operands as the note in attention.py says: u = q + 128, 128 * key sums, zero padding
    q = u.astype(np.int32) - 128
    assert np.array_equal(cs[..., :N], 128 * q.sum(-1)) and not cs[..., N:].any() and not a[..., N:].any()
    keys = kq.view(np.int8).reshape(B, H, -1, D // 4, 16 * att.INZ, 4).transpose(0, 1, 2, 4, 3, 5).reshape(B, H, -1, D)
    assert np.array_equal(keys[:, :, :N], q) and not keys[:, :, N:].any()
    vals = vq.view(np.int8).reshape(B, H, -1, D, 4).transpose(0, 1, 2, 4, 3).reshape(B, H, -1, D)
    w = np.random.default_rng(N + D).standard_normal((B, N, H, D)).astype(np.float32).transpose(0, 2, 1, 3) * 2
    np.testing.assert_allclose(vals[:, :, :N] * vs[:, :, None, :], w, atol=0.51 * vs.max())
    assert not vals[:, :, N:].any()


@pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI: the int8 attention kernel cannot run here")
@pytest.mark.parametrize("amx", [False, True], ids=["vnni", "amx"])
def test_int8_kernel_with_a_zero_head_and_large_scores(amx):
    x = np.random.default_rng(3).standard_normal((1, 33, 2, 16)).astype(np.float32) * 8
    x[:, :, 1] = 0  # an all-zero head: scales must not divide by zero
    got, ref, _ = _run_int8(1, 33, 2, 16, 4.0, x, amx=amx)
    assert np.isfinite(got).all() and not got[:, :, 1].any()
    assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max()


def test_int8_attention_is_refused_in_one_line_where_it_cannot_run():
    v3 = make_target({"kind": "llvm"}, "x86-64-v3")
    assert "AVX-512 VNNI" in att.int8_attention(64, v3)
    if VNNI:
        nat = make_target({"kind": "llvm"}, "native")
        assert att.int8_attention(64, nat) is None and "divisible by 16" in att.int8_attention(24, nat)


@pytest.fixture(scope="module")
def emb():
    return load_model()  # the embedded model: heads of width 32


def _int8_target(tmp_path, isa="native", backend="tvm"):
    p = tmp_path / f"{backend}-att8-{isa}.toml"
    p.write_text(
        f'backend = "{backend}"\nprecision = "int8"\nisa = "{isa}"\nrewrites = ["shift_patch_norm", "fold_ista_update"]\n'
        '[quantize]\nscheme = "int8"\ncalibration_images = 64\nattention = "int8"\n'
        "[parity]\nmin_top1_agreement = 0.95\nmin_cosine = 0.98\n"
    )
    return p


@pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI: the int8 attention kernel cannot run here")
def test_int8_attention_target_builds_and_passes_parity(emb, tmp_path):
    art = compile(emb, _int8_target(tmp_path), out=tmp_path / "q", parity_limit=200, **QUIET)
    m = art.manifest
    assert m["backend"]["attention"]["precision"] == {"int8": emb.cfg.depth}, m["backend"]["attention"]
    assert "attention_products" in m["precision"]["detail"]
    # on an AMX host both products run on the tiles (the embedded model's heads are 32 wide), and the manifest says so
    amx = has_amx(make_target({"kind": "llvm"}, "native"))
    assert ("amx" in m["backend"]["attention"]["tile"]) == amx and ("AMX" in m["precision"]["detail"]["attention_products"]) == amx
    assert not any(k.startswith("attention_products") for k in m["quantization"]["keep_float"])
    assert m["parity"]["passed"], m["parity"]


def test_int8_attention_falls_back_to_float32_without_vnni_and_says_so(emb, tmp_path):
    art = compile(emb, _int8_target(tmp_path, "x86-64-v3"), out=tmp_path / "v3", parity_limit=50, **QUIET)
    info = art.manifest["backend"]["attention"]
    assert info["precision"] == {"float32": emb.cfg.depth} and "AVX-512 VNNI" in info["int8_refused"]
    assert "attention_products" not in art.manifest["precision"]["detail"]
    assert "attention_products_w_wT_and_A_w" in art.manifest["quantization"]["keep_float"]  # it did stay float


def test_int8_attention_is_refused_by_backends_that_do_not_take_it(ref, tmp_path):
    with pytest.raises(CrateEdgeError, match='quantize.attention = "int8" is not supported by backend onnxruntime'):
        compile(ref, _int8_target(tmp_path, backend="onnxruntime"), out=tmp_path / "o", parity_limit=20, **QUIET)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI: the int8 attention kernel cannot run here")
@pytest.mark.parametrize("amx", [False, True], ids=["vnni", "amx"])
def test_int8_kernel_writes_the_next_sites_u8_activations(amx):
    # out_scale: the same output, quantized as quant.py's activation quantizer would (q + 128)
    B, N, H, D, sa = 2, 37, 2, 32, 0.01
    tgt = make_target({"kind": "llvm"}, "native")
    x = np.random.default_rng(5).standard_normal((B, N, H, D)).astype(np.float32)
    got, _, ops = _run_int8(B, N, H, D, D**-0.5, x, amx=amx)
    aq = tvm.compile(tvm.IRModule({"main": att.mssa_attention_int8(N, H, D, D**-0.5, "main", out_scale=sa, amx=amx)}), target=tgt)
    dev = tvm.cpu()
    q = tvm.runtime.tensor(np.zeros((B, N, H, D), np.uint8), dev)
    aq(*(tvm.runtime.tensor(t, dev) for t in ops), q)
    want = np.clip(np.rint(got * np.float32(1 / sa)), -127, 127) + 128
    assert np.abs(q.numpy().astype(int) - want).max() <= 1 and (q.numpy() == want).mean() > 0.999
    assert (q.numpy() == 1).any() or (q.numpy() == 255).any() or np.abs(got).max() < 127 * sa
