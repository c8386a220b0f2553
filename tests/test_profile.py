"""`crate-edge profile` (crate_edge.profile): per-block and per-op-kind latency from each runtime's
own profiler on a real two-layer probe build for ONNX Runtime (fp32 and int8), ExecuTorch and
TVM, with the blocks' fidelity beside it; a non-probe build gets logits only; the CLI writes the
report; bad input is refused in one line. A backend that cannot compile or run here is skipped
with the reason."""

import json

import numpy as np
import pytest
import torch

import crate_edge
from crate_edge import CrateEdgeError
from crate_edge.backends import get_backend
from crate_edge.compiler import ParityError
from crate_edge.profile import ENGINES, KINDS, NOT_PROBE, profile
from crate_edge.targets import load_target
from tests.procs import run

DEPTH = 2
TARGETS = ["onnxruntime", "onnxruntime-int8", "executorch", "tvm"]
LAYER_BLOCKS = [f"layer{l}.{p}" for l in range(DEPTH) for p in ("mssa", "ista")]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A two-layer CRATE in the crate-edge format and 32 float inputs for it."""
    tmp = tmp_path_factory.mktemp("profile")
    torch.manual_seed(0)
    m = crate_edge.create_model("mnist-micro", depth=DEPTH, dim=32, heads=2, dim_head=16).eval()
    crate_edge.save_model(m, tmp / "model")
    x = np.random.default_rng(0).standard_normal((32, *m.cfg.input_shape)).astype(np.float32)
    np.savez(tmp / "data.npz", x=x)
    return tmp / "model", tmp / "data.npz", tmp


_BUILT: dict = {}


def _artifact(small, name: str, probe: bool = True):
    model, data, tmp = small
    key = (name, probe)
    if key not in _BUILT:
        t = load_target(name)
        be = get_backend(t.backend)
        for ok, why in (be.available(t), be.available(t, run=True)):
            if not ok:
                pytest.skip(f"{name} unavailable here: {why}")
        kw = {"calibration_images": 32, "calibration_data": str(data)} if t.quantize else {}
        out = tmp / f"{name}{'-probe' if probe else ''}"
        try:
            crate_edge.compile(model, t, out=out, probe=probe, parity_data=str(data), log=lambda s: None, keep_failed=True, **kw)
        except ParityError:  # an untrained model's near-tied logits may flip top-1 under int8; the profile is the point here
            pass
        _BUILT[key] = out
    return _BUILT[key]


def _profile(small, art, **kw):
    model, data, _ = small
    args = dict(data=str(data), batch=8, iters=6, reference=str(model), fidelity_images=16, progress=False)
    return profile(art, **{**args, **kw})


@pytest.mark.parametrize("name", TARGETS)
def test_profile_attributes_blocks_and_kinds(small, name, tmp_path):
    art = _artifact(small, name)
    rep = _profile(small, art)
    assert rep.attributed, rep.notes
    blocks = rep.blocks()
    for b in ["embed", *LAYER_BLOCKS, "head"]:
        assert b in blocks and blocks[b]["ms"] > 0, (b, blocks.get(b))
    # every kernel time is a time, and the blocks add up to the runtime's own total
    assert all(k.us >= 0 for k in rep.kernels) and rep.total_ms > 0 and rep.unprofiled_ms > 0
    assert sum(b["ms"] for b in blocks.values()) == pytest.approx(rep.total_ms, rel=1e-6)
    assert sum(rep.engines().values()) == pytest.approx(rep.total_ms, rel=1e-6)
    assert {k.kind for k in rep.kernels} <= set(KINDS) and {k.engine for k in rep.kernels} <= set(ENGINES)
    # block other is split into what lies outside the kernels without the profiler and the profiler's own cost
    if "other" in blocks:
        split = [n for n in rep.notes if "lies outside every kernel" in n]
        assert len(split) == 1, rep.notes
        inside = sum(k.us for k in rep.kernels if k.block != "other") / 1e3 / rep.runs_used
        assert f"{inside:.3f} ms per run" in split[0] and f"{max(0.0, rep.unprofiled_ms - inside):.3f} ms" in split[0]
    # the structure of a CRATE layer shows in the kinds
    for l in range(DEPTH):
        assert blocks[f"layer{l}.mssa"]["attention"] > 0 and blocks[f"layer{l}.mssa"]["ista"] == 0
        assert blocks[f"layer{l}.ista"]["attention"] == 0 and blocks[f"layer{l}.ista"]["mssa_projection"] == 0
    assert blocks["embed"]["attention"] == blocks["head"]["attention"] == 0
    if name != "executorch":  # XNNPACK's operator timer ticks in whole microseconds: its small GEMMs may read 0
        for l in range(DEPTH):
            assert blocks[f"layer{l}.mssa"]["mssa_projection"] > 0 and blocks[f"layer{l}.ista"]["ista"] > 0
    if name.endswith("int8"):
        assert rep.kinds()["quant"] > 0 and rep.engines()["int8"] > 0 and rep.engines()["quant"] > 0
        assert rep.outside_ms < rep.total_ms
    else:
        assert rep.kinds()["quant"] == 0 and rep.engines()["int8"] == 0
    if name == "executorch":
        assert rep.engines()["delegate"] > 0 and any("microseconds" in n for n in rep.notes)
    if name.startswith("onnxruntime"):  # the session the runner and the profiler open honours options.disabled_optimizers
        ops = {k.op for k in rep.kernels}
        assert "LayerNormalization" in ops or "SkipLayerNormalization" in ops
        skipped = "SkipLayerNormFusion" in load_target(name).options.get("disabled_optimizers", [])
        assert ("SkipLayerNormalization" in ops) != skipped, sorted(ops)
    # fidelity of a probe build, per block
    fid = rep.block_fidelity()
    floor = 0.9 if name.endswith("int8") else 0.999
    for l in range(DEPTH):
        assert fid[f"layer{l}.mssa"]["cosine"] > floor and fid[f"layer{l}.mssa"]["coding_rate_rel"] >= 0
        assert fid[f"layer{l}.ista"]["cosine"] > floor and 0.5 < fid[f"layer{l}.ista"]["iou"] <= 1
    assert fid["head"]["cosine"] > floor and "embed" not in fid
    # table, JSON, Markdown and PNG
    table = rep.table()
    assert "layer1.ista" in table and "total" in table and "cosine" in table
    out = rep.write(tmp_path / "report")
    doc = json.loads((out / "profile.json").read_text())
    assert doc["format"] == "crate-edge-profile" and doc["block_fidelity"]["layer0.ista"]["iou"] > 0.5
    assert set(doc["blocks"]) == set(blocks) and doc["kernels"]
    assert "| block |" in (out / "profile.md").read_text()
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_probe_build_gets_logits_only(small):
    art = _artifact(small, "onnxruntime", probe=False)
    rep = _profile(small, art, iters=3)
    assert rep.fidelity["probe"] is False and rep.fidelity["layers"] is None
    assert NOT_PROBE in rep.notes and NOT_PROBE in rep.table()
    assert set(rep.block_fidelity()) == {"head"} and rep.block_fidelity()["head"]["top1_agreement"] > 0.9
    assert rep.attributed and "layer1.mssa" in rep.blocks()  # latency still per block
    assert _profile(small, art, iters=2, fidelity=False).fidelity is None


def test_cli_writes_the_report_and_refuses_bad_input_in_one_line(small, tmp_path):
    model, data, _ = small
    art = _artifact(small, "onnxruntime")
    out = tmp_path / "prof"
    args = ["profile", str(art), "--data", str(data), "--batch", "2", "--iters", "3", "--reference", str(model), "--out", str(out)]
    r = run(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "layer0.mssa" in r.stdout and f"wrote {out}/profile.json" in r.stdout
    for f in ("profile.json", "profile.md", "profile.png"):
        assert (out / f).is_file()
    (tmp_path / "not-an-artifact").mkdir()
    r = run(["profile", str(tmp_path / "not-an-artifact"), "--out", str(tmp_path / "o2")], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a crate-edge artifact" in r.stderr
    assert not (tmp_path / "o2").exists()


def test_unprofiled_backends_and_bad_arguments_are_one_line_errors(small, tmp_path):
    stand_in = tmp_path / "coreml-art"
    stand_in.mkdir()
    manifest = {"format": "crate-edge-artifact", "files": {}, "backend": {"name": "coreml"}, "target": {"name": "coreml"}}
    (stand_in / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CrateEdgeError, match="cannot profile coreml") as e:
        profile(stand_in)
    assert "\n" not in str(e.value)
    art = _artifact(small, "onnxruntime")
    for kw, msg in ((dict(iters=0), "iters must be"), (dict(batch=0), "batch must be"), (dict(batch=10**6), "batch range")):
        with pytest.raises(CrateEdgeError, match=msg):
            _profile(small, art, **kw)


# the kernels of the two-layer TVM build above, in call order (PrimFunc names as the VM reports them)
TVM_CALLS = (
    "transpose2 fused_strided_slice_subtract1 layer_norm4 fused_matmul_add1_prepacked layer_norm11 "
    "fused_broadcast_to_concatenate_add11"
    + " layer_norm21 matmul11_prepacked transpose41 transpose51 fused_matmul2_multiply1 softmax1 matmul31 transpose61"
    " fused_matmul1_add2_add31_prepacked layer_norm21 fused_matmul1_add2_relu1_prepacked"
    * DEPTH
    + " take1 layer_norm31 fused_matmul4_add41_prepacked"
).split()


def test_call_order_attribution_and_its_check():
    from crate_edge.profile import Kernel, _segment, _tvm_class

    def kernels(names):
        return [Kernel(s, s, *_tvm_class(s), per_run=[1.0]) for s in names]

    ks = kernels(TVM_CALLS)
    assert _segment(ks, DEPTH)
    got = [(k.name, k.block, k.kind) for k in ks]
    assert got[:6] == [(n, "embed", kd) for n, kd in zip(TVM_CALLS[:6], ["layout", "embed", "layernorm", "embed", "layernorm", "embed"])]
    mssa = [(n, kd) for n, b, kd in got if b == "layer1.mssa"]
    assert [kd for _, kd in mssa] == [
        "layernorm",
        "mssa_projection",
        "layout",
        "layout",
        "attention",
        "attention",
        "attention",
        "layout",
        "mssa_projection",
    ]
    assert [(n, kd) for n, b, kd in got if b == "layer1.ista"] == [
        ("layer_norm21", "layernorm"),
        ("fused_matmul1_add2_relu1_prepacked", "ista"),
    ]
    assert [(n, kd) for n, b, kd in got if b == "head"] == [
        ("take1", "layout"),
        ("layer_norm31", "layernorm"),
        ("fused_matmul4_add41_prepacked", "head"),
    ]
    # a sequence that is not DEPTH CRATE layers is not guessed at: one softmax missing, or the layers' LayerNorms
    no_softmax = list(TVM_CALLS)
    no_softmax.remove("softmax1")
    no_norms = [n for n in TVM_CALLS if n != "layer_norm21"]
    for broken in (no_softmax, no_norms):
        ks = kernels(broken)
        assert not _segment(ks, DEPTH) and {k.block for k in ks} == {"other"}
