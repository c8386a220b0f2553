"""Users' own data for calibration, parity and evaluation: crate_edge.data.open_inputs and the
options that take a data spec (compile --calibration-data / --parity-data, quantize, run, eval)."""

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import crate_edge
from crate_edge import CrateConfig, CrateEdgeError
from crate_edge.data import InputSet, open_inputs, prepare
from crate_edge.model import CRATE

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "crate_edge.cli"]

# a small RGB model that normalises its inputs: a float `x` must reach it untouched
CFG = CrateConfig(
    image_size=16,
    patch_size=4,
    channels=3,
    num_classes=5,
    dim=32,
    depth=1,
    heads=2,
    dim_head=16,
    mean=(0.5, 0.4, 0.3),
    std=(0.25, 0.2, 0.3),
)


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _float_npz(path, n, shape=(3, 16, 16), labels=True, seed=0, **extra):
    g = np.random.default_rng(seed)
    arrays = {"x": g.standard_normal((n, *shape)).astype(np.float32)}
    if labels:
        arrays["y"] = g.integers(0, 5, n)
    arrays.update(extra)
    np.savez(path, **arrays)
    return arrays


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CRATE_EDGE_DEBUG", None)
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    errs = [ln for ln in lines if ln.startswith("error:")]
    assert len(errs) == 1 and lines[-1] == errs[0], r.stderr
    return errs[0]


def _no_output(d: Path, name: str):
    assert not (d / name).exists()
    assert not [p.name for p in d.iterdir() if p.name.startswith(f".{name}.")], list(d.iterdir())


# ------------------------------------------------------------------ each kind of spec


def test_float_npz_passes_through_untouched(tmp_path):
    a = _float_npz(tmp_path / "mine.npz", 10)
    s = open_inputs(str(tmp_path / "mine.npz"), CFG)
    assert isinstance(s, InputSet) and len(s) == s.total == 10 and s.has_labels and s.kind == "npz"
    x, y = s.tensors()
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(a["x"])) and torch.equal(y, torch.from_numpy(a["y"]))  # no resize, no normalisation
    got = list(s.batches(4))
    assert [len(b[0]) for b in got] == [4, 4, 2] and torch.equal(torch.cat([b[0] for b in got]), x)
    assert [len(b[0]) for b in s.batches(4, limit=5)] == [4, 1]
    # subsets: first n, and n evenly spaced as calibration takes them
    f = s.first(3)
    assert torch.equal(f.tensors()[0], x[:3]) and f.record()["selection"] == "first"
    sp = s.spread(4)
    idx = torch.linspace(0, 9, 4).long()
    assert torch.equal(sp.tensors()[0], x[idx]) and torch.equal(sp.labels, y[idx])
    assert s.first(50) is s and s.first(None) is s
    r = sp.record()
    assert r == {
        **r,
        "spec": str(tmp_path / "mine.npz"),
        "kind": "npz",
        "layout": "x",
        "sha256": _sha(tmp_path / "mine.npz"),
        "images": 4,
        "of": 10,
        "selection": "evenly spaced",
        "labels": True,
    }
    assert "split" not in r
    json.dumps(r)
    # labels are optional
    _float_npz(tmp_path / "unl.npz", 3, labels=False)
    u = open_inputs(tmp_path / "unl.npz", CFG)  # a Path works too
    assert not u.has_labels and u.labels is None and u.tensors()[1] is None and next(u.batches(2))[1] is None
    assert u.record()["labels"] is False


