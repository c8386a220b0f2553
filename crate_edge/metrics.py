"""Logit-level agreement of an artifact with its eager reference, and the check of a target's
logit tolerances (max_abs, min_top1_agreement, min_cosine): used by compile's parity check
and by the parity suite."""

from __future__ import annotations

import numpy as np


def logit_parity(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """Top-1 agreement, max/mean |diff| and min/mean cosine of two logit arrays (and each one's top-1
    against `labels` when given)."""
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    cos = (ref64 * out64).sum(1) / (np.linalg.norm(ref64, axis=1) * np.linalg.norm(out64, axis=1) + 1e-30)
    d = {
        "n": int(len(ref)),
        "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
        "max_abs": float(np.abs(ref64 - out64).max()),
        "mean_abs": float(np.abs(ref64 - out64).mean()),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
    }
    if labels is not None:
        d["reference_top1"] = float((ref.argmax(1) == labels).mean())
        d["artifact_top1"] = float((out.argmax(1) == labels).mean())
    return d


def check_tolerances(p: dict[str, float], tol: dict[str, float]) -> list[str]:
    """The logit tolerances `p` (from logit_parity) misses, one line each."""
    fails = []
    if "max_abs" in tol and p["max_abs"] > tol["max_abs"]:
        fails.append(f"max |logit diff| {p['max_abs']:.3g} > {tol['max_abs']:.3g} (by {p['max_abs'] - tol['max_abs']:.3g})")
    if "min_top1_agreement" in tol and p["top1_agreement"] < tol["min_top1_agreement"]:
        fails.append(
            f"top-1 agreement {100 * p['top1_agreement']:.2f}% < {100 * tol['min_top1_agreement']:.2f}% "
            f"(short by {100 * (tol['min_top1_agreement'] - p['top1_agreement']):.2f} points)"
        )
    if "min_cosine" in tol and p["min_cosine"] < tol["min_cosine"]:
        fails.append(f"min logit cosine {p['min_cosine']:.6f} < {tol['min_cosine']:.6f}")
    return fails
