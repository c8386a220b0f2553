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
from crate_edge.backends.tvm.target import make_target  # noqa: E402
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
    pk = tvm.compile(tvm.IRModule({"main": att.pack_keys(N, H, D, NR, "main")}), target=tgt)
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
