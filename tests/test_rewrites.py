"""Each CRATE-aware rewrite computes the same function (<= 1e-5 in fp32) and exports."""

import pytest
import torch

from crate_edge import create_model, load_model
from crate_edge.export import export
from crate_edge.rewrites import PASSES, FoldedISTA, Probe, apply, split_probe_outputs


@pytest.fixture(scope="module")
def models(ref_ckpt):
    torch.manual_seed(0)
    return {
        "reference": load_model(ref_ckpt, heads=4),
        "mean-pool-1ch": create_model("mnist-micro", pool="mean").eval(),
        "tiny-224": create_model("tiny", num_classes=10).eval(),
    }


def _x(m, b=3):
    return torch.randn(b, *m.cfg.input_shape, generator=torch.Generator().manual_seed(7))


COMBOS = [[p] for p in PASSES] + [
    ["shift_patch_norm", "fold_ista", "sdpa_attention"],
    ["shift_patch_norm", "channel_major_patches", "fold_ista_update"],
    ["shift_patch_norm", "linear_layernorm", "channel_major_patches"],
    ["shift_patch_norm", "fold_ista", "bmm_attention", "linear_layernorm"],
]


@pytest.mark.parametrize("names", COMBOS, ids=lambda n: "+".join(n))
@pytest.mark.parametrize("which", ["reference", "mean-pool-1ch", "tiny-224"])
def test_rewrite_preserves_outputs(models, names, which):
    m = models[which]
    x = _x(m, 2 if which == "tiny-224" else 3)
    with torch.no_grad():
        want = m(x)
        got = apply(m, names)(x)
    err = (want - got).abs().max().item()
    assert err <= 1e-5, f"{names} on {which}: {err:.3g}"


def test_rewrites_do_not_touch_the_source(models):
    m = models["reference"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = apply(m, ["fold_ista", "linear_layernorm"])
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    for share in (False, True):  # a pass that permutes parameters makes new tensors either way
        apply(m, ["shift_patch_norm", "channel_major_patches"], share_parameters=share)
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert isinstance(r.transformer.layers[0][1].fn, FoldedISTA)
    assert not isinstance(m.transformer.layers[0][1].fn, FoldedISTA)


def test_fold_is_computed_in_float64(models):
    """Folding in fp32 would lose the small eta (D - D^T D) term against the identity."""
    m = models["tiny-224"]
    D = m.transformer.layers[0][1].fn.weight.detach()
    A64 = torch.eye(D.shape[0], dtype=torch.float64) + 0.1 * (D.double() - D.double().t() @ D.double())
    folded = apply(m, ["fold_ista"]).transformer.layers[0][1].fn.weight
    assert torch.equal(folded, A64.t().float())


def test_unknown_rewrite(models):
    from crate_edge import CrateEdgeError

    with pytest.raises(CrateEdgeError, match="unknown rewrite"):
        apply(models["reference"], ["nope"])


def test_probe_outputs_per_layer_features(models):
    m = models["reference"]
    x = _x(m)
    from crate_edge.whitebox import trace

    t = trace(m, x)
    with torch.no_grad():
        logits, ws, zs = split_probe_outputs(Probe(apply(m, ["fold_ista", "sdpa_attention"]))(x), m.cfg.depth)
    assert (logits - t["logits"]).abs().max() <= 1e-5
    for i in range(m.cfg.depth):
        assert (ws[i] - t[f"layer{i}/qkv"]).abs().max() <= 1e-5
        assert (zs[i] - t[f"layer{i}/z_out"]).abs().max() <= 1e-5


@pytest.mark.parametrize("names", [["fold_ista", "sdpa_attention"], ["fold_ista", "bmm_attention", "linear_layernorm"]])
def test_export_with_dynamic_batch(models, names):
    m = apply(models["reference"], names)
    ep = export(m, _x(m, 2), (1, 64))
    for b in (1, 5):
        x = _x(m, b)
        with torch.no_grad():
            assert (ep.module()(x) - m(x)).abs().max() <= 1e-5


def test_shift_patch_norm_conditions_near_uniform_patches(models):
    """Patches with variance << eps (flat background) make the patch LayerNorm amplify the
    rounding of its mean by up to eps^-1/2; the shifted form must track float64 closely."""
    import copy

    m = models["tiny-224"]
    g = torch.Generator().manual_seed(3)
    x = 0.7 + 1e-4 * torch.randn(2, *m.cfg.input_shape, generator=g)  # nearly flat images
    with torch.no_grad():
        ref = Probe(apply(copy.deepcopy(m).double(), []))(x.double())[1]
        plain = Probe(apply(m, []))(x)[1]
        shifted = Probe(apply(m, ["shift_patch_norm"]))(x)[1]
    e_plain = (plain.double() - ref).abs().max().item()
    e_shift = (shifted.double() - ref).abs().max().item()
    assert e_shift <= 1e-5 and e_shift < e_plain / 10, (e_plain, e_shift)


def test_a_shared_parameter_view_trains_the_model_itself(models):
    """Training runs through TRAIN_FUSION over the model's own parameters: gradients and updates
    reach the reference formulation, which stays unrewritten."""
    from crate_edge.model import ISTA, MSSA
    from crate_edge.train import TRAIN_FUSION

    torch.manual_seed(0)
    m = create_model("mnist-micro").train()
    fast = apply(m, TRAIN_FUSION, share_parameters=True)
    assert fast.training and {id(p) for p in fast.parameters()} == {id(p) for p in m.parameters()}
    assert isinstance(m.transformer.layers[0][0].fn, MSSA) and isinstance(m.transformer.layers[0][1].fn, ISTA)
    x = _x(m, 4)
    fast(x).square().sum().backward()
    g_fast = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m(x).square().sum().backward()
    for n, p in m.named_parameters():
        assert torch.allclose(g_fast[n], p.grad, rtol=1e-4, atol=1e-5), n
