"""The TVM backend: the reference model through Relax to the Relax VM (parity with eager, dynamic
batch), a CUDA build that refuses to run without a GPU, and MetaSchedule tuning whose database
lands in the artifact and is reused."""

import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'crate-edge[tvm]')")

from crate_edge import BackendUnavailable, CrateEdgeError, create_model, load_artifact, load_model  # noqa: E402
from crate_edge.backends import get_backend  # noqa: E402
from crate_edge.compiler import compile  # noqa: E402
from crate_edge.export import Exported, export  # noqa: E402
from crate_edge.rewrites import apply  # noqa: E402
from crate_edge.targets import load_target  # noqa: E402

QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module")
def ref(ref_ckpt):
    return load_model(ref_ckpt, heads=4)


@pytest.fixture(scope="module")
def cpu_art(ref, tmp_path_factory):
    return compile(ref, "tvm", out=tmp_path_factory.mktemp("tvm") / "art", parity_limit=200, **QUIET)


def _x(m, b, seed=3):
    return torch.randn(b, *m.cfg.input_shape, generator=torch.Generator().manual_seed(seed)).numpy()


def _eager(m, x):
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


def test_cpu_artifact_parity_and_dynamic_batch(ref, cpu_art):
    m = cpu_art.manifest
    assert m["parity"]["passed"] and m["parity"]["max_abs"] <= 1e-4, m["parity"]
    assert m["parity"]["executor"] == "tvm"
    assert m["backend"]["device"] == "cpu" and m["backend"]["batch"] == "dynamic [1, 256]"
    assert m["input"]["batch_range"] == [1, 256]
    assert "model.so" in m["files"]
    art = load_artifact(cpu_art.path)
    for b in (1, 3):
        x = _x(ref, b)
        got = art(x)
        assert got.shape == (b, 10)
        assert np.abs(got - _eager(ref, x)).max() <= 1e-4


