"""TVM int8 (target tvm-int8): the policy's site GEMMs become int8 x int8 -> int32 kernels (AVX2
vpmaddwd), the rest of the Relax program stays fp32. On the embedded Fashion-MNIST model: the
manifest says what is int8 and what is not, the library really embeds int8 weights instead of the
float ones, parity passes, held-out top-1 is within half a point of fp32, and the kernel itself
is exact against an integer reference (row and column tails included)."""

import numpy as np
import pytest
import torch

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'crate-edge[tvm]')")

from crate_edge import CrateEdgeError, load_artifact, load_model  # noqa: E402
from crate_edge.compiler import compile, parity_images  # noqa: E402
from crate_edge.quantize import all_sites  # noqa: E402
from crate_edge.rewrites import apply  # noqa: E402

QUIET = dict(log=lambda s: None)


def _need_avx2_and_calibration_data():
    from tvm.target import codegen

    from crate_edge.backends.tvm import make_target

    if not codegen.target_has_features("avx2", make_target({"kind": "llvm", "mcpu": "native"})):
        pytest.skip("this CPU has no AVX2: the TVM int8 kernel is x86-64 AVX2 only")
    try:
        from crate_edge.data import load_dataset

        load_dataset("fashion-mnist", "train")
    except CrateEdgeError as e:
        pytest.skip(f"calibration data missing: {e}")


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def art(model, tmp_path_factory):
    _need_avx2_and_calibration_data()
    return compile(model, "tvm-int8", out=tmp_path_factory.mktemp("tvmq") / "int8", parity_limit=1000, **QUIET)


def _sites(model):
    return all_sites(apply(model, ["shift_patch_norm", "fold_ista_update"]))


def test_manifest_precision_and_quantization_block(model, art):
    m = art.manifest
    sites = _sites(model)
    assert len(sites) == 2 + 3 * model.cfg.depth
    q = m["quantization"]
    assert q["config"]["scheme"] == "int8" and q["config"]["ista"] == "update"
    assert sorted(q["sites"]) == sorted(sites) and q["calibration"]["split"] == "train"
    assert "layer_norm" in q["keep_float"] and "softmax" in q["keep_float"]
    assert m["rewrites"] == ["shift_patch_norm", "channel_major_patches", "fold_ista_update"]
    prec = m["precision"]
    assert prec["default"] == "fp32"
    assert set(prec["sites"]) == set(sites) and all(v.startswith("int8") for v in prec["sites"].values())
    be = m["backend"]["quantization"]
    assert set(be["sites"]) == set(sites)
    assert all(s["activation_scale"] > 0 for s in be["sites"].values())
    # the AMX kernel takes every GEMM whose K is whole 64-byte steps where the target has AMX tiles
    from crate_edge.backends import tvm as tb

    amx = be["kernel_isa"] == "avx512vnni" and tb.has_amx(tb.make_target({"kind": "llvm"}, "native"))
    on = [("amx" if amx and s["k"] % 64 == 0 else be["kernel_isa"]) for s in be["sites"].values()]
    assert be["gemm_kernels"] == {k: on.count(k) for k in set(on)}
    if be["kernel_isa"] == "avx512vnni":
        # each layer's out map takes its bias and the residual add, each ISTA GEMM its identity path and ReLU
        assert be["epilogues"] == {"residual": model.cfg.depth, "residual_relu": model.cfg.depth}
        # both LayerNorms of each layer (and the patch and head ones) write the u8 activations themselves
        assert be["layernorm_quantize_fused"] >= 2 * model.cfg.depth
        # each layer's int8 attention writes its out map's u8 activations
        assert be["attention_quantize_fused"] == model.cfg.depth
    else:
        assert be["epilogues"] == {} and be["layernorm_quantize_fused"] == be["attention_quantize_fused"] == 0


