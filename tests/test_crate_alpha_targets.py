"""Every shipped target compiles CRATE-α and keeps the same parity budgets as for CRATE: its
[parity] table, per layer too (a probe build: support IoU of z2, coding rate, SQNR), on the
embedded held-out images. A target whose backend cannot compile here is skipped with the reason."""

import pytest
import torch

import crate_edge
from crate_edge.backends import get_backend
from crate_edge.parity import parity
from crate_edge.targets import list_targets, load_target


@pytest.fixture(scope="module")
def alpha(tmp_path_factory):
    torch.manual_seed(0)
    m = crate_edge.create_model("crate-alpha-mnist", depth=2, dim=32, heads=2, dim_head=16, mean=(0.286,), std=(0.353,)).eval()
    return m, crate_edge.save_model(m, tmp_path_factory.mktemp("alpha") / "model"), tmp_path_factory.mktemp("alpha-arts")


@pytest.mark.parametrize("name", list_targets())
def test_every_target_compiles_crate_alpha_within_its_budgets(name, alpha):
    model, model_dir, root = alpha
    t = load_target(name)
    ok, why = get_backend(t.backend).available(t)
    if not ok:
        pytest.skip(f"{name} cannot compile here: {why}")
    kw = {"calibration_images": 64} if t.quantize else {}
    art = crate_edge.compile(model_dir, t, out=root / name, probe=True, parity_data="embedded", parity_limit=300, log=lambda s: None, **kw)
    assert art.manifest["source_model"]["config"]["family"] == "crate-alpha"
    rep = parity([art], reference=model, data="embedded", limit=300, progress=False)
    r = rep.results[0]
    assert r.passed, rep.message()  # the target's own [parity] table, per layer included
    assert not r.unchecked, r.unchecked
    assert len(r.layers) == 2 and all("residual" in d for d in r.layers)
    for d in r.layers:  # the support of z2 survives every precision
        assert d["support_iou_mean"] >= 0.95, (d["layer"], d["support_iou_mean"])
        assert abs(d["residual"] - d["residual_ref"]) <= 0.01
