"""The quantization core: configs as data, the CRATE-aware site policy, calibration data."""

import pytest
import torch

import crate_edge
from crate_edge.errors import CrateEdgeError
from crate_edge.quantize import QuantConfig, all_sites, calibration_images, quant_rewrites, quant_sites
from crate_edge.rewrites import FoldedISTAUpdate, Probe, apply
from crate_edge.targets import Target


def _target(**q):
    return Target(name="t", backend="onnxruntime", quantize=q)


def test_float_target_has_no_config():
    assert QuantConfig.from_target(_target()) is None


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"scheme": "int3"}, "quantize.scheme"),
        ({"ista": "half"}, "quantize.ista"),
        ({"calibration": "vibes"}, "quantize.calibration"),
        ({"sites": ["qkv", "softmax"]}, "softmax"),
        ({"bogus": 1}, "unknown [quantize] key"),
    ],
)
def test_bad_config_is_one_clear_error(bad, msg):
    with pytest.raises(CrateEdgeError, match=msg.replace("[", r"\[")):
        QuantConfig.from_target(_target(**bad))


def test_rewrites_follow_the_ista_choice():
    upd = QuantConfig(ista="update")
    assert quant_rewrites(["shift_patch_norm", "fold_ista", "sdpa_attention"], upd) == [
        "shift_patch_norm",
        "fold_ista_update",
        "sdpa_attention",
    ]
    assert quant_rewrites(["fold_ista_update"], QuantConfig(ista="matrix")) == ["fold_ista"]
    assert quant_rewrites(["sdpa_attention"], None) == ["sdpa_attention"]


def test_sites_follow_the_policy():
    m = crate_edge.load_model()
    depth = m.cfg.depth
    r = apply(m, ["fold_ista_update", "sdpa_attention"])
    sites = all_sites(r)
    assert len(sites) == 2 + 3 * depth
    mods = dict(r.named_modules())
    for name, path in sites.items():
        assert path in mods, (name, path)
        assert isinstance(mods[path], torch.nn.Linear)  # only weight GEMMs are sites
    assert isinstance(mods[sites["0.ista"]], torch.nn.Linear) and isinstance(mods[sites["0.ista"].rsplit(".", 1)[0]], FoldedISTAUpdate)
    # a probe wrapper shifts every path under "model."
    psites = all_sites(Probe(r))
    assert all(psites[k] == "model." + v for k, v in sites.items())
    qc = QuantConfig(sites=["qkv", "ista"], float_layers=[1, 3])
    chosen = quant_sites(r, qc)
    assert set(chosen) == {f"{i}.{k}" for i in range(depth) if i not in (1, 3) for k in ("qkv", "ista")}


def test_calibration_comes_from_the_training_split():
    m = crate_edge.load_model()
    x = calibration_images(m.cfg, QuantConfig(calibration_images=32))
    assert x.shape == (32, *m.cfg.input_shape) and x.dtype == torch.float32
    with pytest.raises(CrateEdgeError, match="not found"):
        calibration_images(m.cfg, QuantConfig(calibration_data="/nonexistent/data"))
