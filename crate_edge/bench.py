"""Benchmark compiled artifacts against eager PyTorch on the same inputs and thread count.

    report = crate_edge.bench(["artifacts/onnxruntime", "artifacts/tvm"], batch=(1, 8, 32), threads=2)
    report.write("out/bench")          # bench.json, bench.md, bench.png
    print(report.table())

Contenders: every artifact given, run by its runtime alone, plus baselines on the artifacts'
source model (manifest["source_model"]): eager PyTorch running the upstream formulation (the
CRATE module as is: three ISTA GEMMs, explicit attention), eager folded ISTA + SDPA
(rewrites shift_patch_norm, fold_ista, sdpa_attention) and torch.compile of that folded model.

How it measures:
  * each contender lives in its own worker process (started one after the other), so its
    peak RSS (VmHWM, else ru_maxrss) is its own: interpreter + its runtime + its model +
    every timed call. Workers import only what their contender needs: an onnxruntime, TVM or
    Core ML artifact is loaded and run without importing torch;
  * load time (artifact/model load, runtime import reported apart) and first-inference time
    (the first call at each batch size, which includes lazy initialisation; for torch.compile
    it includes compilation);
  * timing in interleaved rounds: after a warm-up, every round gives each contender its share
    of the iterations in turn (the order rotates per round), so drift on a shared machine hits
    all contenders alike. Before each block the run waits until every worker is idle (thread
    pools spin for a while after their last job and would steal the next contender's cores),
    and records how much CPU the idle workers still used during the block (others_cpu_per_s).
    Percentiles over all timed calls; throughput = batch / p50; ratios against eager upstream's p50;
  * every contender's logits on the same input are compared with eager upstream's (max |diff|,
    top-1 agreement), so a fast wrong contender shows;
  * TVM RPC (rpc="host:port", rpc_key= for a tracker): the TVM artifacts' model.so is uploaded
    to a TVM RPC server and run by the Relax VM on the remote CPU; times come from the VM's
    time_evaluator on the remote device (network excluded); remote memory is not measured.

This module imports neither torch nor the backends at import time (see docs/on-device.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CrateEdgeError
from .manifest import artifact_size, read_verified

BASELINES = ("upstream", "folded", "compile")
BASELINE_LABELS = {"upstream": "eager upstream", "folded": "eager folded+SDPA", "compile": "torch.compile folded+SDPA"}
FOLDED_REWRITES = ["shift_patch_norm", "fold_ista", "sdpa_attention"]
LIBRARIES = ["torch", "numpy", "onnxruntime", "onnx", "executorch", "torchao", "apache-tvm", "coremltools", "tensorrt"]


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ host (torch-free)


def host_info() -> dict[str, Any]:
    """CPU model, cores, ISA flags, GPU and library versions, without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        txt = Path("/proc/cpuinfo").read_text()
        for line in txt.splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "Model", "Hardware") and ":" in line:
                cpu = line.split(":", 1)[1].strip()
                if key == "model name":
                    break
        fl = next((l.split(":", 1)[1].split() for l in txt.splitlines() if l.split(":", 1)[0].strip() in ("flags", "Features")), [])
        flags = sorted(
            f
            for f in fl
            if f.startswith(("avx", "amx", "fma", "sse4", "neon", "asimd", "sve", "sme", "i8mm", "bf16", "fphp", "dotprod", "asimddp"))
            or f in ("f16c",)
        )
    except OSError:
        if platform.system() == "Darwin":
            try:
                cpu = (
                    subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5).stdout.strip()
                    or cpu
                )
            except (OSError, subprocess.SubprocessError):
                pass
    gpu = None
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if r.returncode == 0 and r.stdout.strip():
            gpu = r.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    if gpu is None and Path("/etc/nv_tegra_release").exists():
        gpu = "NVIDIA Jetson (" + Path("/etc/nv_tegra_release").read_text().split(",")[0].strip("# ") + ")"
    libs = {}
    for d in LIBRARIES:
        try:
            libs[d] = version(d)
        except PackageNotFoundError:
            pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "isa": flags,
        "gpu": gpu,
        "python": platform.python_version(),
        "libraries": libs,
    }


# ------------------------------------------------------------------ artifacts (torch-free)


def _set_thread_env(threads: int | None) -> None:
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS"):
            os.environ[k] = str(threads)


# ------------------------------------------------------------------ TVM RPC


def parse_hostport(s: str, what: str = "--rpc") -> tuple[str, int]:
    host, sep, port = str(s).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CrateEdgeError(f"{what} {s!r}: expected HOST:PORT")
    return host, int(port)


