"""`crate-edge demo`: the whole toolchain on one model (by default the embedded reference model).

    report = crate_edge.demo.demo(targets=None, out="out/demo")
    print(report.table())

1. compile: every target that compiles on this host (fp32 and reduced precision), reusing the
   artifacts of an earlier run of the same model and target files (OUT/artifacts/);
2. parity: every artifact against the eager model on the held-out images (top-1 agreement,
   max |diff|, min cosine), and for the reduced-precision targets per layer from a probe build
   (ISTA support IoU, coding rate R^c), in one crate_edge.parity pass;
3. bench: every artifact that executes here, side by side in one crate_edge.bench run with eager
   upstream and the folded eager model, at batch 1 and 32;
4. report: OUT/report.html (self-contained), report.md, report.json and the charts
   (latency.png, parity.png, whitebox.png), and one table in the terminal.

A target that cannot compile here is listed with why; one that compiles but cannot execute
here (TensorRT, Core ML off macOS) is checked on its stand-in executor, labelled as such, and
not benchmarked.
"""

from __future__ import annotations

import base64
import html
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import get_backend
from .bench import bench
from .checkpoint import load_model
from .compiler import compile_each
from .data import load_dataset, prepare
from .errors import CrateEdgeError
from .host import host_info
from .outputs import atomic_write, owned_dir
from .parity import parity
from .targets import list_targets, load_target
from .whitebox import measure

BATCHES = (1, 32)
FORMAT = "crate-edge-demo"
STATUS_LEGEND = (
    "Status: ok = compiled, parity within the target's tolerances on its own runtime, benchmarked; "
    "stand-in = compiled, but its runtime cannot execute here (TensorRT, Core ML off macOS, CUDA builds), so parity "
    "ran on the closest executor of the same network (named in the note) and it is not benchmarked; "
    "skipped = cannot compile here (the note says why); FAIL = outside the target's parity tolerances or failed to compile. "
    "Speed-ups are p50 latency of eager upstream over the target's, measured side by side in this run."
)


def _reduced(t) -> bool:
    return t.precision != "fp32" or bool(t.quantize)


