"""crate_edge.bench, `crate-edge bench`, TVM RPC over loopback and bench/table.py --quick."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import crate_edge
from crate_edge.bench import BASELINE_LABELS, RPCRunner, bench
from crate_edge.cli import main
from crate_edge.errors import CrateEdgeError
from crate_edge.manifest import read_verified as read_artifact
from crate_edge.runtime import load

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "crate_edge"

# blocks `import torch` in every process started with it on PYTHONPATH (workers inherit it)
NO_TORCH = """import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
"""
# runs bench() without crate_edge/__init__ (which imports torch), as a torch-free install would
TORCH_FREE_BENCH = """import importlib.machinery as m, importlib.util as u, json, sys
s = m.ModuleSpec("crate_edge", None, is_package=True); s.submodule_search_locations = [sys.argv[1]]
sys.modules["crate_edge"] = u.module_from_spec(s)
from crate_edge.bench import bench
r = bench(sys.argv[2:], batch="1,2", threads=1, warmup=1, iters=3, rounds=1, baselines=(), progress=False)
print(json.dumps({"report": r.to_dict(), "torch_in_parent": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def ort_art(work):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    return crate_edge.compile(None, "onnxruntime", out=work / "ort", parity_limit=64).path


@pytest.fixture(scope="module")
def tvm_art(work):
    pytest.importorskip("tvm")
    return crate_edge.compile(None, "tvm", out=work / "tvm", parity_limit=64).path


@pytest.fixture(scope="module")
def report(ort_art):
    return bench([ort_art], batch="1,4", threads=1, warmup=1, iters=8, rounds=2)


@pytest.fixture(scope="module")
def no_torch_path(work):
    d = work / "notorch"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(NO_TORCH)
    return d


def test_report_fields(report, ort_art):
    d = report.to_dict()
    names = [c["name"] for c in d["contenders"]]
    assert names == [BASELINE_LABELS["upstream"], BASELINE_LABELS["folded"], BASELINE_LABELS["compile"], "onnxruntime"], d["skipped"]
    assert d["settings"]["batch"] == [1, 4] and d["settings"]["threads"] == 1
    h = d["host"]
    assert h["cpu"] and h["cores"] >= 1 and isinstance(h["isa"], list) and "onnxruntime" in h["libraries"] and "torch" in h["libraries"]
    m = read_artifact(ort_art)
    for c in d["contenders"]:
        assert c["load_s"] > 0 and c["peak_rss_mb"] >= c["rss_after_load_mb"] > c["rss_before_load_mb"] > 0
        for b in (1, 4):
            r = c["results"][str(b)]
            assert r["n"] == 8
            assert 0 < r["min_ms"] <= r["p10_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
            assert r["throughput_ips"] == pytest.approx(b / (r["p50_ms"] / 1e3), rel=1e-9)
            assert r["first_ms"] > 0
            # idle workers were quiet while this one was timed (Linux /proc accounting)
            assert r["others_cpu_per_s"] is not None and 0 <= r["others_cpu_per_s"] < 0.5
            # every contender computes the same function on the same input
            assert r["max_abs_vs_upstream"] < 1e-4 and r["top1_agreement_vs_upstream"] == 1.0
            up = d["contenders"][0]["results"][str(b)]["p50_ms"]
            assert r["speedup_vs_upstream"] == pytest.approx(up / r["p50_ms"])
    ort = d["contenders"][-1]
    assert ort["torch_imported"] is False  # onnxruntime alone, in its own process
    assert ort["size_bytes"] == sum((ort_art / f).stat().st_size for f in m["files"]) + (ort_art / "manifest.json").stat().st_size
    assert ort["target"] == "onnxruntime" and ort["target_precision"] == "fp32"
    assert d["contenders"][0]["torch_imported"] is True and d["source_model"]["sha256"] == m["source_model"]["sha256"]


def test_write(report, tmp_path):
    paths = report.write(tmp_path)
    assert [p.name for p in paths] == ["bench.json", "bench.md", "bench.png"]
    assert json.loads(paths[0].read_text())["contenders"][-1]["name"] == "onnxruntime"
    assert "| onnxruntime | 4 |" in paths[1].read_text()
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[2].stat().st_size > 5000


def test_seconds_mode(ort_art):
    r = bench([ort_art], batch=2, threads=1, warmup=1, seconds=0.3, rounds=3, baselines=(), progress=False)
    res = r.result("onnxruntime", 2)
    assert r.data["settings"]["seconds"] == 0.3 and res["n"] >= 3
    assert 0.05 < res["n"] * res["mean_ms"] / 1e3 < 3.0  # about 0.3 s of calls (loose: a shared machine)
    with pytest.raises(CrateEdgeError, match="not both"):
        bench([ort_art], iters=3, seconds=1.0, baselines=())


def test_other_source_model_needs_model(work):
    pytest.importorskip("onnxruntime")
    import torch

    torch.manual_seed(1)
    other = crate_edge.create_model("mnist-micro").eval()
    art = crate_edge.compile(other, "onnxruntime", out=work / "ort-micro", parity_limit=16).path
    with pytest.raises(CrateEdgeError, match="--model"):
        bench([art], iters=2, progress=False)
    with pytest.raises(CrateEdgeError, match="not the artifacts' source"):
        bench([art], iters=2, model=crate_edge.load_model(), progress=False)
    r = bench([art], iters=2, rounds=1, warmup=0, threads=1, model=other, baselines=("upstream",), progress=False)
    assert r.result("onnxruntime", 1)["max_abs_vs_upstream"] < 1e-4


def test_cli_ok(ort_art, tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "bench",
            str(ort_art),
            "--batch",
            "1,2",
            "--iters",
            "3",
            "--warmup",
            "0",
            "--rounds",
            "1",
            "--threads",
            "1",
            "--baselines",
            "upstream",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "| onnxruntime | 2 |" in res.output and "| eager upstream | 1 |" in res.output
    assert {p.name for p in tmp_path.iterdir()} >= {"bench.json", "bench.md", "bench.png"}


@pytest.mark.parametrize(
    "args,msg",
    [
        (["/nonexistent/artifact"], "not a crate-edge artifact"),
        (["ART", "--batch", "1,x"], "expected positive integers"),
        (["ART", "--batch", "0"], "expected positive integers"),
        (["ART", "--iters", "3", "--seconds", "1"], "not both"),
        (["ART", "--baselines", "upstream,fast"], "unknown baseline"),
        (["ART", "--rpc", "nohost"], "expected HOST:PORT"),
    ],
)
def test_cli_errors(ort_art, args, msg):
    args = [str(ort_art) if a == "ART" else a for a in args]
    res = CliRunner().invoke(main, ["bench", *args])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], res.output


def test_runtimes_without_torch(ort_art, tvm_art, no_torch_path):
    """The onnxruntime and TVM artifacts are loaded, run and timed with torch unimportable."""
    env = {**os.environ, "PYTHONPATH": str(no_torch_path)}
    p = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_BENCH, str(PKG), str(ort_art), str(tvm_art)], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    d = out["report"]
    assert not out["torch_in_parent"] and not d["skipped"], d["skipped"]
    assert [c["name"] for c in d["contenders"]] == ["onnxruntime", "tvm"]
    for c in d["contenders"]:
        assert c["torch_imported"] is False and c["results"]["2"]["p50_ms"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_server(no_torch_path):
    """A TVM RPC server on loopback (torch blocked, like a bare device), stopped afterwards."""
    pytest.importorskip("tvm")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(no_torch_path)}
    srv = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1), "--silent"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        t0 = time.time()
        while True:
            if srv.poll() is not None:
                pytest.fail(f"the TVM RPC server exited with status {srv.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() - t0 > 180:
                    pytest.fail("the TVM RPC server did not start listening within 180 s")
                time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        try:
            os.killpg(srv.pid, signal.SIGTERM)  # the server and the session processes it forked
        except ProcessLookupError:
            pass
        try:
            srv.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(srv.pid, signal.SIGKILL)
            srv.wait()


def test_rpc_loopback(tvm_art, rpc_server):
    m = read_artifact(tvm_art)
    remote = RPCRunner(tvm_art, m, rpc_server, threads=1)
    local = load(tvm_art, threads=1).outputs
    rng = np.random.default_rng(3)
    for b in (1, 3):
        x = rng.standard_normal((b, *m["input"]["shape"][1:])).astype(np.float32)
        got, want = remote(x)[0], local(x)[0]
        assert got.shape == (b, 10)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        ts = remote.time(x, 4)
        assert len(ts) == 4 and all(0 < t < 10_000 for t in ts)
    remote.close()  # a plain RPC server serves one session at a time
    import gc

    gc.collect()

    r = bench([tvm_art], batch="1,2", threads=1, warmup=1, iters=4, rounds=2, rpc=rpc_server, baselines=("upstream",), progress=False)
    c = next(c for c in r.contenders if c["name"] == "tvm [rpc]")
    assert c["remote"] and c["peak_rss_mb"] is None and "RPC" in c["executor"]
    for b in ("1", "2"):
        res = c["results"][b]
        assert res["n"] == 4 and 0 < res["p50_ms"] <= res["p99_ms"] and res["max_abs_vs_upstream"] < 1e-4


def test_rpc_unreachable(tvm_art):
    port = _free_port()  # nothing listens there
    with pytest.raises(CrateEdgeError, match="cannot reach the TVM RPC server"):
        bench([tvm_art], rpc=f"127.0.0.1:{port}", baselines=(), iters=2, progress=False, rpc_timeout=60)


def test_rpc_errors(ort_art):
    with pytest.raises(CrateEdgeError, match="HOST:PORT"):
        bench([ort_art], rpc="localhost", baselines=())
    with pytest.raises(CrateEdgeError, match="--rpc-key needs --rpc"):
        bench([ort_art], rpc_key="rk3399", baselines=())


def test_table_quick(tmp_path):
    pytest.importorskip("onnxruntime")
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "table.py"),
            "--quick",
            "--targets",
            "onnxruntime",
            "--threads",
            "1",
            "--iters",
            "3",
            "--baselines",
            "upstream,folded",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads((tmp_path / "table.json").read_text())
    emb = d["models"]["embedded"]
    assert list(d["models"]) == ["embedded"]
    assert emb["flops"]["analytic_matches_counter"] and emb["flops"]["upstream"] > emb["flops"]["folded"] > 0
    ceil = d["gemm_ceilings"]
    assert ceil["fp32"]["gflops"] == max(ceil["fp32"]["all"].values()) > 0  # the fastest of torch and ONNX Runtime
    assert ceil["int8"]["all"]["onnxruntime MatMulInteger u8 x s8 (MLAS)"] > 0
    sb = emb["speedup_bound"]["1"]
    up = emb["bench"]["contenders"][0]["results"]["1"]["p50_ms"]
    assert sb["upstream_p50_ms"] == up
    assert sb["gemm_only_min_ms"]["fp32"] == pytest.approx(emb["flops"]["folded"] / ceil["fp32"]["gflops"] / 1e6)
    for k, ms in sb["gemm_only_min_ms"].items():
        assert sb["max_speedup"][k] == pytest.approx(up / ms)
    # int8 under the CRATE policy keeps the attention products float: between fp32 and int8 everywhere
    lo, hi = sorted([sb["gemm_only_min_ms"]["fp32"], sb["gemm_only_min_ms"]["int8_everything"]])
    assert lo <= sb["gemm_only_min_ms"]["int8_crate_policy"] <= hi
    names = [c["name"] for c in emb["bench"]["contenders"]]
    assert names == [BASELINE_LABELS["upstream"], BASELINE_LABELS["folded"], "onnxruntime"]
    rf = emb["bench"]["contenders"][-1]["results"]["1"]["roofline"]
    assert rf["precision"] == "fp32" and rf["min_ms"] > 0 and rf["fraction_of_ceiling"] > 0
    md = (tmp_path / "table.md").read_text()
    assert "| onnxruntime | fp32 | 1 |" in md and "Upper bound on the speed-up over eager upstream at batch 1" in md
    assert (tmp_path / "table.png").read_bytes()[:4] == b"\x89PNG"


def test_quiesce_waits_for_a_busy_worker():
    """_quiesce returns only once no worker burns CPU: a child spinning for 0.4 s holds it."""
    import subprocess
    import sys
    import time
    import types

    from crate_edge.bench.measure import _cpu_s, _quiesce

    assert _cpu_s(os.getpid()) > 0
    p = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<0.4: pass\ntime.sleep(30)"])
    try:
        time.sleep(0.05)
        waited = _quiesce({"spinner": types.SimpleNamespace(p=p)}, quiet_s=0.05, timeout=5)
        assert 0.3 <= waited < 3, waited
    finally:
        p.kill()
        p.wait()


# ------------------------------------------------------------------ GPU paths, as far as a CPU host can check them


def _table_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_table_target_selection_by_device():
    """CPU runs measure the CPU targets; --device cuda the GPU ones, each GPU target that cannot
    run here listed with the reason (never timed on the CPU instead)."""
    from crate_edge.targets import list_targets, load_target

    t = _table_module()
    cpu, cpu_skip = t.runnable_targets(None, "cpu")
    gpu_names = [n for n in list_targets() if load_target(n).device == "cuda"]
    assert {"aoti-cuda", "onnxruntime-cuda", "tvm-cuda", "tensorrt"} <= set(gpu_names)
    assert not set(gpu_names) & (set(cpu) | set(cpu_skip))
    gpu, gpu_skip = t.runnable_targets(None, "cuda")
    import torch

    if not torch.cuda.is_available():
        assert gpu == [] and set(gpu_skip) == set(gpu_names)
        assert "no CUDA GPU" in gpu_skip["aoti-cuda"]
        pytest.importorskip("onnxruntime")
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            assert "none of CUDAExecutionProvider" in gpu_skip["onnxruntime-cuda"]


def test_table_device_errors(tmp_path):
    import torch

    if not torch.cuda.is_available():
        p = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "table.py"), "--device", "cuda", "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --device cuda: torch"), p.stderr[-500:]
        with pytest.raises(CrateEdgeError, match="no CUDA GPU"):
            bench([tmp_path], device="cuda")
    (tmp_path / "table.json").write_text(json.dumps({"settings": {"device": "cuda"}, "models": {}}))
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "table.py"), "--quick", "--append", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "was measured on cuda, this run is cpu" in p.stderr and "Traceback" not in p.stderr


