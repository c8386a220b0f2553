"""Helpers for the tests that run crate-edge in real subprocesses (kills, concurrent writers)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import crate_edge
from crate_edge.outputs import KILL_ENV

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "crate_edge.cli"]


def env(**kw):
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    e.pop(KILL_ENV, None)
    e.update(kw)
    return e


def run(args, cwd, **kw):
    return subprocess.run(CLI + args, cwd=cwd, env=env(**kw), capture_output=True, text=True, timeout=600)


def debris(parent: Path, name: str):
    """crate-edge's hidden siblings of `name` in `parent` (partial, displaced, lock)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def tiny_recipe(tmp_path: Path, epochs: int, limit: int) -> Path:
    """tests/test_train.py's smoke recipe as a file."""
    text = (ROOT / "tests" / "test_train.py").read_text().split('TINY = """')[1].split('"""')[0]
    p = tmp_path / "r.toml"
    p.write_text(text.format(epochs=epochs, fused="true", limit=limit))
    return p


def small_model_and_data(tmp_path: Path) -> tuple[Path, Path]:
    """A one-layer CRATE in the crate-edge format and 16 float inputs for it: the cheapest real compile."""
    from crate_edge import create_model

    torch.manual_seed(0)
    m = create_model("mnist-micro", depth=1, dim=32, heads=2, dim_head=16).eval()
    crate_edge.save_model(m, tmp_path / "small-model")
    x = np.random.default_rng(0).standard_normal((16, *m.cfg.input_shape)).astype(np.float32)
    np.savez(tmp_path / "small-data.npz", x=x)
    return tmp_path / "small-model", tmp_path / "small-data.npz"
