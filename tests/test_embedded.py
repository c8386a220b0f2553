"""The embedded reference model and the main job (`crate-edge demo`)."""

import json
import subprocess
import sys

import pytest

import crate_edge
from crate_edge import CrateEdgeError


@pytest.fixture(scope="module")
def embedded():
    return crate_edge.load_model()


def test_embedded_model_loads_from_the_package(embedded):
    c = embedded.cfg
    assert (c.image_size, c.channels, c.num_classes) == (28, 1, 10) and not embedded.training


def test_embedded_model_scores_at_least_90_percent_on_fashion_mnist(embedded):
    try:
        r = crate_edge.evaluate(embedded, "fashion-mnist:test")
    except CrateEdgeError as e:
        pytest.skip(str(e))
    assert r["n"] == 10_000
    assert r["top1"] >= 0.90, f"top-1 {r['top1']:.4f}"


def test_embedded_model_is_sparse_and_compressive(embedded):
    from crate_edge.data import load_dataset, prepare
    from crate_edge.whitebox import measure

    ds = load_dataset("embedded")
    wb = measure(embedded, prepare(ds.images[:64], embedded.cfg))
    assert len(wb.coding_rate_mean) == embedded.cfg.depth
    assert (wb.zero_fraction_mean > 0.3).all()  # ISTA outputs are sparse in every layer


def test_main_job_and_inspect(tmp_path):
    """The main job's CLI (narrowed to one fp32 target; tests/test_demo.py covers the report), then
    the white-box and evaluation verbs on the embedded model."""
    cli = [sys.executable, "-m", "crate_edge.cli"]
    r = subprocess.run(cli + ["demo", "--targets", "onnxruntime", "--out", str(tmp_path / "demo")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "onnxruntime" in r.stdout and "eager upstream" in r.stdout and "report.html" in r.stdout
    d = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert [t["target"] for t in d["targets"]] == ["onnxruntime"] and d["targets"][0]["status"] == "ok"
    assert (tmp_path / "demo" / "whitebox.png").stat().st_size > 10_000
    r = subprocess.run(cli + ["inspect", "--n", "32", "--out", str(tmp_path / "insp")], capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "insp" / "whitebox.png").exists(), r.stderr
    r = subprocess.run(cli + ["eval", "--data", "embedded"], capture_output=True, text=True)
    assert r.returncode == 0 and "top-1" in r.stdout, r.stderr
