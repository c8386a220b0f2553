"""Upstream checkpoints of many shapes and containers, crate-edge's format, and bad files."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from crate_edge import CrateEdgeError, load_model, save_model
from crate_edge.checkpoint import import_checkpoint

from .oracle import random_upstream_state_dict, upstream_logits

SHAPES = [  # image, patch, channels, dim, depth, heads, dim_head, classes, pool
    (32, 4, 3, 96, 2, 4, 24, 10, "mean"),
    (28, 4, 1, 64, 3, 2, 32, 10, "cls"),
    (64, 16, 3, 48, 2, 3, 16, 5, "cls"),
    (28, 7, 1, 40, 2, 5, 8, 7, "mean"),
    (16, 4, 3, 32, 2, 1, 32, 4, "cls"),  # heads=1, dim_head=dim: upstream has no output map
]


def _containers(sd, arch="crate_custom"):
    pre = {"module." + k: v for k, v in sd.items()}
    return {
        "train_script": {
            "epoch": 3,
            "arch": arch,
            "state_dict": pre,
            "best_acc1": torch.tensor(12.5),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "scheduler": {"last_epoch": 3},
        },
        "finetune_script": {"model": pre, "optimizer": {"state": {}, "param_groups": []}, "scaler": {"scale": 65536.0}},
        "model_only": {"model": sd},
        "bare": sd,
        "bare_prefixed": pre,
    }


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}px-p{s[1]}-c{s[2]}-h{s[5]}-{s[8]}")
def test_upstream_checkpoints_of_other_shapes_match_the_oracle(tmp_path, shape):
    image, patch, ch, dim, depth, heads, dh, classes, pool = shape
    sd = random_upstream_state_dict(image, patch, ch, dim, depth, heads, dh, classes, seed=sum(shape[:8]))
    x = torch.randn(3, ch, image, image, generator=torch.Generator().manual_seed(1))
    want = upstream_logits(sd, x, heads, pool)
    for name, obj in _containers(sd).items():
        f = tmp_path / f"{name}.pth.tar"
        torch.save(obj, f)
        m = load_model(f, heads=heads, pool=pool)
        c = m.cfg
        assert (c.image_size, c.patch_size, c.channels, c.dim, c.depth, c.heads, c.dim_head, c.num_classes, c.pool) == shape
        with torch.no_grad():
            err = (m(x).double() - want).abs().max().item()
        assert err <= 1e-4, f"{name}: {err}"
        with torch.no_grad():  # and in float64 the two implementations agree to rounding
            assert (m.double()(x.double()) - want).abs().max().item() <= 1e-9


def test_heads_from_published_configuration_and_arch(tmp_path):
    sd = random_upstream_state_dict(32, 16, 3, 384, 12, 6, 64, 10)  # CRATE-Tiny shapes, small image
    f = tmp_path / "tiny.pth"
    torch.save(sd, f)
    assert load_model(f).cfg.heads == 6  # published configuration (dim 384, depth 12)
    sd2 = random_upstream_state_dict(32, 16, 3, 576, 2, 12, 48, 10)
    torch.save({"arch": "CRATE_small", "state_dict": sd2}, f)
    assert load_model(f).cfg.heads == 12  # the training script's arch names it
    torch.save(sd2, f)
    with pytest.raises(CrateEdgeError, match=r"--heads"):
        load_model(f)


def test_missing_heads_message_names_the_flag(ref_ckpt):
    with pytest.raises(CrateEdgeError, match=r"pass --heads H \(Python: heads=H\)"):
        load_model(ref_ckpt)


def test_pool_defaults_to_cls_and_can_be_mean(ref_ckpt):
    assert load_model(ref_ckpt, heads=4).cfg.pool == "cls"
    assert load_model(ref_ckpt, heads=4, pool="mean").cfg.pool == "mean"


def test_crate_edge_format_round_trip(tmp_path, ref_ckpt):
    m = load_model(ref_ckpt, heads=4, pool="mean")
    out = save_model(m, tmp_path / "m")
    assert sorted(os.listdir(out)) == [".crate-edge.json", "config.json", "model.safetensors"]  # crate_edge.outputs.MARKER
    doc = json.loads((out / "config.json").read_text())
    assert doc["format"] == "crate-edge" and doc["config"]["pool"] == "mean" and doc["config"]["heads"] == 4
    x = torch.randn(2, 3, 32, 32)
    for src in (out, out / "model.safetensors"):  # the .safetensors alone carries the config too
        m2 = load_model(src)
        assert m2.cfg == m.cfg
        with torch.no_grad():
            assert torch.equal(m(x), m2(x))
    assert not m2.training


def test_import_writes_crate_edge_format(tmp_path, ref_ckpt):
    out = import_checkpoint(ref_ckpt, tmp_path / "imp", heads=4)
    doc = json.loads((out / "config.json").read_text())
    assert doc["metadata"]["imported_from"] == ref_ckpt.name
    assert load_model(out).cfg.heads == 4


# ------------------------------------------------------------------ bad input


def _err(path, **kw):
    with pytest.raises(CrateEdgeError) as e:
        load_model(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_truncated_checkpoint(tmp_path, ref_ckpt):
    f = tmp_path / "trunc.pth.tar"
    f.write_bytes(ref_ckpt.read_bytes()[:4000])
    assert "truncated or corrupt" in _err(f, heads=4)


def test_random_bytes(tmp_path):
    f = tmp_path / "noise.pth"
    f.write_bytes(os.urandom(5000))
    _err(f, heads=4)
    g = tmp_path / "noise.safetensors"
    g.write_bytes(os.urandom(5000))
    assert "safetensors" in _err(g)


def test_wrong_shapes_and_unknown_or_missing_keys(tmp_path):
    sd = random_upstream_state_dict(32, 4, 3, 64, 2, 4, 16, 10)
    f = tmp_path / "bad.pth"
    bad = dict(sd)
    bad["transformer.layers.1.1.fn.weight"] = torch.zeros(64, 32)
    torch.save(bad, f)
    assert "transformer.layers.1.1.fn.weight has shape (64, 32)" in _err(f, heads=4)
    extra = dict(sd, **{"transformer.layers.0.0.fn.extra": torch.zeros(1)})
    torch.save(extra, f)
    assert "unknown 1 key(s) e.g. transformer.layers.0.0.fn.extra" in _err(f, heads=4)
    missing = {k: v for k, v in sd.items() if k != "mlp_head.0.bias"}
    torch.save(missing, f)
    assert "missing 1 key(s) e.g. mlp_head.0.bias" in _err(f, heads=4)
    torch.save({"foo": torch.zeros(3)}, f)
    assert "not a CRATE or CRATE-α checkpoint" in _err(f, heads=4)
    torch.save(sd, f)
    assert "does not divide" in _err(f, heads=5)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_pickle_that_would_execute_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    f = tmp_path / "evil.pth"
    with open(f, "wb") as fh:
        torch.save({"state_dict": {"cls_token": torch.zeros(1)}, "payload": _Exploit()}, fh)
    assert "refusing to load" in _err(f, heads=4)
    g = tmp_path / "evil_raw.pth"
    g.write_bytes(pickle.dumps(_Exploit()))
    _err(g, heads=4)
    assert not marker.exists()


def test_tampered_crate_edge_weights_are_detected(tmp_path, ref_ckpt):
    out = save_model(load_model(ref_ckpt, heads=4), tmp_path / "m")
    w = out / "model.safetensors"
    b = bytearray(w.read_bytes())
    b[-10] ^= 0xFF
    w.write_bytes(bytes(b))
    assert "sha256 does not match" in _err(out)


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, ref_ckpt):
    f = tmp_path / "noise.pth"
    f.write_bytes(os.urandom(300))
    cases = [
        ["import", str(f), "--out", str(tmp_path / "o"), "--heads", "4"],
        ["import", str(ref_ckpt), "--out", str(tmp_path / "o")],
        ["inspect", str(tmp_path / "missing.pth")],
        ["train", str(tmp_path / "missing.toml")],
    ]
    for args in cases:
        r = subprocess.run([sys.executable, "-m", "crate_edge.cli", *args], capture_output=True, text=True)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists()
