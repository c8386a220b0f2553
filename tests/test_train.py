import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crate_edge import CrateEdgeError, load_model
from crate_edge.train import load_recipe, train

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny-smoke"
epochs = {epochs}
batch_size = 64
seed = 3
fused = {fused}
[model]
variant = "mnist-micro"
dim = 32
depth = 2
heads = 2
dim_head = 16
mean = [0.2860]
std = [0.3530]
[data]
train = "embedded"
val = "embedded"
limit = {limit}
[augment]
random_crop_padding = 2
hflip = true
[optim]
lr = 3e-3
"""


def _recipe(tmp_path, epochs=3, fused="true", limit=512):
    p = tmp_path / "r.toml"
    p.write_text(TINY.format(epochs=epochs, fused=fused, limit=limit))
    return p


def test_a_few_steps_lower_the_loss(tmp_path):
    r = _recipe(tmp_path, epochs=4)
    last = train(r, tmp_path / "out", progress=False)
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())["log"]
    assert len(log) == 4 and log[-1]["train_loss"] < log[0]["train_loss"] - 0.05
    assert last["weights_sha256"]
    m = load_model(tmp_path / "out" / "model")
    assert m.cfg.dim == 32 and not m.training


def test_resume_continues_where_it_stopped(tmp_path):
    r = _recipe(tmp_path, epochs=2)
    train(r, tmp_path / "a", progress=False)
    full = train(r, tmp_path / "b", progress=False, until=1)
    resumed = train(r, tmp_path / "b", progress=False)  # picks up epoch 2 from b/resume
    log = json.loads((tmp_path / "b" / "train_log.json").read_text())["log"]
    assert [e["epoch"] for e in log] == [1, 2] and full["epoch"] == 1 and resumed["epoch"] == 2
    ref = json.loads((tmp_path / "a" / "train_log.json").read_text())["log"]
    assert abs(ref[1]["train_loss"] - log[1]["train_loss"]) < 1e-4


def test_bad_recipes(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("epochs = 1\n[optim]\nlearning_rate = 1\n")
    with pytest.raises(CrateEdgeError, match="unknown key"):
        load_recipe(p)
    p.write_text("epochs = [\n")
    with pytest.raises(CrateEdgeError, match="invalid TOML"):
        load_recipe(p)
    p.write_text('[model]\nvariant = "nope"\n')
    with pytest.raises(CrateEdgeError, match="unknown model variant"):
        load_recipe(p)


def test_shipped_recipes_parse():
    for f in sorted((ROOT / "recipes").glob("*.toml")):
        r = load_recipe(f)
        r.model_config()


def test_ddp_two_cpu_processes_train_one_model(tmp_path):
    r = _recipe(tmp_path, epochs=2, fused="false", limit=256)
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os, torch
        torch.set_num_threads(1)
        from crate_edge.train import train
        rec = train({str(r)!r}, {str(tmp_path / "ddp")!r}, progress=False)
        with open(os.path.join({str(tmp_path)!r}, f"rank{{os.environ['RANK']}}.json"), "w") as f:
            json.dump(rec, f)
    """)
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == 2 and r0["weights_sha256"] == r1["weights_sha256"]
    log = json.loads((tmp_path / "ddp" / "train_log.json").read_text())["log"]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    # one model, saved once, equal to what both ranks hold
    from crate_edge.checkpoint import model_hash

    assert model_hash(load_model(tmp_path / "ddp" / "model")) == r0["weights_sha256"]
