"""Every CPU target's fp32 artifact against eager PyTorch, in one run, same input and threads.

    python bench/cpu_targets.py [--model tiny|embedded|PATH] [--threads 2] [--batch 1] [--targets ...]

Baselines: eager PyTorch running the upstream formulation (three ISTA GEMMs, explicit
attention: crate_edge's CRATE module as is) and eager folded ISTA + SDPA. Each contender is
timed in interleaved rounds (round-robin, so drift on a shared machine hits all alike); the
median over all rounds is reported, with ratios against upstream eager. Writes JSON, a Markdown
table and a PNG chart to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import crate_edge  # noqa: E402
from bench._common import time_rounds, write_tables  # noqa: E402
from crate_edge.compiler import compile_each  # noqa: E402
from crate_edge.host import host_info  # noqa: E402
from crate_edge.rewrites import apply  # noqa: E402

CPU_TARGETS = ["onnxruntime", "aoti", "executorch", "tvm"]


def model_for(name: str):
    if name == "tiny":
        torch.manual_seed(0)
        return crate_edge.create_model("tiny", num_classes=10).eval(), "CRATE-Tiny/16 at 224 (random weights)"
    if name == "embedded":
        return crate_edge.load_model(), "embedded reference model (28x28)"
    return crate_edge.load_model(name), name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--targets", nargs="*", default=CPU_TARGETS)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--artifacts", default=None, help="Keep artifacts here (default: a temporary directory)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    model, label = model_for(a.model)
    x = torch.randn(a.batch, *model.cfg.input_shape, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    folded = apply(model, ["fold_ista", "sdpa_attention"])

    def eager(m):
        def f(inp):
            with torch.no_grad():
                return m(torch.from_numpy(inp)).numpy()

        return f

    fns = {"eager upstream": eager(model), "eager folded+SDPA": eager(folded)}
    ref = fns["eager upstream"](xn)
    rows_meta: dict[str, dict] = {"eager upstream": {"max_abs_vs_upstream": 0.0}, "eager folded+SDPA": {}}
    rows_meta["eager folded+SDPA"]["max_abs_vs_upstream"] = float(np.abs(fns["eager folded+SDPA"](xn) - ref).max())
    skipped = {}
    art_root = Path(a.artifacts) if a.artifacts else Path(tempfile.mkdtemp(prefix="crate-bench-"))
    arts, skipped = compile_each(model, a.targets, art_root, prefix=f"{a.model}-", parity_limit=200)
    for t, art in arts.items():
        fns[t] = art
        rows_meta[t] = {
            "max_abs_vs_upstream": float(np.abs(art(xn) - ref).max()),
            "parity": {k: art.manifest["parity"][k] for k in ("top1_agreement", "max_abs", "passed")},
            "rewrites": art.manifest["rewrites"],
            "executor": art.executor,
        }
    print(f"timing {len(fns)} contenders: batch {a.batch}, {a.threads} threads", file=sys.stderr)
    times = time_rounds(fns, xn, a.warmup, a.rounds, a.per_round)
    base = float(np.median(times["eager upstream"]))
    rows = []
    for k, v in times.items():
        med = float(np.median(v))
        rows.append(
            {
                "contender": k,
                "median_ms": med,
                "p90_ms": float(np.percentile(v, 90)),
                "speedup_vs_upstream": base / med,
                **rows_meta.get(k, {}),
            }
        )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": label,
        "batch": a.batch,
        "threads": a.threads,
        "host": host_info(torch_info=True),
        "rows": rows,
        "skipped": skipped,
        "versions": {
            "torch": torch.__version__,
            **{k: f.manifest["backend"]["versions"] for k, f in fns.items() if hasattr(f, "manifest")},
        },
    }
    stem = f"cpu_targets_{a.model}_b{a.batch}_t{a.threads}"
    lines = [
        f"{label}, batch {a.batch}, {a.threads} threads, {result['host']['cpu']}, {result['date'][:10]}",
        "",
        "| contender | median ms | p90 ms | vs eager upstream | max abs vs upstream |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['contender']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['speedup_vs_upstream']:.2f}x | "
            f"{r.get('max_abs_vs_upstream', float('nan')):.1e} |"
        )
    for k, v in skipped.items():
        lines.append(f"| {k} | skipped: {v} | | | |")
    out = write_tables(a.out, stem, result, lines)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    ax.barh([r["contender"] for r in rows][::-1], [r["median_ms"] for r in rows][::-1], color="tab:blue")
    for i, r in enumerate(rows[::-1]):
        ax.text(r["median_ms"], i, f" {r['median_ms']:.1f} ms ({r['speedup_vs_upstream']:.1f}x)", va="center")
    ax.set_xlabel("median latency (ms), lower is better")
    ax.set_title(f"{label}\nbatch {a.batch}, {a.threads} threads")
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    print(f"wrote {out}/{stem}.json, .md, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
