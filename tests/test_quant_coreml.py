"""Core ML reduced precision: int8 weights, palettized weights and int8 weights +
activations, applied by coremltools.optimize.coreml to the CRATE policy's sites only.

Core ML predictions need macOS: off macOS these tests verify the converted program statically
(which MIL linears carry compressed weights / quantized inputs, package sizes) and the numerics
through the reference executor (torch on the exported program with the weights decompressed
from the saved .mlpackage), which the manifest labels "not Core ML"."""

import dataclasses
import platform

import numpy as np
import pytest
import torch

import crate_edge
from crate_edge import BackendUnavailable, CrateEdgeError, load_artifact
from crate_edge.compiler import compile, parity_images
from crate_edge.metrics import check_tolerances, logit_parity
from crate_edge.targets import load_target

ct = pytest.importorskip(
    "coremltools", reason="coremltools not installed: Core ML quantization untested (pip install 'crate-edge[coreml]')"
)

PARITY_N = 300  # held-out images for compile-time parity (the full slice is 1,000)
NEW = ("coreml-int8w", "coreml-palettize", "coreml-w8a8")
OFF_MAC = platform.system() != "Darwin"


def _calibration_available():
    from crate_edge.data import load_dataset

    try:
        load_dataset("fashion-mnist", "train")
    except CrateEdgeError as e:  # the dataset is not installed here
        return str(e)
    return ""


@pytest.fixture(scope="module")
def model():
    return crate_edge.load_model().eval()


@pytest.fixture(scope="module")
def held_out(model):
    x, y = parity_images(model.cfg, "embedded", PARITY_N)
    with torch.no_grad():
        ref = model(x).numpy()
    return x.numpy(), y.numpy(), ref


@pytest.fixture(scope="module")
def arts(model, tmp_path_factory):
    why = _calibration_available()
    if why:
        pytest.skip(f"calibration images (fashion-mnist training split) unavailable: {why}")
    root = tmp_path_factory.mktemp("cmq")
    out = {}
    for name in ("coreml", *NEW):
        out[name] = _compile(model, name, root / name)
    return out


def _compile(model, target, out, n=PARITY_N):
    """compile(), which must pass the target's own [parity] table (no max_abs for quantized targets)."""
    t = load_target(target) if isinstance(target, str) else target
    art = compile(model, t, out=out, parity_limit=n, log=lambda s: None)
    p = art.manifest["parity"]
    assert p["passed"] and check_tolerances(p, t.tolerances) == [], (t.name, p)
    return art


def _program(art):
    """The saved .mlpackage's MIL program, read back independently of the manifest."""
    from coremltools.models import utils as mutils

    ml = ct.models.MLModel(str(art.path / "model.mlpackage"), skip_model_load=True)
    return mutils._apply_graph_pass(ml, [], return_pymil_prog=True, skip_model_load=True)


def _linears(prog):
    """MIL linear op name -> (op types producing its weight, op type producing its input)."""
    from crate_edge.backends.coreml import _weight_producer

    out = {}
    for op in prog.functions["main"].operations:
        if op.op_type == "linear":
            x = op.inputs["x"].op
            out[op.name] = ([o.op_type for o in _weight_producer(op)], x.op_type if x is not None else None)
    return out


@pytest.mark.parametrize("name", NEW)
def test_manifest_says_what_is_and_is_not_verified(arts, name, model):
    art = arts[name]
    m = art.manifest
    q = m["quantization"]
    assert q["config"]["scheme"] == load_target(name).quantize["scheme"]
    assert len(q["sites"]) == 2 + 3 * model.cfg.depth  # embed, head and qkv/out/ista per layer
    assert set(m["backend"]["quant_sites"]) == set(q["sites"])
    assert "compression" in m["verified"] and "conversion" in m["verified"]
    assert m["precision"]["default"] == "fp16" and set(m["precision"]["sites"]) == set(q["sites"])
    assert "sites" in m["precision"]["detail"]["weights"]
    assert check_tolerances(m["parity"], load_target(name).parity) == []
    if OFF_MAC:
        assert "execution" in m["not_verified"] and "macOS" in m["not_verified"]["execution"]
        assert "runtime_kernels" in m["not_verified"]
        assert m["parity"]["executor"].startswith("not Core ML: torch (float16)")
        assert "decompressed weights" in m["parity"]["executor"]
        with pytest.raises(BackendUnavailable, match="macOS"):
            load_artifact(art.path)  # Core ML itself cannot run here


@pytest.mark.parametrize(
    "name,weight_op",
    [
        ("coreml-int8w", "constexpr_blockwise_shift_scale"),
        ("coreml-palettize", "constexpr_lut_to_dense"),
        ("coreml-w8a8", "constexpr_blockwise_shift_scale"),
    ],
)
def test_compressed_weights_exactly_on_the_sites(arts, name, weight_op):
    art = arts[name]
    n = len(art.manifest["quantization"]["sites"])
    lin = _linears(_program(art))
    site_ops = {v["linear"] for v in art.manifest["backend"]["quant_sites"].values()}
    assert site_ops <= set(lin)
    compressed = {k for k, (chain, _) in lin.items() if weight_op in chain}
    assert compressed == site_ops and len(compressed) == n
    ops = art.manifest["backend"]["mil_ops"]
    assert ops.get(weight_op, 0) == n
    quant_in = {k for k, (_, x) in lin.items() if x == "dequantize"}
    if name == "coreml-w8a8":  # int8 activations exactly at the site GEMMs' inputs
        assert quant_in == site_ops and ops.get("quantize") == ops.get("dequantize") == n
    else:
        assert not quant_in and "quantize" not in ops
    # the float remainder is untouched: attention, LayerNorm, softmax, ReLU run in fp16
    fp16_ops = set(art.manifest["precision"]["detail"]["ops_by_dtype"]["fp16"])
    assert {"layer_norm", "scaled_dot_product_attention", "relu", "linear", "add"} <= fp16_ops
    assert art.manifest["precision"]["detail"]["ops_by_dtype"].get("fp32", []) == ["cast"]  # only the fp32 I/O casts