_COUNT_WORKERS = """
import os, sys, numpy as np
from crate_edge.runtime import load
threads = int(sys.argv[2]) if len(sys.argv) > 2 else None
before = len(os.listdir("/proc/self/task"))
r = load(sys.argv[1], threads=threads)
r(np.zeros((1, *r.manifest["input"]["shape"][1:]), np.float32))
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and 2 CPUs")
def test_the_thread_pool_takes_the_threads_asked_for(cpu_art):
    # TVM alone caps its pool at half the hardware threads (one on a 2-vCPU machine), and
    # runtime.config_threadpool cannot lift the cap: threads=2 ran on one thread
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}

    def workers(*args):
        r = subprocess.run([sys.executable, "-c", _COUNT_WORKERS, str(cpu_art.path), *args], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.split()[-1])

    one, two = workers("1"), workers("2")
    assert two == one + 1, (one, two)  # the pool's extra worker thread (the caller is worker 0)
    assert workers() == len(os.sched_getaffinity(0)) - 1 + one  # default: every CPU it may use


def test_bad_target_option(ref, tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('backend = "tvm"\nrewrites = ["fold_ista"]\n[options]\ntarget = "llvm -mcpu=znver3"\n')
    with pytest.raises(CrateEdgeError, match="options.target must be a table"):
        compile(ref, p, out=tmp_path / "a", parity_limit=20, **QUIET)
    p.write_text('backend = "tvm"\n[options]\ntune_trials = 2\n')
    with pytest.raises(CrateEdgeError, match="static batch"):
        compile(ref, p, out=tmp_path / "b", parity_limit=20, **QUIET)


def _no_gpu_but_nvcc():
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("a CUDA GPU is present: this test is about GPU-less hosts")
    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("no nvcc: TVM compiles CUDA kernels with it")


def test_cuda_builds_here_and_refuses_to_run_without_a_gpu(ref, tmp_path):
    _no_gpu_but_nvcc()
    t = load_target("tvm-cuda")
    be = get_backend("tvm")
    module = apply(ref, t.rewrites)
    example = _x(ref, 2)
    ep = export(module, torch.from_numpy(example), t.dynamic_batch)
    out = tmp_path / "cuda"
    out.mkdir()
    comp = be.compile(Exported(module, ep, torch.from_numpy(example), t.dynamic_batch), t, out)
    assert comp.info["device"] == "cuda" and "execution" in comp.not_verified
    assert (out / "model.so").stat().st_size > 0
    # the CUDA kernels are in the library, as source handed to nvcc and as device code
    assert b"cuda" in (out / "model.so").read_bytes()
    manifest = {"backend": {"name": "tvm", **comp.info}, "target": {"definition": t.raw}}
    av = be.available(run=True, manifest=manifest)
    assert av.ok is False and "no CUDA GPU" in av.reason
    with pytest.raises(BackendUnavailable, match="CUDA build and this machine has no CUDA GPU"):
        be.runner(out, manifest)
    # the numerics of the same Relax module, built for this CPU, against eager
    run, label = be.reference_runner(out, manifest)
    assert "not the CUDA library" in label
    x = _x(ref, 3)
    assert np.abs(run(x)[0] - _eager(ref, x)).max() <= 1e-4


def test_cuda_through_the_compile_flow(ref, tmp_path):
    """The compile flow's parity check loads the artifact; without a GPU that refuses clearly
    (or, where load_artifact asks available(run=True) about the artifact, parity runs on the CPU twin)."""
    _no_gpu_but_nvcc()
    try:
        art = compile(ref, "tvm-cuda", out=tmp_path / "cuda", parity_limit=100, **QUIET)
    except BackendUnavailable as e:
        assert "no CUDA GPU" in str(e)
        return
    assert "not the CUDA library" in art.manifest["parity"]["executor"] and art.manifest["parity"]["passed"]
    with pytest.raises(BackendUnavailable):
        load_artifact(tmp_path / "cuda")


def test_tuning_writes_a_database_and_reuses_it(tmp_path):
    """Two MetaSchedule trials on a one-layer MNIST CRATE (static batch: MetaSchedule tunes concrete
    shapes). The database lands in the artifact; a second compile handed it reuses every kernel
    it holds without tuning."""
    pytest.importorskip("xgboost")
    pytest.importorskip("psutil")
    torch.manual_seed(0)
    m = create_model("mnist-micro", depth=1).eval()
    p = tmp_path / "tuned.toml"
    p.write_text(
        'backend = "tvm"\nrewrites = ["fold_ista"]\n[options]\ntune_trials = 2\n[input]\nexample_batch = 1\ndynamic_batch = false\n'
    )
    a = compile(m, p, out=tmp_path / "a", parity_limit=50, **QUIET)
    db = tmp_path / "a" / "tuning_db"
    assert (db / "database_workload.json").stat().st_size > 0
    assert "tuning_db/database_tuning_record.json" in a.manifest["files"]
    tun = a.manifest["backend"]["tuning"]
    assert tun["tuned"] >= 1 and tun["reused"] == 0 and a.manifest["parity"]["passed"]
    for k in tun["kernels"].values():  # our schedule was measured next to MetaSchedule's and the faster kept
        assert k["default_ms"] is not None and k["kept"] in ("metaschedule", "default")
    assert tun["kernels_from_metaschedule"] == sum(k["kept"] == "metaschedule" for k in tun["kernels"].values())
    p.write_text(p.read_text().replace("tune_trials = 2", f'tune_trials = 0\ntuning_db = "{db}"'))
    b = compile(m, p, out=tmp_path / "b", parity_limit=50, **QUIET)
    tun2 = b.manifest["backend"]["tuning"]
    assert tun2["tasks"] == tun["tasks"] and tun2["reused"] >= tun["tuned"] and tun2["tuned"] == 0
    assert (tmp_path / "b" / "tuning_db" / "database_tuning_record.json").read_bytes() == (db / "database_tuning_record.json").read_bytes()
    assert b.manifest["parity"]["passed"]
    x = _x(m, 1)
    assert np.abs(b(x) - _eager(m, x)).max() <= 1e-4
