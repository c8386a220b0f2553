"""crate_edge.runtime: the one path that runs artifacts. It verifies before it runs, checks and
splits batches in one place, and runs ONNX Runtime and TVM artifacts with torch unimportable."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import crate_edge
from crate_edge import BackendUnavailable, CrateEdgeError
from crate_edge.runtime import Runner, load
from tests.procs import ROOT, small_model_and_data


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    model, data = small_model_and_data(d)
    out = {}
    for target in ("onnxruntime", "tvm"):
        try:
            out[target] = crate_edge.compile(model, target, out=d / target, parity_data=data, log=lambda s: None)
        except BackendUnavailable as e:
            print(f"{target}: {e}")
    x = np.load(data)["x"]
    return d, out, x


def test_runs_onnxruntime_and_tvm_artifacts_without_torch(arts):
    d, built, x = arts
    if set(built) != {"onnxruntime", "tvm"}:
        pytest.skip(f"needs onnxruntime and TVM here; built only {sorted(built)}")
    np.save(d / "x.npy", x)
    for name, art in built.items():
        np.save(d / f"want_{name}.npy", art(x))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        import crate_edge.runtime as rt
        x = np.load({str(d / "x.npy")!r})
        for name in ("onnxruntime", "tvm"):
            r = rt.load({str(d)!r} + "/" + name, threads=1)
            got = r(x)
            np.testing.assert_allclose(got, np.load({str(d)!r} + f"/want_{{name}}.npy"), rtol=0, atol=1e-5)
            print(name, r.executor, r.detail, r.input_shape, got.shape)
        assert not any(m == "torch" or m.startswith("torch.") for m, v in sys.modules.items() if v is not None)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split("\n")
    assert lines[0].startswith("onnxruntime onnxruntime CPUExecutionProvider (1, 28, 28)") and lines[1].startswith("tvm tvm Relax VM (cpu)")


def test_verifies_before_it_runs(arts):
    d, built, _ = arts
    art = built["onnxruntime"]
    bad = d / "tampered"
    bad.mkdir()
    for f in art.path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.onnx").write_bytes((bad / "model.onnx").read_bytes()[:-8] + b"tampered")
    with pytest.raises(CrateEdgeError, match="does not match its sha256"):
        load(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(CrateEdgeError, match="corrupt manifest"):
        load(bad)
    with pytest.raises(CrateEdgeError, match="not a crate-edge artifact"):
        load(d / "nothing-here")


def test_batches_are_checked_split_and_padded_in_one_place(arts):
    _, built, x = arts
    art = built["onnxruntime"]
    lo, hi = art.batch_range
    assert (lo, hi) == (1, 256) and art.input_shape == (1, 28, 28) and art.precision
    big = np.concatenate([x] * 20)  # 320 > 256: two chunks
    np.testing.assert_allclose(art(big), np.concatenate([art(x)] * 20), rtol=0, atol=1e-5)
    with pytest.raises(CrateEdgeError, match=r"takes \(batch, 1, 28, 28\)"):
        art(x[:, :, :27])
    calls = []

    def fixed_batch_of_4(b):
        calls.append(len(b))
        return [b.reshape(len(b), -1).sum(1, keepdims=True)]

    fake = Runner("fake", {"input": {"shape": [4, 1, 28, 28], "batch_range": [4, 4]}, "target": {"name": "fake"}}, fixed_batch_of_4, "fake")
    out = fake(x[:10])
    assert calls == [4, 4, 4] and out.shape == (10, 1)


def test_a_runtime_that_is_not_installed_is_named_with_its_extra(arts, tmp_path):
    d, built, _ = arts
    art = built["onnxruntime"]
    m = json.loads((art.path / "manifest.json").read_text())
    code = textwrap.dedent(f"""
        import sys
        sys.modules["onnxruntime"] = None
        import crate_edge.runtime as rt
        try:
            rt.load({str(art.path)!r})
        except rt.BackendUnavailable as e:
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert f"cannot run {m['target']['name']} artifact here" in r.stdout and "pip install 'crate-edge[onnx]'" in r.stdout, (
        r.stdout + r.stderr
    )
