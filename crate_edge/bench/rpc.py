"""TVM RPC: a TVM artifact's model.so run by the Relax VM on a TVM RPC server's CPU (or on a
tracker's device), timed there by the VM's time_evaluator. Imports tvm only when used."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import CrateEdgeError


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
        if threads:  # capped by the server's own TVM_NUM_THREADS (crate_edge.runtimes._tvm_threads): start it with that set
            try:
                self.remote.get_function("runtime.config_threadpool")(0, int(threads))
            except Exception:  # an old or minimal remote runtime: its default pool
                pass
        self.rlib = self.remote.load_module(remote_name)
        self.dev = self.remote.cpu(0)
        self.vm = rvm.VirtualMachine(self.rlib, self.dev)
        lo, hi = manifest["input"].get("batch_range") or (0, 0)
        self.static = lo if lo == hi else None
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
