"""Each reduced-precision CPU artifact against the same backend's fp32 artifact (the int8 speed-up
over fp32), in ONE process with interleaved rounds, beside eager upstream and what a user would
pick instead (torch.compile; OpenVINO f32, default precision and NNCF int8 with the `openvino`
extra), against this host's GEMM floors measured in the same run.

    python bench/quant_speed.py [--model tiny] [--threads 2] [--batch 1] [--artifacts DIR]

Timing: bench._common.time_rounds, with the CPU idle again before every contender's block (a
runtime whose threads keep spinning after a call would slow the next one), run twice, in the
contenders' order and reversed; both medians are recorded and the table gives the first and
the largest difference between the two. Floors: GEMM FLOPs per image (bench/table.py's count)
over this host's ceilings measured here (bench/table.py's gemm_ceilings on the model's
(tokens x d) x (d x d) shape, before the forward run, between the runs and after the reversed
one; each run is held to the mean of the measurements either side of it, since a shared host's
speed drifts between minutes): fp32 (every GEMM at the fp32 ceiling), int8 under the CRATE policy
(weight GEMMs at the int8 ceiling, the attention products at fp32), int8 everywhere, bf16.
Fraction of floor = floor ms / median ms, each contender against its own precision's floor (an
int8 one that quantizes the attention products too against int8 everywhere; every int8 one also
against the CRATE-policy floor, in its own column). Every result records the host's ISA. Artifacts are
compiled into --artifacts, in a child process (--compile-only), and reused only when built from
the same model and target for this host's CPU (crate_edge.isa). The child matters: on a 2-core
AMX Xeon, tvm-int8 timed 5.33 ms in the process that had just compiled the artifacts and 4.26 ms
in a fresh one that reused them (4.2 ms alone), the other contenders alike within noise.
Writes bench/results/quant_speed_<model>_b<batch>_t<threads>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import crate_edge  # noqa: E402
from bench import baselines  # noqa: E402
from bench._common import time_rounds, write_tables  # noqa: E402
from bench.table import gemm_ceilings, gemm_flops  # noqa: E402
from crate_edge.compiler import compile_each  # noqa: E402
from crate_edge.host import host_info  # noqa: E402
from crate_edge.metrics import logit_parity  # noqa: E402
from crate_edge.quantize import INT8_ATTENTION, QuantConfig, calibration_images  # noqa: E402
from crate_edge.targets import load_target  # noqa: E402

PAIRS = [("executorch", "executorch-int8"), ("onnxruntime", "onnxruntime-int8"), ("tvm", "tvm-int8")]
UPSTREAM = "eager upstream"


def floors(cfg, ceil: dict, batch: int) -> dict[str, float | None]:
    """Minimum ms per batch at this host's GEMM ceilings (module docstring)."""
    fl = gemm_flops(cfg)
    attn = cfg.depth * fl["attention_products_per_layer"]
    g = {p: (ceil[p]["gflops"] or 0.0) * 1e9 for p in ("fp32", "bf16", "int8")}
    ms = lambda flops, rate: batch * flops / rate * 1e3 if rate else None  # noqa: E731
    return {
        "fp32_upstream": ms(fl["upstream"], g["fp32"]),
        "fp32": ms(fl["folded"], g["fp32"]),
        "bf16": ms(fl["folded"], g["bf16"]),
        "int8_crate_policy": None if not g["int8"] else batch * ((fl["folded"] - attn) / g["int8"] + attn / g["fp32"]) * 1e3,
        "int8_everything": ms(fl["folded"], g["int8"]),
    }


def window(c1: dict, c2: dict) -> dict:
    """The ceilings of the minutes between two gemm_ceilings measurements: each precision's rate
    the mean of the two (None where neither has one)."""
    out = dict(c1)
    for p in ("fp32", "bf16", "int8"):
        r = [c[p]["gflops"] for c in (c1, c2) if c.get(p, {}).get("gflops")]
        out[p] = {**c1[p], "gflops": sum(r) / len(r) if r else None}
    return out