def test_only_configured_sites_are_compressed(model, tmp_path):
    """A narrower policy (no embed / head, layer 2 kept float) compresses exactly those linears."""
    t = load_target("coreml-int8w")
    t = dataclasses.replace(t, name="coreml-int8w-narrow", quantize={**t.quantize, "sites": ["qkv", "out", "ista"], "float_layers": [2]})
    art = _compile(model, t, tmp_path / "narrow")
    sites = art.manifest["backend"]["quant_sites"]
    assert sorted(sites) == sorted(f"{i}.{k}" for i in range(model.cfg.depth) if i != 2 for k in ("qkv", "out", "ista"))
    lin = _linears(_program(art))
    compressed = {k for k, (chain, _) in lin.items() if chain and chain[0].startswith("constexpr_")}
    assert compressed == {v["linear"] for v in sites.values()}
    assert len(lin) - len(compressed) == 2 + 3  # embed, head and layer 2's three GEMMs stay fp16 consts


@pytest.mark.parametrize("name", NEW)
def test_reference_numerics_use_the_program_weights_and_pass_tolerances(arts, held_out, name):
    x, y, ref = held_out
    art = load_artifact(arts[name].path, reference_ok=True)
    got = art(x)
    p = logit_parity(ref, got, y)
    assert check_tolerances(p, load_target(name).parity) == []  # the [parity] table (no max_abs for quantized targets)
    # the reference is not the plain fp16 program: the compressed weights are in it
    plain = load_artifact(arts["coreml"].path, reference_ok=True)(x)
    assert np.abs(got - plain).max() > 1e-3
    # and the decompressed site weights are a quantization of the float ones, not the float ones
    from crate_edge.backends.coreml import read_compressed

    comp = read_compressed(art.path / "model.mlpackage", art.manifest["backend"]["quant_sites"])
    w = comp["0.qkv"]["weight"].astype(np.float32)
    gm = torch.export.load(str(art.path / "source.pt2")).module()
    w0 = gm.get_parameter(art.manifest["backend"]["quant_sites"]["0.qkv"]["param"]).detach().numpy()
    err = np.abs(w - w0)
    assert 0 < err.max() < 0.1 * np.abs(w0).max()
    levels = max(len(np.unique(row)) for row in w)
    if name == "coreml-palettize":
        assert levels <= 2 ** arts[name].manifest["quantization"]["config"]["nbits"]
    else:
        assert levels <= 256
        if name == "coreml-w8a8":
            assert all("act" in c for c in comp.values())


def test_compressed_packages_are_smaller_than_fp16(arts):
    fp16 = arts["coreml"].manifest["backend"]["package_bytes"]
    for name in NEW:
        b = arts[name].manifest["backend"]
        assert b["package_bytes"] < fp16, (name, b["package_bytes"], fp16)
        assert b["float_package_bytes"] == pytest.approx(fp16, rel=0.05)
    assert arts["coreml-palettize"].manifest["backend"]["package_bytes"] < arts["coreml-int8w"].manifest["backend"]["package_bytes"]


def test_fp16_target_precision_map_is_exact(arts):
    m = arts["coreml"].manifest
    by = m["precision"]["detail"]["ops_by_dtype"]
    assert by["fp32"] == ["cast"] and "linear" in by["fp16"] and "softmax" not in by.get("fp32", [])
    assert m["quantization"] is None and m["parity"]["executor"].startswith("torch (float16)")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"scheme": "fp8"}, "not supported"),
        ({"scheme": "palettize", "nbits": 5}, "nbits"),
        ({"scheme": "int8", "calibration": "mse"}, "calibration"),
    ],
)
def test_bad_quantize_tables_are_refused(model, tmp_path, change, match):
    t = load_target("coreml-w8a8")
    t = dataclasses.replace(t, quantize={**t.quantize, **change})
    with pytest.raises(CrateEdgeError, match=match):
        compile(model, t, out=tmp_path / "bad", parity_limit=10, log=lambda s: None)


def test_deployment_target_too_old_is_refused(model, tmp_path):
    t = load_target("coreml-w8a8")
    t = dataclasses.replace(t, options={**t.options, "minimum_deployment_target": "iOS16"})
    with pytest.raises(CrateEdgeError, match="iOS17"):
        compile(model, t, out=tmp_path / "old", parity_limit=10, log=lambda s: None)
    t = load_target("coreml-palettize")
    t = dataclasses.replace(t, options={**t.options, "minimum_deployment_target": "iOS17"})
    with pytest.raises(CrateEdgeError, match="iOS18"):
        compile(model, t, out=tmp_path / "old2", parity_limit=10, log=lambda s: None)
