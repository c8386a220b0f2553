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
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
os.environ.setdefault("TVM_NUM_THREADS", str(_THREADS))  # TVM's pool likewise (crate_edge.runtimes._tvm_threads)


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


# Files whose module fixtures compile several artifacts, or that run many real compiles, go to
# the workers first: with whole files per worker (--dist loadfile), a long file picked up last
# leaves the other worker idle at the end.
_HEAVY_FIRST = [
    "test_outputs_kill.py",
    "test_quant_executorch.py",
    "test_bench.py",
    "test_profile.py",
    "test_crate_alpha_targets.py",
    "test_compiler.py",
    "test_quant_coreml.py",
    "test_backend_executorch.py",
    "test_backend_tvm.py",
    "test_embedded.py",
    "test_quant_onnx.py",
    "test_readme.py",
    "test_backend_contract.py",
    "test_calibration.py",
    "test_demo.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
    items.sort(key=lambda it: rank.get(Path(str(it.fspath)).name, len(rank)))  # stable: order within a file kept
