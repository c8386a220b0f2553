"""The accuracy-parity suite (crate_edge.parity, crate_edge.testing, `crate-edge parity`):
a faithful probe artifact passes tight per-layer tolerances, a planted broken layer is found
and named, non-probe artifacts get logit metrics only, and bad input is refused in one line."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import crate_edge
from crate_edge import CrateEdgeError, load_model
from crate_edge.cli import main
from crate_edge.parity import parity
from crate_edge.runtime import Runner
from crate_edge.testing import assert_parity

pytest.importorskip("onnxruntime")

BROKEN_LAYER = 3
TIGHT = dict(min_sqnr_db=60, min_support_iou=0.99, max_coding_rate_rel=1e-4, max_top1_drop=0.0, min_top1_agreement=0.999)


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def ref():
    return load_model()


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    probe = crate_edge.compile(None, "onnxruntime", out=d / "probe", probe=True, parity_limit=200, log=_quiet)
    plain = crate_edge.compile(None, "onnxruntime", out=d / "plain", parity_limit=200, log=_quiet)
    broken_model = load_model()
    with torch.no_grad():  # perturb block 3's ISTA dictionary D only
        D = broken_model.transformer.layers[BROKEN_LAYER][1].fn.weight
        D.add_(torch.randn(D.shape, generator=torch.Generator().manual_seed(0)) * D.std())
    broken = crate_edge.compile(broken_model, "onnxruntime", out=d / "broken", probe=True, parity_limit=200, log=_quiet)
    return {"probe": probe, "plain": plain, "broken": broken, "dir": d}


def test_probe_artifact_passes_tight_tolerances(arts, ref):
    rep = assert_parity(arts["probe"].path, limit=500, **TIGHT)
    r = rep.results[0]
    assert rep.passed and r.probe and r.source_matches_reference and len(r.layers) == ref.cfg.depth
    assert r.tolerances["min_sqnr_db"] == 60 and r.tolerances["max_abs"] == 1e-4  # caller's over the target file's
    for d in r.layers:
        assert d["z_sqnr_db"] > 60 and d["w_sqnr_db"] > 60 and d["z_cos_min"] > 0.99999
        assert d["support_iou_mean"] > 0.99 and d["support_iou_p05"] > 0.98
        assert abs(d["zero_fraction"] - d["zero_fraction_ref"]) < 1e-3 and d["coding_rate_rel"] < 1e-4
    # the reference side agrees with independent measurements: the eager forward and whitebox.measure()
    from crate_edge.data import load_dataset, prepare
    from crate_edge.whitebox import measure

    ds = load_dataset("embedded")
    assert rep.n == 500
    labels = ds.labels[:500].numpy()
    with torch.no_grad():
        eager = torch.cat([ref(prepare(ds.images[i : i + 100], ref.cfg)) for i in range(0, 500, 100)]).numpy()
    assert rep.reference["top1"] == pytest.approx(float((eager.argmax(1) == labels).mean()), abs=1e-12)
    wb = measure(ref, prepare(ds.images[:500], ref.cfg))
    for l, d in enumerate(rep.reference["layers"]):
        assert d["zero_fraction_ref"] == pytest.approx(wb.zero_fraction_mean[l], abs=1e-9)
        assert d["coding_rate_ref"] == pytest.approx(wb.coding_rate_mean[l], rel=1e-6)
    assert r.logits["top1_drop"] == pytest.approx(r.logits["reference_top1"] - r.logits["artifact_top1"])


def test_planted_broken_layer_is_found_and_named(arts, ref):
    with pytest.raises(CrateEdgeError, match="reference"):  # not compiled from the embedded model
        parity(arts["broken"].path, data="embedded", progress=False)
    rep = parity(
        arts["broken"].path,
        reference=ref,
        data="embedded",
        limit=300,
        progress=False,
        tolerances={"min_support_iou": 0.9, "max_coding_rate_rel": 0.02, "min_sqnr_db": 40},
    )
    r = rep.results[0]
    assert not rep.passed and not r.source_matches_reference
    # blocks before the perturbation are untouched; the error enters at block 3's ISTA output
    for d in r.layers[:BROKEN_LAYER]:
        assert d["z_sqnr_db"] > 60 and d["support_iou_mean"] > 0.99
    assert r.layers[BROKEN_LAYER]["w_sqnr_db"] > 60  # w_3 comes from block 3's input
    assert r.layers[BROKEN_LAYER]["z_sqnr_db"] < 40 and r.layers[BROKEN_LAYER]["support_iou_mean"] < 0.9
    assert r.first_failing_layer() == BROKEN_LAYER
    assert min(v.layer for v in r.violations if v.layer is not None) == BROKEN_LAYER
    assert f"layer {BROKEN_LAYER} ISTA support IoU" in rep.message()
    with pytest.raises(AssertionError, match=f"layer {BROKEN_LAYER} ISTA support IoU"):
        assert_parity(arts["broken"].path, reference=ref, limit=300, min_support_iou=0.9)


def test_non_probe_artifact_gets_logit_metrics_only(arts, tmp_path):
    rep = parity(arts["plain"].path, data="embedded", limit=300, progress=False, tolerances={"min_support_iou": 0.9})
    r = rep.results[0]
    assert rep.passed and not r.probe and r.layers is None and r.unchecked == ["min_support_iou"]
    assert r.logits["n"] == 300 and r.logits["top1_agreement"] >= 0.999 and r.logits["max_abs"] <= 1e-4
    rep.write(tmp_path)
    assert "Not a probe build" in (tmp_path / "parity.md").read_text() and (tmp_path / "parity.png").stat().st_size > 0
    with pytest.raises(AssertionError, match="not a probe build"):
        assert_parity(arts["plain"].path, limit=100, min_support_iou=0.9)
    assert_parity(arts["plain"].path, limit=100, max_abs=1e-4)


def test_several_artifacts_and_report_files(arts, tmp_path, ref):
    rep = parity(
        [arts["probe"].path, arts["plain"].path, arts["broken"].path],
        reference=ref,
        data="embedded",
        limit=256,
        batch_size=100,
        progress=False,
        tolerances={"min_support_iou": 0.9},
    )
    assert [r.passed for r in rep.results] == [True, True, False] and rep.n == 256
    rep.write(tmp_path)
    doc = json.loads((tmp_path / "parity.json").read_text())
    assert doc["n"] == 256 and len(doc["artifacts"]) == 3 and doc["passed"] is False
    assert doc["artifacts"][0]["layers"][0]["layer"] == 0 and doc["artifacts"][1]["layers"] is None
    md = (tmp_path / "parity.md").read_text()
    assert "| layer |" in md and "FAIL" in md and (tmp_path / "parity.png").stat().st_size > 10_000


def test_odd_batches_are_padded_to_the_artifact_batch_range():
    calls = []

    def runner(x):
        calls.append(len(x))
        return [x.reshape(len(x), -1).sum(1, keepdims=True)]

    art = Runner("fake", {"input": {"shape": [4, 1, 2, 2], "batch_range": [4, 4]}, "target": {"name": "fake"}}, runner, "fake")
    x = np.random.default_rng(0).standard_normal((10, 1, 2, 2)).astype(np.float32)
    out = art(x)
    assert calls == [4, 4, 4] and out.shape == (10, 1)
    np.testing.assert_allclose(out[:, 0], x.reshape(10, -1).sum(1), rtol=1e-6)


@pytest.mark.parametrize("n,p", [(50, 32), (17, 32), (8, 8)])
def test_fast_coding_rate_equals_whitebox(n, p):
    from crate_edge.parity import coding_rate
    from crate_edge.whitebox import coding_rate as upstream

    w = torch.randn(5, 3, n, p, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(coding_rate(w), upstream(w), rtol=1e-10, atol=1e-9)


def test_cli(arts, tmp_path, ref):
    runner = CliRunner()
    probe, broken = str(arts["probe"].path), str(arts["broken"].path)
    out = tmp_path / "ok"
    r = runner.invoke(main, ["parity", probe, "--data", "embedded", "--limit", "200", "--out", str(out), "--tol", "min_sqnr_db=60"])
    assert r.exit_code == 0, r.output
    assert "SQNR" in r.output and all((out / f).exists() for f in ("parity.json", "parity.md", "parity.png"))
    assert json.loads((out / "parity.json").read_text())["artifacts"][0]["tolerances"]["min_sqnr_db"] == 60

    ref_dir = crate_edge.zoo.embedded_model_dir()
    r = runner.invoke(
        main,
        [
            "parity",
            broken,
            "--reference",
            str(ref_dir),
            "--data",
            "embedded",
            "--limit",
            "200",
            "--out",
            str(tmp_path / "bad"),
            "--tol",
            "min_support_iou=0.9",
        ],
    )
    assert r.exit_code == 1 and f"layer {BROKEN_LAYER}" in r.output and "parity FAILED" in r.output
    assert (tmp_path / "bad" / "parity.json").exists()

    tampered = tmp_path / "tampered"
    shutil.copytree(probe, tampered)
    f = tampered / "model.onnx"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x55
    f.write_bytes(bytes(b))
    other = crate_edge.save_model(crate_edge.create_model("mnist-micro"), tmp_path / "micro")
    for args, what in (
        ([broken, "--data", "embedded"], "reference"),  # implicit embedded reference, other source
        ([str(tmp_path / "nope"), "--data", "embedded"], "not found"),
        ([str(tampered), "--data", "embedded"], "sha256"),
        ([probe, "--data", "no-such-data"], "not found"),
        ([probe, "--data", "embedded", "--reference", str(other)], "does not fit"),
        ([probe, "--data", "embedded", "--tol", "min_iou=0.9"], "unknown tolerance"),
        ([probe, "--data", "embedded", "--tol", "min_iou"], "KEY=VALUE"),
    ):
        r = runner.invoke(main, ["parity", *args, "--out", str(tmp_path / "x")])
        assert r.exit_code == 2, (args, r.output)
        err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and what in err[0], (args, r.output)


def test_long_runs_do_not_grow_memory(arts, ref):
    """Regression: heap fragmentation once grew a 10k-image run with ten probe artifacts past
    24 GB. With a trim per batch, a run 3x as long needs no more memory than a short one."""
    from crate_edge.parity import _release_memory

    def rss_mb():
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) / 1e3

    _release_memory()
    parity([arts["probe"], arts["broken"]], reference=ref, data="fashion-mnist", limit=400, progress=False)
    short = rss_mb()
    parity([arts["probe"], arts["broken"]], reference=ref, data="fashion-mnist", limit=1200, progress=False)
    assert rss_mb() - short < 150, (short, rss_mb())