class RPCRunner:
    """A TVM artifact's model.so on a TVM RPC server: uploaded, loaded by remote.load_module and
    run by the Relax VM on the remote CPU. `time(x, n)` gives n per-call device times (ms) from
    the VM's time_evaluator (network excluded); `__call__` returns the remote outputs."""

    def __init__(self, art_dir: Path, manifest: dict, rpc: str, key: str | None = None, threads: int | None = None):
        import tvm
        from tvm import rpc as trpc
        from tvm.runtime import vm as rvm

        if manifest["backend"]["name"] != "tvm":
            raise CrateEdgeError(f"--rpc runs TVM artifacts; {art_dir} is a {manifest['backend']['name']} artifact")
        if manifest["backend"].get("device", "cpu") != "cpu":
            raise CrateEdgeError(f"{art_dir}: --rpc supports TVM CPU (llvm) builds; this one is for {manifest['backend'].get('device')}")
        host, port = parse_hostport(rpc)
        try:
            if key:
                self.remote = trpc.connect_tracker(host, port).request(key, priority=1, session_timeout=0)
            else:
                self.remote = trpc.connect(host, port, session_timeout=0)
        except Exception as e:  # TVM's errors are long; one line names the problem
            raise CrateEdgeError(
                f"cannot reach the TVM RPC {'tracker' if key else 'server'} at {host}:{port}"
                f"{' for key ' + key if key else ''}: {str(e).strip().splitlines()[-1][:200]}"
            ) from None
        self.where = f"{'tracker ' if key else ''}{host}:{port}{' key ' + key if key else ''}"
        lib = Path(art_dir) / "model.so"
        remote_name = f"crate_edge_{hashlib.sha256(str(lib.resolve()).encode()).hexdigest()[:12]}.so"
        self.remote.upload(str(lib), remote_name)
        if threads:
            try:
                self.remote.get_function("runtime.config_threadpool")(0, int(threads))
            except Exception:  # an old or minimal remote runtime: its default pool
                pass
        self.rlib = self.remote.load_module(remote_name)
        self.dev = self.remote.cpu(0)
        self.vm = rvm.VirtualMachine(self.rlib, self.dev)
        self.static = manifest["backend"].get("static_batch")
        self._set = None
        self._tvm = tvm

    def close(self) -> None:
        """End the RPC session (a plain TVM RPC server serves one session at a time)."""
        self.vm = self.rlib = self.dev = self.remote = None

    def _input(self, x: np.ndarray):
        if self.static is not None and len(x) != self.static:
            raise CrateEdgeError(f"this TVM artifact was built for batch {self.static}; over RPC it runs only that batch")
        if self._set is not x:
            self.vm.set_input("main", self._tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), self.dev))
            self._set = x

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self._input(x)
        self.vm.invoke_stateful("main")
        out = self.vm.get_outputs("main")
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return [o.numpy() for o in outs]

    def time(self, x: np.ndarray, n: int) -> list[float]:
        self._input(x)
        ev = self.vm.time_evaluator("invoke_stateful", self.dev, number=1, repeat=int(n))
        return [1e3 * float(s) for s in ev("main").results]


# ------------------------------------------------------------------ worker process


