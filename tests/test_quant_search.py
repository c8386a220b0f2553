"""The accuracy-driven fallback: raise the most sensitive block to float until the budget holds,
keep the fastest passing configuration, always save the best one with a log."""

import json

import pytest
import torch

import crate_edge
from crate_edge.backends import get_backend
from crate_edge.errors import CrateEdgeError
from crate_edge.search import _sensitivity, search
from crate_edge.targets import load_target

pytestmark = pytest.mark.skipif(not get_backend("onnxruntime").available().ok, reason="onnxruntime not installed")


def test_sensitivity_is_the_noise_power_each_block_adds():
    layers = [{"z_sqnr_db": 50.0}, {"z_sqnr_db": 45.0}, {"z_sqnr_db": 20.0}, {"z_sqnr_db": float("inf")}]
    assert _sensitivity(layers) == pytest.approx([1e-5, 10**-4.5 - 1e-5, 1e-2 - 10**-4.5, -1e-2])


def _target(tmp_path, **quant):
    base = load_target("onnxruntime-int8").raw
    lines = [
        'name = "ort-int8-search"',
        'backend = "onnxruntime"',
        'precision = "int8"',
        'rewrites = ["shift_patch_norm", "fold_ista", "sdpa_attention"]',
        "[options]",
        "opset = 23",
        "threads = 1",
        "[quantize]",
    ]
    q = {**base["quantize"], "calibration_images": 64, **quant}
    for k, v in q.items():
        lines.append(f"{k} = {json.dumps(v)}")
    lines += ["[input]", "example_batch = 2", "dynamic_batch = [1, 64]", "[parity]", "min_top1_agreement = 0.5"]
    p = tmp_path / "t.toml"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_passing_budget_keeps_everything_quantized(tmp_path):
    out = tmp_path / "art"
    r = search(None, _target(tmp_path), out, budget={"max_top1_drop": 0.05, "min_support_iou": 0.5}, limit=200, log=lambda s: None)
    assert r["passed"] and r["chosen_float_layers"] == [] and len(r["attempts"]) == 1
    art = crate_edge.load_artifact(out)
    assert not art.probe and art.manifest["quantization"]["config"]["float_layers"] == []
    assert json.loads((tmp_path / "art" / "search.json").read_text())["passed"]


def test_impossible_budget_raises_blocks_by_sensitivity_and_saves_the_best(tmp_path):
    torch.manual_seed(0)
    m = crate_edge.create_model("mnist-micro").eval()  # depth 4: a short search
    out = tmp_path / "art"
    with pytest.raises(CrateEdgeError, match="no configuration met the budget"):
        # 200 dB SQNR in every layer: no quantized configuration can pass (the embed and head
        # GEMMs stay quantized even with every block in float)
        search(m, _target(tmp_path), out, budget={"min_sqnr_db": 200.0}, limit=64, log=lambda s: None)
    log = json.loads((tmp_path / "art" / "search.json").read_text())
    att = log["attempts"]
    assert len(att) == m.cfg.depth + 1 and not any(a["passed"] for a in att)
    for prev, nxt in zip(att, att[1:]):  # one block more each time: the most sensitive one left
        added = set(nxt["float_layers"]) - set(prev["float_layers"])
        assert len(added) == 1
        cand = {l: s for l, s in enumerate(prev["sensitivity"]) if l not in prev["float_layers"]}
        assert added == {max(cand, key=cand.get)}
    assert (out / "manifest.json").exists()  # the best found is saved anyway


def test_cli_bad_input_is_one_line(tmp_path):
    from click.testing import CliRunner

    from crate_edge.cli import main

    for args, msg in [
        (["--target", "onnxruntime"], "no [quantize] table"),
        (["--target", "onnxruntime-int8", "--budget", "x"], "KEY=NUMBER"),
        (["--target", "nope"], "unknown target"),
    ]:
        r = CliRunner().invoke(main, ["quantize", *args, "--out", str(tmp_path / "a")])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