@dataclass
class DemoReport:
    data: dict[str, Any]

    @property
    def rows(self) -> list[dict]:
        """Benchmarked targets first, then failures, stand-ins and what could not compile."""
        order = {"ok": 0, "FAIL": 1, "stand-in": 2, "skipped": 3}
        return sorted(self.data["targets"], key=lambda r: (order.get(r["status"], 4), r["target"]))

    def notes(self) -> dict[str, tuple[int, str]]:
        """target -> (number, note) for the rows that have one, numbered in row order."""
        out: dict[str, tuple[int, str]] = {}
        for r in self.rows:
            if r.get("note"):
                out[r["target"]] = (len(out) + 1, r["note"])
        return out

    def table(self) -> str:
        """The one table for the terminal: the same cells as the Markdown and HTML tables."""
        grid = [HEADER] + [_md_cells(r) for r in self.rows] + [_baseline_cells(n, r) for n, r in self.data.get("baselines", {}).items()]
        widths = [max(len(row[i]) for row in grid) for i in range(len(HEADER) - 1)]
        lines = []
        for k, row in enumerate(grid):
            cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells + [row[-1]]).rstrip())
            if k == 0:
                lines.append("-" * len(lines[0]))
        h = self.data["host"]
        lines.append(STATUS_LEGEND)
        lines.append(f"host: {h['cpu']}, {h.get('cores_usable', h.get('cores'))} cores, ISA {' '.join(h.get('isa', [])) or '?'}")
        return "\n".join(lines)

    def markdown(self) -> str:
        d = self.data
        out = [
            "# crate-edge demo",
            "",
            f"{d['model']['label']}; parity on {d['parity']['n']} images of {d['parity']['data']}; "
            f"speed: {d['bench']['threads']} threads, p50 latency, speed-up against eager upstream.",
            "",
            "| " + " | ".join(HEADER) + " |",
            "|---|---|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(BATCHES) + "---|",
        ]
        notes = self.notes()
        for r in self.rows:
            k = notes.get(r["target"], (None,))[0]
            out.append("| " + " | ".join(_md_cells(r)[:-1] + [f"note {k}" if k else ""]) + " |")
        for name, r in d.get("baselines", {}).items():
            out.append("| " + " | ".join(_baseline_cells(name, r)) + " |")
        h = d["host"]
        out += ["", "Notes:", ""] + [f"{k}. **{t}**: {n}" for t, (k, n) in notes.items()]
        out += [
            "",
            STATUS_LEGEND,
            "",
            "![latency](latency.png)",
            "",
            "![per-layer parity of the reduced-precision targets](parity.png)",
            "",
            "![white box of the model](whitebox.png)",
            "",
            f"Host: {h['cpu']}, {h.get('cores_usable', h.get('cores'))} cores, ISA {' '.join(h.get('isa', []))}; "
            f"{h['platform']}, Python {h['python']}.",
            "",
            "Libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(d["libraries"].items())),
            "",
            f"Time: {d['seconds']['total']:.0f} s (compile {d['seconds']['compile']:.0f} s, parity {d['seconds']['parity']:.0f} s, "
            f"bench {d['seconds']['bench']:.0f} s); {d['reused']} of {d['compiled']} artifacts reused from an earlier run.",
        ]
        return "\n".join(out) + "\n"

    def html(self, images: dict[str, bytes]) -> str:
        """Self-contained: styles inline, the charts embedded as data URIs."""
        d = self.data
        head = HEADER
        rows = []
        notes = self.notes()
        for r in self.rows:
            cls = {"ok": "ok", "FAIL": "fail"}.get(r["status"], "other")
            cells = "".join(f"<td>{html.escape(c)}</td>" for c in _md_cells(r)[:-1])
            k = notes.get(r["target"], (None,))[0]
            cells += f'<td><a href="#note-{k}">note {k}</a></td>' if k else "<td></td>"
            rows.append(f'<tr class="{cls}" data-target="{html.escape(r["target"])}">{cells}</tr>')
        note_list = "".join(
            f'<li id="note-{k}" data-target="{html.escape(t)}"><b>{html.escape(t)}</b>: {html.escape(n)}</li>'
            for t, (k, n) in notes.items()
        )
        for name, r in d.get("baselines", {}).items():
            rows.append('<tr class="baseline">' + "".join(f"<td>{html.escape(c)}</td>" for c in _baseline_cells(name, r)) + "</tr>")

        def img(name, alt):
            if name not in images:
                return ""
            b64 = base64.b64encode(images[name]).decode()
            return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"><figcaption>{html.escape(alt)}</figcaption></figure>'

        h = d["host"]
        libs = "".join(f"<li>{html.escape(k)} {html.escape(str(v))}</li>" for k, v in sorted(d["libraries"].items()))
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>crate-edge demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; width: 100%; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: right; white-space: nowrap; }}
td:first-child, td:nth-child(2), td:nth-child(3), td:last-child, th:first-child {{ text-align: left; }}
td:last-child {{ text-align: left; }}
.scroll {{ overflow-x: auto; }}
th {{ background: #f3f3f3; position: sticky; top: 0; white-space: normal; vertical-align: bottom; }}
tr.fail td:nth-child(3) {{ color: #b00; font-weight: bold; }}
tr.other td {{ color: #777; }}
tr.baseline td {{ background: #fafafa; font-style: italic; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 0.9em; }}
.meta {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>crate-edge demo</h1>
<p>{html.escape(d["model"]["label"])}. Parity on {d["parity"]["n"]} held-out images of {html.escape(d["parity"]["data"])}
against the eager model; speed: {d["bench"]["threads"]} threads, p50 latency, speed-up against eager upstream
(measured side by side in one run). Reduced-precision targets are also checked per layer (ISTA support IoU,
coding rate R<sup>c</sup>).</p>
<div class="scroll"><table id="results"><thead><tr>{"".join(f"<th>{html.escape(c)}</th>" for c in head)}</tr></thead>
<tbody>{"".join(rows)}</tbody></table></div>
<p class="meta">{html.escape(STATUS_LEGEND)}</p>
<ol class="meta notes">{note_list}</ol>
{img("latency.png", "latency at batch 1 and 32 (p50, bars p10-p90)")}
{img("parity.png", "per-layer parity of the reduced-precision targets")}
{img("whitebox.png", "white box of the model: coding rate and sparsity per layer")}
<h2>Host</h2>
<p class="meta">{html.escape(h["cpu"])}, {h.get("cores_usable", h.get("cores"))} cores; ISA {html.escape(" ".join(h.get("isa", [])))};
{html.escape(h["platform"])}; Python {html.escape(h["python"])}.</p>
<ul class="meta">{libs}</ul>
<p class="meta">Time: {d["seconds"]["total"]:.0f} s (compile {d["seconds"]["compile"]:.0f} s, parity {d["seconds"]["parity"]:.0f} s,
bench {d["seconds"]["bench"]:.0f} s); {d["reused"]} of {d["compiled"]} artifacts reused from an earlier run.</p>
</body></html>
"""


HEADER = ["target", "precision", "status", "top-1 agreement", "max abs diff", "min cosine", "min ISTA IoU", "max R^c rel"]
HEADER += [h for b in BATCHES for h in (f"batch {b} ms", f"batch {b} speed-up")] + ["note"]


def _baseline_cells(name: str, r: dict) -> list[str]:
    """An eager baseline's row: its p50 per batch; eager upstream is the speed-ups' reference."""
    cells = [name, "fp32", "eager", "", "", "", "", ""]
    for b in BATCHES:
        cells += [f"{r[str(b)]['p50_ms']:.2f}" if str(b) in r else "-", "1.00x" if name == "eager upstream" else ""]
    return cells + ["baseline"]


def _md_cells(r: dict) -> list[str]:
    p = r.get("parity") or {}
    s = r.get("speed") or {}

    def f(v, fmt, suffix=""):
        return "-" if v is None else format(v, fmt) + suffix

    cells = [
        r["target"],
        r["precision"],
        r["status"],
        f(p.get("top1_agreement") and 100 * p["top1_agreement"], ".2f", "%"),
        f(p.get("max_abs"), ".1e"),
        f(p.get("min_cosine"), ".5f"),
        f(p.get("min_support_iou"), ".3f"),
        f(None if p.get("max_coding_rate_rel") is None else 100 * p["max_coding_rate_rel"], ".2f", "%"),
    ]
    for b in BATCHES:
        x = s.get(str(b), {})
        cells += [f(x.get("p50_ms"), ".2f"), f(x.get("speedup"), ".2f", "x")]
    return cells + [r.get("note", "")]


def demo(targets=None, out="out/demo", model=None, threads: int | None = None, log=None) -> DemoReport:
    """The whole toolchain on `model` (default: the embedded model): module docstring.
    `targets`: names (default: every target). Returns the DemoReport it also wrote to `out`."""
    t0 = time.perf_counter()
    emit = log or (lambda s: print(s, file=sys.stderr, flush=True))

    def say(s: str) -> None:
        emit(f"[{time.perf_counter() - t0:5.0f} s] {s}")

    src = load_model(model)
    names = list(targets) if targets else list_targets()
    known = set(list_targets())
    bad = [n for n in names if n not in known and not Path(n).suffix == ".toml"]
    if bad:
        raise CrateEdgeError(f"unknown target(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    out = Path(out)
    rows: dict[str, dict] = {}
    tlist = [load_target(n) for n in names]
    for t in tlist:
        rows[t.name] = {"target": t.name, "backend": t.backend, "precision": t.precision, "device": t.device, "status": "", "note": ""}
    with owned_dir(out, "demo", dirs=("artifacts",)) as d:
        art_root = d / "artifacts"
        # 1. compile (plain builds for speed, probe builds of the reduced targets for per-layer parity)
        t1 = time.perf_counter()
        compilable = []
        for t in tlist:
            ok, why = get_backend(t.backend).available(t)
            if ok:
                compilable.append(t)
            else:
                rows[t.name].update(status="skipped", note=f"cannot compile here: {why}")
        reused = []
        built, failed = _compile(src, compilable, art_root, "", say, reused)
        reduced = [t for t in compilable if _reduced(t) and t.name in built]
        probes, pfailed = _compile(src, reduced, art_root, "probe-", say, reused, probe=True)
        for name, why in {**failed, **pfailed}.items():
            rows[name].update(status="FAIL", note=f"compile failed: {why}")
        t_compile = time.perf_counter() - t1

        # 2. parity: one pass over the held-out images for every artifact (probe builds where built)
        t1 = time.perf_counter()
        checked = {n: probes.get(n, a) for n, a in built.items() if n not in pfailed}
        say(f"[demo] parity of {len(checked)} artifacts against the eager model")
        rep = parity(list(checked.values()), reference=src, data="embedded", progress=False)
        for r in rep.results:
            ls = r.layers or []
            row = rows[r.target]
            row["parity"] = {
                "executor": r.executor,
                "top1_agreement": r.logits["top1_agreement"],
                "max_abs": r.logits["max_abs"],
                "min_cosine": r.logits["min_cosine"],
                "top1": r.logits.get("artifact_top1"),
                "min_support_iou": min((x["support_iou_mean"] for x in ls), default=None),
                "max_coding_rate_rel": max((x["coding_rate_rel"] for x in ls), default=None),
                "passed": r.passed,
                "failures": r.failures,
            }
            row["status"] = "ok" if r.passed else "FAIL"
            if not r.passed:
                row["note"] = "; ".join(r.failures)[:200]
        t_parity = time.perf_counter() - t1

        # 3. bench: what executes here, side by side with the eager baselines
        t1 = time.perf_counter()
        runs = {n: a for n, a in built.items() if a.executor == get_backend(a.manifest["backend"]["name"]).name}
        for n, a in built.items():
            if n not in runs:
                what = "compiled; parity on " + a.executor
                rows[n]["note"] = (
                    rows[n]["note"] + "; " if rows[n]["note"] else ""
                ) + f"{what}; not benchmarked (its runtime cannot execute here)"
                if rows[n]["status"] == "ok":
                    rows[n]["status"] = "stand-in"
        say(f"[demo] bench: {len(runs)} artifacts and eager upstream / folded at batch {', '.join(map(str, BATCHES))}")
        br = bench(
            [a.path for a in runs.values()], batch=BATCHES, threads=threads, model=src, baselines=("upstream", "folded"), iters=20, rounds=4
        )
        baselines: dict[str, dict] = {}
        for c in br.contenders:
            speed = {
                b: {"p50_ms": r["p50_ms"], "speedup": r.get("speedup_vs_upstream"), "throughput_ips": r.get("throughput_ips")}
                for b, r in c["results"].items()
                if "p50_ms" in r
            }
            target = (c.get("target") or "") if c.get("kind") != "baseline" else None
            name = c["name"]
            match = target if target in runs else None
            if match is not None:
                rows[match]["speed"] = speed
            else:
                baselines[name] = speed
        t_bench = time.perf_counter() - t1

        # 4. report
        lib = {}
        for a in built.values():
            lib.update(a.manifest["backend"].get("versions", {}))
        host = host_info(torch_info=True)
        lib.update({k: v for k, v in (host.get("libraries") or {}).items() if v})
        data = {
            "format": FORMAT,
            "version": 1,
            "model": {
                "label": _label(src, model),
                "sha256": next(iter(built.values())).manifest["source_model"]["sha256"] if built else None,
            },
            "targets": [rows[t.name] for t in tlist],
            "baselines": baselines,
            "parity": {"n": rep.n, "data": rep.data, "reference_top1": rep.reference.get("top1")},
            "bench": {"threads": br.data["settings"]["threads"], "batch": list(BATCHES)},
            "host": host,
            "libraries": lib,
            "compiled": len(built) + len(probes),
            "reused": len(reused),
            "seconds": {"compile": t_compile, "parity": t_parity, "bench": t_bench, "total": time.perf_counter() - t0},
        }
        report = DemoReport(data)
        images = _charts(d, br, rep, src)
        atomic_write(d / "report.json", json.dumps(data, indent=1, default=str) + "\n")
        atomic_write(d / "report.md", report.markdown())
        atomic_write(d / "report.html", report.html(images))
    return report


def _label(src, model) -> str:
    c = src.cfg
    what = "embedded reference model (Fashion-MNIST)" if model in (None, "embedded") else f"model {model}"
    return (
        f"{what}: CRATE dim {c.dim}, depth {c.depth}, {c.heads} heads, patch {c.patch_size} on {c.image_size}x{c.image_size}x{c.channels}"
    )


def _compile(src, tlist, root: Path, prefix: str, say, reused: list, probe: bool = False):
    """compile_each, with a line per target and which artifacts were reused."""
    if not tlist:
        return {}, {}
    logs: list[str] = []

    def log(s):
        logs.append(s)
        if s.startswith("[") and ("reusing" in s or "compiled in" in s or "[skip]" in s or "failed" in s):
            say(s)
            if "reusing" in s:
                reused.append(s)

    say(f"[demo] compiling {len(tlist)} {'probe builds' if probe else 'targets'} into {root}")
    with owned_dir(root, "artifacts", dirs=tuple(prefix + t.name for t in tlist) + _existing(root)):
        built, skipped = compile_each(src, tlist, root, prefix=prefix, reuse=True, log=log, probe=probe)
    return built, skipped


def _existing(root: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))) if root.is_dir() else ()


def _charts(d: Path, br, rep, src) -> dict[str, bytes]:
    """latency.png (bench), parity.png (per layer, probe builds), whitebox.png (the model), drawn
    in a scratch directory and written into `d` atomically."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    ds = load_dataset("embedded")
    wb = measure(src, prepare(ds.images[:256], src.cfg))
    images = {}
    with tempfile.TemporaryDirectory(prefix="crate-demo-") as td:
        br.plot(Path(td) / "latency.png")
        rep.plot(Path(td) / "parity.png")
        wb.plot(Path(td) / "whitebox.png", title="the model's white box: 256 held-out images")
        for name in ("latency.png", "parity.png", "whitebox.png"):
            images[name] = (Path(td) / name).read_bytes()
            atomic_write(d / name, images[name])
    return images
