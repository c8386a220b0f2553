"""Each reduced-precision CPU artifact against the same backend's fp32 artifact (the int8 speed-up
over fp32), in ONE process with interleaved rounds (no idle worker processes whose thread pools
spin while another contender runs), plus eager upstream for the speed-up ratio.

    python bench/quant_speed.py [--model tiny] [--threads 2] [--batch 1] [--artifacts DIR]

Artifacts are compiled into --artifacts (reused when present and built from the same model).
Writes bench/results/quant_speed_<model>_b<batch>_t<threads>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import crate_edge  # noqa: E402
from bench._common import time_rounds, write_tables  # noqa: E402
from crate_edge.compiler import compile_each  # noqa: E402
from crate_edge.host import host_info  # noqa: E402

PAIRS = [("executorch", "executorch-int8"), ("onnxruntime", "onnxruntime-int8"), ("tvm", "tvm-int8")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "embedded"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts" / "speed"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model == "tiny":
        torch.manual_seed(0)
        model, label = crate_edge.create_model("tiny", num_classes=10).eval(), "CRATE-Tiny/16 at 224 (random weights)"
    else:
        model, label = crate_edge.load_model(), "embedded reference model (28x28)"
    x = np.random.default_rng(0).standard_normal((a.batch, *model.cfg.input_shape)).astype(np.float32)

    def eager(inp):
        with torch.no_grad():
            return model(torch.from_numpy(inp)).numpy()

    fns = {"eager upstream": eager}
    arts, skipped = compile_each(model, [t for p in PAIRS for t in p], a.artifacts, prefix=f"{a.model}-", reuse=True, parity_limit=200)
    fns.update(arts)
    times = time_rounds(fns, x, 5, a.rounds, a.per_round)
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows = []
    for fp, q in PAIRS:
        if fp in med and q in med:
            rows.append(
                {
                    "backend": fp,
                    "fp32_ms": med[fp],
                    "reduced": q,
                    "reduced_ms": med[q],
                    "speedup_vs_fp32": med[fp] / med[q],
                    "fp32_vs_upstream": med["eager upstream"] / med[fp],
                    "reduced_vs_upstream": med["eager upstream"] / med[q],
                }
            )
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": label,
        "batch": a.batch,
        "threads": a.threads,
        "host": host_info(torch_info=True),
        "median_ms": med,
        "p90_ms": {k: float(np.percentile(v, 90)) for k, v in times.items()},
        "rows": rows,
        "skipped": skipped,
    }
    stem = f"quant_speed_{a.model}_b{a.batch}_t{a.threads}"
    lines = [
        f"{label}, batch {a.batch}, {a.threads} threads, {res['host']['cpu']}, {res['date'][:10]}; eager upstream "
        f"{med['eager upstream']:.1f} ms (median of {a.rounds * a.per_round} interleaved calls per contender, one process)",
        "",
        "| backend | fp32 ms | reduced target | reduced ms | reduced vs fp32 | fp32 vs eager upstream | reduced vs eager upstream |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['fp32_ms']:.2f} | {r['reduced']} | {r['reduced_ms']:.2f} | {r['speedup_vs_fp32']:.2f}x | "
            f"{r['fp32_vs_upstream']:.2f}x | {r['reduced_vs_upstream']:.2f}x |"
        )
    for k, v in skipped.items():
        lines.append(f"| {k} | skipped: {v} | | | | | |")
    out = write_tables(a.out, stem, res, lines)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["fp32_ms"] for r in rows], 0.4, label="fp32")
    ax.bar(xs + 0.2, [r["reduced_ms"] for r in rows], 0.4, label="int8")
    ax.axhline(med["eager upstream"], color="k", ls="--", lw=1, label="eager upstream")
    ax.set_xticks(xs, [r["backend"] for r in rows])
    ax.set(ylabel="median ms (lower is better)", title=f"{label}, batch {a.batch}, {a.threads} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)


if __name__ == "__main__":
    main()
