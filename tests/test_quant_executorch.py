"""ExecuTorch int8 (PT2E + XNNPACK): the embedded model compiled to executorch-int8 keeps the
CRATE quantization policy (only the site linears in int8), XNNPACK runs those linears as int8
GEMMs, and accuracy stays within the target's tolerances and ~0.5 point of fp32."""

import pytest
import torch

pytest.importorskip("executorch.exir", reason="executorch not installed (pip install 'crate-edge[executorch]')")
pytest.importorskip("torchao.quantization.pt2e", reason="torchao (PT2E quantization) not installed")

import crate_edge  # noqa: E402
from crate_edge.backends import executorch as et  # noqa: E402
from crate_edge.calibration import observe_ranges  # noqa: E402
from crate_edge.compiler import compile  # noqa: E402
from crate_edge.errors import CrateEdgeError  # noqa: E402
from crate_edge.metrics import check_tolerances  # noqa: E402
from crate_edge.quantize import QuantConfig, quant_sites  # noqa: E402
from crate_edge.runtime import load as load_artifact  # noqa: E402
from crate_edge.targets import load_target  # noqa: E402


def _need_calibration_data():
    from crate_edge.data import load_dataset

    try:
        load_dataset("fashion-mnist", "train")
    except CrateEdgeError as e:
        pytest.skip(f"calibration data unavailable: {e}")


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    _need_calibration_data()
    out = tmp_path_factory.mktemp("et8") / "int8"
    return compile(None, "executorch-int8", out=out, log=lambda s: None)  # must pass the target's [parity]


def test_manifest_quantization_block(int8):
    m = int8.manifest
    q = m["quantization"]
    model = crate_edge.load_model()
    assert q["config"]["scheme"] == "int8" and q["config"]["weights"] == "per_channel"
    assert q["calibration"]["split"] == "train" and q["calibration"]["images"] == q["config"]["calibration_images"]
    assert len(q["sites"]) == 2 + 3 * model.cfg.depth  # embed, head, and qkv/out/ista per layer
    for op in ("layer_norm", "softmax", "residual_add", "ista_threshold_relu"):
        assert op in q["keep_float"]
    prec = m["precision"]
    assert prec["default"] == "fp32" and set(prec["sites"]) == set(q["sites"])
    assert all(v.startswith("int8 GEMM (weights int8 per-channel") for v in prec["sites"].values())
    expected_fold = "fold_ista_update" if q["config"]["ista"] == "update" else "fold_ista"
    assert expected_fold in m["rewrites"]


def test_xnnpack_runs_the_site_linears_in_int8(int8):
    b = int8.manifest["backend"]
    n_sites = len(int8.manifest["quantization"]["sites"])
    lin = b["int8"]["delegated_linears"]
    # every site linear is inside a delegate with int8 weights; the LayerNorm-averaging linears stay fp32
    assert lin.get("int8_static_act", 0) + lin.get("int8_dynamic_act", 0) == n_sites
    assert lin.get("fp32", 0) > 0
    assert b["int8"]["quantized_sites"] == n_sites
    left = b["outside_delegates"]
    # no quantize/dequantize, linear or GEMM falls back to portable kernels: what stays outside is
    # exactly what the fp32 target leaves there (the cls pick z[:, 0], and the x[..., :1] slice of
    # shift_patch_norm, which XNNPACK does not take on a dynamic-batch tensor)
    assert not [k for k in left if "quantize" in k or "linear" in k or "mm" in k], left
    assert set(left) <= {"aten.select_copy.int", "aten.slice_copy.Tensor"}, left
    assert b["batch"] == "dynamic [1, 64]"


def test_parity_and_accuracy(int8):
    p = int8.manifest["parity"]
    assert p["executor"] == "executorch"
    tol = load_target("executorch-int8").parity
    assert "max_abs" not in tol  # int8 is judged by top-1 agreement and logit cosine, not max |diff|
    assert not check_tolerances(p, tol), check_tolerances(p, tol)
    assert p["top1_agreement"] >= 0.98
    # held-out slice (embedded 1000 images): within ~0.5 point of fp32
    assert p["artifact_top1"] >= p["reference_top1"] - 0.005, p


@pytest.mark.parametrize("b", [1, 3])
def test_dynamic_batch_runs(int8, b):
    from crate_edge.data import open_inputs

    model = crate_edge.load_model().eval()
    # held-out images, not noise: on a random input the eager top-2 logits were 0.05 apart, closer
    # than int8 keeps them (max |diff| 0.046), so its argmax measured nothing
    x, _ = open_inputs("embedded", model.cfg, "test").first(4).tensors()
    x = x[4 - b :]
    got = load_artifact(int8.path)(x.numpy())
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == want.shape
    assert (got.argmax(1) == want.argmax(1)).all()
    assert abs(got - want).max() < 0.5 * abs(want).max()  # int8, not garbage


def test_quantizer_annotates_only_the_sites():
    """On a small model, without lowering: one observed linear per site, nothing else observed."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    torch.manual_seed(0)
    model = crate_edge.create_model("mnist-micro", depth=2).eval()
    from crate_edge import rewrites

    qc = QuantConfig(calibration="max", sites=["qkv", "ista"])
    module = rewrites.apply(model, ["shift_patch_norm", "fold_ista_update", "bmm_attention", "linear_layernorm"])
    sites = quant_sites(module, qc)
    assert sorted(sites) == ["0.ista", "0.qkv", "1.ista", "1.qkv"]
    x = torch.randn(2, *model.cfg.input_shape)
    ranges = observe_ranges(module, sites, torch.randn(8, *model.cfg.input_shape), "max", outputs=True)
    configs, label = et.quantization_configs(qc, ranges)
    assert label.startswith("crate_edge.calibration max")
    q = et._site_quantizer(sites, configs)
    gm = torch.export.export(module, (x,), strict=False).module()
    prepared = prepare_pt2e(gm, q)
    assert sorted(q.annotated) == sorted(sites) and all(len(v) == 1 for v in q.annotated.values())
    # only the site linears have observed inputs (activation and weight); the LayerNorm-averaging
    # linears, softmax, bmm, adds and the ISTA ReLU have none
    lin_all = [n for n in prepared.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default]
    lin_obs = [n for n in lin_all if any(a.op == "call_module" for a in n.all_input_nodes)]
    assert len(lin_obs) == len(sites) < len(lin_all), (len(lin_obs), len(lin_all))
    for n in prepared.graph.nodes:  # every observer is a site linear's input or output, nothing else's
        if n.op == "call_module":
            assert n.args[0] in lin_obs or set(n.users) <= set(lin_obs), n.format_node()


def test_fixed_range_observer_gives_torchaos_qparams_of_the_range():
    """The observer holds crate_edge.calibration's range: whatever it sees, its qparams are
    torchao's affine int8 arithmetic on that range."""
    cls = et._fixed_observer_cls()
    obs = cls(lo=-0.5, hi=2.0, dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
    obs(torch.linspace(-100, 100, 1001))  # observes nothing
    scale, zp = obs.calculate_qparams()
    assert abs(float(scale) - 2.5 / 255) < 1e-7
    assert int(zp) == -128 + round(0.5 / (2.5 / 255))


def test_bad_activation_mode_is_one_line_error():
    with pytest.raises(CrateEdgeError, match="activations"):
        et.activation_mode(QuantConfig(options={"activations": "per_token"}))
