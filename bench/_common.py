"""What the in-process measurement scripts (cpu_targets.py, quant_speed.py) share: the timing
loop and writing a result as JSON plus a Markdown table. (`crate-edge bench` runs each contender
in its own process; these scripts time every contender in one.)"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def time_rounds(fns: dict, x: np.ndarray, warmup: int, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Milliseconds per call of each fns[k](x): after `warmup` calls each, `rounds` rounds in which
    every contender makes `per_round` timed calls in turn, the order rotating per round so drift
    on a shared machine hits all alike; one untimed call first lets the previous one's threads settle."""
    for f in fns.values():
        for _ in range(warmup):
            f(x)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
        for k in order:
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
