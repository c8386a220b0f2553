"""crate_edge.compile for the backends that run (or convert) here, artifacts and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import crate_edge
from crate_edge import BackendUnavailable, CrateEdgeError, create_model, load_artifact
from crate_edge.compiler import ParityError, compile
from crate_edge.manifest import MANIFEST
from crate_edge.targets import list_targets, load_target


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_model("mnist-micro").eval()


def _x(m, b):
    return torch.randn(b, *m.cfg.input_shape, generator=torch.Generator().manual_seed(b)).numpy()


def _eager(m, x):
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def ort_art(micro, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    return compile(micro, "onnxruntime", out=tmp_path_factory.mktemp("a") / "ort", parity_limit=300, log=lambda s: None)


def test_onnxruntime_artifact(micro, ort_art):
    m = ort_art.manifest
    assert m["parity"]["passed"] and m["parity"]["top1_agreement"] >= 0.999 and m["parity"]["max_abs"] <= 1e-4
    assert m["rewrites"] == ["shift_patch_norm", "fold_ista", "sdpa_attention"]
    assert m["backend"]["ops"]["Attention"] == micro.cfg.depth  # MSSA kept as one fused op per layer
    assert m["source_model"]["sha256"] == crate_edge.checkpoint.model_hash(micro)
    assert set(m["files"]) == {"model.onnx"} and m["host"]["cores"] >= 1
    assert m["input"]["batch_range"] == [1, 256] and m["target"]["sha256"]
    for b in (1, 3, 300):  # 300 > max batch: split into accepted batches
        assert np.abs(ort_art(_x(micro, b)) - _eager(micro, _x(micro, b))).max() <= 1e-4


def test_tampered_or_corrupt_artifacts_are_refused(ort_art, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ort_art.path, bad)
    f = bad / "model.onnx"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x55
    f.write_bytes(bytes(b))
    with pytest.raises(CrateEdgeError, match="does not match its sha256"):
        load_artifact(bad)
    f.unlink()
    with pytest.raises(CrateEdgeError, match="missing"):
        load_artifact(bad)
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(CrateEdgeError, match="corrupt manifest"):
        load_artifact(bad)
    with pytest.raises(CrateEdgeError, match="not a crate-edge artifact"):
        load_artifact(tmp_path)
    m = json.loads((ort_art.path / MANIFEST).read_text())
    m["files"]["../../etc/passwd"] = "0" * 64
    (bad / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CrateEdgeError):
        load_artifact(bad)


def test_wrong_input_shape(ort_art, micro):
    with pytest.raises(CrateEdgeError, match="takes \\(batch, 1, 28, 28\\)"):
        ort_art(np.zeros((2, 3, 28, 28), np.float32))


def test_targets_resolve_and_bad_target_files(tmp_path):
    names = list_targets()
    for n in ("onnxruntime", "aoti", "coreml", "tensorrt", "executorch", "tvm"):
        assert n in names, n
    for n in names:
        load_target(n)
    with pytest.raises(CrateEdgeError, match="unknown target 'nope'"):
        load_target("nope")
    p = tmp_path / "mine.toml"
    p.write_text('backend = "onnxruntime"\nrewrites = ["fold_ista"]\n[parity]\nmax_abs = 1e-3\n')
    t = load_target(p)
    assert t.name == "mine" and t.tolerances["max_abs"] == 1e-3
    for text, msg in [
        ('backend = "nope"\n', "unknown backend"),
        ('backend = "onnxruntime"\nrewrites = ["x"]\n', "unknown rewrite"),
        ('backend = "onnxruntime"\nfoo = 1\n', "unknown key"),
        ('backend = "onnxruntime"\nprecision = "int3"\n', "precision"),
        ("backend = \n", "invalid TOML"),
    ]:
        p.write_text(text)
        with pytest.raises(CrateEdgeError, match=msg):
            load_target(p)


def test_parity_failure_says_by_how_much_and_writes_nothing(micro, tmp_path):
    pytest.importorskip("onnxruntime")
    p = tmp_path / "strict.toml"
    p.write_text('backend = "onnxruntime"\nrewrites = ["fold_ista"]\n[parity]\nmax_abs = 1e-12\n')
    with pytest.raises(ParityError, match=r"max \|logit diff\| .* > 1e-12 \(by "):
        compile(micro, p, out=tmp_path / "art", parity_limit=50, log=lambda s: None)
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art*"))
    with pytest.raises(ParityError, match="artifact kept"):
        compile(micro, p, out=tmp_path / "art", parity_limit=50, keep_failed=True, log=lambda s: None)
    assert json.loads((tmp_path / "art" / MANIFEST).read_text())["parity"]["passed"] is False


def test_interrupted_compile_leaves_no_artifact(micro, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from crate_edge.backends.onnxruntime import ONNXRuntimeBackend

    def boom(self, exported, target, out, quant=None):
        (out / "model.onnx").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(ONNXRuntimeBackend, "compile", boom)
    with pytest.raises(KeyboardInterrupt):
        compile(micro, "onnxruntime", out=tmp_path / "art", log=lambda s: None)
    assert os.listdir(tmp_path) == []


def test_missing_backend_package(micro, tmp_path, monkeypatch):
    import dataclasses

    from crate_edge.backends.onnxruntime import ONNXRuntimeBackend

    cap = dataclasses.replace(ONNXRuntimeBackend.capabilities, compile_needs=("onnxruntime", "no_such_package_xyz"))
    monkeypatch.setattr(ONNXRuntimeBackend, "capabilities", cap)
    with pytest.raises(BackendUnavailable, match=r"no_such_package_xyz not installed \(pip install 'crate-edge\[onnx\]'\)"):
        compile(micro, "onnxruntime", out=tmp_path / "art", log=lambda s: None)


def test_aoti_artifact(micro, tmp_path):
    art = compile(micro, "aoti", out=tmp_path / "aoti", parity_limit=200, log=lambda s: None)
    assert art.manifest["parity"]["passed"]
    for b in (1, 4):
        assert np.abs(art(_x(micro, b)) - _eager(micro, _x(micro, b))).max() <= 1e-4


def test_aoti_cuda_needs_a_gpu_to_compile(micro, tmp_path):
    import torch

    from crate_edge.errors import BackendUnavailable

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: aoti-cuda compiles here")
    with pytest.raises(BackendUnavailable, match="aoti-cuda: AOTInductor compiles a CUDA package on a CUDA host"):
        compile(micro, "aoti-cuda", out=tmp_path / "a", log=lambda s: None)
    assert not (tmp_path / "a").exists()


def test_coreml_conversion_is_verified_but_not_executed_here(micro, tmp_path):
    pytest.importorskip("coremltools")
    import platform

    art = compile(micro, "coreml", out=tmp_path / "cm", parity_limit=300, log=lambda s: None)
    m = art.manifest
    assert m["backend"]["fused_attention_ops"] == micro.cfg.depth  # iOS18: one SDPA op per layer
    assert m["backend"]["mil_dtypes"].get("fp16", 0) > 0 and m["precision"]["default"] == "fp16"
    assert (tmp_path / "cm" / "model.mlpackage" / "Manifest.json").exists()
    if platform.system() != "Darwin":
        assert "not Core ML" in m["parity"]["executor"] and "execution" in m["not_verified"]
        with pytest.raises(BackendUnavailable, match="macOS"):
            load_artifact(tmp_path / "cm")
    assert m["parity"]["top1_agreement"] >= 0.995
    ios17 = compile(micro, "coreml-ios17", out=tmp_path / "cm17", parity_limit=100, log=lambda s: None)
    assert ios17.manifest["backend"]["fused_attention_ops"] == 0


def test_tensorrt_network_and_build_command(micro, tmp_path):
    pytest.importorskip("onnx")
    import onnx

    from crate_edge.backends.tensorrt import PARSER_OPS

    art = compile(micro, "tensorrt", out=tmp_path / "trt", parity_limit=300, log=lambda s: None)
    m = art.manifest
    ops = m["backend"]["ops"]
    assert set(ops) <= PARSER_OPS and ops["Attention"] == micro.cfg.depth
    g = onnx.load(str(tmp_path / "trt" / "model.onnx")).graph
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
    assert {i.data_type for i in g.initializer if i.dims and len(i.dims) == 2} == {onnx.TensorProto.FLOAT16}  # fp16 weights
    script = (tmp_path / "trt" / "build_engine.sh").read_text()
    assert "--stronglyTyped" in script and "--maxShapes=images:256x1x28x28" in script
    if not m["backend"]["engine_built"]:
        assert "engine" in m["not_verified"] and "onnxruntime" in m["parity"]["executor"]
        with pytest.raises(BackendUnavailable):
            load_artifact(tmp_path / "trt")


def test_cli_compile_run_and_errors(ref_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    cli = [sys.executable, "-m", "crate_edge.cli"]
    r = subprocess.run(
        cli + ["compile", "--target", "onnxruntime", "--model", str(ref_ckpt), "--heads", "4", "--out", str(tmp_path / "a")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cli + ["run", str(tmp_path / "a"), "--n", "5"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("predicted") == 5, r.stderr
    for args in (["compile", "--target", "nosuch", "--model", str(ref_ckpt), "--heads", "4"], ["run", str(tmp_path)]):
        r = subprocess.run(cli + args, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run(cli + ["targets"], capture_output=True, text=True)
    assert r.returncode == 0 and "tensorrt" in r.stdout and "coreml" in r.stdout


def test_compile_each_skips_with_reasons_and_reuses(micro, tmp_path, monkeypatch):
    """The measurement scripts' loop: a failing target and a missing backend are skipped with the
    reason, never silently; reuse loads the same model's artifact instead of compiling again."""
    pytest.importorskip("onnxruntime")
    from crate_edge.backends.base import Availability
    from crate_edge.backends.tvm import TVMBackend
    from crate_edge.compiler import compile_each

    strict = tmp_path / "strict.toml"
    strict.write_text('backend = "onnxruntime"\nrewrites = ["fold_ista"]\n[parity]\nmax_abs = 1e-12\n')
    monkeypatch.setattr(
        TVMBackend, "available", lambda self, *a, **k: Availability(False, "apache-tvm not installed (pip install 'crate-edge[tvm]')")
    )
    said = []
    arts, skipped = compile_each(micro, ["onnxruntime", strict, "tvm"], tmp_path / "a", prefix="m-", parity_limit=50, log=said.append)
    assert list(arts) == ["onnxruntime"] and arts["onnxruntime"].path == tmp_path / "a" / "m-onnxruntime"
    assert skipped["strict"].startswith("compile failed: ") and "1e-12" in skipped["strict"]
    assert skipped["tvm"] == "apache-tvm not installed (pip install 'crate-edge[tvm]')"
    assert any(s.startswith("[skip] tvm") for s in said)
    stamp = (arts["onnxruntime"].path / MANIFEST).stat().st_mtime_ns
    again, _ = compile_each(micro, ["onnxruntime"], tmp_path / "a", prefix="m-", reuse=True, log=said.append)
    assert (again["onnxruntime"].path / MANIFEST).stat().st_mtime_ns == stamp and said[-1].startswith("[onnxruntime] reusing")
    # built by other crate-edge code (an upgrade, an edited backend): compiled again
    monkeypatch.setattr("crate_edge.compiler.code_sha256", lambda: "0" * 64)
    compile_each(micro, ["onnxruntime"], tmp_path / "a", prefix="m-", reuse=True, parity_limit=50, log=said.append)
    assert said[-1].startswith("[onnxruntime] compiled")
    monkeypatch.undo()
    torch.manual_seed(1)
    other = create_model("mnist-micro").eval()  # another model: the stored artifact is not reused
    compile_each(other, ["onnxruntime"], tmp_path / "a", prefix="m-", reuse=True, parity_limit=50, log=said.append)
    assert said[-1].startswith("[onnxruntime] compiled")