def test_library_embeds_int8_weights_not_float_ones(model, art):
    """Bytes of the constants the library embeds, by dtype: every site weight as int8 (columns
    padded to the kernel's panel: 16 for AVX2, 16 * nz (gemm_panels: 32 on AMX) and k to a multiple of 4 for VNNI), and
    no float copy of them (which alone would be 4x the int8 bytes)."""
    from crate_edge.backends.tvm import quant

    q = art.manifest["backend"]["quantization"]
    consts = q["weight_constants"]
    vnni, amx = q["kernel_isa"] == "avx512vnni", "amx" in q["gemm_kernels"]
    mod = apply(model, ["shift_patch_norm", "fold_ista_update"])
    want = 0
    for path in _sites(model).values():
        n, k = mod.get_submodule(path).weight.shape
        panel, kq = (16 * quant.gemm_panels(k, n, amx)[0], 4) if vnni else (16, 1)
        want += -(-n // panel) * panel * (-(-k // kq) * kq)
    assert consts["int8"] == want
    assert consts["float32"] < want  # LayerNorm, biases, scales, embeddings; the float site weights would be 4 * want


def test_parity_and_dynamic_batch(model, art):
    p = art.manifest["parity"]
    assert p["passed"] and p["executor"] == "tvm" and p["n"] == 1000
    assert p["top1_agreement"] >= 0.98 and p["min_cosine"] >= 0.99
    assert p["tolerances"].get("max_abs", 1.0) > 1e-4  # not the fp32 budget
    a = load_artifact(art.path)
    for b in (1, 3):
        x = torch.randn(b, *model.cfg.input_shape, generator=torch.Generator().manual_seed(b)).numpy()
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = a(x)
        assert got.shape == (b, 10)
        cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        assert cos.min() > 0.99, cos


def test_held_out_top1_within_half_a_point_of_fp32(model, art):
    x, y = parity_images(model.cfg, "embedded")
    a = load_artifact(art.path)
    got = np.concatenate([a(x[i : i + 256].numpy()) for i in range(0, len(x), 256)])
    with torch.no_grad():
        ref = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)]).numpy()
    top_q, top_f = (got.argmax(1) == y.numpy()).mean(), (ref.argmax(1) == y.numpy()).mean()
    print(f"held-out top-1 on {len(x)} images: int8 {100 * top_q:.2f}%, fp32 {100 * top_f:.2f}%")
    assert top_q >= top_f - 0.005


def test_int8_kernel_is_exact():
    """The TIR kernel against numpy on integers: 13 rows (two 6-row tiles and a one-row tail)
    and 20 columns (a padded second panel); out = (A_q @ W_q^T) * s exactly (int32 sums < 2^24)."""
    import tvm

    from crate_edge.backends import tvm as tb

    tgt = tb.make_target({"kind": "llvm", "mcpu": "native"})
    from tvm.target import codegen

    if not codegen.target_has_features("avx2", tgt):
        pytest.skip("this CPU has no AVX2")
    m, k, n = 13, 64, 20
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k))
    packed, sw, wq = tb.pack_int8_weight(w)
    aq = rng.integers(-127, 128, size=(m, k)).astype(np.int16)
    lib = tvm.compile(tvm.IRModule({"main": tb._qgemm_int8(k, n, "main")}), target=tgt).jit()
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((m, 32), np.float32), dev)

    def run(a16, wp, scale):
        lib["main"](
            tvm.runtime.tensor(np.ascontiguousarray(a16).view(np.int32), dev),
            tvm.runtime.tensor(wp, dev),
            tvm.runtime.tensor(scale, dev),
            out,
        )
        return out.numpy()[:, :n]

    s = sw.astype(np.float32)
    ref = (aq.astype(np.int64) @ wq.astype(np.int64).T).astype(np.float32) * s[:n]
    np.testing.assert_array_equal(run(aq, packed, s), ref)
    # extremes: 127 * -127 summed over k = 64 is far outside int16; vpmaddwd keeps it exact (vpmaddubsw would saturate)
    p_neg, _, q_neg = tb.pack_int8_weight(-np.ones((n, k)))
    assert (q_neg == -127).all()
    assert (run(np.full((m, k), 127, np.int16), p_neg, np.ones(32, np.float32)) == -127 * 127 * k).all()


