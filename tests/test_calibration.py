"""One calibration: crate_edge.calibration computes every activation range, with one meaning
per method, and every int8 backend quantizes with it. The cross-backend test reads the scales
each backend actually wrote (ONNX Q/DQ initializers, the ExecuTorch program's dequantize
arguments, the Core ML program's quantize ops, TVM's baked constants) and checks that the same
images and method give the same clipping range per site on every backend."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from crate_edge.calibration import Range, observe_ranges
from crate_edge.errors import CrateEdgeError


def _two_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def test_percentile_is_the_nearest_rank_of_abs_x_computed_exactly():
    m = _two_linears()
    x = torch.randn(100, 5, 8, generator=torch.Generator().manual_seed(1))
    for p in (99.0, 99.9, 99.99, 50.0):
        got = observe_ranges(m, {"a": "0"}, x, "percentile", p, batch=7).inputs["a"]
        a = np.sort(np.abs(x.numpy().ravel()))
        want = float(a[math.ceil(round(p * a.size / 100, 6)) - 1])  # the ceil(p/100 * N)-th smallest
        assert got.amax == pytest.approx(want, abs=0), p
        assert got.lo == max(float(x.min()), -want) and got.hi == min(float(x.max()), want)


def test_max_is_the_extremes_and_ranges_include_zero():
    m = _two_linears()
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    c = observe_ranges(m, {"a": "0", "b": "2"}, x, "max", outputs=True, batch=16)
    assert c.inputs["a"] == Range(float(x.min()), float(x.max()))
    with torch.no_grad():
        relu = torch.relu(m[0](x))
    assert c.inputs["b"].lo == 0.0 and c.inputs["b"].hi == pytest.approx(float(relu.max()))  # ReLU output: lo clipped up to 0
    with torch.no_grad():
        y = m(x)
    assert c.outputs["b"] == Range(min(float(y.min()), 0.0), max(float(y.max()), 0.0))
    rec = c.record()
    assert rec["method"] == "max" and set(rec["inputs"]) == {"a", "b"} and "outputs" in rec


def test_entropy_is_within_the_observed_range():
    pytest.importorskip("onnxruntime")
    m = _two_linears()
    x = torch.randn(64, 16, 8, generator=torch.Generator().manual_seed(3))
    x[0, 0, 0] = 40.0  # one outlier: the KL threshold clips it
    r = observe_ranges(m, {"a": "0"}, x, "entropy").inputs["a"]
    assert 1.0 < r.amax < 40.0


@pytest.mark.parametrize(
    "kw, match", [({"method": "mse"}, "method"), ({"percentile": 0.0}, "percentile"), ({"percentile": 101}, "percentile")]
)
def test_bad_calibration_requests_are_one_line_errors(kw, match):
    m = _two_linears()
    args = {"method": "percentile", "percentile": 99.0, **kw}
    with pytest.raises(CrateEdgeError, match=match):
        observe_ranges(m, {"a": "0"}, torch.randn(4, 8), args["method"], args["percentile"])

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(CrateEdgeError, match="never executed"):
        observe_ranges(WithUnused(), {"a": "a", "z": "unused"}, torch.randn(4, 8), "max")
    with pytest.raises(CrateEdgeError, match="no module"):
        observe_ranges(m, {"a": "0", "z": "9.fc"}, torch.randn(4, 8), "max")


# ------------------------------------------------------------------ the same range on every backend

TARGETS = ["onnxruntime-int8", "executorch-int8", "tvm-int8", "coreml-w8a8", "tensorrt-int8"]


def _onnx_ranges(art) -> dict[str, tuple[float, float]]:
    """Site -> the clipping range of the Q/DQ on the site GEMM's activation input (ONNX Runtime's
    QDQ network and the TensorRT network both)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(art.path / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    nodes = {n.name: n for n in g.node}
    q = art.manifest["backend"]["quantized"]
    site_nodes = q.get("site_nodes") or {s: d["node"] for s, d in q["sites"].items()}
    out = {}
    for site, name in site_nodes.items():
        dq = prod[nodes[name].input[0]]
        assert dq.op_type == "DequantizeLinear", (site, dq.op_type)
        s = float(inits[dq.input[1]].reshape(-1)[0])
        zp = inits[dq.input[2]].reshape(-1)[0] if len(dq.input) > 2 else np.uint8(0)
        if zp.dtype == np.int8 and int(zp) == 0:  # symmetric: scale = amax / 127
            out[site] = (-127 * s, 127 * s)
        else:  # affine (uint8): the integer range mapped back
            info = np.iinfo(zp.dtype)
            out[site] = ((info.min - int(zp)) * s, (info.max - int(zp)) * s)
    return out


def _executorch_ranges(art):
    qp = art.manifest["backend"]["int8"]["input_qparams"]
    return {s: ((d["qmin"] - d["zero_point"]) * d["scale"], (d["qmax"] - d["zero_point"]) * d["scale"]) for s, d in qp.items()}


def _coreml_ranges(art):
    from crate_edge.backends.coreml import read_compressed

    comp = read_compressed(art.path / "model.mlpackage", art.manifest["backend"]["quant_sites"])
    out = {}
    for site, d in comp.items():
        s, zp, lo, hi = d["act"]
        out[site] = ((lo - zp) * s, (hi - zp) * s)
    return out


def _tvm_ranges(art):
    scales = art.manifest["backend"]["quantization"]["input_scales"]
    return {s: (-127 * v, 127 * v) for s, v in scales.items()}  # symmetric int8, scale = amax / 127


READERS = {
    "onnxruntime": _onnx_ranges,
    "tensorrt": _onnx_ranges,
    "executorch": _executorch_ranges,
    "coreml": _coreml_ranges,
    "tvm": _tvm_ranges,
}
SCHEME = {"onnxruntime": "affine", "executorch": "affine", "coreml": "symmetric", "tvm": "symmetric", "tensorrt": "symmetric"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The small one-layer model compiled for every int8 target that compiles here, all with the
    same 32 calibration images and one method (percentile 99.9)."""
    from crate_edge.backends import get_backend
    from crate_edge.compiler import compile
    from crate_edge.targets import load_target
    from tests.procs import small_model_and_data

    tmp = tmp_path_factory.mktemp("cal")
    model, data = small_model_and_data(tmp)
    x = np.load(data)["x"]
    np.savez(tmp / "cal.npz", x=np.concatenate([x, x[::-1] * 0.5]))  # 32 images
    arts, skipped = {}, {}
    for name in TARGETS:
        t = load_target(name)
        ok, why = get_backend(t.backend).available(t)
        if not ok:
            skipped[name] = why
            continue
        # static activations on every target (executorch-int8's own quantizes per row at run time:
        # no range to compare)
        quant = {**t.quantize, "activations": "static", "calibration": "percentile", "percentile": 99.9}
        t = dataclasses.replace(t, quantize=quant, raw={**t.raw, "quantize": quant})
        arts[name] = compile(
            model,
            t,
            out=tmp / name,
            parity_data=str(data),
            keep_failed=True,
            calibration_data=str(tmp / "cal.npz"),
            calibration_images=32,
            log=lambda s: None,
        )
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    return arts


def test_every_backend_clips_each_site_at_the_same_range(artifacts):
    if len(artifacts) < 2:
        pytest.skip(f"fewer than two int8 backends compile here: {sorted(artifacts)}")
    ranges = {}
    for name, art in artifacts.items():
        be = art.manifest["target"]["definition"]["backend"]
        ranges[name] = READERS[be](art)
        want = {s: Range(**r) for s, r in art.manifest["quantization"]["ranges"]["inputs"].items()}
        assert set(ranges[name]) == set(want) == set(art.manifest["quantization"]["sites"]), name
    names = sorted(ranges)
    ref = ranges[names[0]]
    for name in names:
        be = artifacts[name].manifest["target"]["definition"]["backend"]
        for site, (lo, hi) in ranges[name].items():
            a_ref = max(-ref[site][0], ref[site][1])
            a = max(-lo, hi)
            assert a == pytest.approx(a_ref, rel=0.01), (name, names[0], site)
            if SCHEME[be] == "affine":  # affine schemes also agree on each end
                r = artifacts[name].manifest["quantization"]["ranges"]["inputs"][site]
                width = r["hi"] - r["lo"]
                assert abs(lo - r["lo"]) <= 0.01 * width and abs(hi - r["hi"]) <= 0.01 * width, (name, site)
    print({n: len(r) for n, r in ranges.items()})