def test_uint8_npz_is_prepared_like_prepare(tmp_path):
    g = np.random.default_rng(1)
    hwc = g.integers(0, 256, (6, 20, 24, 3), dtype=np.uint8)  # (N, H, W, C), resized to 16x16
    np.savez(tmp_path / "u8.npz", images=hwc, labels=np.arange(6) % 5)
    x, y = open_inputs(tmp_path / "u8.npz", CFG).tensors()
    want = prepare(torch.from_numpy(hwc.transpose(0, 3, 1, 2).copy()), CFG)
    assert x.shape == (6, 3, 16, 16) and torch.equal(x, want) and y.tolist() == [0, 1, 2, 3, 4, 0]
    grey = g.integers(0, 256, (4, 16, 16), dtype=np.uint8)  # grey, no labels: replicated to RGB, normalised
    np.savez(tmp_path / "grey.npz", images=grey)
    s = open_inputs(tmp_path / "grey.npz", CFG)
    x, y = s.tensors()
    mean, std = torch.tensor(CFG.mean).view(1, 3, 1, 1), torch.tensor(CFG.std).view(1, 3, 1, 1)
    ref = (torch.from_numpy(grey).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std
    assert y is None and torch.allclose(x, ref, atol=1e-6)
    assert s.record()["layout"] == "images" and "resize" in s.record()["preprocessing"]


def test_image_folder_is_resized_and_normalised(tmp_path):
    from PIL import Image

    g = np.random.default_rng(2)
    root = tmp_path / "imgs"
    arrs = {}
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            a = g.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i}.png")
            arrs[(c, i)] = a
    (root / "dog" / "notes.txt").write_text("not an image")
    s = open_inputs(str(root), CFG)
    assert s.kind == "folder" and len(s) == 6 and s.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, _ = s.tensors()
    mean, std = torch.tensor(CFG.mean).view(3, 1, 1), torch.tensor(CFG.std).view(3, 1, 1)
    ref = (torch.from_numpy(arrs[("dog", 1)].transpose(2, 0, 1).copy()).float() / 255 - mean) / std  # at the model's size
    assert torch.allclose(x[4], ref, atol=1e-6)
    # the folder's hash: sorted relative paths and file hashes (the text file is not an image)
    files = sorted(p for p in root.rglob("*.png"))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{_sha(f)}\n".encode())
    assert s.record()["sha256"] == h.hexdigest()
    # another size is resized (shorter side, centre crop) and normalised with the model's settings
    Image.fromarray(g.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "cat" / "big.png")
    s2 = open_inputs(str(root), CFG)
    assert s2.tensors()[0].shape == (7, 3, 16, 16) and s2.record()["sha256"] != s.record()["sha256"]


def test_idx_directory_and_named_sets(tmp_path):
    for name, arr in (
        ("t10k-images-idx3-ubyte", np.full((4, 16, 16), 255, np.uint8)),
        ("t10k-labels-idx1-ubyte", np.arange(4, dtype=np.uint8)),
    ):
        hdr = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
        (tmp_path / (name + ".gz")).write_bytes(gzip.compress(hdr + arr.tobytes()))
    s = open_inputs(str(tmp_path), CFG)
    x, y = s.tensors()
    assert s.kind == "idx" and s.record()["split"] == "test" and len(s.record()["sha256"]) == 64
    assert torch.allclose(x[0, 1], torch.full((16, 16), (1 - 0.4) / 0.2)) and y.tolist() == [0, 1, 2, 3]
    with pytest.raises(CrateEdgeError, match="missing"):
        open_inputs(f"{tmp_path}:train", CFG)
    e = open_inputs("embedded", CFG)
    assert e.total == 1000 and e.has_labels and e.tensors()[0][:2].shape == (2, 3, 16, 16)
    r = e.first(8).record()
    assert r["kind"] == "named" and r["name"] == "embedded" and r["split"] == "test" and r["images"] == 8 and "sha256" not in r


# ------------------------------------------------------------------ bad data: one clear line


