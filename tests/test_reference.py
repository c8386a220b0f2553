"""crate-edge's CRATE against outputs of the upstream implementation (../shared/reference)."""

import numpy as np
import pytest
import torch

import crate_edge
from crate_edge.checkpoint import build, infer_config
from crate_edge.rewrites import apply
from crate_edge.train import TRAIN_FUSION
from crate_edge.whitebox import measure, trace


def _from_npz(golden, heads):
    sd = {k[3:]: torch.from_numpy(v) for k, v in golden.items() if k.startswith("sd/")}
    cfg = infer_config(sd, "npz", heads=heads)
    return build(sd, cfg, "npz")


@pytest.fixture(params=["checkpoint", "npz"])
def ref_model(request, golden, golden_meta, ref_ckpt):
    heads = golden_meta["config"]["heads"]
    if request.param == "checkpoint":
        return crate_edge.load_model(ref_ckpt, heads=heads)
    return _from_npz(golden, heads)


def test_config_inferred_from_weights(ref_model, golden_meta):
    c = golden_meta["config"]
    cfg = ref_model.cfg
    assert (cfg.image_size, cfg.patch_size, cfg.num_classes, cfg.dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.pool, cfg.channels) == (
        c["image_size"],
        c["patch_size"],
        c["num_classes"],
        c["dim"],
        c["depth"],
        c["heads"],
        c["dim_head"],
        c["pool"],
        c["channels"],
    )
    assert sum(p.numel() for p in ref_model.parameters()) == golden_meta["n_params"]


def test_logits_and_every_traced_tensor(ref_model, golden):
    x = torch.from_numpy(golden["input"])
    with torch.no_grad():
        logits = ref_model(x)
    assert (logits - torch.from_numpy(golden["logits"])).abs().max() <= 1e-5
    t = trace(ref_model, x)
    names = [k[len("trace/") :] for k in golden if k.startswith("trace/")]
    assert len(names) >= 4 * 6 + 4
    for name in names:
        ours = t["logits" if name == "logits_traced" else name]
        ref = torch.from_numpy(golden["trace/" + name])
        assert ours.shape == ref.shape, name
        err = (ours - ref).abs().max().item()
        assert err <= 1e-5, f"{name}: max abs {err:.3g}"


def test_fp64_matches_upstream_fp64(ref_model, golden):
    m = ref_model.double()
    with torch.no_grad():
        out = m(torch.from_numpy(golden["input"]).double())
    assert (out - torch.from_numpy(golden["logits_fp64"])).abs().max() <= 1e-10


def test_whitebox_measurements_match_upstream(ref_model, golden):
    wb = measure(ref_model, torch.from_numpy(golden["input"]))
    for ours, theirs in [
        (wb.coding_rate_mean, "coding_rate_mean"),
        (wb.coding_rate_std, "coding_rate_std"),
        (wb.zero_fraction_mean, "sparsity_zero_frac_mean"),
        (wb.zero_fraction_std, "sparsity_zero_frac_std"),
    ]:
        np.testing.assert_allclose(ours, golden[theirs], rtol=1e-4, atol=0, err_msg=theirs)
    assert wb["coding_rate_mean"] is wb.coding_rate_mean  # key access works as well


def test_fused_formulation_is_the_same_function(ref_model, golden):
    x = torch.from_numpy(golden["input"])
    with torch.no_grad():
        a = ref_model(x)
        b = apply(ref_model, TRAIN_FUSION, share_parameters=True)(x)
    assert (a - b).abs().max() <= 1e-5