def test_vnni_kernel_is_exact_and_chosen_by_the_cpu():
    """The AVX-512 VNNI kernel against numpy: 13 rows (two 5-row tiles and a 3-row tail), 70
    columns (two panels, the second padded), K = 30 (not a multiple of 4: the activation
    quantizer pads with zero points); the +128 of the unsigned operand is undone exactly, at the
    extremes too. The kernel is picked by the target's CPU level, not the build host."""
    import tvm
    from tvm import te

    from crate_edge.backends import tvm as tb

    assert tb.kernel_for(tb.make_target({"kind": "llvm"}, "x86-64-v3")) == "avx2"
    assert tb.kernel_for(tb.make_target({"kind": "llvm"}, "x86-64-v4")) == "avx2"  # v4 does not include VNNI
    tgt = tb.make_target({"kind": "llvm"}, "native")
    if tb.kernel_for(tgt) != "avx512vnni":
        pytest.skip("this CPU has no AVX-512 VNNI")
    m, k, n = 13, 30, 70
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k))
    packed, comp, sw, wq = tb.pack_int8_weight_vnni(w)
    scale = 0.05
    x = rng.uniform(-8, 8, size=(m, k)).astype(np.float32)  # some beyond 127 * scale: clipped
    xa = te.placeholder((m, k), "float32", name="x")
    quant = tvm.compile(te.create_prim_func([xa, tb.quant._quantize_act_u8(xa, scale)]), target=tgt)
    kern = tvm.compile(tvm.IRModule({"main": tb._qgemm_vnni(k, n, "main")}), target=tgt)
    dev = tvm.cpu()
    au8 = tvm.runtime.tensor(np.zeros((m, 32), np.uint8), dev)
    quant(tvm.runtime.tensor(x, dev), au8)
    aq = np.clip(np.rint(x / np.float32(scale)), -127, 127).astype(np.int64)
    np.testing.assert_array_equal(au8.numpy()[:, :k], aq + 128)
    assert (au8.numpy()[:, k:] == 128).all()
    npad = packed.shape[0] * 16 * tb.quant.VNZ
    out = tvm.runtime.tensor(np.zeros((m, npad), np.float32), dev)

    def run(a, wp, c, s):
        kern(tvm.runtime.tensor(a, dev), tvm.runtime.tensor(wp, dev), tvm.runtime.tensor(c, dev), tvm.runtime.tensor(s, dev), out)
        return out.numpy()[:, :n]

    s = sw.astype(np.float32)
    ref = (aq @ wq.astype(np.int64).T).astype(np.float32) * s[:n]
    np.testing.assert_array_equal(run(au8.numpy(), packed, comp, s), ref)
    p_neg, c_neg, _, q_neg = tb.pack_int8_weight_vnni(-np.ones((n, k)))
    a_max = np.full((m, 32), 128, np.uint8)
    a_max[:, :k] = 255  # +127
    assert (run(a_max, p_neg, c_neg, np.ones(npad, np.float32)) == -127 * 127 * k).all()
    # the epilogues: + bias + residual (and ReLU), fused into the write-back
    bias = rng.standard_normal(npad).astype(np.float32)
    res = rng.standard_normal((m, npad)).astype(np.float32)
    full = (aq @ np.pad(wq, ((0, npad - n), (0, 0))).astype(np.int64).T).astype(np.float32) * np.pad(s[:n], (0, npad - n))
    for epi, want in (("residual", full + bias + res), ("residual_relu", np.maximum(full + bias + res, 0))):
        ek = tvm.compile(tvm.IRModule({"main": tb._qgemm_vnni(k, n, "main", epilogue=epi)}), target=tgt)
        sp = np.pad(s[:n], (0, npad - n)).astype(np.float32)
        ek(*(tvm.runtime.tensor(v, dev) for v in (au8.numpy(), packed, comp, sp, bias, res)), out)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-6, atol=1e-5)
    assert (out.numpy() == 0).any()  # the ReLU did something


