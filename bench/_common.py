"""What the in-process measurement scripts (cpu_targets.py, quant_speed.py) share: the timing
loop and writing a result as JSON plus a Markdown table. (`crate-edge bench` runs each contender
in its own process; these scripts time every contender in one.)"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def _cpu_busy(window_s: float = 0.02) -> float:
    """Fraction of this machine's CPU time that was busy over `window_s` (/proc/stat; 0 elsewhere)."""

    def read():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = read()
        time.sleep(window_s)
        t1, i1 = read()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def settle(pause_s: float = 0.05, busy_below: float = 0.15, max_s: float = 1.0) -> float:
    """Wait until no runtime's threads are still spinning from its last call: a pause, then until
    the CPU is idle (busy below `busy_below` over 20 ms windows), at most `max_s`. On 2 cores a
    runtime whose workers spin after a call (ONNX Runtime's, OpenMP's) slows whichever contender
    is timed next (measured on a Zen 4 host, CRATE-Tiny, 2 threads: onnxruntime-int8 18.7 ms right
    after another runtime's block, 12.4 ms after a pause). Returns the last busy fraction seen,
    which the result records."""
    time.sleep(pause_s)
    t_end = time.perf_counter() + max_s
    busy = _cpu_busy()
    while busy >= busy_below and time.perf_counter() < t_end:
        busy = _cpu_busy()
    return busy


def time_rounds(fns: dict, x: np.ndarray, warmup: int, rounds: int, per_round: int, busy: dict | None = None) -> dict[str, list[float]]:
    """Milliseconds per call of each fns[k](x): after `warmup` calls each, `rounds` rounds in which
    every contender makes `per_round` timed calls in turn, the order rotating per round so drift
    on a shared machine hits all alike. Before each contender's block: `settle` (the CPU idle
    again), then one untimed call. `busy` (if given) collects the CPU busy fraction seen before
    each block, per contender."""
    for f in fns.values():
        for _ in range(warmup):
            f(x)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
        for k in order:
            b = settle()
            if busy is not None:
                busy.setdefault(k, []).append(b)
            fns[k](x)
            for _ in range(per_round):
                t = time.perf_counter()
                fns[k](x)
                times[k].append((time.perf_counter() - t) * 1e3)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {np.median(v):.2f}" for k, v in times.items()), file=sys.stderr)
    return times


def write_tables(out, stem: str, result: dict, lines: list[str]) -> Path:
    """out/<stem>.json (the result) and out/<stem>.md (the lines), which are also printed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out
