"""Kernel and ProfileReport: a profile as a table, Markdown, profile.json (to_dict) and a chart of
latency and fidelity per block (plot; matplotlib is imported only there), written together by
write. KINDS and ENGINES, the vocabulary every runtime's kernels are classed in, are explained in
the package docstring."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import atomic_dir

KINDS = ("embed", "mssa_projection", "attention", "ista", "layernorm", "quant", "layout", "head", "other")
ENGINES = ("int8", "quant", "delegate", "float", "overhead")
NOT_PROBE = "not a probe build: compile with --probe for per-block fidelity"


@dataclass
class Kernel:
    """One kernel (an ONNX node, an XNNPACK operator, a portable kernel, a TVM PrimFunc call) at
    one place in the run, with its time summed over the profiled runs."""

    name: str
    op: str  # the runtime's op type or kernel family
    cls: str  # gemm softmax attention layernorm quant layout elementwise other
    engine: str
    per_run: list[float] = field(default_factory=list)  # us in each profiled run
    us: float = 0.0  # summed over the runs the report uses
    block: str = "other"
    kind: str = "other"
    scope: str | None = None  # ONNX Runtime: the module path it was attributed by
    ln_start: bool = False

    def to_dict(self, runs: int) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "block": self.block,
            "kind": self.kind,
            "engine": self.engine,
            "ms": self.us / 1e3 / runs,
            **({"scope": self.scope} if self.scope else {}),
        }


@dataclass
class ProfileReport:
    artifact: str
    target: str
    backend: str
    executor: str
    batch: int
    iters: int  # profiled runs
    runs_used: int  # the faster half of them by the runtime's total, which every time averages
    threads: int | None
    profiler: str
    total_ms: float  # per run, under the profiler (the runtime's own total), mean of the runs used
    all_runs_ms: float  # the same over every profiled run
    unprofiled_ms: float  # per call, median, through crate_edge.runtime without the profiler
    kernels: list[Kernel]
    depth: int
    attribution: str
    attributed: bool
    notes: list[str] = field(default_factory=list)
    fidelity: dict[str, Any] | None = None

    # ---------------------------------------------------------- aggregates
    @property
    def block_names(self) -> list[str]:
        order = ["embed"] + [f"layer{l}.{p}" for l in range(self.depth) for p in ("mssa", "ista")] + ["head", "delegate", "other"]
        seen = {k.block for k in self.kernels}
        return [b for b in order if b in seen] + sorted(seen - set(order))

    def blocks(self) -> dict[str, dict[str, float]]:
        """block -> {"ms": per call, kind: ms per call, ...} in model order."""
        out = {b: {"ms": 0.0, **{k: 0.0 for k in KINDS}} for b in self.block_names}
        for k in self.kernels:
            ms = k.us / 1e3 / self.runs_used
            out[k.block]["ms"] += ms
            out[k.block][k.kind] += ms
        return out

    def kinds(self) -> dict[str, float]:
        out = {k: 0.0 for k in KINDS}
        for k in self.kernels:
            out[k.kind] += k.us / 1e3 / self.runs_used
        return out

    def engines(self) -> dict[str, float]:
        out = {e: 0.0 for e in ENGINES}
        for k in self.kernels:
            out[k.engine] += k.us / 1e3 / self.runs_used
        return out

    @property
    def outside_ms(self) -> float:
        """Per call: float kernels the runtime runs itself, outside delegated and integer kernels
        and their Q/DQ conversions (and outside the overhead remainder)."""
        return self.engines()["float"]

    def block_fidelity(self) -> dict[str, dict[str, float]]:
        """block -> {"cosine", "iou", "coding_rate_rel"} where measured (the package docstring)."""
        f = self.fidelity
        if not f:
            return {}
        out: dict[str, dict[str, float]] = {}
        for d in f.get("layers") or []:
            l = d["layer"]
            out[f"layer{l}.mssa"] = {"cosine": d["w_cos_mean"], "coding_rate_rel": d["coding_rate_rel"]}
            out[f"layer{l}.ista"] = {"cosine": d["z_cos_mean"], "iou": d["support_iou_mean"]}
        lg = f.get("logits") or {}
        if "mean_cosine" in lg:
            out["head"] = {"cosine": lg["mean_cosine"], "top1_agreement": lg["top1_agreement"]}
        return out

    def to_dict(self) -> dict:
        return _clean(
            {
                "format": "crate-edge-profile",
                "version": 1,
                "artifact": self.artifact,
                "target": self.target,
                "backend": self.backend,
                "executor": self.executor,
                "batch": self.batch,
                "iters": self.iters,
                "runs_used": self.runs_used,
                "threads": self.threads,
                "profiler": self.profiler,
                "total_ms": self.total_ms,
                "all_runs_ms": self.all_runs_ms,
                "unprofiled_ms": self.unprofiled_ms,
                "attribution": self.attribution,
                "attributed": self.attributed,
                "blocks": self.blocks(),
                "kinds": self.kinds(),
                "engines": self.engines(),
                "outside_ms": self.outside_ms,
                "fidelity": self.fidelity,
                "block_fidelity": self.block_fidelity(),
                "kernels": [k.to_dict(self.runs_used) for k in self.kernels],
                "notes": self.notes,
            }
        )

    # ---------------------------------------------------------- text
    def _used_kinds(self) -> list[str]:
        tot = self.kinds()
        return [k for k in KINDS if tot[k] > 0]

    def _rows(self):
        """(block, ms, %, [kind ms], cosine, IoU, R^c rel) per block, then the total."""
        blocks, fid, kinds = self.blocks(), self.block_fidelity(), self._used_kinds()
        total = sum(b["ms"] for b in blocks.values()) or 1.0
        for name, b in blocks.items():
            f = fid.get(name, {})
            yield name, b["ms"], 100 * b["ms"] / total, [b[k] for k in kinds], f.get("cosine"), f.get("iou"), f.get("coding_rate_rel")
        yield "total", total, 100.0, [sum(b[k] for b in blocks.values()) for k in kinds], None, None, None

    def _header(self) -> list[str]:
        e = self.engines()
        tot = sum(e.values()) or 1.0
        eng = ", ".join(f"{k} {v:.3f}" for k, v in e.items() if v > 0)
        lines = [
            f"profile of {self.artifact} (target {self.target}, {self.executor}): batch {self.batch}, "
            f"threads {self.threads if self.threads else 'the runtime default'}",
            f"profiler: {self.profiler}",
            f"profiled: {self.total_ms:.3f} ms per run, mean of the faster {self.runs_used} of {self.iters} runs "
            f"({self.all_runs_ms:.3f} ms over all); without the profiler {self.unprofiled_ms:.3f} ms (median)",
            f"time outside delegated and integer kernels (float kernels the runtime runs itself): {self.outside_ms:.3f} ms "
            f"({100 * self.outside_ms / tot:.1f}%); by engine, ms: {eng}",
            f"blocks: {self.attribution}",
        ]
        f = self.fidelity
        if f:
            lines.append(
                f"fidelity on {f['n']} images of {f['data']} against {f['reference']}: "
                + (
                    "mssa rows: MSSA features w_l (cosine, R^c rel), ista rows: ISTA output z_l (cosine, support IoU), head: logits"
                    if f["probe"]
                    else f"{f['note']}; head: logits"
                )
            )
        return lines

    def table(self) -> str:
        kinds = self._used_kinds()
        w = {k: max(len(k), 7) for k in kinds}
        head = (
            f"{'block':<14} {'ms':>8} {'%':>6} " + " ".join(f"{k:>{w[k]}}" for k in kinds) + f"  {'cosine':>10} {'IoU':>7} {'R^c rel':>9}"
        )
        lines = self._header() + [head]
        for name, ms, pct, per, cos, iou, rc in self._rows():
            lines.append(
                f"{name:<14} {ms:>8.3f} {pct:>6.1f} "
                + " ".join(f"{v:>{w[k]}.3f}" for k, v in zip(kinds, per))
                + f"  {_fmt(cos, '.7f'):>10} {_fmt(iou, '.4f'):>7} {_fmt(rc, '.2e'):>9}"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        kinds = self._used_kinds()
        out = [f"# Profile: {Path(self.artifact).name}", ""] + [f"- {line}" for line in self._header()] + [""]
        out.append("| block | ms | % | " + " | ".join(kinds) + " | cosine | IoU | R^c rel |")
        out.append("|---|---:|---:|" + "---:|" * len(kinds) + "---:|---:|---:|")
        for name, ms, pct, per, cos, iou, rc in self._rows():
            out.append(
                f"| {name} | {ms:.3f} | {pct:.1f} | "
                + " | ".join(f"{v:.3f}" for v in per)
                + f" | {_fmt(cos, '.7f')} | {_fmt(iou, '.4f')} | {_fmt(rc, '.2e')} |"
            )
        if self.notes:
            out += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        out += ["", "## Kernels", "", "| kernel | op | block | kind | engine | ms |", "|---|---|---|---|---|---:|"]
        for k in self.kernels:
            out.append(f"| {k.name} | {k.op} | {k.block} | {k.kind} | {k.engine} | {k.us / 1e3 / self.runs_used:.4f} |")
        return "\n".join(out) + "\n"

    # ---------------------------------------------------------- files
    def plot(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        blocks, fid, kinds = self.blocks(), self.block_fidelity(), self._used_kinds()
        names = list(blocks)
        y = np.arange(len(names))
        fig, (a1, a2) = plt.subplots(
            1, 2, figsize=(13, 2.4 + 0.42 * len(names)), sharey=True, gridspec_kw={"width_ratios": [2.2, 1]}, squeeze=True
        )
        colors = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(KINDS)}
        left = np.zeros(len(names))
        for k in kinds:
            v = np.array([blocks[b][k] for b in names])
            a1.barh(y, v, left=left, color=colors[k], label=k, height=0.7)
            left += v
        for yi, tot in zip(y, left):
            a1.text(tot, yi, f" {tot:.3f}", va="center", fontsize=8)
        a1.set_yticks(y, names)
        a1.invert_yaxis()
        a1.set_xlim(0, max(left.max(), 1e-6) * 1.12)
        a1.set(
            xlabel=f"ms per run (mean of the faster {self.runs_used} of {self.iters} runs)",
            title=f"latency by block and op kind: {self.executor}, batch {self.batch}",
        )
        a1.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(kinds), 5), frameon=False)
        a1.grid(axis="x", alpha=0.3)
        floor = 1e-12  # exact agreement (a deviation of 0) is drawn here
        series = [
            ("1 - cosine", "cosine", "o", True),
            ("1 - support IoU", "iou", "s", True),
            ("$R^c$ relative difference", "coding_rate_rel", "^", False),
        ]
        drawn = False
        for j, (label, key, marker, one_minus) in enumerate(series):
            pts = [(i, fid[b][key]) for i, b in enumerate(names) if b in fid and fid[b].get(key) is not None]
            if not pts:
                continue
            xs = [max(floor, (1 - v) if one_minus else v) for _, v in pts]
            a2.plot(xs, [i + 0.18 * (j - 1) for i, _ in pts], marker, ls="none", ms=7, color=("k", "teal", "goldenrod")[j], label=label)
            drawn = True
        a2.set_xscale("log")
        a2.set(xlabel=f"deviation from the reference (log; lower is better; 0 drawn at {floor:g})", title="fidelity per block")
        a2.grid(axis="x", alpha=0.3, which="major")
        if drawn:
            a2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        else:
            a2.set_xlim(1e-8, 1)
        f = self.fidelity
        msg = "fidelity not measured" if not f else None if f["probe"] else NOT_PROBE
        if msg:
            a2.text(0.5, 0.5, msg.replace(": ", ":\n"), transform=a2.transAxes, ha="center", va="center", fontsize=9)
        fig.suptitle(
            f"{Path(self.artifact).name} ({self.target}): {self.total_ms:.3f} ms per run under {self.backend}'s profiler", fontsize=11
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)

    def write(self, out_dir) -> Path:
        """Write profile.json, profile.md and profile.png into `out_dir` in one atomic step."""
        with atomic_dir(out_dir, "report") as tmp:
            (tmp / "profile.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n")
            (tmp / "profile.md").write_text(self.markdown())
            self.plot(tmp / "profile.png")
        return Path(out_dir)


def float_kernel_class(name: str) -> tuple[str, str] | None:
    """(class, engine) that a runtime's own (non-delegated) kernel name says by a keyword,
    lower-cased name in: quant, layernorm, softmax, attention; None when no keyword is in it
    (each runtime then applies its own naming rules)."""
    if "quantize" in name or "choose_qparams" in name:
        return "quant", "quant"
    for kw, cls in (("layer_norm", "layernorm"), ("layernorm", "layernorm"), ("softmax", "softmax"), ("attention", "attention")):
        if kw in name:
            return cls, "float"
    return None


def _fmt(v, spec: str) -> str:
    return "-" if v is None else "inf" if v == math.inf else format(v, spec)


def _clean(d):
    if isinstance(d, dict):
        return {k: _clean(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_clean(v) for v in d]
    if isinstance(d, (float, np.floating)):
        v = float(d)
        return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    return d
