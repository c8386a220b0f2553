"""The worker processes: each contender runs in its own, so its peak RSS is its own (interpreter,
its runtime, its model and every timed call) and it imports only what it needs (an ONNX Runtime,
TVM or Core ML artifact loads and runs without torch).

Protocol: one JSON request per line on the worker's stdin, one JSON reply line on its stdout
({"ok": true, ...} or {"ok": false, "error": one line}):
    init   {kind: artifact | rpc | upstream | folded | compile, path | model, threads, ...}
           -> executor, import_s, load_s, rss_before_load_mb, rss_after_load_mb, torch_imported
    first  {batch, input: .npy path} -> first_ms, logits
    time   {batch, input, n} -> ms (n per-call times), input_on_device
    done   {} -> rss_mb, vmhwm_mb, ru_maxrss_mb, gpu_peak_mb; the worker exits
_Worker is the worker side, _Proc the parent's handle on one worker process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CrateEdgeError
from ..manifest import read_verified
from .contenders import FOLDED_REWRITES
from .measure import _rss_mb
from .rpc import RPCRunner

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS")


def _set_thread_env(threads: int | None) -> None:
    if threads:
        for k in _THREAD_VARS:
            os.environ[k] = str(threads)


def worker_env(threads: int) -> dict[str, str]:
    """This process's environment with every runtime's thread-count variable set to `threads`."""
    env = dict(os.environ)
    for k in _THREAD_VARS:
        env[k] = str(threads)
    return env


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
            from ..runtime import runner_for

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
            from ..checkpoint import load_model
            from ..rewrites import apply

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


# Starts a worker without running crate_edge/__init__ (the facade; a worker needs only its
# contender's modules): a bare package module whose __path__ is the crate_edge directory, so
# `crate_edge.bench.worker` and what it imports resolve.
_BOOT = (
    "import importlib.machinery as m, importlib.util as u, sys;"
    "s = m.ModuleSpec('crate_edge', None, is_package=True); s.submodule_search_locations = [sys.argv[1]];"
    "p = u.module_from_spec(s); sys.modules['crate_edge'] = p;"
    "from crate_edge.bench.worker import _worker_main; _worker_main()"
)


class _Proc:
    """A worker process for one contender; `ask(op=..., ...)` sends a request and returns the
    reply (an error reply if the worker died or, with a timeout, did not answer in time)."""

    def __init__(self, name: str, env: dict, log: Path):
        self.name = name
        self.log = log
        self.errf = open(log, "w")
        self.p = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(Path(__file__).resolve().parents[1])],
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
