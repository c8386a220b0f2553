"""BenchReport: what bench measured, as bench.json (to_dict), a Markdown table (table) and a bar
chart per batch size (plot; matplotlib is imported only there)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .contenders import BASELINE_LABELS


@dataclass
class BenchReport:
    """Results of `bench`: `to_dict()`, `table()`, `plot(path)`, `write(out_dir)`."""

    data: dict[str, Any]

    @property
    def contenders(self) -> list[dict]:
        return self.data["contenders"]

    def result(self, name: str, batch: int) -> dict:
        c = next(c for c in self.contenders if c["name"] == name)
        return c["results"][str(batch)]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def table(self) -> str:
        d = self.data
        s = d["settings"]
        timing = f"{s['seconds']} s per contender" if s.get("seconds") else f"{s['iters']} iterations"
        gpu = any(c.get("gpu_peak_mb") for c in self.contenders)
        where = d["host"]["cpu"] + (f", GPU {d['host']['gpu']}" if gpu and d["host"].get("gpu") else "")
        lines = [
            f"{d['source_model'].get('label', 'source model')}: {s['threads']} threads, {timing} in {s['rounds']} interleaved "
            f"rounds after {s['warmup']} warm-up, {where}",
            "",
            "| contender | batch | p50 ms | p90 ms | p99 ms | images/s | vs eager upstream | max abs vs upstream "
            "| load s | first call ms | peak RSS MB | " + ("GPU peak MB | " if gpu else "") + "size MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
        ]
        f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
        pad = " |" * (10 + gpu)
        for c in self.contenders:
            for b, r in c["results"].items():
                if "error" in r:
                    lines.append(f"| {c['name']} | {b} | failed: {r['error']}{pad}")
                    continue
                lines.append(
                    f"| {c['name']} | {b} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['throughput_ips']:.1f} "
                    f"| {f(r.get('speedup_vs_upstream'), '.2f')}x | {f(r.get('max_abs_vs_upstream'), '.1e')} "
                    f"| {f(c.get('load_s'), '.2f')} | {f(r.get('first_ms'), '.1f')} | {f(c.get('peak_rss_mb'), '.0f')} "
                    + (f"| {f(c.get('gpu_peak_mb'), '.0f')} " if gpu else "")
                    + f"| {f(c['size_bytes'] / 1e6 if c.get('size_bytes') else None, '.2f')} |"
                )
        for k, v in d["skipped"].items():
            lines.append(f"| {k} | | skipped: {v}{pad}")
        lines += ["", f"Peak RSS: {d['memory_note']}"]
        if any(r.get("input_on_device") for c in self.contenders for r in c["results"].values()):
            lines.append(f"GPU timing: {s['gpu_timing']}")
        return "\n".join(lines)

    def plot_axes(self, axes, title: str = "") -> None:
        """One horizontal bar chart per batch size (p50, bars p10-p90) on the given axes."""
        batches = self.data["settings"]["batch"]
        ok = [c for c in self.contenders if any("p50_ms" in r for r in c["results"].values())]
        for ax, b in zip(axes, batches):
            rows = [(c["name"], c["results"].get(str(b), {})) for c in ok]
            rows = [(n, r) for n, r in rows if "p50_ms" in r][::-1]
            y = np.arange(len(rows))
            p50 = [r["p50_ms"] for _, r in rows]
            err = [[r["p50_ms"] - r.get("p10_ms", r["p50_ms"]) for _, r in rows], [r["p90_ms"] - r["p50_ms"] for _, r in rows]]
            ax.barh(y, p50, xerr=err, color=["tab:gray" if n in BASELINE_LABELS.values() else "tab:blue" for n, _ in rows], capsize=2)
            ax.set_yticks(y, [n for n, _ in rows])
            for i, (_, r) in enumerate(rows):
                sp = r.get("speedup_vs_upstream")
                ax.text(r["p50_ms"], i, f"  {r['p50_ms']:.2f} ms" + (f" ({sp:.2f}x)" if sp else ""), va="center", fontsize=8)
            ax.set_xlabel("latency p50 (ms), bars p10-p90; lower is better")
            ax.set_title(f"{title}batch {b}", fontsize=9)
            ax.set_xlim(0, max(p50 or [1]) * 1.45)

    def plot(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        batches = self.data["settings"]["batch"]
        n = len(self.contenders)
        fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 0.45 * max(n, 1) + 1.8), squeeze=False)
        self.plot_axes(axes[0])
        s = self.data["settings"]
        fig.suptitle(f"{self.data['source_model'].get('label', '')}, {s['threads']} threads, {self.data['host']['cpu']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def write(self, out_dir, stem: str = "bench") -> list[Path]:
        from ..outputs import atomic_dir

        names = [f"{stem}.json", f"{stem}.md", f"{stem}.png"]
        with atomic_dir(out_dir, "report") as tmp:
            (tmp / names[0]).write_text(json.dumps(self.data, indent=1))
            (tmp / names[1]).write_text(self.table() + "\n")
            self.plot(tmp / names[2])
        return [Path(out_dir) / n for n in names]
