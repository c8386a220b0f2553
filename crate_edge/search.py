"""Accuracy-driven quantization: `crate-edge quantize` / `crate_edge.search.search`. Compile the
quantized target as a probe build, measure it against the fp32 model, and while the budget
fails keep the most sensitive block in float and try again."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

from torch import nn

from .checkpoint import load_model
from .compiler import compile as _compile
from .errors import CrateEdgeError
from .outputs import check_writable, output_lock, work_dir
from .parity import parity
from .quantize import QuantConfig, calibration_set
from .targets import load_target

SEARCH_LOG = "search.json"  # every attempt of the accuracy-driven search, inside the artifact
DEFAULT_BUDGET = {"max_top1_drop": 0.003, "min_support_iou": 0.90, "max_coding_rate_rel": 0.02}


def _with_float_layers(target, float_layers: list[int]):
    """The target with quantize.float_layers replaced (definition and manifest follow)."""
    raw = copy.deepcopy(target.raw)
    raw.setdefault("quantize", {})["float_layers"] = sorted(float_layers)
    q = dict(target.quantize, float_layers=sorted(float_layers))
    sha = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    return dataclasses.replace(target, quantize=q, raw=raw, sha256=sha)


def _latency_ms(art, x, iters: int = 15) -> float:
    art(x)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        art(x)
        ts.append(time.perf_counter() - t)
    return 1e3 * sorted(ts)[len(ts) // 2]


def _sensitivity(layers: list[dict]) -> list[float]:
    """Per block: the noise-to-signal power it adds to the features, 10^(-SQNR_l/10) -
    10^(-SQNR_{l-1}/10), with the SQNR of the ISTA outputs at block boundaries (the input has no
    error). In power, blocks compare on one scale; as a loss in dB the first block always looked
    worst, its loss being counted from infinity."""
    out, prev = [], 0.0
    for d in layers:
        s = d.get("z_sqnr_db")
        nsr = 0.0 if s is None or math.isnan(s) or s == math.inf else 10 ** (-s / 10)
        out.append(nsr - prev)
        prev = nsr
    return out


def search(
    model=None,
    target="executorch-int8",
    out=None,
    budget: dict | None = None,
    data: str = "fashion-mnist:train",
    limit: int = 2000,
    log=None,
    calibration_data=None,
    calibration_images: int | None = None,
) -> dict:
    """Accuracy-driven fallback: compile the quantized target as a probe build, measure
    it against the fp32 model on `data` (default: training images, so the test set stays
    untouched), and while the budget fails keep the most sensitive block (largest noise power added
    across it) in float and try again. The first configuration that passes has the fewest
    float blocks, i.e. is the fastest; it is compiled again without probe outputs into `out`.
    If none passes, the best one found is saved anyway and CrateEdgeError says so. A log of
    every attempt (config, metrics, batch-1 latency) is written into the artifact as
    `search.json`. `out` is held for the whole search (a second writer waits) and refused up front
    if it holds files crate-edge did not write; tries are compiled beside it, in a scratch
    directory that the next writer of `out` removes if this one is killed.
    `calibration_data` / `calibration_images` override the target's [quantize] calibration in
    every compile (see crate_edge.compiler.compile); `data` may be any crate_edge.data spec
    (without labels the top-1 drop is not checked)."""
    say = log or (lambda s: print(s, file=sys.stderr))
    t = target if not isinstance(target, (str, Path)) else load_target(target)
    qc = QuantConfig.from_target(t)
    if qc is None:
        raise CrateEdgeError(f"target {t.name} has no [quantize] table: nothing to search")
    src = model if isinstance(model, nn.Module) else load_model(model)
    src = src.eval()
    bud = {**DEFAULT_BUDGET, **dict(t.quantize.get("budget", {})), **(budget or {})}
    out = check_writable(out or f"artifacts/{t.name}")
    depth = src.cfg.depth
    cal_kw = {"calibration_data": calibration_data, "calibration_images": calibration_images}
    if calibration_data is not None:
        qc = qc.replace(calibration_data=str(calibration_data))
    if calibration_images is not None:
        qc = qc.replace(calibration_images=int(calibration_images))
    cal = calibration_set(src.cfg, qc)  # missing, malformed or too few calibration images: fail before any compile
    x1 = cal.first(1).tensors()[0].numpy()
    float_layers = sorted(set(qc.float_layers))
    attempts: list[dict] = []
    best = None
    with output_lock(out, say=say):  # one search writes `out` at a time
        work = work_dir(out, "search")
        try:
            while True:
                tt = _with_float_layers(t, float_layers)
                say(f"[search] {t.name}: float blocks {float_layers or 'none'}")
                art = _compile(src, tt, out=work / f"try{len(attempts)}", probe=True, keep_failed=True, log=lambda s: None, **cal_kw)
                rep = parity([art], reference=src, data=data, limit=limit, tolerances=bud, progress=False)[0]
                lat = _latency_ms(art, x1) if art.executor == t.backend else None
                sens = _sensitivity(rep.layers) if rep.layers else [0.0] * depth
                rec = {
                    "float_layers": list(float_layers),
                    "passed": rep.passed,
                    "message": rep.message(),
                    "top1_drop": rep.logits.get("top1_drop"),
                    "top1_agreement": rep.logits.get("top1_agreement"),
                    "min_support_iou": min(d["support_iou_mean"] for d in rep.layers) if rep.layers else None,
                    "max_coding_rate_rel": max(d["coding_rate_rel"] for d in rep.layers) if rep.layers else None,
                    "sensitivity": sens,
                    "latency_b1_ms": lat,
                    "executor": art.executor,
                }
                attempts.append(rec)
                say(
                    f"[search]   {'PASS' if rep.passed else 'fail'}: {rep.message()}"
                    + (f"; batch-1 {lat:.2f} ms" if lat is not None else "")
                )
                score = (rep.passed, -len(float_layers), rec["top1_agreement"] or 0.0)
                if best is None or score > best[0]:
                    best = (score, list(float_layers), rec)
                if rep.passed:
                    break
                cand = [(s, l) for l, s in enumerate(sens) if l not in float_layers]
                if not cand:
                    break
                float_layers = sorted(float_layers + [max(cand)[1]])
            _, chosen, rec = best
            say(
                f"[search] {'passing' if rec['passed'] else 'best (budget NOT met)'} configuration: float blocks {chosen or 'none'}; "
                f"compiling it into {out}"
            )
            search_log = {
                "target": t.name,
                "budget": bud,
                "data": data,
                "limit": limit,
                "chosen_float_layers": chosen,
                "passed": rec["passed"],
                "attempts": attempts,
                "artifact": str(out),
            }
            final = _compile(
                src,
                _with_float_layers(t, chosen),
                out=out,
                keep_failed=True,
                **cal_kw,
                extra_files={SEARCH_LOG: json.dumps(search_log, indent=1, default=str)},
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not rec["passed"]:
        raise CrateEdgeError(f"{t.name}: no configuration met the budget ({rec['message']}); best saved at {out}, log {out / SEARCH_LOG}")
    return {**search_log, "artifact_obj": final}
