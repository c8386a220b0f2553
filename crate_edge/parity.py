"""The accuracy-parity suite: compiled artifacts against the eager fp32 reference, on a whole
labelled test set, at the logits and (for probe builds) at every layer.

    report = crate_edge.parity.parity(["artifacts/onnxruntime"], data="fashion-mnist")
    report.write("out/parity")          # parity.json, parity.md, parity.png
    report.passed, report.message()     # names the worst layer and metric

The reference runs the upstream formulation in fp32 (the CRATE module as is), and
`model.forward_intermediates(x)` gives its per-layer tensors. A probe artifact outputs
(logits, w_0..w_{L-1}, z_1..z_L) (crate_edge.rewrites.Probe). Layer l is
`model.transformer.layers[l]` (0-based, as the probe outputs mssa_features_l / ista_out_l):
  w_l   MSSA features U^T LN1(Z^l) of its input, (b, heads, N, p)
  z_l   its ISTA output Z^{l+1}, (b, N, d): the block boundary
So a perturbation inside block l shows first in z_l (and in w_{l+1}).
For a CRATE-α (crate_edge.crate_alpha) z_l is the layer's sparse code z2 (b, N, 4d), whose
support IoU and zero fraction are measured the same way, and the probe also outputs, per layer
and image, the reconstruction residual ||x - D z2|| / ||x||: reported per layer as residual_ref
and residual (the artifact's), in the tables and the PNG.

Metrics, streamed batch by batch (per-layer tensors are never held beyond one batch):
  logits     reference and artifact top-1 against the labels, top-1 drop (reference minus
             artifact, a fraction), top-1 agreement, min/mean cosine, max/mean |diff|
  per layer  SQNR (dB, 10 log10 sum ref^2 / sum (art - ref)^2 over all images) and per-image
             cosine (mean, min) of z_l and w_l; max |diff| of z_l; ISTA zero fraction of z_l,
             reference and artifact (whitebox.zero_fraction); ISTA support IoU of z_l
             (whitebox.support_iou: mean, min and 5th percentile over images); coding rate R^c
             of w_l (whitebox.coding_rate's value, float64, mean over images, computed on the p x p
             side by Cholesky: see `coding_rate`), reference and artifact,
             and its relative difference |R_art - R_ref| / |R_ref|.
The coding rate costs one N x N logdet per head, layer and image: it is computed on every
image when N <= 64 tokens (the 28x28 models: N = 50) and on the first 256 images otherwise
(`coding_rate_images` overrides; the report records how many were used).

Tolerances come from the artifact's target file ([parity] table, i.e.
manifest["target"]["definition"]["parity"]), overridden by the caller's `tolerances`:
  max_abs               max |logit diff|
  min_top1_agreement    top-1 agreement with the reference (fraction)
  min_cosine            min per-image logit cosine
  max_top1_drop         reference top-1 minus artifact top-1 (fraction: 0.003 = 0.3 points)
  min_support_iou       per layer, on the mean ISTA support IoU
  max_coding_rate_rel   per layer, relative coding-rate difference (0.02 = 2%)
  min_sqnr_db           per layer, SQNR of z_l and of w_l
The per-layer ones need a probe build; on another artifact they are listed as unchecked.
Top-1 (and so max_top1_drop) needs labels: on unlabelled data (an .npz `x` without `y`) the
report gives the other metrics, says that top-1 was not computed, and lists max_top1_drop as
unchecked.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .checkpoint import load_model, model_hash
from .data import open_inputs
from .errors import CrateEdgeError
from .family import is_model
from .metrics import logit_parity
from .outputs import atomic_dir
from .rewrites import split_probe_outputs
from .runtime import Runner, load
from .targets import tolerances_for
from .whitebox import EPS, support_iou, zero_fraction

TOLERANCE_KEYS = ("max_abs", "min_top1_agreement", "min_cosine", "max_top1_drop", "min_support_iou", "max_coding_rate_rel", "min_sqnr_db")
LAYER_TOLERANCES = ("min_support_iou", "max_coding_rate_rel", "min_sqnr_db")
CODING_RATE_FULL_MAX_TOKENS = 64
CODING_RATE_CAP = 256
_BATCH_BYTES = 256 << 20  # probe outputs of one batch (reference + artifact) stay under about this
_Z_IS = {False: "z = its ISTA output", True: "z = its sparse code z2 (CRATE-α)"}


# ------------------------------------------------------------------ report types


@dataclass
class Violation:
    """One tolerance a result is outside of. `excess` is the relative amount (for ranking)."""

    metric: str  # tolerance key
    text: str  # e.g. "layer 3 ISTA support IoU 0.71 < 0.90"
    value: float
    limit: float
    excess: float
    layer: int | None = None

    def to_dict(self) -> dict:
        return {"metric": self.metric, "layer": self.layer, "value": _num(self.value), "limit": self.limit, "text": self.text}


@dataclass
class ArtifactParity:
    """The parity of one artifact against the reference."""

    label: str
    path: str
    target: str
    executor: str
    probe: bool
    source_matches_reference: bool
    logits: dict[str, float]
    layers: list[dict[str, float]] | None  # None: not a probe build
    tolerances: dict[str, float]
    violations: list[Violation] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    coding_rate_images: int = 0

    @property
    def passed(self) -> bool:
        return not self.violations

    @property
    def has_residual(self) -> bool:
        """Per-layer rows carry the sparse-coding residual ‖x − Dz‖/‖x‖ (a CRATE-α probe build)."""
        return bool(self.layers) and "residual" in self.layers[0]

    @property
    def failures(self) -> list[str]:
        return [v.text for v in self.violations]

    def worst(self) -> Violation | None:
        """The worst per-layer violation (the diagnosis) if any, else the worst logits one."""
        vs = [v for v in self.violations if v.layer is not None] or self.violations
        return max(vs, key=lambda v: v.excess) if vs else None

    def first_failing_layer(self) -> int | None:
        ls = [v.layer for v in self.violations if v.layer is not None]
        return min(ls) if ls else None

    def message(self) -> str:
        """One line: the worst violation (layer and metric), then the first failing layer, the
        worst logits violation and the count when they add something."""
        if self.passed:
            return f"{self.label}: parity passed"
        w = self.worst()
        extra = []
        first = self.first_failing_layer()
        if first is not None and first != w.layer:
            f = max((v for v in self.violations if v.layer == first), key=lambda v: v.excess)
            extra.append(f"first failing layer {first}: {f.text}")
        lv = [v for v in self.violations if v.layer is None]
        if lv and w.layer is not None:
            extra.append(max(lv, key=lambda v: v.excess).text)
        if len(self.violations) > 1:
            extra.append(f"{len(self.violations)} violations in all")
        return f"{self.label}: {w.text}" + (f" ({'; '.join(extra)})" if extra else "")

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "path": self.path,
            "target": self.target,
            "executor": self.executor,
            "probe": self.probe,
            "source_matches_reference": self.source_matches_reference,
            "passed": self.passed,
            "tolerances": self.tolerances,
            "failures": self.failures,
            "violations": [v.to_dict() for v in self.violations],
            "unchecked": self.unchecked,
            "logits": _clean(self.logits),
            "coding_rate_images": self.coding_rate_images,
            "layers": None if self.layers is None else [_clean(d) for d in self.layers],
            "note": None if self.probe else "not a probe build: logit metrics only (compile with --probe for per-layer parity)",
        }


@dataclass
class ParityReport:
    reference: dict[str, Any]  # name, sha256, top1 (None without labels), layers (zero fraction, coding rate) when measured
    data: str  # the data spec
    n: int
    seconds: float
    results: list[ArtifactParity]
    data_record: dict[str, Any] | None = None  # crate_edge.data.InputSet.record(): kind, sha256, split, images, labels

    @property
    def labelled(self) -> bool:
        return self.reference.get("top1") is not None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[str]:
        return [f"{r.label}: {t}" for r in self.results for t in r.failures]

    def __getitem__(self, i) -> ArtifactParity:
        if isinstance(i, str):
            for r in self.results:
                if i in (r.label, r.path, r.target):
                    return r
            raise KeyError(i)
        return self.results[i]

    def message(self) -> str:
        """One line: passed, or the failing artifacts' worst violations."""
        bad = [r for r in self.results if not r.passed]
        if not bad:
            return f"parity passed: {len(self.results)} artifact(s) on {self.n} images of {self.data}"
        return "; ".join(r.message() for r in bad)

    def to_dict(self) -> dict:
        return {
            "format": "crate-edge-parity",
            "version": 1,
            "data": self.data,
            "data_record": self.data_record,
            "n": self.n,
            "seconds": round(self.seconds, 3),
            "passed": self.passed,
            "reference": _clean(self.reference),
            "artifacts": [r.to_dict() for r in self.results],
        }

    # ---------------------------------------------------------- text
    def table(self) -> str:
        """A short plain-text summary: one logits row per artifact, a per-layer table per probe build."""
        ref = self.reference
        lines = [
            f"reference {ref['name']}: top-1 {_pct(ref['top1'])} on {self.n} images of {self.data} ({self.seconds:.1f} s)"
            + ("" if self.labelled else " (no labels: top-1 not computed)"),
            f"{'artifact':<28} {'executor':<14} {'top-1':>7} {'drop':>6} {'agree':>7} {'min cos':>10} {'max|d|':>9}  verdict",
        ]
        for r in self.results:
            lg = r.logits
            lines.append(
                f"{r.label[:28]:<28} {r.executor[:14]:<14} {_pct(lg.get('artifact_top1')):>7} {_pts(lg.get('top1_drop')):>6} "
                f"{100 * lg['top1_agreement']:>6.2f}% {lg['min_cosine']:>10.7f} {lg['max_abs']:>9.2e}  "
                f"{'pass' if r.passed else 'FAIL'}"
            )
        for r in self.results:
            if r.layers is None:
                lines.append(f"{r.label}: not a probe build, logit metrics only")
                continue
            alpha = r.has_residual
            lines.append(f"{r.label} per layer ({_Z_IS[alpha]}, w = MSSA features; coding rate on {r.coding_rate_images} images):")
            lines.append(
                f"{'layer':>5} {'SQNR z':>8} {'SQNR w':>8} {'cos z min':>10} {'IoU mean':>9} {'IoU p05':>8} "
                f"{'zeros ref':>9} {'zeros':>7} {'R^c ref':>9} {'R^c':>9} {'rel':>9}" + (f" {'resid ref':>9} {'resid':>9}" if alpha else "")
            )
            for d in r.layers:
                lines.append(
                    f"{d['layer']:>5} {_db(d['z_sqnr_db']):>8} {_db(d['w_sqnr_db']):>8} {d['z_cos_min']:>10.6f} "
                    f"{d['support_iou_mean']:>9.4f} {d['support_iou_p05']:>8.4f} {d['zero_fraction_ref']:>9.4f} "
                    f"{d['zero_fraction']:>7.4f} {d['coding_rate_ref']:>9.3f} {d['coding_rate']:>9.3f} {d['coding_rate_rel']:>9.2e}"
                    + (f" {d['residual_ref']:>9.4f} {d['residual']:>9.4f}" if alpha else "")
                )
        for r in self.results:
            for t in r.failures:
                lines.append(f"FAIL {r.label}: {t}")
            if r.unchecked:
                lines.append(f"unchecked {r.label}: {_unchecked(r.unchecked)}")
        return "\n".join(lines)

    def markdown(self) -> str:
        ref = self.reference
        out = [
            f"# Parity: {len(self.results)} artifact(s) against {ref['name']}",
            "",
            f"Data: {self.data}, {self.n} images; "
            + (f"reference top-1 {100 * ref['top1']:.2f}% (eager fp32); " if self.labelled else "no labels, so top-1 is not computed; ")
            + f"{self.seconds:.1f} s. Verdict: **{'passed' if self.passed else 'FAILED'}**.",
            "",
            "## Logits",
            "",
            "| artifact | target | executor | top-1 | drop (points) | agreement | min cosine | mean cosine | max abs | mean abs | verdict |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.results:
            lg = r.logits
            out.append(
                f"| {r.label} | {r.target} | {r.executor} | {_pct(lg.get('artifact_top1'))} | {_pts(lg.get('top1_drop'))} | "
                f"{100 * lg['top1_agreement']:.2f}% | {lg['min_cosine']:.7f} | {lg['mean_cosine']:.7f} | {lg['max_abs']:.3g} | "
                f"{lg['mean_abs']:.3g} | {'pass' if r.passed else 'FAIL'} |"
            )
        for r in self.results:
            out += [
                "",
                f"## {r.label}",
                "",
                f"Tolerances: {', '.join(f'{k}={v:g}' for k, v in r.tolerances.items()) or 'none'}"
                + ("" if r.source_matches_reference else " (the reference is NOT this artifact's source model)"),
                "",
            ]
            if r.layers is None:
                out.append("Not a probe build: logit metrics only (compile with `--probe` for per-layer parity).")
            else:
                alpha = r.has_residual
                out += [
                    f"Layer l = transformer.layers[l]; {_Z_IS[alpha]}, w = its MSSA features. Coding rate over "
                    f"{r.coding_rate_images} images." + (" Residual: ||x - D z2|| / ||x||, mean over images." if alpha else ""),
                    "",
                    "| layer | SQNR z (dB) | SQNR w (dB) | cos z mean | cos z min | cos w min | max abs z | IoU mean | IoU min | IoU p05 "
                    "| zeros ref | zeros | R^c ref | R^c | R^c rel |" + (" residual ref | residual |" if alpha else ""),
                    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if alpha else ""),
                ]
                for d in r.layers:
                    out.append(
                        f"| {d['layer']} | {_db(d['z_sqnr_db'])} | {_db(d['w_sqnr_db'])} | {d['z_cos_mean']:.7f} | {d['z_cos_min']:.7f} | "
                        f"{d['w_cos_min']:.7f} | {d['z_max_abs']:.3g} | {d['support_iou_mean']:.4f} | {d['support_iou_min']:.4f} | "
                        f"{d['support_iou_p05']:.4f} | {d['zero_fraction_ref']:.4f} | {d['zero_fraction']:.4f} | "
                        f"{d['coding_rate_ref']:.3f} | {d['coding_rate']:.3f} | {d['coding_rate_rel']:.2e} |"
                        + (f" {d['residual_ref']:.4f} | {d['residual']:.4f} |" if alpha else "")
                    )
            if r.violations:
                out += ["", "Failures:", ""] + [f"- {t}" for t in r.failures]
            if r.unchecked:
                out += ["", f"Unchecked: {_unchecked(r.unchecked)}"]
        return "\n".join(out) + "\n"

    # ---------------------------------------------------------- files
    def plot(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        probes = [r for r in self.results if r.layers is not None]
        if not probes:
            fig, ax = plt.subplots(figsize=(6, 4))
            if self.labelled:
                names = ["reference"] + [r.label for r in self.results]
                vals = [100 * self.reference["top1"]] + [100 * r.logits["artifact_top1"] for r in self.results]
                colors = ["k"] + [f"C{i}" for i in range(len(self.results))]
                what = "top-1 (%)"
            else:  # no labels: agreement with the reference's top-1 instead
                names = [r.label for r in self.results]
                vals = [100 * r.logits["top1_agreement"] for r in self.results]
                colors = [f"C{i}" for i in range(len(self.results))]
                what = "top-1 agreement with the reference (%)"
            ax.bar(range(len(vals)), vals, color=colors)
            ax.set_xticks(range(len(vals)), names, rotation=20, ha="right")
            ax.set_ylim(min(vals) - 2, max(vals) + 1)
            ax.set(ylabel=what, title=f"{what} on {self.n} images of {self.data} (no probe builds: logits only)")
        else:
            alpha = probes[0].has_residual
            fig, axs = plt.subplots(2, 3 if alpha else 2, figsize=(16 if alpha else 11, 8))
            (a1, a2, *a5), (a3, a4, *a6) = axs
            layers = np.arange(len(probes[0].layers))
            ref_layers = self.reference.get("layers") or probes[0].layers
            if alpha:  # CRATE-α: the residual of the code, and its change against the reference
                a5, a6 = a5[0], a6[0]
                a5.plot(layers, [d["residual_ref"] for d in ref_layers], "k--x", ms=9, zorder=5, label="reference")
                for i, r in enumerate(probes):
                    a5.plot(layers, [d["residual"] for d in r.layers], "-o", color=f"C{i}", label=r.label)
                    a6.plot(layers, [d["residual"] - d["residual_ref"] for d in r.layers], "-o", color=f"C{i}", label=r.label)
                a5.set(xlabel="layer", ylabel="$\\|x - D z_2\\| / \\|x\\|$", title="reconstruction residual of the code")
                a6.set(xlabel="layer", ylabel="artifact - reference", title="residual change")
            a3.plot(layers, [d["zero_fraction_ref"] for d in ref_layers], "k--x", ms=9, zorder=5, label="reference")
            a4.plot(layers, [d["coding_rate_ref"] for d in ref_layers], "k--x", ms=9, zorder=5, label="reference")
            for i, r in enumerate(probes):
                c = f"C{i}"
                a1.plot(layers, [_finite(d["z_sqnr_db"]) for d in r.layers], "-o", color=c, label=f"{r.label} z")
                a1.plot(layers, [_finite(d["w_sqnr_db"]) for d in r.layers], ":s", color=c, label=f"{r.label} w")
                a2.plot(layers, [d["support_iou_mean"] for d in r.layers], "-o", color=c, label=f"{r.label} mean")
                a2.plot(layers, [d["support_iou_p05"] for d in r.layers], ":v", color=c, label=f"{r.label} 5th pct")
                a3.plot(layers, [d["zero_fraction"] for d in r.layers], "-o", color=c, label=r.label)
                a4.plot(layers, [d["coding_rate"] for d in r.layers], "-o", color=c, label=r.label)
                for key, ax in (("min_sqnr_db", a1), ("min_support_iou", a2)):
                    if key in r.tolerances:
                        ax.axhline(r.tolerances[key], color=c, lw=0.8, ls="--", alpha=0.6)
            zname = "code $z_2$" if alpha else "ISTA output"
            a1.set(xlabel="layer", ylabel="SQNR (dB)", title=f"SQNR vs reference (z: {zname}, w: MSSA features)")
            a2.set(xlabel="layer", ylabel="IoU", title=f"support IoU of the {zname} vs reference")
            a3.set(xlabel="layer", ylabel="fraction of zeros in " + ("$z_2$" if alpha else "$Z^{l+1}$"), title="ISTA zero fraction")
            a4.set(xlabel="layer", ylabel="$R^c$ of $U^T$LN($Z^l$)", title=f"coding rate ({probes[0].coding_rate_images} images)")
            for ax in axs.flat:
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
                ax.xaxis.get_major_locator().set_params(integer=True)
            fig.suptitle(f"parity against {self.reference['name']} on {self.n} images of {self.data}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def write(self, out_dir, extra_files: dict[str, str] | None = None) -> Path:
        """Write parity.json, parity.md and parity.png into `out_dir`, with `extra_files`
        ({name: text}, e.g. a script's summary) in the same atomic step; returns the directory."""
        with atomic_dir(out_dir, "report") as tmp:
            (tmp / "parity.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n")
            (tmp / "parity.md").write_text(self.markdown())
            self.plot(tmp / "parity.png")
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        return Path(out_dir)


# ------------------------------------------------------------------ helpers


def _num(v):
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    return v


def _clean(d):
    if isinstance(d, dict):
        return {k: _clean(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_clean(v) for v in d]
    return _num(d)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _pts(v) -> str:
    return "n/a" if v is None else f"{100 * v:+.2f}"


def _unchecked(keys) -> str:
    """Unchecked tolerances with the reason: per-layer ones need a probe build, the top-1 drop labels."""
    layer = [k for k in keys if k in LAYER_TOLERANCES]
    other = [k for k in keys if k not in LAYER_TOLERANCES]
    parts = ([f"{', '.join(layer)} (not a probe build)"] if layer else []) + (
        [f"{', '.join(other)} (the data has no labels)"] if other else []
    )
    return "; ".join(parts)


def _db(v) -> str:
    return "inf" if v == math.inf else f"{v:.1f}"


def _finite(v, cap: float = 200.0) -> float:
    return cap if v == math.inf else float(v)


def _sqnr(sig: float, err: float) -> float:
    if err == 0:
        return math.inf
    return 10 * math.log10(sig / err) if sig > 0 else -math.inf


def _cosine_from_sums(rr: torch.Tensor, gg: torch.Tensor, ee: torch.Tensor) -> torch.Tensor:
    """Per-image cosine of r and g from |r|^2, |g|^2 and |g - r|^2 (float64): r.g = (|r|^2 + |g|^2 - |e|^2) / 2,
    accurate near 1 where the difference is small; 1 where both are zero."""
    den = (rr * gg).sqrt()
    c = ((rr + gg - ee) / 2 / den.clamp_min(1e-300)).clamp(-1.0, 1.0)
    return torch.where((rr == 0) & (gg == 0), torch.ones_like(c), c)


def coding_rate(w: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """crate_edge.whitebox.coding_rate, computed faster with the same result (float64):
    logdet(I_N + c W W^T) = logdet(I_p + c W^T W) (Sylvester) on the smaller side, by Cholesky
    (the matrix is symmetric positive definite), falling back to logdet where Cholesky fails."""
    eps = EPS if eps is None else eps
    w = w.double()
    w = w / w.norm(dim=-1, keepdim=True)
    b, k, n, p = w.shape
    g = w.transpose(-1, -2) @ w if p < n else w @ w.transpose(-1, -2)
    g.mul_(p / (n * eps)).diagonal(dim1=-2, dim2=-1).add_(1.0)
    L, info = torch.linalg.cholesky_ex(g)
    half = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # 1/2 logdet
    if bool((info != 0).any()) or not bool(torch.isfinite(half).all()):
        half = 0.5 * torch.logdet(g)
    return half.sum(dim=1)


def _parse_tolerances(tol: dict | None, where: str) -> dict[str, float]:
    out = {}
    for k, v in (tol or {}).items():
        if k not in TOLERANCE_KEYS:
            raise CrateEdgeError(f"{where}: unknown tolerance {k!r}; known: {', '.join(TOLERANCE_KEYS)}")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise CrateEdgeError(f"{where}: tolerance {k} must be a number, got {v!r}") from None
        if math.isnan(out[k]):
            raise CrateEdgeError(f"{where}: tolerance {k} is NaN")
    return out


def target_tolerances(manifest: dict) -> dict[str, float]:
    """The parity tolerances of an artifact's target file that this suite knows."""
    raw = tolerances_for(manifest.get("target", {}).get("definition") or {})
    return _parse_tolerances({k: v for k, v in raw.items() if k in TOLERANCE_KEYS}, f"{manifest.get('target', {}).get('name')} target")


def _load_reference(reference):
    if is_model(reference):
        return reference.eval(), type(reference).__name__ + " module", False
    if isinstance(reference, torch.nn.Module):
        raise CrateEdgeError(f"reference must be a CRATE or CRATE-α module or a model path, got {type(reference).__name__}")
    if reference is None or str(reference) == "embedded":
        return load_model(None), "embedded reference model", reference is None
    return load_model(reference), str(reference), False


def _load_artifacts(artifacts) -> list:
    if isinstance(artifacts, (str, os.PathLike, Runner)):
        artifacts = [artifacts]
    arts = []
    for a in artifacts:
        if isinstance(a, Runner):
            arts.append(a)
        else:
            if not Path(a).exists():
                raise CrateEdgeError(f"artifact {a} not found")
            arts.append(load(a, reference_ok=True))
    if not arts:
        raise CrateEdgeError("no artifacts given")
    return arts


_STRUCTURE = ("family", "image_size", "patch_size", "channels", "num_classes", "dim", "depth", "heads", "dim_head", "pool", "overcomplete")


def _check_fits(model, art) -> None:
    cfg = model.cfg.to_dict()
    src = art.manifest.get("source_model", {}).get("config", {})
    src, cfg = {"family": "crate", **src}, {"family": "crate", **cfg}
    bad = [f"{k} {src.get(k)!r} vs {cfg.get(k)!r}" for k in _STRUCTURE if k in src and _norm(src.get(k)) != _norm(cfg.get(k))]
    if bad:
        raise CrateEdgeError(
            f"the reference does not fit {art.path} (artifact vs reference: {', '.join(bad)}); "
            "pass the artifact's source model with --reference"
        )


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere). Without it a long
    parity run grows without bound from heap fragmentation, not from anything it keeps: measured
    on the embedded model, +0.5 MB per image per probe artifact, so 10,000 test images with ten
    probe artifacts ran out of 24 GB; with a trim per batch the RSS stays flat."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class _LayerAcc:
    """Streaming per-layer statistics of one artifact against the reference."""

    def __init__(self, depth: int):
        self.depth = depth
        z = lambda: [0.0] * depth  # noqa: E731
        self.z_sig, self.z_err, self.w_sig, self.w_err, self.z_max = z(), z(), z(), z(), z()
        self.z_cos = [[] for _ in range(depth)]
        self.w_cos = [[] for _ in range(depth)]
        self.zf = [[] for _ in range(depth)]
        self.iou = [[] for _ in range(depth)]
        self.cr = [[] for _ in range(depth)]
        self.res = [[] for _ in range(depth)]

    def add(self, l: int, w_ref, w, z_ref, z, cr_n: int, residual=None):
        for ref, got, sig, err, cos in ((z_ref, z, self.z_sig, self.z_err, self.z_cos), (w_ref, w, self.w_sig, self.w_err, self.w_cos)):
            r, g = ref.flatten(1), got.flatten(1)
            e = g - r
            rr, gg = (r * r).sum(1, dtype=torch.float64), (g * g).sum(1, dtype=torch.float64)
            ee = (e * e).sum(1, dtype=torch.float64)
            sig[l] += float(rr.sum())
            err[l] += float(ee.sum())
            cos[l].append(_cosine_from_sums(rr, gg, ee).numpy())
            if ref is z_ref:
                self.z_max[l] = max(self.z_max[l], float(e.abs().max()) if e.numel() else 0.0)
        self.zf[l].append(zero_fraction(z).numpy())
        self.iou[l].append(support_iou(z_ref, z).numpy())
        if cr_n > 0:
            self.cr[l].append(coding_rate(w[:cr_n]).numpy())
        if residual is not None:
            self.res[l].append(residual.double().numpy())

    def layers(self, ref_zf, ref_cr, ref_res=None) -> list[dict]:
        out = []
        for l in range(self.depth):
            zc, wc = np.concatenate(self.z_cos[l]), np.concatenate(self.w_cos[l])
            iou = np.concatenate(self.iou[l])
            cr = np.concatenate(self.cr[l]) if self.cr[l] else np.array([np.nan])
            cr_ref = ref_cr[l]
            crm = float(np.mean(cr))
            out.append(
                {
                    "layer": l,
                    "z_sqnr_db": _sqnr(self.z_sig[l], self.z_err[l]),
                    "z_cos_mean": float(zc.mean()),
                    "z_cos_min": float(zc.min()),
                    "z_max_abs": self.z_max[l],
                    "w_sqnr_db": _sqnr(self.w_sig[l], self.w_err[l]),
                    "w_cos_mean": float(wc.mean()),
                    "w_cos_min": float(wc.min()),
                    "zero_fraction_ref": ref_zf[l],
                    "zero_fraction": float(np.concatenate(self.zf[l]).mean()),
                    "support_iou_mean": float(iou.mean()),
                    "support_iou_min": float(iou.min()),
                    "support_iou_p05": float(np.percentile(iou, 5)),
                    "coding_rate_ref": cr_ref,
                    "coding_rate": crm,
                    "coding_rate_rel": abs(crm - cr_ref) / abs(cr_ref) if cr_ref != 0 else (0.0 if crm == cr_ref else math.inf),
                }
            )
            if self.res[l]:  # CRATE-α: reconstruction residual of the code, ||x - D z2|| / ||x||
                out[-1]["residual_ref"] = ref_res[l]
                out[-1]["residual"] = float(np.concatenate(self.res[l]).mean())
        return out


def check(logits: dict, layers: list[dict] | None, tol: dict[str, float]) -> tuple[list[Violation], list[str]]:
    """Violations of `tol` by one artifact's metrics, and the per-layer tolerances it could not check."""
    v: list[Violation] = []

    def rel(excess, limit):
        return excess / max(abs(limit), 1e-12)

    if "max_abs" in tol and not logits["max_abs"] <= tol["max_abs"]:
        v.append(
            Violation(
                "max_abs",
                f"logits max |diff| {logits['max_abs']:.3g} > {tol['max_abs']:.3g}",
                logits["max_abs"],
                tol["max_abs"],
                rel(logits["max_abs"] - tol["max_abs"], tol["max_abs"]),
            )
        )
    if "min_top1_agreement" in tol and not logits["top1_agreement"] >= tol["min_top1_agreement"]:
        t = tol["min_top1_agreement"]
        v.append(
            Violation(
                "min_top1_agreement",
                f"logits top-1 agreement {100 * logits['top1_agreement']:.2f}% < {100 * t:.2f}%",
                logits["top1_agreement"],
                t,
                rel(t - logits["top1_agreement"], 1 - t if t < 1 else t),
            )
        )
    if "min_cosine" in tol and not logits["min_cosine"] >= tol["min_cosine"]:
        t = tol["min_cosine"]
        v.append(
            Violation(
                "min_cosine",
                f"logits min cosine {logits['min_cosine']:.6f} < {t:.6f}",
                logits["min_cosine"],
                t,
                rel(t - logits["min_cosine"], 1 - t if t < 1 else t),
            )
        )
    if "max_top1_drop" in tol and "top1_drop" in logits and not logits["top1_drop"] <= tol["max_top1_drop"]:
        t = tol["max_top1_drop"]
        v.append(
            Violation(
                "max_top1_drop",
                f"top-1 drop {100 * logits['top1_drop']:.2f} points > {100 * t:.2f}",
                logits["top1_drop"],
                t,
                rel(logits["top1_drop"] - t, t if t > 0 else 0.01),
            )
        )
    unchecked = [k for k in LAYER_TOLERANCES if k in tol] if layers is None else []
    if "max_top1_drop" in tol and "top1_drop" not in logits:  # no labels
        unchecked.append("max_top1_drop")
    for d in layers or []:
        l = d["layer"]
        if "min_support_iou" in tol and not d["support_iou_mean"] >= tol["min_support_iou"]:
            t = tol["min_support_iou"]
            v.append(
                Violation(
                    "min_support_iou",
                    f"layer {l} ISTA support IoU {d['support_iou_mean']:.4g} < {t:.4g}",
                    d["support_iou_mean"],
                    t,
                    rel(t - d["support_iou_mean"], 1 - t if t < 1 else t),
                    l,
                )
            )
        if "max_coding_rate_rel" in tol and not d["coding_rate_rel"] <= tol["max_coding_rate_rel"]:
            t = tol["max_coding_rate_rel"]
            v.append(
                Violation(
                    "max_coding_rate_rel",
                    f"layer {l} coding rate differs by {100 * d['coding_rate_rel']:.3g}% > "
                    f"{100 * t:.3g}% ({d['coding_rate']:.3f} vs {d['coding_rate_ref']:.3f})",
                    d["coding_rate_rel"],
                    t,
                    rel(d["coding_rate_rel"] - t, t),
                    l,
                )
            )
        if "min_sqnr_db" in tol:
            t = tol["min_sqnr_db"]
            for key, what in (("z_sqnr_db", "ISTA output SQNR"), ("w_sqnr_db", "MSSA features SQNR")):
                if not d[key] >= t:
                    v.append(Violation("min_sqnr_db", f"layer {l} {what} {d[key]:.1f} dB < {t:.1f} dB", d[key], t, rel(t - d[key], t), l))
    return v, unchecked


# ------------------------------------------------------------------ the suite


@torch.no_grad()
def parity(
    artifacts,
    reference=None,
    data: str = "fashion-mnist",
    limit: int | None = None,
    batch_size: int | None = None,
    tolerances: dict | None = None,
    progress: bool = True,
    coding_rate_images: int | None = None,
) -> ParityReport:
    """Compare one or more artifacts (directories or loaded crate_edge.runtime.Runners) with the eager fp32
    reference on the test split of `data` (any crate_edge.data spec; `limit` images at most).

    `reference`: a CRATE module, a model path, "embedded", or None for the embedded model, in
    which case it must be the artifacts' source model (else CrateEdgeError: pass reference=).
    `tolerances` override the artifact's target file ([parity]); see the module docstring.
    `batch_size` defaults to what keeps one batch's per-layer tensors under about 256 MiB."""
    t0 = time.perf_counter()
    override = _parse_tolerances(tolerances, "tolerances")
    if limit is not None and limit < 1:
        raise CrateEdgeError(f"limit must be at least 1, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise CrateEdgeError(f"batch size must be at least 1, got {batch_size}")
    arts = _load_artifacts(artifacts)
    model, ref_name, implicit = _load_reference(reference)
    cfg, depth = model.cfg, model.cfg.depth
    ref_hash = model_hash(model)
    if ref_name.endswith(" module"):
        ref_name += f" (sha256 {ref_hash[:12]})"
    for a in arts:
        _check_fits(model, a)
        if implicit and a.manifest.get("source_model", {}).get("sha256") != ref_hash:
            raise CrateEdgeError(
                f"{a.path} was not compiled from the embedded reference model (source sha256 "
                f"{str(a.manifest.get('source_model', {}).get('sha256'))[:12]}...); pass its source model with --reference"
            )
    ds = open_inputs(data, cfg, "test").first(limit)
    n_total = len(ds)

    n_tok = cfg.num_patches + 1
    any_probe = any(a.probe for a in arts)
    if batch_size is None:
        code = cfg.dim * getattr(cfg, "overcomplete", 1)  # CRATE-α's code is 4d wide
        per_img = 4 * depth * (n_tok * code + cfg.heads * n_tok * cfg.dim_head) * (1 + sum(a.probe for a in arts)) if any_probe else 4096
        batch_size = int(max(1, min(256, _BATCH_BYTES // per_img)))
    cr_cap = (
        coding_rate_images if coding_rate_images is not None else (n_total if n_tok <= CODING_RATE_FULL_MAX_TOKENS else CODING_RATE_CAP)
    )
    cr_cap = max(1, min(int(cr_cap), n_total))

    labels, ref_logits = [], []
    art_logits = [[] for _ in arts]
    accs = [_LayerAcc(depth) if a.probe else None for a in arts]
    ref_zf = [[] for _ in range(depth)]
    ref_cr = [[] for _ in range(depth)]
    ref_res = [[] for _ in range(depth)]
    n_fields = len(type(model).PROBE_FIELDS)
    it: Iterable = ds.batches(batch_size)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            it = bar = tqdm(
                it,
                total=-(-n_total // batch_size),
                desc="parity",
                unit="batch",
                file=sys.stderr,
                leave=False,
                mininterval=1.0 if sys.stderr.isatty() else 30.0,
            )
        except ImportError:  # a line per batch instead
            pass
    seen = 0
    model.eval()
    for bi, (x, y) in enumerate(it):
        zL, feats = model.forward_intermediates(x)
        ref_logits.append(model.forward_head(zL).numpy())
        if y is not None:
            labels.append(y.numpy())
        cr_n = max(0, min(len(x), cr_cap - seen))
        if any_probe:
            for l, f in enumerate(feats):
                ref_zf[l].append(zero_fraction(f[1]).numpy())
                if cr_n:
                    ref_cr[l].append(coding_rate(f[0][:cr_n]).numpy())
                if n_fields > 2:
                    ref_res[l].append(f[2].double().numpy())
        xn = x.numpy()
        for k, a in enumerate(arts):
            outs = a.outputs(xn)
            if a.probe:
                if len(outs) != 1 + n_fields * depth:
                    raise CrateEdgeError(f"{a.path}: probe artifact returned {len(outs)} outputs, expected {1 + n_fields * depth}")
                lg, ws, zs, *rest = split_probe_outputs(outs, depth)
                t = lambda v: torch.from_numpy(np.asarray(v, dtype=np.float32))  # noqa: E731
                for l in range(depth):
                    accs[k].add(l, feats[l][0], t(ws[l]), feats[l][1], t(zs[l]), cr_n, t(rest[0][l]) if rest else None)
            else:
                lg = outs[0]
            art_logits[k].append(np.asarray(lg, dtype=np.float32))
        seen += len(x)
        _release_memory()
        if progress and bar is None:
            print(f"parity: {seen}/{n_total} images", file=sys.stderr)
    if bar is not None:
        bar.close()

    y = np.concatenate(labels) if ds.has_labels else None
    ref = np.concatenate(ref_logits)
    ref_top1 = float((ref.argmax(1) == y).mean()) if y is not None else None
    ref_layers = None
    zf_means = cr_means = res_means = None
    if any_probe:
        zf_means = [float(np.concatenate(v).mean()) for v in ref_zf]
        cr_means = [float(np.concatenate(v).mean()) for v in ref_cr]
        res_means = [float(np.concatenate(v).mean()) for v in ref_res] if n_fields > 2 else None
        ref_layers = [{"layer": l, "zero_fraction_ref": zf_means[l], "coding_rate_ref": cr_means[l]} for l in range(depth)]
        for l, d in enumerate(ref_layers if res_means else []):
            d["residual_ref"] = res_means[l]
    results = []
    labels_seen: dict[str, int] = {}
    for k, a in enumerate(arts):
        got = np.concatenate(art_logits[k])
        lg = logit_parity(ref, got, y)
        if y is not None:
            lg["top1_drop"] = lg["reference_top1"] - lg["artifact_top1"]
        layers = accs[k].layers(zf_means, cr_means, res_means) if a.probe else None
        tol = {**target_tolerances(a.manifest), **override}
        viol, unchecked = check(lg, layers, tol)
        label = Path(a.path).name
        labels_seen[label] = labels_seen.get(label, 0) + 1
        if labels_seen[label] > 1:
            label = f"{label}#{labels_seen[label]}"
        results.append(
            ArtifactParity(
                label=label,
                path=str(a.path),
                target=a.target,
                executor=a.executor,
                probe=a.probe,
                source_matches_reference=a.manifest.get("source_model", {}).get("sha256") == ref_hash,
                logits=lg,
                layers=layers,
                tolerances=tol,
                violations=viol,
                unchecked=unchecked,
                coding_rate_images=cr_cap if a.probe else 0,
            )
        )
    refinfo = {
        "name": ref_name,
        "sha256": ref_hash,
        "top1": ref_top1,
        "config": cfg.to_dict(),
        "coding_rate_images": cr_cap if any_probe else 0,
        "layers": ref_layers,
    }
    return ParityReport(
        reference=refinfo, data=ds.spec, n=int(len(ref)), seconds=time.perf_counter() - t0, results=results, data_record=ds.record()
    )


def layer_parity(
    model,
    target,
    artifact,
    parity_data: str = "embedded",
    calibration_data=None,
    calibration_images: int | None = None,
    log=None,
):
    """Per-layer parity (ISTA support IoU, coding rate, CRATE-α's residual of z2) of a plain
    artifact, which has no per-layer outputs: the same model and target are compiled again as a
    probe build, its twin (same rewrites, calibration data and images), in a scratch directory
    beside the artifact; the twin is checked layer by layer against the eager model and removed.
    A probe build's extra outputs can change how a backend fuses or quantizes, so the twin's
    logits are compared with the artifact's on the same images. Returns (the twin's
    crate_edge.parity.ParityReport, max |twin logits - artifact logits|)."""
    import shutil

    from .compiler import ParityError, compile, parity_images
    from .outputs import work_dir
    from .runtime import load

    say = log or (lambda s: print(s, file=sys.stderr))
    src = model if isinstance(model, torch.nn.Module) else load_model(model)
    scratch = work_dir(artifact.path, "probe-twin")
    try:
        say(f"[{artifact.target}] per-layer parity: compiling its probe twin")
        try:
            twin = compile(
                src,
                target,
                out=scratch / f"{artifact.path.name}-probe-twin",
                probe=True,
                parity_data=parity_data,
                keep_failed=True,
                log=lambda s: None,
                calibration_data=calibration_data,
                calibration_images=calibration_images,
            )
        except ParityError:  # its logits beyond the budget: kept, and the per-layer table says where
            twin = load(scratch / f"{artifact.path.name}-probe-twin", reference_ok=True)
        x = parity_images(src.cfg, parity_data)[0].numpy()
        diff = float(np.abs(twin(x) - artifact(x)).max())
        rep = parity([twin], reference=src, data=parity_data, progress=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rep, diff
