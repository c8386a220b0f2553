"""The reduced-precision accuracy budgets, measured: every reduced-precision target that compiles here, on
the embedded reference model, against the eager fp32 model over the Fashion-MNIST test set.

    python bench/quant_accuracy.py [--targets T ...] [--limit N] [--out bench/results/quant]

Each target is compiled as a probe build (per-layer outputs), then `crate_edge.parity.parity`
measures all of them in one pass with each target's own [parity] tolerances (for int8 targets:
top-1 drop <= 0.3 points, ISTA support IoU >= 0.90 per layer, coding rate within 2% per layer;
fp16: top-1 agreement >= 99.5%). Writes parity.json / .md / .png (per-layer curves of the
reference against every target) and summary.md to --out. Exits 1 if any target misses its budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import crate_edge  # noqa: E402
from crate_edge.compiler import compile_each  # noqa: E402
from crate_edge.parity import parity  # noqa: E402
from crate_edge.targets import list_targets, load_target  # noqa: E402


def reduced_targets() -> list[str]:
    return [n for n in list_targets() if load_target(n).precision != "fp32" or load_target(n).quantize]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="*", default=None, help="default: every reduced-precision target")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--limit", type=int, default=None, help="images (default: the whole test split)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quant"))
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts" / "quant"))
    ap.add_argument("--reuse", action="store_true", help="load probe builds of the same model and target files from --artifacts")
    a = ap.parse_args()

    model = crate_edge.load_model()
    built, skipped = compile_each(model, a.targets or reduced_targets(), a.artifacts, reuse=a.reuse, probe=True, keep_failed=True)
    arts = list(built.values())
    if not arts:
        print("no reduced-precision target compiles here", file=sys.stderr)
        return 1
    rep = parity(arts, reference=model, data=a.data, limit=a.limit, progress=True)
    lines = [
        f"Embedded reference model, {rep.n} images of {rep.data}; reference (eager fp32) top-1 {100 * rep.reference['top1']:.2f}%.",
        "",
        "| target | executor | top-1 | drop (points) | agreement | min layer IoU | max layer R^c rel | budget |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rep.results:
        lg, ls = r.logits, r.layers or []
        iou = min((d["support_iou_mean"] for d in ls), default=float("nan"))
        cr = max((d["coding_rate_rel"] for d in ls), default=float("nan"))
        lines.append(
            f"| {r.target} | {r.executor} | {100 * lg['artifact_top1']:.2f}% | {100 * lg['top1_drop']:+.2f} | "
            f"{100 * lg['top1_agreement']:.2f}% | {iou:.3f} | {100 * cr:.2f}% | "
            f"{'pass' if r.passed else 'FAIL: ' + r.message()} |"
        )
    for k, v in skipped.items():
        lines.append(f"| {k} | skipped: {v} | | | | | | |")
    rep.write(a.out, extra_files={"summary.md": "\n".join(lines) + "\n"})
    print(rep.table())
    print("\n".join(lines))
    return 0 if rep.passed else 1


if __name__ == "__main__":
    sys.exit(main())
