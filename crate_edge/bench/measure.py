"""How bench measures one batch size across its workers, and the process gauges it reads.

    first call     each contender's first call at the batch size (lazy initialisation included;
                   for torch.compile, compilation) and its logits, for the accuracy check;
    warm-up        `warmup` untimed calls each (their median sizes the seconds= blocks);
    timed rounds   every round gives each contender its share of the iterations in turn, the
                   order rotating per round, so drift on a shared machine hits all contenders
                   alike; before each block the workers are let go idle (_quiesce) and the CPU the
                   idle ones still used during the block is recorded (others_cpu_per_s);
    statistics     percentiles over all timed calls, throughput = batch / p50.

A worker here is anything with `ask(**request) -> dict` (the protocol of crate_edge.bench.worker)
and `p.pid`. Also: peak and current RSS of this process (_rss_mb), CPU seconds of another (_cpu_s)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np


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


def _rss_mb() -> dict[str, float | None]:
    """This process's resident set now (rss_mb) and at its peak (vmhwm_mb; ru_maxrss_mb where
    /proc is missing)."""
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


def iterations_per_round(live: list[str], warm_ms: dict[str, float], rounds: int, iters: int | None, seconds: float | None) -> dict:
    """Timed calls per round for each contender: `iters` split over the rounds, or as many as
    fill seconds / rounds at the contender's warm-up speed."""
    if seconds is not None:
        return {n: [max(1, int(round(seconds / rounds / max(warm_ms[n], 1e-3) * 1e3)))] * rounds for n in live}
    q, rem = divmod(iters, rounds)
    return {n: [q + (1 if i < rem else 0) for i in range(rounds)] for n in live}


class _Batch:
    """One batch size measured across the workers: `results[name]` is each contender's entry
    ({"error": ...} once it failed), `live` the contenders still running."""

    def __init__(self, procs: dict, batch: int, x_path: Path, say: Callable[[str], None]):
        self.procs, self.batch, self.say = procs, batch, say
        self.req = {"batch": batch, "input": str(x_path)}
        self.live = list(procs)
        self.results: dict[str, dict] = {}
        self.logits: dict[str, np.ndarray] = {}

    def _fail(self, n: str, error: str, tell: bool = True) -> None:
        self.results[n] = {"error": error}
        self.live.remove(n)
        if tell:
            self.say(f"{n} failed at batch {self.batch}: {error}")

    def first_calls(self) -> None:
        for n in list(self.live):
            r = self.procs[n].ask(op="first", **self.req)
            if not r.get("ok"):
                self._fail(n, r["error"])
                continue
            self.results[n] = {"first_ms": r["first_ms"]}
            self.logits[n] = np.asarray(r["logits"], dtype=np.float32)
        self.say(f"batch {self.batch}: first calls " + ", ".join(f"{n} {self.results[n]['first_ms']:.1f} ms" for n in self.live))

    def warm_up(self, warmup: int) -> dict[str, float]:
        """Median ms of the warm-up calls per contender (its first call's when warmup is 0)."""
        warm: dict[str, float] = {}
        for n in list(self.live):
            if warmup:
                r = self.procs[n].ask(op="time", **self.req, n=warmup)
                if not r.get("ok"):
                    self._fail(n, r["error"], tell=False)
                    continue
                warm[n] = float(np.median(r["ms"]))
            else:
                warm[n] = self.results[n]["first_ms"]
        return warm

    def timed_rounds(self, per: dict[str, list[int]], rounds: int) -> None:
        procs, live = self.procs, self.live
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
                r = procs[n].ask(op="time", **self.req, n=per[n][i])
                t_block = time.perf_counter() - t_block
                stolen = sum((_cpu_s(procs[q].p.pid) or 0.0) - v for q, v in others.items() if v is not None)
                busy[n][0] += stolen
                busy[n][1] += t_block
                if not r.get("ok"):
                    self._fail(n, r["error"])
                    continue
                times[n].extend(r["ms"])
                if r.get("input_on_device"):
                    self.results[n]["input_on_device"] = True
            self.say(f"batch {self.batch} round {i + 1}/{rounds}: " + ", ".join(f"{n} {np.median(times[n]):.2f} ms" for n in live))
        for n in live:
            res = self.results[n]
            res.update(_stats(times[n], self.batch))
            # CPU the other (idle) workers used while this one was timed, per wall second: ~0 when
            # the blocks were clean; the cores' worth lost to them otherwise (Linux only)
            res["others_cpu_per_s"] = busy[n][0] / busy[n][1] if busy[n][1] > 0 else None


def measure_batch(
    procs: dict,
    batch: int,
    x_path: Path,
    warmup: int,
    rounds: int,
    iters: int | None,
    seconds: float | None,
    say: Callable[[str], None],
) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """First calls, warm-up and timed rounds of every worker at one batch size, on the input saved
    at x_path: (results per contender, in the workers' order; first-call logits of those that ran)."""
    m = _Batch(procs, batch, x_path, say)
    m.first_calls()
    warm = m.warm_up(warmup)
    m.timed_rounds(iterations_per_round(m.live, warm, rounds, iters, seconds), rounds)
    return {n: m.results[n] for n in procs}, m.logits
