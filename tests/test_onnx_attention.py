"""The onnxruntime targets' Attention layout (crate_edge/backends/onnxruntime.py attention_tokens):
the exporter's 4-D Attention with its Reshape/Transpose pairs becomes one 3-D Attention on the
token-major tensor, same outputs; the 4-D form stays on request; an unknown layout is refused."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'crate-edge[onnx]')")

from crate_edge import CrateEdgeError, load_model  # noqa: E402
from crate_edge.compiler import compile  # noqa: E402

QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module")
def ref(ref_ckpt):
    return load_model(ref_ckpt, heads=4)


def _target(tmp_path, layout):
    p = tmp_path / f"ort-{layout}.toml"
    p.write_text(
        'backend = "onnxruntime"\nrewrites = ["shift_patch_norm", "fold_ista", "sdpa_attention"]\n'
        f'[options]\nopset = 23\nattention_layout = "{layout}"\nproviders = ["CPUExecutionProvider"]\n'
    )
    return p


def test_tokens_layout_drops_the_head_transposes_and_keeps_the_outputs(ref, tmp_path):
    tok = compile(ref, _target(tmp_path, "tokens"), out=tmp_path / "t", parity_limit=100, **QUIET)
    heads = compile(ref, _target(tmp_path, "heads"), out=tmp_path / "h", parity_limit=100, **QUIET)
    bt, bh = tok.manifest["backend"], heads.manifest["backend"]
    assert bt["attention_nodes_rewritten"] == ref.cfg.depth and bh["attention_nodes_rewritten"] == 0
    assert bt["ops"]["Attention"] == bh["ops"]["Attention"] == ref.cfg.depth
    # the Transpose on each side of every Attention and the Reshape before it are gone
    assert bh["ops"]["Transpose"] - bt["ops"].get("Transpose", 0) == 2 * ref.cfg.depth, (bh["ops"], bt["ops"])
    assert bh["ops"]["Reshape"] - bt["ops"].get("Reshape", 0) == ref.cfg.depth  # the one before
    assert tok.manifest["parity"]["passed"]
    x = torch.randn(3, *ref.cfg.input_shape, generator=torch.Generator().manual_seed(2)).numpy()
    assert np.abs(tok(x) - heads(x)).max() <= 1e-5


def test_unknown_attention_layout(ref, tmp_path):
    with pytest.raises(CrateEdgeError, match="options.attention_layout = 'flat'; known: tokens, heads"):
        compile(ref, _target(tmp_path, "flat"), out=tmp_path / "a", parity_limit=20, **QUIET)
    assert not (tmp_path / "a").exists()
