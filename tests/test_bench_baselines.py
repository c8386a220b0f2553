"""The measurement scripts' baselines and timing hygiene (bench/baselines.py, bench/_common.py):
what a user would pick instead runs and agrees with eager, a missing package is skipped with the
reason, and the floors follow the GEMM counts."""

import sys

import numpy as np
import pytest
import torch

import crate_edge
from bench import _common, baselines
from bench.quant_speed import floor_of, floors, int8_attention, window


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return crate_edge.create_model("mnist-micro", depth=1).eval()


def test_settle_waits_for_an_idle_cpu():
    b = _common.settle(pause_s=0.0, max_s=0.2)
    assert 0.0 <= b <= 1.0
    busy = {}
    t = _common.time_rounds({"a": lambda x: x, "b": lambda x: x}, np.zeros(1), 0, 2, 2, busy=busy)
    assert set(busy) == {"a", "b"} and len(busy["a"]) == 2 and len(t["a"]) == 4


def test_torch_compile_baseline_agrees_with_eager(micro):
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    fns, skipped = baselines.torch_compile(micro, x)
    if skipped:
        pytest.skip(skipped["torch.compile"])
    with torch.no_grad():
        np.testing.assert_allclose(fns["torch.compile"](x), micro(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_openvino_missing_is_skipped_with_the_reason(micro, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails
    fns, skipped = baselines.openvino(micro, np.zeros((1, 1, 28, 28), np.float32), np.zeros((4, 1, 28, 28), np.float32), 1)
    assert not fns and set(skipped) == {"openvino f32", "openvino default", "openvino+nncf int8"}
    assert all("pip install 'crate-edge[openvino]'" in v for v in skipped.values())


def test_openvino_baselines_agree_with_eager(micro):
    pytest.importorskip("openvino")
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    cal = np.random.default_rng(1).random((8, 1, 28, 28), dtype=np.float32)
    fns, skipped = baselines.openvino(micro, x, cal, 1)
    with torch.no_grad():
        want = micro(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(fns["openvino f32"](x), want, atol=1e-4)
    assert fns["openvino default"].precision in ("fp32", "bf16", "fp16")
    if "openvino+nncf int8" in fns:
        got = fns["openvino+nncf int8"](x)
        assert got.shape == want.shape and np.isfinite(got).all()


def test_floors_follow_the_gemm_counts():
    cfg = crate_edge.create_model("tiny").cfg
    ceil = {p: {"gflops": g} for p, g in (("fp32", 100.0), ("bf16", 200.0), ("int8", 400.0))}
    f = floors(cfg, ceil, 1)
    assert f["fp32_upstream"] > f["fp32"] > f["bf16"] > f["int8_crate_policy"] > f["int8_everything"]
    assert f["fp32"] / f["int8_everything"] == pytest.approx(4.0)
    assert floor_of("eager upstream", "fp32") == "fp32_upstream"
    assert floor_of("onnxruntime-int8", "int8") == "int8_crate_policy"
    assert floor_of("openvino+nncf int8", "int8") == "int8_everything"
    assert floor_of("openvino default", "bf16") == "bf16"
    # an int8 target whose attention products ran in int8 is held to int8 everywhere, as NNCF is
    assert floor_of("tvm-int8", "int8", int8_attention=True) == "int8_everything"
    assert not int8_attention({"precision": {"detail": {}}})
    assert int8_attention({"precision": {"detail": {"attention_products": "int8 (vpdpbusd)"}}})


def test_each_run_is_held_to_the_ceilings_either_side_of_it():
    a = {
        "shape": [1, 2, 3],
        "fp32": {"gflops": 100.0, "how": "x"},
        "bf16": {"gflops": None, "how": "y"},
        "int8": {"gflops": 400.0, "how": "z"},
    }
    b = {
        "shape": [1, 2, 3],
        "fp32": {"gflops": 80.0, "how": "x"},
        "bf16": {"gflops": None, "how": "y"},
        "int8": {"gflops": 300.0, "how": "w"},
    }
    w = window(a, b)
    assert w["fp32"]["gflops"] == pytest.approx(90.0) and w["int8"]["gflops"] == pytest.approx(350.0)
    assert w["bf16"]["gflops"] is None and w["shape"] == [1, 2, 3] and w["fp32"]["how"] == "x"
    assert a["fp32"]["gflops"] == 100.0  # the samples themselves are kept as measured
