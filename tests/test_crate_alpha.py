"""CRATE-α against upstream's own model code: fixtures made by scripts/make_alpha_fixtures.py
running UCSC-VLAA/CRATE-alpha's torch_inference/model/crate_alpha.py at shapes nothing else here
was built on (non-square images, patch 14, heads x dim_head != dim, one head without an output
map, token scales where LayerNorm's eps shows), in each checkpoint container import accepts."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import crate_edge
from crate_edge import CrateEdgeError, load_model, rewrites
from crate_edge.crate_alpha import CrateAlpha, CrateAlphaConfig
from crate_edge.whitebox import measure

FIX = Path(__file__).parent / "fixtures" / "crate_alpha"
CASES = json.loads((FIX / "cases.json").read_text())


def _load(name, **kw):
    args = CASES[name]["args"]
    if isinstance(args["image_size"], list):  # a non-square grid cannot be told from the token count
        kw.setdefault("image_size", tuple(args["image_size"]))
    if CASES[name]["heads_needed"]:
        kw.setdefault("heads", args["heads"])
    return load_model(FIX / f"{name}.pth", **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_reproduces_upstream_logits(name):
    m = _load(name)
    assert isinstance(m, CrateAlpha)
    args = CASES[name]["args"]
    for k in ("patch_size", "num_classes", "dim", "depth", "heads", "dim_head"):
        assert getattr(m.cfg, k) == args[k], k
    f = np.load(FIX / f"{name}.npz")
    with torch.no_grad():
        got = m(torch.from_numpy(f["images"])).double().numpy()
    assert np.abs(got - f["logits"]).max() <= 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_white_box_values_match_upstream(name):
    m = _load(name)
    f = np.load(FIX / f"{name}.npz")
    wb = measure(m, torch.from_numpy(f["images"]))
    np.testing.assert_array_equal(wb.per_image["zero_fraction"], f["zero_fraction"])  # exact zeros of z2
    np.testing.assert_allclose(wb.per_image["residual"], f["residual"], atol=1e-5)
    np.testing.assert_allclose(wb.per_image["coding_rate"], f["coding_rate"], rtol=1e-5)
    assert "residual |x-Dz2|/|x|" in wb.table() and len(wb.to_dict()["residual_mean"]) == m.cfg.depth


def test_heads_are_asked_for_when_shapes_cannot_tell(tmp_path):
    with pytest.raises(CrateEdgeError, match="pass --heads H") as e:
        load_model(FIX / "p14-small-scale.pth")
    assert "CRATE-α" in str(e.value) and "\n" not in str(e.value)
    # the published base configuration needs no --heads (meta tensors: no 86M-parameter file here)
    cfg = crate_edge.family.variant_config("crate-alpha-base")
    assert (cfg.heads, cfg.dim_head, cfg.patch_size) == (12, 64, 16)


def test_import_command_and_round_trip(tmp_path):
    r = _cli_import(FIX / "rect-40x24-p8.pth", tmp_path, "--heads", "3", "--image-size", "40,24")
    assert r.returncode == 0, r.stderr
    assert "CRATE-α dim=48 depth=2 heads=3x20" in r.stdout and "image=(40, 24)" in r.stdout
    out = tmp_path / "out"
    back = load_model(out)
    assert isinstance(back.cfg, CrateAlphaConfig) and json.loads((out / "config.json").read_text())["config"]["family"] == "crate-alpha"
    f = np.load(FIX / "rect-40x24-p8.npz")
    with torch.no_grad():
        assert np.abs(back(torch.from_numpy(f["images"])).double().numpy() - f["logits"]).max() <= 1e-5
    assert crate_edge.checkpoint.model_hash(back) == crate_edge.checkpoint.model_hash(_load("rect-40x24-p8"))


def _cli_import(src, tmp_path, *extra):
    return subprocess.run(
        [sys.executable, "-m", "crate_edge.cli", "import", str(src), "--out", str(tmp_path / "out"), *extra], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda sd: sd.pop("transformer.layers.1.1.fn.D1"), "missing 1 key(s) e.g. transformer.layers.1.1.fn.D1"),
        (lambda sd: sd.__setitem__("transformer.layers.0.1.fn.D", torch.zeros(40, 150)), "transformer.layers.0.1.fn.D has shape (40, 150)"),
        (lambda sd: sd.__setitem__("transformer.layers.1.1.fn.D1", torch.zeros(40, 80)), "transformer.layers.1.1.fn.D1 has shape (40, 80)"),
        (lambda sd: sd.__setitem__("conv1.weight", torch.zeros(40, 3, 16)), "conv1.weight has shape (40, 3, 16)"),
        (
            lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("conv1") or k.startswith("transformer")],
            "not a CRATE or CRATE-α checkpoint",
        ),
    ],
)
def test_bad_checkpoints_get_one_line(tmp_path, edit, needle):
    sd = torch.load(FIX / "one-head-identity.pth", weights_only=True)
    edit(sd)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(CrateEdgeError) as e:
        load_model(bad)
    assert needle in str(e.value) and "\n" not in str(e.value)
    r = _cli_import(bad, tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and needle in r.stderr
    assert not (tmp_path / "out").exists()


PASSES = [
    ["fold_ista"],
    ["fold_ista_update"],
    ["sdpa_attention"],
    ["bmm_attention"],
    ["linear_layernorm"],
    ["patch_linear"],
    ["shift_patch_norm"],  # CRATE-α has no patch LayerNorm: nothing to do, and nothing may change
    ["patch_linear", "fold_ista_update", "sdpa_attention"],
    ["patch_linear", "fold_ista", "bmm_attention", "linear_layernorm"],
]


@pytest.mark.parametrize("names", PASSES, ids=["+".join(p) for p in PASSES])
@pytest.mark.parametrize("case", ["rect-40x24-p8", "one-head-identity"])
def test_rewrites_are_exact_on_crate_alpha(names, case):
    m = _load(case)
    x = torch.from_numpy(np.load(FIX / f"{case}.npz")["images"])
    r = rewrites.apply(m, names)
    with torch.no_grad():
        z, feats = m.forward_intermediates(x)
        z2, feats2 = r.forward_intermediates(x)
        assert (r(x) - m(x)).abs().max() <= 1e-5
        for a, b in zip(feats, feats2):
            for t1, t2 in zip(a, b):
                assert (t1 - t2).abs().max() <= 1e-5
        # the support of z2 is the same set
        for a, b in zip(feats, feats2):
            assert ((a[1] != 0) != (b[1] != 0)).float().mean() <= 1e-4
    if "fold_ista" in names or "fold_ista_update" in names:
        assert all(type(ista.fn).__name__ == "FoldedOvercompleteISTA" for _, ista in r.transformer.layers)


def test_quantization_sites_cover_every_alpha_gemm():
    from crate_edge.quantize import QuantConfig, all_sites, quant_rewrites, quant_sites

    m = _load("p14-small-scale")
    qc = QuantConfig()
    names = quant_rewrites(["shift_patch_norm", "fold_ista", "sdpa_attention"], qc, m.cfg.FAMILY)
    assert names[0] == "patch_linear" and "fold_ista_update" in names
    r = rewrites.Probe(rewrites.apply(m, names))
    sites = all_sites(r)
    assert set(sites) == {"embed", "head"} | {
        f"{i}.{k}" for i in range(3) for k in ("qkv", "out", "ista.enc", "ista.syn", "ista.res", "ista.dec")
    }
    mods = dict(r.named_modules())
    assert all(isinstance(mods[p], torch.nn.Linear) for p in sites.values())
    assert set(quant_sites(r, qc.replace(float_layers=[1]))) == set(sites) - {s for s in sites if s.startswith("1.")}
    assert not any(s.endswith("ista.enc") for s in quant_sites(r, qc.replace(sites=["embed", "qkv", "out", "head"])))


@pytest.mark.parametrize("probe", [True, False], ids=["probe-build", "plain-build"])
def test_compile_int8_with_user_data_reports_code_iou_and_residual(tmp_path, probe):
    """An imported CRATE-α, onnxruntime-int8, the user's own calibration and parity data: the
    per-layer table (z2 support IoU and residual per layer) from a --probe build, or, for the
    plain build, from its probe twin, which leaves nothing behind."""
    pytest.importorskip("onnxruntime")
    crate_edge.import_checkpoint(FIX / "rect-40x24-p8.pth", tmp_path / "model", heads=3, image_size=(40, 24))
    from crate_edge.data import load_dataset

    img = load_dataset("embedded", "test").images[:96].float() / 255  # real images: 28x28 grey -> 40x24 RGB
    x = torch.nn.functional.interpolate(img, size=(40, 24), mode="bilinear").repeat(1, 3, 1, 1)
    np.savez(tmp_path / "mine.npz", x=x.numpy().astype(np.float32))
    r = subprocess.run(
        [
            *(sys.executable, "-m", "crate_edge.cli", "compile", "--target", "onnxruntime-int8"),
            *("--model", str(tmp_path / "model"), "--calibration-data", str(tmp_path / "mine.npz")),
            *("--calibration-images", "64", "--parity-data", str(tmp_path / "mine.npz"), "-o", str(tmp_path / "art")),
            *(["--probe"] if probe else []),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sparse code z2" in r.stdout and "resid ref" in r.stdout and "IoU mean" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 13]
    assert len(rows) == 2  # one per layer
    for row in rows:
        assert float(row[4]) > 0.9  # support IoU of z2 under int8
        assert abs(float(row[11]) - float(row[12])) < 0.02  # residual, reference vs artifact
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["quantization"]["calibration"]["spec"].endswith("mine.npz")
    if not probe:
        assert m["outputs"] == ["logits"] and "measured on the artifact's probe twin" in r.stdout
        diff = float(r.stdout.split("differ from the artifact's by at most ")[1].split()[0])
        assert diff < 1e-3  # the twin computes what the artifact computes
        assert sorted(q.name for q in tmp_path.iterdir()) == ["art", "mine.npz", "model"]  # the twin is gone
        return
    assert m["outputs"][1:4] == ["mssa_features_0", "mssa_features_1", "ista_code_0"]
    assert m["outputs"][-1] == "ista_residual_1" and "1.ista.res" in m["quantization"]["sites"]
    assert m["quantization"]["calibration"]["spec"].endswith("mine.npz")
