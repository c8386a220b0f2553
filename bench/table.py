"""Regenerate the performance tables of docs/results.md: every target and precision that compiles and runs
here, against eager PyTorch, with a roofline.

    python bench/table.py [--threads 2] [--batch 1,32] [--iters 30] [--targets ...] [--quick]

Models: CRATE-Tiny/16 at 224 (random weights, torch.manual_seed(0)) and the embedded reference
model. Targets: crate_edge.targets.list_targets(), keeping those whose backend can compile and
run here (a target that cannot, or whose compile or parity check fails, is listed with the
reason). Timing: crate_edge.bench (interleaved rounds, one worker process per contender,
same inputs and threads; ratios against eager upstream).

Roofline: GEMM FLOPs per image counted from the config (upstream: three ISTA GEMMs; folded:
one), checked against torch.utils.flop_counter.FlopCounterMode, over this machine's GEMM
ceilings measured here on a CRATE-like shape (fp32: the faster of torch.mm and ONNX Runtime's
MatMul; bf16: torch.mm; int8: the fastest of torch._int_mm, the x86/fbgemm quantized linear and
ONNX Runtime's u8 x s8 MatMulInteger). It also gives the upper bound on any contender's speed-up
over eager upstream (GEMM time alone at those ceilings). The implied minimum latency
is FLOPs x batch / ceiling: no contender can beat it without skipping work. (FlopCounterMode does not count the CPU
SDPA kernel, so the folded count is checked on the folded model with explicit attention.)

--quick: the embedded model only, batch 1, few iterations, short GEMM measurements (a smoke run).
Writes bench/results/table.{json,md,png} (or --out).

--device cuda (on an NVIDIA host): the same script for the GPU. Contenders: the torch baselines
on the GPU (eager upstream, eager folded/SDPA, torch.compile) and the targets whose artifacts run
on CUDA (aoti-cuda, onnxruntime-cuda where onnxruntime-gpu is installed, tvm-cuda, tensorrt*);
models CRATE-Tiny and CRATE-Base at 224, batch 1 and 256; GPU contenders are timed on
GPU-resident inputs with a synchronize per call; GEMM ceilings from cuBLAS (fp32 with TF32 off,
tf32, bf16, fp16, int8 torch._int_mm). Writes table_gpu.{json,md,png}. --append adds this run's
models to an existing file of the same device (to split a long GPU run into short calls):

    python bench/table.py --device cuda --models tiny --out bench/results
    python bench/table.py --device cuda --models base --out bench/results --append
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import crate_edge  # noqa: E402
from crate_edge.backends import get_backend  # noqa: E402
from crate_edge.bench import FOLDED_REWRITES, bench, parse_batches  # noqa: E402
from crate_edge.compiler import compile_each  # noqa: E402
from crate_edge.errors import CrateEdgeError  # noqa: E402
from crate_edge.rewrites import apply  # noqa: E402
from crate_edge.targets import list_targets, load_target  # noqa: E402


def say(msg: str) -> None:
    print(f"[table] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ FLOPs


def gemm_flops(cfg) -> dict[str, int]:
    """GEMM FLOPs (2 per multiply-add) per image; LayerNorm, softmax and elementwise ops excluded."""
    n = cfg.num_patches + 1
    d, inner = cfg.dim, cfg.heads * cfg.dim_head
    ph, pw = (cfg.patch_size, cfg.patch_size) if isinstance(cfg.patch_size, int) else cfg.patch_size
    patch_dim = cfg.channels * ph * pw
    project_out = not (cfg.heads == 1 and cfg.dim_head == d)
    embed = 2 * cfg.num_patches * patch_dim * d
    mssa = 2 * n * d * inner + 2 * (2 * n * n * inner) + (2 * n * inner * d if project_out else 0)
    head = 2 * d * cfg.num_classes
    if cfg.FAMILY == "crate-alpha":  # D^T x, D z1, D^T (D z1 - x), D1 z2: four d x 4d GEMMs, folded or not
        ista_up = ista_fold = 4 * 2 * n * d * cfg.code_dim
    else:  # CRATE: three d x d GEMMs upstream, one folded
        ista_fold = 2 * n * d * d
        ista_up = 3 * ista_fold
    up = embed + cfg.depth * (mssa + ista_up) + head
    folded = embed + cfg.depth * (mssa + ista_fold) + head
    return {
        "upstream": up,
        "folded": folded,
        "ista_upstream_per_layer": ista_up,
        "ista_folded_per_layer": ista_fold,
        "attention_products_per_layer": 4 * n * n * inner,
    }


def counted_flops(model) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *model.cfg.input_shape)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


# ------------------------------------------------------------------ GEMM ceilings


def _rate(f, flops: float, min_s: float, sync=lambda: None) -> float:
    """GFLOP/s of f; sync() waits for queued work (a GPU's stream) before a clock is read."""
    f()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        f()
        n += 1
        if n % 8 == 0 or n < 8:
            sync()
            el = time.perf_counter() - t0
            if el >= min_s and n >= 3:
                break
    # best of a few short repeats: a ceiling, not a typical value
    best = el / n
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(max(1, n // 3)):
            f()
        sync()
        best = min(best, (time.perf_counter() - t) / max(1, n // 3))
    return flops / best / 1e9


def _ort_gemm_rates(m: int, k: int, n: int, threads: int, min_s: float) -> tuple[float, float]:
    """(fp32 MatMul GFLOP/s, u8 x s8 MatMulInteger GOP/s) of ONNX Runtime's CPU provider."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads

    def sess(op, a_t, y_t, w):
        g = helper.make_graph(
            [helper.make_node(op, ["a", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("a", a_t, [m, k])],
            [helper.make_tensor_value_info("y", y_t, [m, n])],
            [numpy_helper.from_array(w, "w")],
        )
        mod = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        return ort.InferenceSession(mod.SerializeToString(), so, providers=["CPUExecutionProvider"])

    fl = 2.0 * m * k * n
    a = rng.standard_normal((m, k), dtype=np.float32)
    s32 = sess("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, rng.standard_normal((k, n), dtype=np.float32))
    au = rng.integers(0, 255, (m, k), dtype=np.uint8)
    s8 = sess("MatMulInteger", TensorProto.UINT8, TensorProto.INT32, rng.integers(-64, 63, (k, n), dtype=np.int8))
    return _rate(lambda: s32.run(None, {"a": a}), fl, min_s), _rate(lambda: s8.run(None, {"a": au}), fl, min_s)


def gemm_ceilings(m: int, k: int, n: int, threads: int, min_s: float) -> dict:
    """GFLOP/s (GOP/s for int8) of GEMMs of shape (m, k) x (k, n) on this machine: the fastest of
    torch's and ONNX Runtime's kernels per precision (a ceiling, not a typical value)."""
    torch.set_num_threads(threads)
    fl = 2.0 * m * k * n
    out = {"shape": [m, k, n], "threads": threads}
    a, b = torch.randn(m, k), torch.randn(k, n)
    out["fp32"] = {"gflops": _rate(lambda: torch.mm(a, b), fl, min_s), "how": "torch.mm float32"}
    ab, bb = a.bfloat16(), b.bfloat16()
    out["bf16"] = {"gflops": _rate(lambda: torch.mm(ab, bb), fl, min_s), "how": "torch.mm bfloat16"}
    int8 = {}
    try:
        ai = torch.randint(-128, 127, (m, k), dtype=torch.int8)
        bi = torch.randint(-128, 127, (k, n), dtype=torch.int8)
        int8["torch._int_mm"] = _rate(lambda: torch._int_mm(ai, bi), fl, min_s)
    except (RuntimeError, AttributeError) as e:
        int8["torch._int_mm"] = f"unavailable: {str(e).splitlines()[0][:120]}"
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xq = torch.quantize_per_tensor(a, 0.05, 64, torch.quint8)
            wq = torch.quantize_per_tensor(b.t().contiguous(), 0.02, 0, torch.qint8)
            pk = torch.ops.quantized.linear_prepack(wq, None)
            int8[f"quantized.linear ({torch.backends.quantized.engine})"] = _rate(
                lambda: torch.ops.quantized.linear(xq, pk, 0.1, 64), fl, min_s
            )
    except (RuntimeError, AttributeError) as e:
        int8["quantized.linear"] = f"unavailable: {str(e).splitlines()[0][:120]}"
    # ONNX Runtime's MLAS GEMMs (the fastest fp32 and u8s8 kernels measured on this CPU in situ)
    try:
        fp32_ort, int8_ort = _ort_gemm_rates(m, k, n, threads, min_s)
        out["fp32"]["all"] = {"torch.mm": out["fp32"]["gflops"], "onnxruntime MatMul (MLAS)": fp32_ort}
        if fp32_ort > out["fp32"]["gflops"]:
            out["fp32"].update(gflops=fp32_ort, how="onnxruntime MatMul (MLAS)")
        int8["onnxruntime MatMulInteger u8 x s8 (MLAS)"] = int8_ort
    except ImportError as e:
        out["fp32"]["all"] = {"torch.mm": out["fp32"]["gflops"], "onnxruntime": f"unavailable: {e}"}
    good = {k: v for k, v in int8.items() if isinstance(v, float)}
    if good:
        best = max(good, key=good.get)
        out["int8"] = {"gflops": good[best], "how": best, "all": int8}
    else:
        out["int8"] = {"gflops": None, "how": "no int8 GEMM path in torch here", "all": int8}
    return out


def gemm_ceilings_cuda(m: int, k: int, n: int, min_s: float) -> dict:
    """The same ceilings on the current CUDA GPU (cuBLAS through torch.mm): fp32 with TF32 off
    (torch's default, so the fp32 contenders' ceiling), tf32, bf16, fp16 and int8 (torch._int_mm)."""
    fl = 2.0 * m * k * n
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    out = {"shape": [m, k, n], "threads": None, "gpu": torch.cuda.get_device_name(dev)}
    a, b = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        out["fp32"] = {"gflops": _rate(lambda: torch.mm(a, b), fl, min_s, sync), "how": "torch.mm float32 (cuBLAS, TF32 off)"}
        torch.backends.cuda.matmul.allow_tf32 = True
        out["tf32"] = {"gflops": _rate(lambda: torch.mm(a, b), fl, min_s, sync), "how": "torch.mm float32 with TF32"}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        x, y = a.to(dt), b.to(dt)
        out[name] = {"gflops": _rate(lambda: torch.mm(x, y), fl, min_s, sync), "how": f"torch.mm {dt} (cuBLAS)"}
    try:
        ai = torch.randint(-128, 127, (m, k), dtype=torch.int8, device=dev)
        bi = torch.randint(-128, 127, (k, n), dtype=torch.int8, device=dev)
        out["int8"] = {"gflops": _rate(lambda: torch._int_mm(ai, bi), fl, min_s, sync), "how": "torch._int_mm (cuBLASLt int8)"}
    except (RuntimeError, AttributeError) as e:
        out["int8"] = {"gflops": None, "how": f"unavailable: {str(e).splitlines()[0][:120]}"}
    return out


def precision_of(c: dict) -> str:
    if c.get("kind") == "baseline":
        return "fp32"
    p = c.get("target_precision", "fp32")
    return p if p in ("fp32", "bf16", "int8") else ("bf16" if p == "fp16" else "fp32")


def speedup_bound(cfg, fl: dict, ceil: dict, rep) -> dict:
    """The most any contender could gain over eager upstream here, per batch: eager upstream's
    measured p50 over the GEMM time alone at this machine's ceilings (LayerNorm, softmax and the
    elementwise ops counted as free, so real ratios stay below it). fp32: every GEMM at the fp32
    ceiling. int8 under the CRATE policy: the weight GEMMs at the int8 ceiling, the attention
    products (kept float) at the fp32 ceiling. int8 everywhere: all folded FLOPs at the int8 ceiling."""
    g32, g8 = ceil["fp32"]["gflops"], ceil["int8"]["gflops"]
    attn = cfg.depth * fl["attention_products_per_layer"]
    up = next((c for c in rep.contenders if c.get("baseline") == "upstream"), None)
    out = {}
    for b, r in (up or {}).get("results", {}).items():
        if "p50_ms" not in r:
            continue
        n = int(b)
        ms = {"fp32": n * fl["folded"] / g32 * 1e3 / 1e9}
        if g8:
            ms["int8_crate_policy"] = n * ((fl["folded"] - attn) / g8 + attn / g32) * 1e3 / 1e9
            ms["int8_everything"] = n * fl["folded"] / g8 * 1e3 / 1e9
        out[b] = {"upstream_p50_ms": r["p50_ms"], "gemm_only_min_ms": ms, "max_speedup": {k: r["p50_ms"] / v for k, v in ms.items()}}
    return out


# ------------------------------------------------------------------ main


def runnable_targets(names: list[str] | None, device: str = "cpu") -> tuple[list[str], dict[str, str]]:
    """The targets to measure (default: every target whose artifacts execute on `device`) and,
    for those that cannot compile or run here, why."""
    keep, skipped = [], {}
    # on "cpu", Core ML targets ("apple") are listed too, so that they show with why they cannot run here
    for name in names or [n for n in list_targets() if load_target(n).device in (device, "apple" if device == "cpu" else device)]:
        t = load_target(name)
        be = get_backend(t.backend)
        ok, why = be.available(t)
        if not ok:
            skipped[name] = f"cannot compile here: {why}"
            continue
        ok, why = be.available(t, run=True)
        if not ok:
            skipped[name] = f"cannot run here: {why}"
            continue
        keep.append(name)
    return keep, skipped


def model_for(name: str):
    if name in ("tiny", "small", "base", "large"):
        torch.manual_seed(0)
        return crate_edge.create_model(name, num_classes=10).eval(), f"CRATE-{name.title()}/16 at 224 (random weights, seed 0)"
    if name.startswith("alpha-") and f"crate-{name}" in crate_edge.VARIANTS:  # alpha-base: CRATE-α-B/16 at 224
        torch.manual_seed(0)
        m = crate_edge.create_model(f"crate-{name}", num_classes=10).eval()
        p = m.cfg.patch_size
        return m, f"CRATE-α-{name[6:7].upper()}/{p} at 224 (random weights, seed 0)"
    if name != "embedded":
        raise CrateEdgeError(
            f"unknown model {name!r}: tiny, small, base, large, alpha-tiny, alpha-small, alpha-base, alpha-large or embedded"
        )
    return crate_edge.load_model(), "embedded reference model (28x28 Fashion-MNIST)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        default=None,
        help="Comma-separated: tiny, small, base, large, alpha-base (CRATE-α), ..., embedded (default tiny,embedded; --quick: embedded)",
    )
    ap.add_argument("--targets", nargs="*", default=None, help="Targets to try (default: every target in list_targets())")
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: the CPU targets and baselines; cuda: the GPU targets and the torch baselines on the GPU",
    )
    ap.add_argument("--threads", type=int, default=None, help="Threads for every contender (default: 2 on cpu, the usable cores on cuda)")
    ap.add_argument("--batch", default=None, help="Batch sizes (default 1,32; cuda: 1,256; --quick: 1)")
    ap.add_argument("--iters", type=int, default=None, help="Timed calls per contender and batch (default 30; --quick: 6)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--baselines", default="upstream,folded,compile", help="Comma-separated baselines, or none")
    ap.add_argument("--quick", action="store_true", help="Smoke run: embedded model, batch 1, few iterations")
    ap.add_argument("--artifacts", default=None, help="Keep compiled artifacts here (default: a temporary directory)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--append", action="store_true", help="Add this run's models to the existing table file in --out (same device)")
    a = ap.parse_args(argv)

    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise CrateEdgeError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU here")
    models = (a.models or ("embedded" if a.quick else "tiny,base" if cuda else "tiny,embedded")).split(",")
    batches = parse_batches(a.batch or ("1" if a.quick else "1,256" if cuda else "1,32"))
    threads = a.threads or (len(os.sched_getaffinity(0)) if cuda and hasattr(os, "sched_getaffinity") else 2)
    iters = a.iters or (6 if a.quick else 30)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    baselines = () if a.baselines == "none" else tuple(b for b in a.baselines.split(",") if b)
    out = Path(a.out)
    stem = "table_gpu" if cuda else "table"
    settings = {"device": a.device, "threads": threads, "batch": list(batches), "iters": iters, "warmup": warmup, "quick": a.quick}
    prev = None
    if a.append and (out / f"{stem}.json").exists():
        prev = json.loads((out / f"{stem}.json").read_text())
        if prev["settings"].get("device", "cpu") != a.device:
            raise CrateEdgeError(
                f"--append: {out / (stem + '.json')} was measured on {prev['settings'].get('device', 'cpu')}, this run is {a.device}"
            )
    targets, skipped_all = runnable_targets(a.targets, a.device)
    for k, v in skipped_all.items():
        say(f"skip {k}: {v}")
    art_root = Path(a.artifacts) if a.artifacts else Path(tempfile.mkdtemp(prefix="crate-table-"))
    big = max(batches)
    result = {"settings": settings, "models": {}, "targets_skipped": skipped_all}

    # GEMM ceilings on CRATE's ISTA GEMM shape (tokens x width) x (width x width) of the first model,
    # at the smallest and the largest batch's token count; per precision the best of them
    m0, _ = model_for(models[0])
    d0 = m0.cfg.dim
    per_shape = []
    for b in sorted({min(batches), big}):
        n_tok = (m0.cfg.num_patches + 1) * b
        say(f"GEMM ceilings: ({n_tok} x {d0}) x ({d0} x {d0}), " + ("CUDA" if cuda else f"{threads} threads"))
        min_s = 0.05 if a.quick else 0.5
        per_shape.append(gemm_ceilings_cuda(n_tok, d0, d0, min_s) if cuda else gemm_ceilings(n_tok, d0, d0, threads, min_s))
    precs = ("fp32", "tf32", "bf16", "fp16", "int8") if cuda else ("fp32", "bf16", "int8")
    ceil = {
        "shapes": [c["shape"] for c in per_shape],
        "threads": None if cuda else threads,
        "per_shape": per_shape,
        "precisions": list(precs),
    }
    for prec in precs:
        best = max(per_shape, key=lambda c: c[prec]["gflops"] or 0.0)
        ceil[prec] = {**best[prec], "shape": best["shape"]}
    result["gemm_ceilings"] = ceil
    say("  " + ", ".join(f"{p} {ceil[p]['gflops']:.1f} G/s ({ceil[p]['how']})" for p in precs if ceil[p]["gflops"]))

    reports = {}
    if prev is not None:  # earlier models of the same device: kept as measured (their own ceilings and date)
        for k, v in prev["models"].items():
            if k not in models:
                v.setdefault("gemm_ceilings", prev["gemm_ceilings"])
                result["models"][k] = v
        for k, v in prev.get("targets_skipped", {}).items():
            result["targets_skipped"].setdefault(k, v)

    for mname in models:
        model, label = model_for(mname)
        fl = gemm_flops(model.cfg)
        fl["counted_upstream"] = counted_flops(model)
        # FlopCounterMode has no formula for CPU SDPA (_scaled_dot_product_flash_attention_for_cpu):
        # the folded count is checked on the same rewrites with explicit attention (same products)
        fl["counted_folded"] = counted_flops(apply(model, [r for r in FOLDED_REWRITES if r != "sdpa_attention"]))
        fl["counted_folded_note"] = "FlopCounterMode on the folded model with explicit attention (it does not count CPU SDPA)"
        fl["analytic_matches_counter"] = fl["counted_upstream"] == fl["upstream"] and fl["counted_folded"] == fl["folded"]
        say(
            f"{label}: {fl['upstream'] / 1e9:.3f} GFLOP/image upstream, {fl['folded'] / 1e9:.3f} folded "
            f"(FlopCounterMode: {fl['counted_upstream'] / 1e9:.3f}, {fl['counted_folded'] / 1e9:.3f})"
        )
        built, skipped = compile_each(model, targets, art_root, prefix=f"{mname}-", parity_limit=200, log=say)
        arts = [art.path for art in built.values()]
        rep = bench(
            arts,
            batch=batches,
            threads=threads,
            warmup=warmup,
            iters=iters,
            model=model if mname != "embedded" else None,
            baselines=baselines,
            label=label,
            device=a.device,
        )
        rep.data["skipped"].update(skipped)
        roof = {}
        for c in rep.contenders:
            prec = precision_of(c)
            g = ceil.get(prec, {}).get("gflops")
            flops = fl["upstream"] if c.get("baseline") == "upstream" else fl["folded"]
            for b, r in c["results"].items():
                if "p50_ms" not in r or not g:
                    continue
                floor = int(b) * flops / (g * 1e9) * 1e3
                r["roofline"] = {
                    "precision": prec,
                    "ceiling_gflops": g,
                    "gemm_flops": int(b) * flops,
                    "min_ms": floor,
                    "fraction_of_ceiling": floor / r["p50_ms"],
                }
        for prec in ("fp32", "bf16", "int8"):
            g = ceil[prec]["gflops"]
            roof[prec] = (
                {
                    str(b): {"upstream_min_ms": b * fl["upstream"] / (g * 1e9) * 1e3, "folded_min_ms": b * fl["folded"] / (g * 1e9) * 1e3}
                    for b in batches
                }
                if g
                else None
            )
        result["models"][mname] = {
            "label": label,
            "flops": fl,
            "roofline_min_ms": roof,
            "bench": rep.to_dict(),
            "speedup_bound": speedup_bound(model.cfg, fl, ceil, rep),
            "gemm_ceilings": ceil,
        }
        reports[mname] = rep
        result["host"] = rep.data["host"]
        write(result, out, stem)  # after each model: a long run that is cut short keeps what it measured

    md = write(result, out, stem)
    from crate_edge.bench import BenchReport

    plot({k: reports.get(k) or BenchReport(v["bench"]) for k, v in result["models"].items()}, out / f"{stem}.png")
    print(md)
    say(f"wrote {out}/{stem}.json, {stem}.md, {stem}.png")
    return result


def write(result: dict, out: Path, stem: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{stem}.json.part"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / f"{stem}.json")
    md = render_md(result)
    (out / f"{stem}.md").write_text(md)
    return md


def render_md(result: dict) -> str:
    s = result["settings"]
    h = result["host"]
    gpu = s.get("device") == "cuda"
    dates = sorted({m["bench"]["date"][:10] for m in result["models"].values()})
    where = (
        f"GPU {h.get('gpu')} (host CPU {h['cpu']}, {h['cores']} cores)" if gpu else f"{h['cpu']} ({h['cores']} cores, {' '.join(h['isa'])})"
    )
    hosts = {
        (m["bench"].get("host") or h).get("cpu", "") + " ".join((m["bench"].get("host") or h).get("isa", []))
        for m in result["models"].values()
    }
    if len(hosts) > 1:  # models appended from runs on different CPUs: each names its own
        where = "the host named under each model (they differ)"
    lines = [
        f"Measured {', '.join(dates)} on {where}, {s['threads']} threads; p50 over {s['iters']} calls per contender in "
        "interleaved rounds, same inputs; speed-up = eager upstream p50 / p50; peak RSS = the contender's own process"
        + ("; GPU contenders timed on GPU-resident inputs with a synchronize per call (no host<->device copies)." if gpu else "."),
        "",
    ]
    for mname, m in result["models"].items():
        fl = m["flops"]
        mh = m["bench"].get("host") or h
        alpha = fl["ista_upstream_per_layer"] == fl["ista_folded_per_layer"]
        lines += [
            f"**{m['label']}**: {fl['upstream'] / 1e9:.3f} GFLOP/image upstream ("
            + ("4 ISTA GEMMs on the 4d-wide code, as folded" if alpha else "3 ISTA GEMMs")
            + f"), {fl['folded'] / 1e9:.3f} folded "
            f"(FlopCounterMode {'agrees' if fl['analytic_matches_counter'] else 'DISAGREES: ' + str((fl['counted_upstream'], fl['counted_folded']))}); "
            f"measured {m['bench']['date'][:10]} on {mh.get('cpu')} ({' '.join(mh.get('isa', []))})",
            "",
            "| contender | precision | batch | p50 ms | p99 ms | images/s | speed-up | roofline min ms (% of ceiling) | peak RSS MB | "
            + ("GPU peak MB | " if gpu else "")
            + "size MB |",
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
        ]
        pad = " |" * (7 + gpu)
        for c in m["bench"]["contenders"]:
            for b, r in c["results"].items():
                if "p50_ms" not in r:
                    lines.append(f"| {c['name']} | {precision_of(c)} | {b} | failed: {r.get('error', '')}{pad}")
                    continue
                rf = r.get("roofline")
                rft = f"{rf['min_ms']:.3f} ({100 * rf['fraction_of_ceiling']:.0f}%)" if rf else "n/a"
                size = f"{c['size_bytes'] / 1e6:.1f}" if c.get("size_bytes") else "-"
                rss = f"{c['peak_rss_mb']:.0f}" if c.get("peak_rss_mb") else "n/a"
                gmb = (f"{c['gpu_peak_mb']:.0f} | " if c.get("gpu_peak_mb") else "n/a | ") if gpu else ""
                lines.append(
                    f"| {c['name']} | {precision_of(c)} | {b} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['throughput_ips']:.0f} "
                    f"| {r.get('speedup_vs_upstream', float('nan')):.2f}x | {rft} | {rss} | {gmb}{size} |"
                )
        for k, v in m["bench"]["skipped"].items():
            lines.append(f"| {k} | | | skipped: {v}{pad}")
        for b, sb in m.get("speedup_bound", {}).items():
            mx = sb["max_speedup"]
            lines += [
                "",
                f"Upper bound on the speed-up over eager upstream at batch {b} on this machine (GEMMs alone at the ceilings "
                f"below, everything else free): fp32 {mx['fp32']:.2f}x"
                + (
                    f"; int8 weight GEMMs with float attention products (the CRATE policy) {mx['int8_crate_policy']:.2f}x; "
                    f"int8 everywhere {mx['int8_everything']:.2f}x"
                    if "int8_crate_policy" in mx
                    else ""
                )
                + ".",
            ]
        lines.append("")
    for k, v in result["targets_skipped"].items():
        lines.append(f"- {k}: {v}")
    seen = []
    for m in result["models"].values():
        ceil = m.get("gemm_ceilings", result["gemm_ceilings"])
        if ceil in seen:
            continue
        seen.append(ceil)
        users = [v["label"].split(" (")[0] for v in result["models"].values() if v.get("gemm_ceilings", result["gemm_ceilings"]) == ceil]
        lines += [
            "",
            f"GEMM ceilings{' measured with ' + ', '.join(users) if len(result['models']) > 1 else ''} (best of shapes {', '.join('x'.join(map(str, sh)) for sh in ceil['shapes'])}; "
            + ("CUDA" if gpu else f"{ceil['threads']} threads")
            + "): "
            + ", ".join(
                f"{p} {ceil[p]['gflops']:.1f} G{'OP' if p == 'int8' else 'FLOP'}/s ({ceil[p]['how']}, {'x'.join(map(str, ceil[p]['shape']))})"
                for p in ceil.get("precisions", ("fp32", "bf16", "int8"))
                if ceil[p]["gflops"]
            ),
        ]
    return "\n".join(lines) + "\n"


def plot(reports: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nb = max(len(r.data["settings"]["batch"]) for r in reports.values())
    nc = max(len(r.contenders) for r in reports.values())
    fig, axes = plt.subplots(len(reports), nb, figsize=(6.5 * nb, (0.45 * nc + 1.6) * len(reports)), squeeze=False)
    for row, (name, rep) in zip(axes, reports.items()):
        n = len(rep.data["settings"]["batch"])
        rep.plot_axes(row[:n], title=f"{rep.data['source_model']['label']}\n")
        for ax in row[n:]:  # a model measured at fewer batch sizes
            ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except CrateEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
