"""ruff's lint and format settings (pyproject.toml) hold for the whole tree."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["crate_edge", "tests", "bench"]


@pytest.fixture(scope="module")
def ruff():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install 'crate-edge[test]')")
    return [sys.executable, "-m", "ruff"]


def test_ruff_check(ruff):
    r = subprocess.run([*ruff, "check", *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def test_ruff_format(ruff):
    r = subprocess.run([*ruff, "format", "--check", *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, "run `ruff format crate_edge tests bench`:\n" + r.stdout[-3000:]
