import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CRATE_EDGE_SHARED", ROOT.parent / "shared"))
REF = SHARED / "reference"

# pytest-xdist workers (./dev.sh test runs the suite in two) share the cores: one each then
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def golden():
    p = REF / "crate_ref_golden.npz"
    if not p.exists():
        pytest.skip(f"shared reference outputs not found at {p} (set CRATE_EDGE_SHARED)")
    z = np.load(p)
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def golden_meta(golden):
    return json.loads(str(golden["meta_json"]))


@pytest.fixture(scope="session")
def ref_ckpt():
    p = REF / "crate_ref_ckpt.pth.tar"
    if not p.exists():
        pytest.skip(f"shared reference checkpoint not found at {p}")
    return p