def floor_of(name: str, precision: str | None, int8_attention: bool = False) -> str:
    """Which floor a contender is held to: its own precision's. An int8 contender that also
    quantizes the attention products (NNCF does; a crate-edge target with [quantize] attention =
    "int8" does where its kernel ran) is held to int8 everywhere, the others to the CRATE policy."""
    if name in (UPSTREAM, "torch.compile"):
        return "fp32_upstream"  # the upstream formulation: three ISTA GEMMs
    if "int8" in name:
        return "int8_everything" if int8_attention or name.startswith("openvino") else "int8_crate_policy"
    return "bf16" if precision == "bf16" else "fp32"


def int8_attention(manifest: dict) -> bool:
    """Whether an artifact's attention products ran in int8 (its precision map says so)."""
    return INT8_ATTENTION in (manifest.get("precision") or {}).get("detail", {})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "embedded"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--no-baselines", action="store_true", help="Only eager upstream and the crate-edge targets")
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts" / "speed"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument(
        "--compile-only", action="store_true", help="Compile (or keep) the artifacts, then exit: what the timed run starts in a child"
    )
    a = ap.parse_args()
    if not a.compile_only:
        # the compilers' leftovers in this process slowed the runtimes timed after them (docstring)
        cmd = [sys.executable, __file__, "--model", a.model, "--artifacts", a.artifacts, "--compile-only"]
        if subprocess.run(cmd).returncode != 0:
            sys.exit("quant_speed: compiling the artifacts failed (output above)")
    torch.set_num_threads(a.threads)
    if a.model == "tiny":
        torch.manual_seed(0)
        model, label = crate_edge.create_model("tiny", num_classes=10).eval(), "CRATE-Tiny/16 at 224 (random weights)"
    else:
        model, label = crate_edge.load_model(), "embedded reference model (28x28)"
    arts, skipped = compile_each(model, [t for p in PAIRS for t in p], a.artifacts, prefix=f"{a.model}-", reuse=True, parity_limit=200)
    if a.compile_only:
        return
    x = np.random.default_rng(0).standard_normal((a.batch, *model.cfg.input_shape)).astype(np.float32)
    host = host_info(torch_info=True)
    print(f"host: {host['cpu']}, ISA {' '.join(host['isa'])}", file=sys.stderr)

    n_tok = (model.cfg.num_patches + 1) * a.batch

    def measure_ceilings(when: str) -> dict:
        print(
            f"GEMM ceilings on ({n_tok} x {model.cfg.dim}) x ({model.cfg.dim} x {model.cfg.dim}), {a.threads} threads, {when}",
            file=sys.stderr,
        )
        return gemm_ceilings(n_tok, model.cfg.dim, model.cfg.dim, a.threads, 0.5)

    def eager(inp):
        with torch.no_grad():
            return model(torch.from_numpy(inp)).numpy()

    fns = {UPSTREAM: eager, **arts}
    precision = {k: v.manifest["target"]["definition"].get("precision", "fp32") for k, v in arts.items()}
    att8 = {k for k, v in arts.items() if int8_attention(v.manifest)}
    if not a.no_baselines:
        f, s = baselines.torch_compile(model, x)
        fns.update(f)
        skipped.update(s)
        cal = calibration_images(model.cfg, QuantConfig.from_target(load_target("onnxruntime-int8"))).numpy()
        f, s = baselines.openvino(model, x, cal, a.threads)
        fns.update(f)
        skipped.update(s)
        precision.update({k: "int8" if "int8" in k else fn.precision or "fp32" for k, fn in f.items()})
    # parity of every contender against eager upstream on the same 32 held-out images
    from crate_edge.data import open_inputs

    px, py = open_inputs("embedded", model.cfg, "test").first(32).tensors()
    ref = np.concatenate([eager(px[i : i + 1].numpy()) for i in range(len(px))])
    parity = {}
    for k, fn in fns.items():
        got = np.concatenate([np.asarray(fn(px[i : i + 1].numpy()))[:1] for i in range(len(px))])
        p = logit_parity(ref, got, None)
        parity[k] = {"top1_agreement": p["top1_agreement"], "min_cosine": p["min_cosine"], "max_abs": p["max_abs"]}

    runs, busy = [], [{}, {}]
    samples = [measure_ceilings("before the forward run")]
    for i, order in enumerate((list(fns), list(fns)[::-1])):
        print(f"timing, {'forward' if i == 0 else 'reversed'} order", file=sys.stderr)
        t = time_rounds({k: fns[k] for k in order}, x, 5, a.rounds, a.per_round, busy=busy[i])
        runs.append(t)
        samples.append(measure_ceilings(f"after the {'forward' if i == 0 else 'reversed'} run"))
    # each run against the ceilings of its own minutes (the mean of the samples either side):
    # a shared host drifts by 10% between minutes, and all of a run's contenders with it
    ceil, ceil_rev = window(samples[0], samples[1]), window(samples[1], samples[2])
    floor_ms, floor_rev = floors(model.cfg, ceil, a.batch), floors(model.cfg, ceil_rev, a.batch)
    times = runs[0]
    med = {k: float(np.median(v)) for k, v in times.items()}
    med_rev = {k: float(np.median(v)) for k, v in runs[1].items()}
    contenders = {}
    for k in fns:
        fk = floor_of(k, precision.get(k), k in att8)
        a8 = fk == "int8_everything"  # its attention products are int8 too (NNCF's, or att8)
        fm = floor_ms.get(fk)
        policy = floor_ms.get("int8_crate_policy") if "int8" in k else None
        contenders[k] = {
            "median_ms": med[k],
            "median_ms_reversed": med_rev[k],
            "order_difference": abs(med[k] - med_rev[k]) / med[k],
            "p90_ms": float(np.percentile(times[k], 90)),
            "precision": precision.get(k, "fp32"),
            "floor": fk,
            "floor_ms": fm,
            "fraction_of_floor": fm / med[k] if fm else None,
            "fraction_of_floor_reversed": floor_rev[fk] / med_rev[k] if floor_rev.get(fk) else None,
            # every int8 contender against the CRATE-policy floor too (float attention products at the
            # fp32 ceiling), which one that quantizes attention can beat: read with int8_attention
            "int8_attention": a8,
            "fraction_of_int8_policy_floor": policy / med[k] if policy else None,
            "vs_upstream": med[UPSTREAM] / med[k],
            "cpu_busy_before_blocks_max": float(max(busy[0].get(k, [0.0]))),
            "parity_vs_eager": parity[k],
        }
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
        "host": host,
        "median_ms": med,
        "p90_ms": {k: float(np.percentile(v, 90)) for k, v in times.items()},
        "rows": rows,
        "skipped": skipped,
        "gemm_ceilings": ceil,
        "gemm_ceilings_reversed": ceil_rev,
        "gemm_ceiling_samples": samples,
        "floors_ms": floor_ms,
        "floors_ms_reversed": floor_rev,
        "contenders": contenders,
        "timing": "time_rounds with settle() before every block, forward then reversed order; median_ms from the forward run",
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
    g = {p: ceil[p]["gflops"] for p in ("fp32", "bf16", "int8")}
    lines += [
        "",
        f"Host: {host['cpu']}, ISA {' '.join(host['isa'])}. GEMM ceilings measured in this run on {ceil['shape']} "
        "(mean of the measurements before and after the forward run; before / after the forward / after the reversed run): "
        + ", ".join(
            f"{p} {v:.0f} G/s ({ceil[p]['how']}; " + " / ".join(f"{c[p]['gflops'] or 0:.0f}" for c in samples) + ")"
            for p, v in g.items()
            if v
        )
        + ". Floors (ms): "
        + ", ".join(f"{k} {v:.2f}" for k, v in floor_ms.items() if v)
        + ".",
        "",
        "| contender | precision | median ms | reversed order ms | p90 ms | vs eager upstream | floor | fraction of floor "
        "| of the int8 policy floor | top-1 agreement / min cosine vs eager |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    pct = lambda v: f"{100 * v:.0f}%" if v else "-"  # noqa: E731
    for k, c in sorted(contenders.items(), key=lambda kv: kv[1]["median_ms"]):
        p = c["parity_vs_eager"]
        prec = c["precision"] + (" (attention int8)" if c["int8_attention"] else "")
        lines.append(
            f"| {k} | {prec} | {c['median_ms']:.2f} | {c['median_ms_reversed']:.2f} | {c['p90_ms']:.2f} | "
            f"{c['vs_upstream']:.2f}x | {c['floor']} | {pct(c['fraction_of_floor'])} | {pct(c['fraction_of_int8_policy_floor'])} | "
            f"{100 * p['top1_agreement']:.1f}% / {p['min_cosine']:.5f} |"
        )
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