def _rss_mb() -> dict[str, float | None]:
    out: dict[str, float | None] = {"rss_mb": None, "vmhwm_mb": None, "ru_maxrss_mb": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["vmhwm_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["ru_maxrss_mb"] = r / (1 << 20) if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        pass
    return out


class _Worker:
    """Runs inside a worker process: one contender, commands as JSON lines on stdin."""

    def __init__(self):
        self.run = None
        self.timer = None
        self.inputs: dict[int, np.ndarray] = {}
        self.torch_cuda = False
        self.device_call = None  # (device, fn on a device tensor): GPU contenders are timed on GPU-resident inputs
        self.dev_inputs: dict[int, Any] = {}
        self.max_batch = 0

    def init(self, spec: dict) -> dict:
        threads = spec.get("threads")
        _set_thread_env(threads)
        rss0 = _rss_mb()["rss_mb"]
        kind = spec["kind"]
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        if kind == "artifact":
            from .runtime import runner_for

            m = read_verified(spec["path"])
            t1 = time.perf_counter()
            r = runner_for(Path(spec["path"]), m, threads)
            run = r.outputs
            info["executor"] = f"{r.executor} ({r.detail})" if r.detail else r.executor
            if r.device_call:
                self.device_call, self.max_batch = r.device_call, r.batch_range[1]
        elif kind == "rpc":
            m = read_verified(spec["path"])
            import tvm  # noqa: F401  (import time reported apart from load time)

            t1 = time.perf_counter()
            r = RPCRunner(Path(spec["path"]), m, spec["rpc"], spec.get("rpc_key"), threads)
            run, self.timer = r, r.time
            info["executor"] = f"TVM Relax VM over RPC ({r.where}), remote CPU"
        else:
            import torch

            if threads:
                torch.set_num_threads(int(threads))
            from .checkpoint import load_model
            from .rewrites import apply

            t1 = time.perf_counter()
            model = load_model(spec["model"]).eval()
            if kind != "upstream":
                model = apply(model, FOLDED_REWRITES)
            dev = "cuda" if spec.get("device") == "cuda" else "cpu"
            model = model.to(dev)
            self.torch_cuda = dev == "cuda"
            fn = torch.compile(model, dynamic=False) if kind == "compile" else model  # one static graph per batch size

            def run(x):
                with torch.inference_mode():
                    y = fn(torch.from_numpy(x).to(dev))
                    if dev == "cuda":
                        torch.cuda.synchronize()
                return [y.float().cpu().numpy()]

            def call(xd):
                with torch.inference_mode():
                    return fn(xd)

            if dev == "cuda":
                self.device_call, self.max_batch = (dev, call), 1 << 30

            info["executor"] = f"torch {torch.__version__} ({dev}, {torch.get_num_threads()} threads)"
        self.run = run
        t2 = time.perf_counter()
        if "torch" in sys.modules:
            self.torch_cuda = self.torch_cuda or bool(
                getattr(sys.modules["torch"], "cuda", None)
                and sys.modules["torch"].cuda.is_available()
                and sys.modules["torch"].cuda.is_initialized()
            )
        return {
            "ok": True,
            "import_s": t1 - t0,
            "load_s": t2 - t1,
            "rss_before_load_mb": rss0,
            "rss_after_load_mb": _rss_mb()["rss_mb"],
            "torch_imported": "torch" in sys.modules,
            **info,
        }

    def _x(self, spec) -> np.ndarray:
        b = int(spec["batch"])
        if b not in self.inputs:
            self.inputs[b] = np.ascontiguousarray(np.load(spec["input"]), dtype=np.float32)
        return self.inputs[b]

    def first(self, spec) -> dict:
        x = self._x(spec)
        t = time.perf_counter()
        out = self.run(x)
        ms = (time.perf_counter() - t) * 1e3
        return {"ok": True, "first_ms": ms, "logits": np.asarray(out[0], dtype=np.float32).tolist()}

    def time_calls(self, spec) -> dict:
        x = self._x(spec)
        n = int(spec["n"])
        if self.timer is not None:
            return {"ok": True, "ms": self.timer(x, n)}
        fn, arg, sync = self.run, x, None
        on_device = self.device_call is not None and len(x) <= self.max_batch
        if on_device:
            fn, arg, sync = self._on_device(x)
        ms = []
        for _ in range(n):
            t = time.perf_counter()
            fn(arg)
            if sync:
                sync()
            ms.append((time.perf_counter() - t) * 1e3)
        return {"ok": True, "ms": ms, **({"input_on_device": True} if on_device else {})}

    def _on_device(self, x: np.ndarray):
        """(fn, input, sync) for timing a GPU contender with its input already on the GPU and a
        synchronize after each call: launch overhead and kernels, no host<->device copies (the
        first-call time includes them). Same inputs as every other contender."""
        import torch

        dev, fn = self.device_call
        sync = torch.cuda.synchronize if str(dev).startswith("cuda") else None
        b = len(x)
        if b not in self.dev_inputs:
            self.dev_inputs[b] = torch.from_numpy(x).to(dev)
        if sync:
            sync()
        return fn, self.dev_inputs[b], sync

    def done(self, spec) -> dict:
        mem = _rss_mb()
        gpu = None
        if self.torch_cuda:
            import torch

            gpu = torch.cuda.max_memory_allocated() / (1 << 20)
        return {"ok": True, **mem, "gpu_peak_mb": gpu}


def _worker_main() -> None:
    w = _Worker()
    ops = {"init": w.init, "first": w.first, "time": w.time_calls, "done": w.done}
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    for line in sys.stdin:
        req = json.loads(line)
        try:
            res = ops[req["op"]](req)
        except CrateEdgeError as e:
            res = {"ok": False, "error": str(e)}
        except Exception as e:  # reported as this contender's failure, one line
            msg = str(e).strip().splitlines()
            res = {"ok": False, "error": f"{type(e).__name__}: {(msg[0] if msg else '')[:300]}"}
        out.write(json.dumps(res) + "\n")
        out.flush()
        if req["op"] == "done" or (req["op"] == "init" and not res["ok"]):
            break


# Starts a worker without running crate_edge/__init__ (which imports torch): a bare package
# module whose __path__ is this directory, so `crate_edge.bench` and what it imports resolve.
_BOOT = (
    "import importlib.machinery as m, importlib.util as u, sys;"
    "s = m.ModuleSpec('crate_edge', None, is_package=True); s.submodule_search_locations = [sys.argv[1]];"
    "p = u.module_from_spec(s); sys.modules['crate_edge'] = p;"
    "import crate_edge.bench as b; b._worker_main()"
)


class _Proc:
    def __init__(self, name: str, env: dict, log: Path):
        self.name = name
        self.log = log
        self.errf = open(log, "w")
        self.p = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(Path(__file__).resolve().parent)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errf,
            text=True,
            env=env,
        )

    def ask(self, timeout: float | None = None, **req) -> dict:
        try:
            self.p.stdin.write(json.dumps(req) + "\n")
            self.p.stdin.flush()
            if timeout is not None:
                import selectors

                with selectors.DefaultSelector() as sel:
                    sel.register(self.p.stdout, selectors.EVENT_READ)
                    if not sel.select(timeout):
                        self.p.kill()
                        self.p.wait()
                        return {"ok": False, "error": f"no reply within {timeout:.0f} s ({req['op']}); worker stopped"}
            line = self.p.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.p.wait(timeout=30)
            tail = [l for l in self.log.read_text(errors="replace").splitlines() if l.strip()][-1:] or ["no output"]
            return {"ok": False, "error": f"worker exited with status {self.p.returncode} ({tail[0][:300]})"}
        return json.loads(line)

    def close(self):
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
            except OSError:
                pass
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.errf.close()


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, all threads (Linux /proc; None elsewhere)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _quiesce(procs: dict, quiet_s: float = 0.1, timeout: float = 3.0) -> float:
    """Wait until no worker process uses CPU for `quiet_s` (at most `timeout` s); returns the wait.
    Thread pools (ONNX Runtime, XNNPACK's pthreadpool, OpenMP, TVM) spin for a while after their
    last job; on a small machine a contender timed while another one's pool still spins loses
    cores to it (measured here: ExecuTorch fp32 at 40-58 ms instead of 24-30 ms)."""
    t0 = time.perf_counter()
    pids = [p.p.pid for p in procs.values()]
    prev = [_cpu_s(q) for q in pids]
    if any(v is None for v in prev):
        return 0.0
    while time.perf_counter() - t0 < timeout:
        time.sleep(quiet_s)
        cur = [_cpu_s(q) for q in pids]
        if cur == prev:
            break
        prev = cur
    return time.perf_counter() - t0


# ------------------------------------------------------------------ the benchmark


@dataclass
class BenchReport:
    """Results of `bench`: `to_dict()`, `table()`, `plot(path)`, `write(out_dir)`."""

    data: dict[str, Any]

    @property
    def contenders(self) -> list[dict]:
        return self.data["contenders"]

    def result(self, name: str, batch: int) -> dict:
        c = next(c for c in self.contenders if c["name"] == name)
        return c["results"][str(batch)]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def table(self) -> str:
        d = self.data
        s = d["settings"]
        timing = f"{s['seconds']} s per contender" if s.get("seconds") else f"{s['iters']} iterations"
        gpu = any(c.get("gpu_peak_mb") for c in self.contenders)
        where = d["host"]["cpu"] + (f", GPU {d['host']['gpu']}" if gpu and d["host"].get("gpu") else "")
        lines = [
            f"{d['source_model'].get('label', 'source model')}: {s['threads']} threads, {timing} in {s['rounds']} interleaved "
            f"rounds after {s['warmup']} warm-up, {where}",
            "",
            "| contender | batch | p50 ms | p90 ms | p99 ms | images/s | vs eager upstream | max abs vs upstream "
            "| load s | first call ms | peak RSS MB | " + ("GPU peak MB | " if gpu else "") + "size MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
        ]
        f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
        pad = " |" * (10 + gpu)
        for c in self.contenders:
            for b, r in c["results"].items():
                if "error" in r:
                    lines.append(f"| {c['name']} | {b} | failed: {r['error']}{pad}")
                    continue
                lines.append(
                    f"| {c['name']} | {b} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['throughput_ips']:.1f} "
                    f"| {f(r.get('speedup_vs_upstream'), '.2f')}x | {f(r.get('max_abs_vs_upstream'), '.1e')} "
                    f"| {f(c.get('load_s'), '.2f')} | {f(r.get('first_ms'), '.1f')} | {f(c.get('peak_rss_mb'), '.0f')} "
                    + (f"| {f(c.get('gpu_peak_mb'), '.0f')} " if gpu else "")
                    + f"| {f(c['size_bytes'] / 1e6 if c.get('size_bytes') else None, '.2f')} |"
                )
        for k, v in d["skipped"].items():
            lines.append(f"| {k} | | skipped: {v}{pad}")
        lines += ["", f"Peak RSS: {d['memory_note']}"]
        if any(r.get("input_on_device") for c in self.contenders for r in c["results"].values()):
            lines.append(f"GPU timing: {s['gpu_timing']}")
        return "\n".join(lines)

    def plot_axes(self, axes, title: str = "") -> None:
        """One horizontal bar chart per batch size (p50, bars p10-p90) on the given axes."""
        batches = self.data["settings"]["batch"]
        ok = [c for c in self.contenders if any("p50_ms" in r for r in c["results"].values())]
        for ax, b in zip(axes, batches):
            rows = [(c["name"], c["results"].get(str(b), {})) for c in ok]
            rows = [(n, r) for n, r in rows if "p50_ms" in r][::-1]
            y = np.arange(len(rows))
            p50 = [r["p50_ms"] for _, r in rows]
            err = [[r["p50_ms"] - r.get("p10_ms", r["p50_ms"]) for _, r in rows], [r["p90_ms"] - r["p50_ms"] for _, r in rows]]
            ax.barh(y, p50, xerr=err, color=["tab:gray" if n in BASELINE_LABELS.values() else "tab:blue" for n, _ in rows], capsize=2)
            ax.set_yticks(y, [n for n, _ in rows])
            for i, (_, r) in enumerate(rows):
                sp = r.get("speedup_vs_upstream")
                ax.text(r["p50_ms"], i, f"  {r['p50_ms']:.2f} ms" + (f" ({sp:.2f}x)" if sp else ""), va="center", fontsize=8)
            ax.set_xlabel("latency p50 (ms), bars p10-p90; lower is better")
            ax.set_title(f"{title}batch {b}", fontsize=9)
            ax.set_xlim(0, max(p50 or [1]) * 1.45)

    def plot(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        batches = self.data["settings"]["batch"]
        n = len(self.contenders)
        fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 0.45 * max(n, 1) + 1.8), squeeze=False)
        self.plot_axes(axes[0])
        s = self.data["settings"]
        fig.suptitle(f"{self.data['source_model'].get('label', '')}, {s['threads']} threads, {self.data['host']['cpu']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def write(self, out_dir, stem: str = "bench") -> list[Path]:
        from .outputs import atomic_dir

        names = [f"{stem}.json", f"{stem}.md", f"{stem}.png"]
        with atomic_dir(out_dir, "report") as tmp:
            (tmp / names[0]).write_text(json.dumps(self.data, indent=1))
            (tmp / names[1]).write_text(self.table() + "\n")
            self.plot(tmp / names[2])
        return [Path(out_dir) / n for n in names]


def parse_batches(spec) -> tuple[int, ...]:
    """ "1,8,32" (or an int, or a sequence) -> (1, 8, 32)."""
    if isinstance(spec, int):
        items = [spec]
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    try:
        out = tuple(int(b) for b in items)
    except (TypeError, ValueError):
        raise CrateEdgeError(f"batch {spec!r}: expected positive integers such as 1,8,32") from None
    if not out or any(b < 1 for b in out):
        raise CrateEdgeError(f"batch {spec!r}: expected positive integers such as 1,8,32")
    return tuple(dict.fromkeys(out))


def _stats(ms: list[float], batch: int) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    p10, p50, p90, p99 = (float(np.percentile(a, q)) for q in (10, 50, 90, 99))
    return {
        "n": int(a.size),
        "p10_ms": p10,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
        "std_ms": float(a.std()),
        "throughput_ips": batch / (p50 / 1e3),
    }


def _resolve_model(model, sha: str, tmp: Path) -> tuple[str, str]:
    """(path a worker can load, label) for the artifacts' source model; the embedded model by
    default, which must then be the source."""
    from .checkpoint import load_model, model_hash, save_model
    from .zoo import embedded_model_dir

    if model is None or model == "embedded":
        path, label = str(embedded_model_dir()), "embedded reference model"
        m = load_model(path)
    elif isinstance(model, (str, os.PathLike)):
        path, label = str(model), str(model)
        m = load_model(path)
        if not (Path(path).is_dir() or Path(path).suffix == ".safetensors"):  # an upstream checkpoint: convert once
            path = str(save_model(m, tmp / "model"))
    else:
        m, label = model, "model passed to bench()"
        path = str(save_model(m, tmp / "model"))
    got = model_hash(m)
    if got != sha:
        if model is None or model == "embedded":
            raise CrateEdgeError(
                f"the artifacts were not compiled from the embedded model (source sha256 {sha[:12]}...): pass "
                "--model with their source model for the baselines, or --baselines none"
            )
        raise CrateEdgeError(f"model {label} (sha256 {got[:12]}...) is not the artifacts' source (sha256 {sha[:12]}...)")
    return path, label


def bench(
    artifacts,
    batch=(1,),
    threads: int | None = None,
    warmup: int = 3,
    iters: int | None = None,
    seconds: float | None = None,
    rounds: int = 5,
    model=None,
    baselines=BASELINES,
    rpc: str | None = None,
    rpc_key: str | None = None,
    label: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    rpc_timeout: float = 120.0,
) -> BenchReport:
    """Time `artifacts` (directories) and the baselines on the same inputs and thread count.

    batch: batch sizes (int, "1,8,32" or a sequence). threads: for every contender (default:
    the usable cores). Timing: `warmup` calls, then `iters` calls per contender (default 30) or
    about `seconds` of calls per contender, split over `rounds` interleaved rounds. model: the
    artifacts' source model (path or CRATE module; default: the embedded model, checked against
    manifest["source_model"]). baselines: any of "upstream", "folded", "compile" (() for none).
    rpc/rpc_key: run the TVM artifacts on a TVM RPC server (or a tracker's device with that key)
    instead of here (rpc_timeout: seconds to wait for the remote session and model load).
    device: where the torch baselines run ("cpu" or "cuda")."""
    say = _say if progress else (lambda s: None)
    if isinstance(artifacts, (str, os.PathLike)):
        artifacts = [artifacts]
    artifacts = [Path(a) for a in artifacts]
    if not artifacts:
        raise CrateEdgeError("no artifact to benchmark")
    batches = parse_batches(batch)
    if iters is not None and seconds is not None:
        raise CrateEdgeError("give iterations or seconds, not both")
    if seconds is not None and not seconds > 0:
        raise CrateEdgeError(f"seconds must be > 0, got {seconds}")
    iters = 30 if iters is None and seconds is None else iters
    if iters is not None and iters < 1:
        raise CrateEdgeError(f"iters must be >= 1, got {iters}")
    if warmup < 0 or rounds < 1:
        raise CrateEdgeError("warmup must be >= 0 and rounds >= 1")
    rounds = min(rounds, iters) if iters else rounds
    baselines = tuple(baselines or ())
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise CrateEdgeError(f"unknown baseline(s) {', '.join(bad)}; known: {', '.join(BASELINES)}")
    if device not in ("cpu", "cuda"):
        raise CrateEdgeError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and baselines:
        import torch

        if not torch.cuda.is_available():
            raise CrateEdgeError("device cuda: torch sees no CUDA GPU here (torch " + torch.__version__ + ")")
    if rpc_key and not rpc:
        raise CrateEdgeError("--rpc-key needs --rpc TRACKER_HOST:PORT")
    if rpc:
        parse_hostport(rpc)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    threads = int(threads) if threads else usable
    if threads < 1:
        raise CrateEdgeError(f"threads must be >= 1, got {threads}")

    manifests = [read_verified(a) for a in artifacts]
    shas = {m["source_model"]["sha256"] for m in manifests}
    shapes = {tuple(m["input"]["shape"][1:]) for m in manifests}
    if len(shas) > 1 or len(shapes) > 1:
        raise CrateEdgeError("the artifacts come from different source models; benchmark them separately")
    sha, shape = shas.pop(), shapes.pop()
    cfg = manifests[0]["source_model"]["config"]

    tmp = Path(tempfile.mkdtemp(prefix="crate-bench-"))
    src_label = label or f"CRATE dim={cfg['dim']} depth={cfg['depth']} at {shape[1]}x{shape[2]}"
    specs: list[tuple[str, dict, dict]] = []  # (name, worker init spec, static info)
    if baselines:
        mpath, mlabel = _resolve_model(model, sha, tmp)
        src_label = label or f"{mlabel} ({src_label})"
        for b in ("upstream", *[x for x in baselines if x != "upstream"]):
            specs.append(
                (
                    BASELINE_LABELS[b],
                    {"kind": b, "model": mpath, "device": device},
                    {"kind": "baseline", "baseline": b, "rewrites": [] if b == "upstream" else FOLDED_REWRITES},
                )
            )
    names = []
    for a, m in zip(artifacts, manifests):
        base = m["target"]["name"]
        name = base if base not in names else f"{base} ({a})"
        names.append(name)
        remote = bool(rpc) and m["backend"]["name"] == "tvm"
        info = {
            "kind": "artifact",
            "artifact": str(a),
            "target": base,
            "backend": m["backend"]["name"],
            "precision": m.get("precision", {}),
            "target_precision": m["target"]["definition"].get("precision", "fp32"),
            "rewrites": m.get("rewrites", []),
            "size_bytes": artifact_size(a, m),
            "quantization": (m.get("quantization") or {}).get("scheme") if isinstance(m.get("quantization"), dict) else None,
        }
        spec = {"kind": "rpc" if remote else "artifact", "path": str(a.resolve()), "rpc": rpc, "rpc_key": rpc_key}
        specs.append((name + (" [rpc]" if remote else ""), spec, info))

    rng = np.random.default_rng(0)
    inputs = {}
    for b in batches:
        inputs[b] = tmp / f"x_b{b}.npy"
        np.save(inputs[b], rng.standard_normal((b, *shape)).astype(np.float32))

    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS"):
        env[k] = str(threads)
    contenders: list[dict] = []
    skipped: dict[str, str] = {}
    procs: dict[str, _Proc] = {}
    try:
        for name, spec, info in specs:
            say(f"loading {name}")
            p = _Proc(name, env, tmp / f"worker{len(procs) + len(skipped)}.log")
            # an RPC server busy with another session, or an unreachable one, must not hang the run
            r = p.ask(op="init", threads=threads, timeout=rpc_timeout if spec.get("kind") == "rpc" else None, **spec)
            if not r.get("ok"):
                p.close()
                skipped[name] = r["error"]
                say(f"skip {name}: {r['error']}")
                continue
            procs[name] = p
            c = {
                "name": name,
                **info,
                "executor": r.get("executor"),
                "import_s": r["import_s"],
                "load_s": r["load_s"],
                "rss_before_load_mb": r.get("rss_before_load_mb"),
                "rss_after_load_mb": r.get("rss_after_load_mb"),
                "torch_imported": r.get("torch_imported"),
                "remote": spec.get("kind") == "rpc",
                "results": {},
            }
            contenders.append(c)
        if not contenders:
            raise CrateEdgeError("nothing could run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        by_name = {c["name"]: c for c in contenders}
        up = BASELINE_LABELS["upstream"] if BASELINE_LABELS["upstream"] in procs else None
        for b in batches:
            live = [n for n in procs if "error" not in by_name[n]["results"].get(str(b), {})]
            logits = {}
            for n in list(live):
                r = procs[n].ask(op="first", batch=b, input=str(inputs[b]))
                if not r.get("ok"):
                    by_name[n]["results"][str(b)] = {"error": r["error"]}
                    live.remove(n)
                    say(f"{n} failed at batch {b}: {r['error']}")
                    continue
                by_name[n]["results"][str(b)] = {"first_ms": r["first_ms"]}
                logits[n] = np.asarray(r["logits"], dtype=np.float32)
            say(f"batch {b}: first calls " + ", ".join(f"{n} {by_name[n]['results'][str(b)]['first_ms']:.1f} ms" for n in live))
            warm: dict[str, float] = {}
            for n in list(live):
                if warmup:
                    r = procs[n].ask(op="time", batch=b, input=str(inputs[b]), n=warmup)
                    if not r.get("ok"):
                        by_name[n]["results"][str(b)] = {"error": r["error"]}
                        live.remove(n)
                        continue
                    warm[n] = float(np.median(r["ms"]))
                else:
                    warm[n] = by_name[n]["results"][str(b)]["first_ms"]
            if seconds is not None:
                per = {n: [max(1, int(round(seconds / rounds / max(warm[n], 1e-3) * 1e3)))] * rounds for n in live}
            else:
                q, rem = divmod(iters, rounds)
                per = {n: [q + (1 if i < rem else 0) for i in range(rounds)] for n in live}
            times: dict[str, list[float]] = {n: [] for n in live}
            busy = {n: [0.0, 0.0] for n in live}  # CPU s other workers used while n was timed, wall s of n's blocks
            for i in range(rounds):
                order = live[i % len(live) :] + live[: i % len(live)] if live else []
                for n in order:
                    if n not in live or per[n][i] == 0:
                        continue
                    _quiesce(procs)
                    others = {q: _cpu_s(p.p.pid) for q, p in procs.items() if q != n}
                    t_block = time.perf_counter()
                    r = procs[n].ask(op="time", batch=b, input=str(inputs[b]), n=per[n][i])
                    t_block = time.perf_counter() - t_block
                    stolen = sum((_cpu_s(procs[q].p.pid) or 0.0) - v for q, v in others.items() if v is not None)
                    busy[n][0] += stolen
                    busy[n][1] += t_block
                    if not r.get("ok"):
                        by_name[n]["results"][str(b)] = {"error": r["error"]}
                        live.remove(n)
                        say(f"{n} failed at batch {b}: {r['error']}")
                        continue
                    times[n].extend(r["ms"])
                    if r.get("input_on_device"):
                        by_name[n]["results"][str(b)]["input_on_device"] = True
                say(f"batch {b} round {i + 1}/{rounds}: " + ", ".join(f"{n} {np.median(times[n]):.2f} ms" for n in live))
            ref = logits.get(up) if up in live else None
            base = None
            for n in live:
                res = by_name[n]["results"][str(b)]
                res.update(_stats(times[n], b))
                # CPU the other (idle) workers used while this one was timed, per wall second: ~0 when
                # the blocks were clean; the cores' worth lost to them otherwise (Linux only)
                res["others_cpu_per_s"] = busy[n][0] / busy[n][1] if busy[n][1] > 0 else None
                if ref is not None and n in logits and logits[n].shape == ref.shape:
                    res["max_abs_vs_upstream"] = float(np.abs(logits[n] - ref).max())
                    res["top1_agreement_vs_upstream"] = float(np.mean(logits[n].argmax(-1) == ref.argmax(-1)))
            if up in live:
                base = by_name[up]["results"][str(b)]["p50_ms"]
                for n in live:
                    res = by_name[n]["results"][str(b)]
                    res["speedup_vs_upstream"] = base / res["p50_ms"]
        for n, p in procs.items():
            r = p.ask(op="done")
            c = by_name[n]
            if r.get("ok"):
                if c["remote"]:
                    c.update(peak_rss_mb=None, local_client_peak_rss_mb=r.get("vmhwm_mb") or r.get("ru_maxrss_mb"), gpu_peak_mb=None)
                else:
                    c.update(peak_rss_mb=r.get("vmhwm_mb") or r.get("ru_maxrss_mb"), gpu_peak_mb=r.get("gpu_peak_mb"))
    finally:
        for p in procs.values():
            p.close()
        for f in tmp.glob("*"):
            if f.is_file():
                f.unlink()
        if (tmp / "model").is_dir():
            import shutil

            shutil.rmtree(tmp / "model", ignore_errors=True)
        try:
            tmp.rmdir()
        except OSError:
            pass
    data = {
        "crate_edge": _version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": host_info(),
        "settings": {
            "batch": list(batches),
            "threads": threads,
            "warmup": warmup,
            "iters": iters,
            "seconds": seconds,
            "rounds": rounds,
            "input": f"standard normal float32 (seed 0), shape (batch, {', '.join(map(str, shape))})",
            "rpc": rpc,
            "rpc_key": rpc_key,
            "baseline_device": device,
            "gpu_timing": "GPU contenders (torch on cuda, AOTInductor CUDA, TensorRT): input resident on the GPU, "
            "wall time of one call plus a synchronize (launches and kernels, no host<->device "
            "copies; first_ms includes them)",
        },
        "source_model": {"sha256": sha, "config": cfg, "label": src_label},
        "contenders": contenders,
        "skipped": skipped,
        "memory_note": (
            "peak resident set size (VmHWM) of the contender's own worker process: Python, the libraries it "
            "imports, its model and every timed call; torch-free runtimes do not import torch. "
            "Remote (RPC) contenders: not measured."
        ),
    }
    return BenchReport(data)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("crate-edge")
    except Exception:
        return "unknown"


class _CallableModule(types.ModuleType):
    """`crate_edge.bench(...)` calls bench() whether crate_edge.bench is this module or the function."""

    def __call__(self, *args, **kw):
        return bench(*args, **kw)


sys.modules[__name__].__class__ = _CallableModule