def test_amx_kernel_is_exact_and_follows_the_host_flags(monkeypatch):
    """The AMX int8 GEMM against numpy: 70 rows (two 32-row AMX blocks and a 6-row VNNI tail), K =
    128 (two k steps), N = 80 (three 32-column panels, the last padded), at the extremes too, and
    its fused epilogue. A native target gets AMX from the host's flags (a virtual machine may name
    an older CPU model), a faked host without them gets none, and asking Linux for the tile state
    is then a no-op."""
    import tvm

    from crate_edge import isa
    from crate_edge.backends import tvm as tb

    real = isa.host_flags()
    monkeypatch.setenv(isa.ENV, " ".join(sorted(real - set(isa.AMX))))
    assert not tb.has_amx(tb.make_target({"kind": "llvm"}, "native"))
    isa.request_amx()  # no AMX on this (faked) host: nothing to ask for
    monkeypatch.setenv(isa.ENV, " ".join(sorted(real | set(isa.AMX))))
    assert tb.has_amx(tb.make_target({"kind": "llvm"}, "native"))
    assert not tb.has_amx(tb.make_target({"kind": "llvm"}, "x86-64-v4"))
    monkeypatch.delenv(isa.ENV)
    tgt = tb.make_target({"kind": "llvm"}, "native")
    if not (tb.kernel_for(tgt) == "avx512vnni" and tb.has_amx(tgt)):
        pytest.skip("this CPU has no AMX int8 tiles (amx_tile, amx_int8)")
    isa.request_amx()
    m, k, n = 70, 128, 80
    rng = np.random.default_rng(2)
    packed, comp, sw, wq = tb.pack_int8_weight_vnni(rng.standard_normal((n, k)), nz=2)
    npad = packed.shape[0] * 32
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    s = np.pad(sw.astype(np.float32)[:n], (0, npad - n))
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((m, npad), np.float32), dev)
    kern = tvm.compile(tvm.IRModule({"main": tb._qgemm_vnni(k, n, "main", nz=2, amx=True)}), target=tgt)

    def run(*v):
        kern(*(tvm.runtime.tensor(x, dev) for x in v), out)
        return out.numpy()

    full = ((a.astype(np.int64) - 128) @ np.pad(wq, ((0, npad - n), (0, 0))).astype(np.int64).T).astype(np.float32) * s
    np.testing.assert_array_equal(run(a, packed, comp, s), full)
    p_neg, c_neg, _, _ = tb.pack_int8_weight_vnni(-np.ones((n, k)), nz=2)
    assert (run(np.full((m, k), 255, np.uint8), p_neg, c_neg, np.ones(npad, np.float32))[:, :n] == -127 * 127 * k).all()
    bias = rng.standard_normal(npad).astype(np.float32)
    res = rng.standard_normal((m, npad)).astype(np.float32)
    ek = tvm.compile(tvm.IRModule({"main": tb._qgemm_vnni(k, n, "main", nz=2, epilogue="residual_relu", amx=True)}), target=tgt)
    ek(*(tvm.runtime.tensor(v, dev) for v in (a, packed, comp, s, bias, res)), out)
    np.testing.assert_allclose(out.numpy(), np.maximum(full + bias + res, 0), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="K % 64"):
        tb._qgemm_vnni(96, n, "main", nz=2, amx=True)


def test_layernorm_quantize_kernel_matches_numpy():
    """The fused LayerNorm + u8 quantizer (VNNI targets): its float output against numpy, its u8
    output exactly what _quantize_act_u8 makes of that float (9 rows: a partial row block; K = 48
    pads Q to 48, K = 40 is refused by the rewrite, not the kernel)."""
    import tvm

    from crate_edge.backends import tvm as tb

    tgt = tb.make_target({"kind": "llvm"}, "native")
    if tb.kernel_for(tgt) != "avx512vnni":
        pytest.skip("this CPU has no AVX-512 VNNI")
    m, K, sa = 9, 48, 0.02
    lib = tvm.compile(tvm.IRModule({"main": tb.quant._layernorm_quant(K, 1e-5, sa, "main")}), target=tgt)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((m, K)) * 3 + 1).astype(np.float32)
    g, b = rng.standard_normal(K).astype(np.float32), rng.standard_normal(K).astype(np.float32)
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.full((m, K), np.nan, np.float32), dev)
    q = tvm.runtime.tensor(np.zeros((m, K), np.uint8), dev)
    lib(*(tvm.runtime.tensor(v, dev) for v in (x, g, b)), y, q)
    want = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5) * g + b
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(q.numpy(), np.clip(np.rint(y.numpy() / np.float32(sa)), -127, 127) + 128)
    assert (q.numpy() == 1).any() and (q.numpy() == 255).any()  # clipped at both ends


def test_unimplemented_schemes_and_targets_refuse(model, tmp_path):
    _need_avx2_and_calibration_data()
    p = tmp_path / "w8.toml"
    p.write_text(
        'backend = "tvm"\nprecision = "int8"\nrewrites = ["fold_ista"]\n[quantize]\nscheme = "int8_weights"\n'
        'activations = "none"\ncalibration_images = 8\n'
    )
    with pytest.raises(CrateEdgeError, match="scheme int8_weights is not supported by backend tvm"):
        compile(model, p, out=tmp_path / "a", parity_limit=10, **QUIET)
    p.write_text('backend = "tvm"\nprecision = "fp16"\nrewrites = ["fold_ista"]\n')
    with pytest.raises(CrateEdgeError, match="precision fp16 is not supported by backend tvm"):
        compile(model, p, out=tmp_path / "b", parity_limit=10, **QUIET)