def _bad(tmp_path):
    """(spec, expected message fragment) for every malformed-data case that open_inputs catches."""
    from PIL import Image

    t = tmp_path
    (t / "junk.npz").write_bytes(b"this is not a zip file")
    np.save(t / "one.npy", np.zeros((2, 3, 16, 16), np.float32))
    os.replace(t / "one.npy", t / "one.npz")
    np.savez(t / "other.npz", pixels=np.zeros((2, 3, 16, 16), np.float32))
    np.savez(t / "f64.npz", x=np.zeros((2, 3, 16, 16)))
    np.savez(t / "u8x.npz", x=np.zeros((2, 3, 16, 16), np.uint8))
    np.savez(t / "flat.npz", x=np.zeros((2, 768), np.float32))
    np.savez(t / "ylen.npz", x=np.zeros((4, 3, 16, 16), np.float32), y=np.zeros(3, np.int64))
    np.savez(t / "yfloat.npz", x=np.zeros((4, 3, 16, 16), np.float32), y=np.zeros(4, np.float32))
    nan = np.zeros((4, 3, 16, 16), np.float32)
    nan[2, 0, 1, 1] = np.nan
    np.savez(t / "nan.npz", x=nan)
    np.savez(t / "grey28.npz", x=np.zeros((4, 1, 28, 28), np.float32))
    np.savez(t / "obj.npz", x=np.array([None, 1], dtype=object))
    np.savez(t / "ch2.npz", images=np.zeros((2, 2, 16, 16), np.uint8))
    (t / "empty_dir").mkdir()
    (t / "flat_dir").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(t / "flat_dir" / "a.png")
    (t / "noimg" / "cls").mkdir(parents=True)
    (t / "noimg" / "cls" / "a.txt").write_text("x")
    np.savez(t / "empty.npz", x=np.zeros((0, 3, 16, 16), np.float32))
    np.savez(t / "whole.npz", x=np.zeros((8, 3, 16, 16), np.float32))
    (t / "trunc.npz").write_bytes((t / "whole.npz").read_bytes()[:300])
    return [
        (t / "nope.npz", "not found"),
        (t / "nope_dir", "not found"),
        (t / "junk.npz", "not an .npz archive .no zip header"),
        (t / "trunc.npz", "cannot read"),
        (t / "one.npz", "single .npy array"),
        (t / "other.npz", "no array 'x'.*it holds pixels"),
        (t / "f64.npz", "'x' must be float32.*float64"),
        (t / "u8x.npz", "'x' must be float32.*uint8 images go in an array named 'images'"),
        (t / "flat.npz", r"'x' must be 4-D.*\(2, 768\)"),
        (t / "ylen.npz", r"'y' must be one label per image, shape \(4,\); got \(3,\)"),
        (t / "yfloat.npz", "'y' must hold integer class indices"),
        (t / "nan.npz", r"non-finite values \(NaN or inf\) in 1 image\(s\), first image 2"),
        (t / "grey28.npz", r"images are \(1, 28, 28\) \(C, H, W\); the model takes \(3, 16, 16\)"),
        (t / "obj.npz", "cannot read"),
        (t / "ch2.npz", "images have 2 channel"),
        (t / "empty_dir", "no class subfolders"),
        (t / "flat_dir", "no class subfolders"),
        (t / "noimg", "no images found"),
        (t / "empty.npz", "holds no images"),
        ("fashion-mnist:val", "unknown split|not found"),
        ("embedded:train", "held-out test slice"),
    ]


def test_bad_data_gives_one_clear_line(tmp_path):
    for spec, msg in _bad(tmp_path):
        with pytest.raises(CrateEdgeError, match=msg) as e:
            open_inputs(str(spec), CFG)
        assert "\n" not in str(e.value), (spec, str(e.value))


def test_corrupt_image_too_few_images_and_missing_labels(tmp_path):
    from PIL import Image

    from crate_edge.quantize import QuantConfig, calibration_images, calibration_set

    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "ok.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    s = open_inputs(str(tmp_path / "imgs"), CFG)  # decoded lazily...
    with pytest.raises(CrateEdgeError, match="cannot decode image .*broken.png"):
        s.tensors()  # ...and a corrupt one is one line
    _float_npz(tmp_path / "mine.npz", 100)
    with pytest.raises(CrateEdgeError, match=r"mine.npz holds 100 images; calibration needs 256"):
        calibration_images(CFG, QuantConfig(calibration_data=str(tmp_path / "mine.npz")))  # no silent shortfall
    cal = calibration_set(CFG, QuantConfig(calibration_data=str(tmp_path / "mine.npz"), calibration_images=100))
    assert len(cal) == 100 and cal.record()["selection"] == "all"
    assert calibration_images(CFG, QuantConfig(calibration_data=str(tmp_path / "mine.npz"), calibration_images=10)).shape == (10, 3, 16, 16)
    _float_npz(tmp_path / "unl.npz", 4, labels=False)
    m = CRATE(CFG).eval()
    with pytest.raises(CrateEdgeError, match="unl.npz has no labels .*evaluation needs labelled data"):
        crate_edge.evaluate(m, str(tmp_path / "unl.npz"))
    r = crate_edge.evaluate(m, str(tmp_path / "mine.npz"), batch_size=32)
    with torch.no_grad():
        x, y = open_inputs(str(tmp_path / "mine.npz"), CFG).tensors()
        assert r["n"] == 100 and r["top1"] == pytest.approx(float((m(x).argmax(1) == y).float().mean()))
    np.savez(tmp_path / "big_labels.npz", x=np.zeros((2, 3, 16, 16), np.float32), y=np.array([0, 7]))
    with pytest.raises(CrateEdgeError, match="label 7 is out of range for a model with 5 classes"):
        crate_edge.evaluate(m, str(tmp_path / "big_labels.npz"))