def test_rate_waits_for_queued_work():
    """The GEMM-ceiling timer reads its clock only after sync() (a GPU's queued kernels)."""
    t = _table_module()
    log = []
    g = t._rate(lambda: log.append("f"), 1e9, 0.01, sync=lambda: log.append("s"))
    assert g > 0 and log[-1] == "s" and log.count("s") >= 5


def test_device_resident_timing_path():
    """The worker's tensor-in timing path (used for GPU contenders), exercised on the CPU: one
    input copy per batch size, one time per call."""
    import torch

    from crate_edge.bench.worker import _Worker

    w = _Worker()
    seen = []
    w.device_call, w.max_batch = ("cpu", lambda x: seen.append(x) or x * 2), 8
    w.run = lambda x: [x]
    x = np.ones((2, 3), np.float32)
    w.inputs[2] = x
    r = w.time_calls({"batch": 2, "input": "unused", "n": 4})
    assert r["input_on_device"] and len(r["ms"]) == 4 and all(m >= 0 for m in r["ms"])
    assert len(seen) == 4 and all(isinstance(s, torch.Tensor) and s is seen[0] for s in seen)  # copied once, reused
    w.inputs[16] = np.ones((16, 3), np.float32)
    r = w.time_calls({"batch": 16, "input": "unused", "n": 2})
    assert "input_on_device" not in r and len(seen) == 4  # above max_batch: the host path


def test_gpu_only_onnxruntime_target_is_never_run_on_the_cpu(tmp_path):
    """onnxruntime-cuda names the CUDA provider alone. On a host without it, compiling works and
    its parity runs on the CPU provider, labelled as a stand-in with execution not verified;
    a session refuses it; bench skips it with the reason instead of timing it on the CPU."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    from crate_edge.runtimes import ort_session

    art = crate_edge.compile(None, "onnxruntime-cuda", out=tmp_path / "ortc", parity_limit=32, log=lambda s: None)
    m = art.manifest
    assert m["backend"]["device"] == "cuda" and "CUDAExecutionProvider" in m["not_verified"]["execution"]
    assert "not the CUDA provider" in m["parity"]["executor"] and m["parity"]["passed"]
    with pytest.raises(CrateEdgeError, match="none of CUDAExecutionProvider"):
        ort_session(art.path / "model.onnx", providers=["CUDAExecutionProvider"])
    with pytest.raises(CrateEdgeError, match="nothing could run here: onnxruntime-cuda: .*none of CUDAExecutionProvider"):
        bench([art.path], baselines=(), iters=2, warmup=0, progress=False)
