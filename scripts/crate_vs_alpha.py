"""CRATE against CRATE-α trained on the same data with the same budget: top-1 on the whole test
set and the white-box curves per layer, side by side.

    python scripts/crate_vs_alpha.py --alpha runs/fmnist-alpha/model [--crate embedded] \
        [--data fashion-mnist:test] [--whitebox-images 256] [--out docs/img]

Writes OUT/crate_vs_alpha.{json,md,png}: per model its parameter count, top-1 and mean
cross-entropy (crate_edge.evaluate), its training log's last epoch when the model directory sits
beside one (train_log.json), and per layer R^c, the zero fraction of the sparse code (CRATE: the
ISTA output, CRATE-α: z2) and, for CRATE-α, the reconstruction residual (crate_edge.whitebox).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import crate_edge  # noqa: E402
from crate_edge.data import open_inputs  # noqa: E402
from crate_edge.family import title  # noqa: E402
from crate_edge.whitebox import measure  # noqa: E402


def _train_log(path: str, recipe: str | None = None) -> dict | None:
    """Epochs, seconds and validation top-1 per epoch of the model's training run, if its log is
    known: a `crate-edge train` run's beside its model directory, else recipes/RECIPE.train_log.json
    (the embedded model's is recipes/fmnist-reference.train_log.json)."""
    p = Path(path).parent / "train_log.json" if path != "embedded" else None
    if p is None or not p.exists():
        p = ROOT / "recipes" / f"{'fmnist-reference' if path == 'embedded' else recipe}.train_log.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    log = d["log"] if isinstance(d, dict) else d
    return {
        "epochs": len(log),
        "seconds": sum(e.get("seconds", 0) for e in log),
        "val_top1": log[-1].get("val_top1"),
        "curve": [[e["epoch"], e["val_top1"]] for e in log if e.get("val_top1") is not None],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crate", default="embedded", help="the CRATE model (default: the embedded reference)")
    ap.add_argument("--alpha", required=True, help="the CRATE-α model (crate-edge directory)")
    ap.add_argument("--data", default="fashion-mnist:test")
    ap.add_argument("--whitebox-images", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for key, path in (("crate", a.crate), ("alpha", a.alpha)):
        m = crate_edge.load_model(None if path == "embedded" else path)
        ev = crate_edge.evaluate(m, a.data, progress=True)
        x, _ = open_inputs("embedded", m.cfg, "test").first(a.whitebox_images).tensors()
        wb = measure(m, x)
        recipe = None if path == "embedded" else json.loads((Path(path) / "config.json").read_text()).get("metadata", {}).get("recipe")
        rows[key] = {
            "model": "embedded" if path == "embedded" else (f"recipe {recipe}" if recipe else str(path)),
            "family": title(m.cfg),
            "config": m.cfg.to_dict(),
            "parameters": sum(p.numel() for p in m.parameters()),
            "eval": ev,
            "train": _train_log(path, recipe),
            "whitebox": wb.to_dict(),
        }
        print(f"{key}: {title(m.cfg)} top-1 {100 * ev['top1']:.2f}%", file=sys.stderr)
    doc = {"data": a.data, "whitebox_data": f"first {a.whitebox_images} embedded held-out images", "models": rows}
    (out / "crate_vs_alpha.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    md = ["| model | family | parameters | top-1 | loss | epochs | training time |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        t = r["train"] or {}
        md.append(
            f"| {r['model']} | {r['family']} | {r['parameters']:,} | {100 * r['eval']['top1']:.2f}% | {r['eval']['loss']:.4f} | "
            f"{t.get('epochs', '-')} | {t.get('seconds', 0) / 3600:.1f} h |"
        )
    (out / "crate_vs_alpha.md").write_text("\n".join(md) + "\n")
    plot(rows, out / "crate_vs_alpha.png")
    print("\n".join(md))


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for (key, r), style, color in zip(rows.items(), ("-o", "-s"), ("C0", "C1")):  # one colour per model in every panel
        wb = r["whitebox"]
        layers = np.arange(1, len(wb["coding_rate_mean"]) + 1)
        label = f"{r['family']} ({r['parameters']:,} params, top-1 {100 * r['eval']['top1']:.2f}%)"
        axes[0].errorbar(layers, wb["coding_rate_mean"], yerr=wb["coding_rate_std"], fmt=style, color=color, capsize=3, label=label)
        axes[1].errorbar(
            layers, 1 - np.array(wb["zero_fraction_mean"]), yerr=wb["zero_fraction_std"], fmt=style, color=color, capsize=3, label=label
        )
        if "residual_mean" in wb:
            axes[2].errorbar(layers, wb["residual_mean"], yerr=wb["residual_std"], fmt=style, color=color, capsize=3, label=label)
        if r["train"] and r["train"]["curve"]:
            ep, top1 = zip(*r["train"]["curve"])
            axes[3].plot(ep, 100 * np.array(top1), style, color=color, ms=3, label=label)
    axes[0].set(xlabel="layer", ylabel="coding rate $R^c$ of $U^T$LN($Z^l$)", title="compression (MSSA)")
    axes[1].set(xlabel="layer", ylabel="non-zero fraction", title="sparsity of the code (CRATE: $Z^{l+1}$, CRATE-α: $z_2$)")
    axes[2].set(xlabel="layer", ylabel="$\\|x - D z_2\\| / \\|x\\|$", title="CRATE-α: reconstruction residual of $z_2$")
    axes[3].set(xlabel="epoch", ylabel="validation top-1 (%)", title="training, same recipe and budget")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