def test_compile_refuses_bad_data_before_writing(tmp_path):
    m = CRATE(CFG).eval()
    _float_npz(tmp_path / "mine.npz", 20)
    np.savez(tmp_path / "bad.npz", x=np.zeros((20, 3, 16, 16)))
    with pytest.raises(CrateEdgeError, match="onnxruntime is not quantized.*calibration_data"):
        crate_edge.compile(m, "onnxruntime", out=tmp_path / "a", calibration_data=str(tmp_path / "mine.npz"), log=lambda s: None)
    with pytest.raises(CrateEdgeError, match="^calibration data: .*bad.npz: 'x' must be float32"):
        crate_edge.compile(m, "onnxruntime-int8", out=tmp_path / "a", calibration_data=str(tmp_path / "bad.npz"), log=lambda s: None)
    with pytest.raises(CrateEdgeError, match="mine.npz holds 20 images; calibration needs 256"):
        crate_edge.compile(m, "onnxruntime-int8", out=tmp_path / "a", calibration_data=str(tmp_path / "mine.npz"), log=lambda s: None)
    with pytest.raises(CrateEdgeError, match="^parity data: .*bad.npz"):
        crate_edge.compile(
            m,
            "onnxruntime-int8",
            out=tmp_path / "a",
            calibration_data=str(tmp_path / "mine.npz"),
            calibration_images=8,
            parity_data=str(tmp_path / "bad.npz"),
            log=lambda s: None,
        )
    _no_output(tmp_path, "a")


def test_cli_bad_data_is_one_line_and_writes_nothing(tmp_path):
    _float_npz(tmp_path / "rgb.npz", 50, shape=(3, 32, 32))  # the embedded model takes (1, 28, 28)
    np.savez(tmp_path / "ylen.npz", x=np.zeros((5, 1, 28, 28), np.float32), y=np.zeros(2, np.int64))
    e = _one_error_line(_cli("compile", "--target", "onnxruntime-int8", "--calibration-data", "rgb.npz", "--out", "art", cwd=tmp_path))
    assert (
        e == "error: calibration data: rgb.npz: images are (3, 32, 32) (C, H, W); the model takes (1, 28, 28) "
        "(a float32 'x' is used as is, never resized)"
    ), e
    e = _one_error_line(_cli("compile", "--target", "onnxruntime-int8", "--parity-data", "ylen.npz", "--out", "art", cwd=tmp_path))
    assert "ylen.npz: 'y' must be one label per image" in e
    e = _one_error_line(_cli("compile", "--target", "onnxruntime", "--calibration-data", "rgb.npz", "--out", "art", cwd=tmp_path))
    assert "not quantized" in e and "--calibration-data" in e
    _no_output(tmp_path, "art")


# ------------------------------------------------------------------ end to end


def _upstream_checkpoint(path, cfg, seed=0):
    """A CRATE saved the way upstream's training script saves it."""
    torch.manual_seed(seed)
    m = CRATE(cfg).eval()
    sd = {f"module.{k}": v.clone() for k, v in m.state_dict().items()}
    torch.save(
        {
            "epoch": 90,
            "arch": "CRATE_custom",
            "state_dict": sd,
            "best_acc1": 11.0,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": list(range(len(sd)))}]},
            "scheduler": {"last_epoch": 90},
        },
        path,
    )
    return m


