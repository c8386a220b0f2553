"""Reduced precision for CRATE, as data: a target's [quantize] table is a QuantConfig, and the
CRATE-aware precision policy below says which GEMMs a backend may quantize and what stays float.

Why the policy (issue 4): MSSA's q = k = v attention multiplies the error of one shared
projection by itself, and ISTA's ReLU sits behind a small threshold (eta * lambda = 0.01), so
small errors flip which coordinates are active. Therefore, in every backend:

  * only the GEMMs with weights are quantized ("sites"): the patch embedding, each layer's
    subspace projection U (qkv), its output map, its ISTA GEMM, and the classifier head;
  * LayerNorm, softmax, the residual adds, the w w^T and A w attention products, and the ISTA
    threshold and ReLU stay in float (their inputs are dequantized before they run);
  * weights are per output channel; activations per tensor, calibrated on training images
    (never the held-out slice parity is measured on);
  * the folded ISTA is quantized either as its update dA = eta (D - D^T D) with the identity
    path y kept in float (`ista = "update"`, rewrite fold_ista_update) or as the whole matrix
    A = I + dA (`ista = "matrix"`, rewrite fold_ista);
  * `float_layers` keeps whole blocks in float: the accuracy-driven fallback raises those.

A backend reads `QuantConfig.from_target(target)` and `quant_sites(module, qc)` to learn which
module paths to quantize; the config and the sites are recorded in the manifest.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import CrateEdgeError

SCHEMES = ("int8", "fp8", "int8_weights", "palettize", "fp16", "bf16")
SITE_KINDS = ("embed", "qkv", "out", "ista", "head")
CALIBRATIONS = ("max", "percentile", "entropy")

# what never gets quantized, by op: recorded in manifests next to the sites
KEEP_FLOAT = ("layer_norm", "softmax", "residual_add", "attention_products_w_wT_and_A_w", "ista_threshold_relu",
              "ista_identity_path (ista = update)")


@dataclass
class QuantConfig:
    scheme: str = "int8"  # int8 (weights + activations) | fp8 (TensorRT) | int8_weights | palettize | fp16 | bf16
    weights: str = "per_channel"  # per_channel | per_tensor
    activations: str = "static"  # static (calibrated per tensor) | dynamic (quantized at run time; ExecuTorch qd8) | none
    calibration: str = "percentile"  # max | percentile | entropy
    percentile: float = 99.99
    calibration_data: str = "fashion-mnist"  # any crate_edge.data spec; the train split is used
    calibration_images: int = 256
    ista: str = "update"  # update | matrix (see module docstring)
    sites: list[str] = field(default_factory=lambda: list(SITE_KINDS))  # site kinds quantized
    float_layers: list[int] = field(default_factory=list)  # blocks kept entirely in float
    nbits: int = 8  # weight bits for int8_weights / palettize
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific extras

    @classmethod
    def from_target(cls, target) -> "QuantConfig | None":
        """The target's [quantize] table as a config, or None for a float target."""
        d = dict(target.quantize or {})
        if not d:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"budget", "fallback"})
        if unknown:
            raise CrateEdgeError(f"target {target.name}: unknown [quantize] key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        qc = cls(**{k: v for k, v in d.items() if k in known})
        qc.validate(target.name)
        return qc

    def validate(self, where: str = "quantize") -> None:
        checks = [("scheme", self.scheme, SCHEMES), ("weights", self.weights, ("per_channel", "per_tensor")),
                  ("activations", self.activations, ("static", "dynamic", "none")), ("calibration", self.calibration, CALIBRATIONS),
                  ("ista", self.ista, ("update", "matrix"))]
        for key, val, allowed in checks:
            if val not in allowed:
                raise CrateEdgeError(f"{where}: quantize.{key} = {val!r}; allowed: {', '.join(allowed)}")
        bad = [s for s in self.sites if s not in SITE_KINDS]
        if bad:
            raise CrateEdgeError(f"{where}: quantize.sites has unknown kind(s) {', '.join(bad)}; known: {', '.join(SITE_KINDS)}")

    def replace(self, **kw) -> "QuantConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def ista_rewrite(self) -> str:
        return "fold_ista_update" if self.ista == "update" else "fold_ista"


@dataclass
class QuantPlan:
    """What a backend's compile(..., quant=plan) gets: the config, the sites to quantize
    (site name -> module path in the module handed to the backend, which may be a Probe
    wrapper) and calibration inputs (prepared float32 NCHW images from the training split).
    `calibration_record` is crate_edge.data.InputSet.record() of those images (for the manifest)."""

    config: QuantConfig
    sites: dict[str, str]
    calibration: torch.Tensor
    calibration_record: dict[str, Any] | None = None

    def manifest(self) -> dict[str, Any]:
        cal = self.calibration_record or {"spec": self.config.calibration_data, "split": "train", "images": int(len(self.calibration))}
        return {"config": self.config.to_dict(), "sites": sorted(self.sites), "keep_float": list(KEEP_FLOAT), "calibration": dict(cal)}


def quant_rewrites(rewrites: list[str], qc: "QuantConfig | None") -> list[str]:
    """The target's rewrite list with the ISTA fold the config asks for."""
    if qc is None:
        return list(rewrites)
    fold = {"fold_ista", "fold_ista_update"}
    out = [qc.ista_rewrite() if r in fold else r for r in rewrites]
    if not fold & set(rewrites):
        out.append(qc.ista_rewrite())
    return out


def all_sites(model: nn.Module) -> dict[str, str]:
    """Every quantizable GEMM of a (rewritten, possibly Probe-wrapped) CRATE:
    site name ("embed", "3.qkv", "3.out", "3.ista", "head") -> module path in `model`.
    The module at that path is an nn.Linear, or a FoldedISTA (F.linear on its own weight)."""
    from .rewrites import FoldedISTA, FoldedISTAUpdate

    prefix = ""
    inner = model
    if not hasattr(inner, "transformer") and hasattr(inner, "model"):
        inner, prefix = inner.model, "model."
    sites = {"embed": f"{prefix}to_patch_embedding.2"}
    for i, (mssa, ista) in enumerate(inner.transformer.layers):
        base = f"{prefix}transformer.layers.{i}"
        sites[f"{i}.qkv"] = f"{base}.0.fn.qkv"
        if isinstance(mssa.fn.to_out, nn.Sequential):
            sites[f"{i}.out"] = f"{base}.0.fn.to_out.0"
        if isinstance(ista.fn, FoldedISTAUpdate):
            sites[f"{i}.ista"] = f"{base}.1.fn.update"
        elif isinstance(ista.fn, FoldedISTA):
            sites[f"{i}.ista"] = f"{base}.1.fn"
        # an unfolded ISTA (three GEMMs on one shared D) is not a quantization site
    sites["head"] = f"{prefix}mlp_head.1"
    return sites


def quant_sites(model: nn.Module, qc: QuantConfig) -> dict[str, str]:
    """The sites the config quantizes (policy: kinds in qc.sites, minus blocks in float_layers)."""
    keep = set(qc.float_layers)
    out = {}
    for name, path in all_sites(model).items():
        kind = name.split(".")[-1]
        layer = int(name.split(".")[0]) if "." in name else None
        if kind in qc.sites and (layer is None or layer not in keep):
            out[name] = path
    return out


def calibration_set(cfg, qc: QuantConfig, data=None):
    """The calibration images as a crate_edge.data.InputSet: qc.calibration_images evenly spaced
    images (a fixed stride, so every class of a class-sorted set is represented) of the training
    split of `data` (default qc.calibration_data; any data spec; an .npz or image folder is used
    whole). Fewer images than qc.calibration_images is an error, not a smaller calibration set.
    The held-out parity slice comes from the test split."""
    from .data import open_inputs

    spec = qc.calibration_data if data is None else data
    try:
        ds = open_inputs(spec, cfg, "train")
    except CrateEdgeError as e:
        raise CrateEdgeError(f"calibration data: {e}") from None
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise CrateEdgeError(f"calibration data {spec!r}: {type(e).__name__}: {e}") from None
    return ds.spread(int(qc.calibration_images), purpose="calibration",
                     hint="lower the target's [quantize].calibration_images, e.g. --calibration-images N, or give more images")


def calibration_images(cfg, qc: QuantConfig) -> torch.Tensor:
    """Prepared model inputs for calibration (see `calibration_set`), float32 NCHW."""
    return calibration_set(cfg, qc).tensors()[0]


# ------------------------------------------------------------------ accuracy-driven fallback

SEARCH_LOG = "search.json"  # every attempt of the accuracy-driven search, inside the artifact
DEFAULT_BUDGET = {"max_top1_drop": 0.003, "min_support_iou": 0.90, "max_coding_rate_rel": 0.02}


def _with_float_layers(target, float_layers: list[int]):
    """The target with quantize.float_layers replaced (definition and manifest follow)."""
    import copy
    import hashlib
    import json

    raw = copy.deepcopy(target.raw)
    raw.setdefault("quantize", {})["float_layers"] = sorted(float_layers)
    q = dict(target.quantize, float_layers=sorted(float_layers))
    sha = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    return dataclasses.replace(target, quantize=q, raw=raw, sha256=sha)


def _latency_ms(art, x, iters: int = 15) -> float:
    import time

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
    import math

    out, prev = [], 0.0
    for d in layers:
        s = d.get("z_sqnr_db")
        nsr = 0.0 if s is None or math.isnan(s) or s == math.inf else 10 ** (-s / 10)
        out.append(nsr - prev)
        prev = nsr
    return out


def search(model=None, target="executorch-int8", out=None, budget: dict | None = None, data: str = "fashion-mnist:train",
           limit: int = 2000, log=None, calibration_data=None, calibration_images: int | None = None) -> dict:
    """Accuracy-driven fallback (issue 4): compile the quantized target as a probe build, measure
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
    import json
    import shutil
    import sys
    from pathlib import Path

    from .checkpoint import load_model
    from .compiler import compile as _compile
    from .outputs import check_writable, output_lock, work_dir
    from .parity import parity
    from .targets import load_target

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
                art = _compile(src, tt, out=work / f"try{len(attempts)}", probe=True, keep_failed=True, log=lambda s: None,
                               **cal_kw)
                rep = parity([art], reference=src, data=data, limit=limit, tolerances=bud, progress=False)[0]
                lat = _latency_ms(art, x1) if art.executor == t.backend else None
                sens = _sensitivity(rep.layers) if rep.layers else [0.0] * depth
                rec = {"float_layers": list(float_layers), "passed": rep.passed, "message": rep.message(),
                       "top1_drop": rep.logits.get("top1_drop"), "top1_agreement": rep.logits.get("top1_agreement"),
                       "min_support_iou": min(d["support_iou_mean"] for d in rep.layers) if rep.layers else None,
                       "max_coding_rate_rel": max(d["coding_rate_rel"] for d in rep.layers) if rep.layers else None,
                       "sensitivity": sens, "latency_b1_ms": lat, "executor": art.executor}
                attempts.append(rec)
                say(f"[search]   {'PASS' if rep.passed else 'fail'}: {rep.message()}"
                    + (f"; batch-1 {lat:.2f} ms" if lat is not None else ""))
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
            say(f"[search] {'passing' if rec['passed'] else 'best (budget NOT met)'} configuration: float blocks {chosen or 'none'}; "
                f"compiling it into {out}")
            search_log = {"target": t.name, "budget": bud, "data": data, "limit": limit, "chosen_float_layers": chosen,
                          "passed": rec["passed"], "attempts": attempts, "artifact": str(out)}
            final = _compile(src, _with_float_layers(t, chosen), out=out, keep_failed=True, **cal_kw,
                             extra_files={SEARCH_LOG: json.dumps(search_log, indent=1, default=str)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not rec["passed"]:
        raise CrateEdgeError(f"{t.name}: no configuration met the budget ({rec['message']}); best saved at {out}, "
                             f"log {out / SEARCH_LOG}")
    return {**search_log, "artifact_obj": final}


def feed_site_inputs(module: nn.Module, sites: dict[str, str], images: torch.Tensor, observe, batch: int = 32) -> None:
    """Run `module` (eager, float) over the calibration `images` in batches, calling
    observe(site, x) with the input x of every site GEMM (forward pre-hooks, removed afterwards).
    Each backend keeps its own statistics; this is the one loop that feeds them."""
    seen: set[str] = set()

    def hook(site):
        def f(_mod, args):
            seen.add(site)
            observe(site, args[0].detach())
        return f

    hooks = [module.get_submodule(path).register_forward_pre_hook(hook(s)) for s, path in sites.items()]
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                module(images[i : i + batch])
    finally:
        for h in hooks:
            h.remove()
    missing = sorted(set(sites) - seen)
    if missing:
        raise CrateEdgeError(f"calibration: site(s) {', '.join(missing)} never executed")
