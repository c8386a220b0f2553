"""ExecuTorch backend: XNNPACK-delegated .pte with a dynamic batch, parity, delegation, probe."""

import pytest
import torch

pytest.importorskip("executorch.exir", reason="executorch not installed (pip install 'crate-edge[executorch]')")

import crate_edge  # noqa: E402
from crate_edge.compiler import compile  # noqa: E402
from crate_edge.rewrites import Probe  # noqa: E402
from crate_edge.runtime import load as load_artifact  # noqa: E402

# what the bmm_attention and linear_layernorm rewrites exist for: none of it may stay on portable kernels
NOT_OUTSIDE = ("layer_norm", "expand_copy", "bmm", "linear", ".mm.", "addmm")


def _build(model, out, **kw):
    return compile(model, "executorch", out=out, parity_limit=200, log=lambda s: None, **kw)


@pytest.fixture(scope="module")
def ref(ref_ckpt, tmp_path_factory):
    model = crate_edge.load_model(ref_ckpt, heads=4).eval()
    return model, _build(model, tmp_path_factory.mktemp("et") / "ref")


@pytest.fixture(scope="module")
def micro_probe(tmp_path_factory):
    # one build covers the second model and the probe outputs (each lowering costs tens of
    # seconds of CPU, roughly in proportion to depth)
    torch.manual_seed(0)
    model = crate_edge.create_model("mnist-micro", depth=2).eval()
    return model, _build(model, tmp_path_factory.mktemp("et") / "micro", probe=True)


def _x(model, b):
    return torch.randn(b, *model.cfg.input_shape, generator=torch.Generator().manual_seed(b))


@pytest.mark.parametrize("which", ["ref", "micro_probe"])
def test_parity_passed(which, request):
    _, art = request.getfixturevalue(which)
    p = art.manifest["parity"]
    assert p["passed"], p["failures"]
    assert p["executor"] == "executorch"
    assert p["max_abs"] <= 1e-4 and p["top1_agreement"] >= 0.999
    assert (art.path / "model.pte").is_file()
    assert art.manifest["backend"]["batch"] == "dynamic [1, 64]"


@pytest.mark.parametrize("which", ["ref", "micro_probe"])
def test_everything_but_the_cls_pick_is_delegated(which, request):
    _, art = request.getfixturevalue(which)
    b = art.manifest["backend"]
    left = b["outside_delegates"]
    assert b["xnnpack_delegates"] >= 1
    assert not [k for k in left if any(s in k for s in NOT_OUTSIDE)], left
    # XNNPACK has no select and no slice of a dynamic-batch tensor: z[:, 0] is all that is left
    assert set(left) <= {"aten.select_copy.int"}, left


@pytest.mark.parametrize("b", [1, 3])
def test_loaded_artifact_matches_eager(ref, b):
    model, art = ref
    loaded = load_artifact(art.path)
    assert loaded.executor == "executorch"
    x = _x(model, b)
    with torch.no_grad():
        want = model(x).numpy()
    got = loaded(x.numpy())
    assert got.shape == want.shape
    assert abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("b", [1, 3])
def test_probe_outputs(micro_probe, b):
    model, art = micro_probe
    depth = model.cfg.depth
    assert len(art.manifest["outputs"]) == 1 + 2 * depth
    x = _x(model, b)
    got = load_artifact(art.path).outputs(x.numpy())
    with torch.no_grad():
        want = Probe(model)(x)
    assert len(got) == 1 + 2 * depth
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        assert abs(g - w.numpy()).max() <= 1e-4