def test_own_checkpoint_and_data_end_to_end_cli(tmp_path):
    """An upstream-format RGB 32x32 CRATE (heads not recoverable from shapes) compiled for
    onnxruntime-int8, calibrated and checked on the user's own float32 npz."""
    cfg = CrateConfig(image_size=32, patch_size=4, channels=3, num_classes=10, dim=64, depth=2, heads=4, dim_head=16)
    _upstream_checkpoint(tmp_path / "ckpt.pth.tar", cfg)
    g = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", x=g.standard_normal((300, 3, 32, 32)).astype(np.float32), y=g.integers(0, 10, 300))
    e = _one_error_line(_cli("import", "ckpt.pth.tar", "--out", "model", cwd=tmp_path))
    assert "--heads" in e
    r = _cli("import", "ckpt.pth.tar", "--heads", "4", "--out", "model", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli(
        "compile",
        "--target",
        "onnxruntime-int8",
        "--model",
        "model",
        "--calibration-data",
        "mine.npz",
        "--parity-data",
        "mine.npz",
        "--out",
        "art",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "calibration on 256 evenly spaced images of mine.npz" in r.stderr
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    sha = _sha(tmp_path / "mine.npz")
    cal = m["quantization"]["calibration"]
    assert cal == {**cal, "spec": "mine.npz", "kind": "npz", "sha256": sha, "images": 256, "of": 300, "selection": "evenly spaced"}
    assert m["quantization"]["config"]["calibration_data"] == "mine.npz"
    p = m["parity"]
    assert p["data"] == {**p["data"], "spec": "mine.npz", "kind": "npz", "sha256": sha, "images": 300, "of": 300, "labels": True}
    assert p["passed"] and p["n"] == 300 and "reference_top1" in p
    from crate_edge.targets import load_target

    tol = load_target("onnxruntime-int8").tolerances  # the target's own budget, as shipped
    assert p["tolerances"] == tol and p["top1_agreement"] >= tol["min_top1_agreement"] and p["min_cosine"] >= tol["min_cosine"]
    r = _cli("run", "art", "--data", "mine.npz", "--n", "3", cwd=tmp_path)
    assert r.returncode == 0 and "label" in r.stdout and "top-1" in r.stdout, r.stderr
    # the input normalisation an upstream checkpoint was trained with travels with the imported model
    r = _cli(
        "import",
        "ckpt.pth.tar",
        "--heads",
        "4",
        "--mean",
        "0.485,0.456,0.406",
        "--std",
        "0.229,0.224,0.225",
        "--out",
        "normed",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    from crate_edge import load_model

    assert load_model(tmp_path / "normed").cfg.std == (0.229, 0.224, 0.225)
    with pytest.raises(CrateEdgeError, match="one value per channel"):
        crate_edge.import_checkpoint(tmp_path / "ckpt.pth.tar", tmp_path / "bad", heads=4, mean=(0.5,), std=(0.2,))
    assert not (tmp_path / "bad").exists()


def test_own_data_python_api_and_unlabelled_parity(tmp_path):
    from crate_edge.parity import parity

    cfg = CrateConfig(image_size=32, patch_size=4, channels=3, num_classes=10, dim=64, depth=2, heads=4, dim_head=16)
    torch.manual_seed(1)
    model = CRATE(cfg).eval()
    g = np.random.default_rng(1)
    np.savez(tmp_path / "cal.npz", x=g.standard_normal((64, 3, 32, 32)).astype(np.float32))
    np.savez(tmp_path / "check.npz", x=g.standard_normal((120, 3, 32, 32)).astype(np.float32))  # no labels
    art = crate_edge.compile(
        model,
        "onnxruntime-int8",
        out=tmp_path / "art",
        calibration_data=str(tmp_path / "cal.npz"),
        calibration_images=64,
        parity_data=str(tmp_path / "check.npz"),
        log=lambda s: None,
    )
    m = art.manifest
    assert m["quantization"]["calibration"]["sha256"] == _sha(tmp_path / "cal.npz") and m["quantization"]["calibration"]["images"] == 64
    assert m["quantization"]["config"]["calibration_images"] == 64
    p = m["parity"]
    assert p["passed"] and p["data"]["labels"] is False and p["data"]["sha256"] == _sha(tmp_path / "check.npz")
    assert "reference_top1" not in p and "artifact_top1" not in p
    # the parity suite on unlabelled data: logit metrics, no top-1, the drop listed as unchecked
    rep = parity([art], reference=model, data=str(tmp_path / "check.npz"), progress=False)
    r = rep[0]
    assert rep.reference["top1"] is None and "top1_drop" not in r.logits and "max_top1_drop" in r.unchecked
    assert rep.n == 120 and rep.data_record["labels"] is False and r.logits["top1_agreement"] >= 0.98
    assert "no labels" in rep.table() and "n/a" in rep.table() and "no labels" in rep.markdown()
    assert "max_top1_drop (the data has no labels)" in rep.table()
    rep.plot(tmp_path / "p.png")
    json.dumps(rep.to_dict())
    # labelled: top-1 drop computed and checked; an InputSet can be passed as data
    np.savez(tmp_path / "lab.npz", x=np.load(tmp_path / "check.npz")["x"], y=g.integers(0, 10, 120))
    s = open_inputs(str(tmp_path / "lab.npz"), cfg).first(100)
    rep = parity([art], reference=model, data=s, progress=False)
    assert rep.n == 100 and "top1_drop" in rep[0].logits and rep.reference["top1"] is not None
    assert rep.data_record["images"] == 100 and rep.data_record["selection"] == "first"
