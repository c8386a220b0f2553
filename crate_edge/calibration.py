"""Calibration: the one place where activation ranges are observed. Every backend quantizes with
the ranges computed here, so a method means the same thing on every target.

The float (eager) module runs over the calibration images; forward hooks on each quantization
site's GEMM see its input (and, on request, its output). Per site, one clipping range [lo, hi]:

  * ``max``: lo = min x, hi = max x over all calibration activations of that tensor;
  * ``percentile`` (p): a = the p-th percentile of |x| (nearest rank: the ceil(p/100 * N)-th
    smallest of the N values, computed exactly), and [lo, hi] = [max(min x, -a), min(max x, a)];
  * ``entropy``: a = the KL-divergence threshold of onnxruntime.quantization's histogram
    collector (TensorRT's method: 2048 bins, 255 quantized bins over the signed range -a..a),
    then [lo, hi] as for percentile.

A backend turns a range into a scale with its declared scheme: symmetric uses
amax = max(-lo, hi) (= a for percentile and entropy), affine uses lo and hi. So two backends
fed the same images and method agree on the clipping range of every site, and their scales
differ only by the scheme.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import CrateEdgeError

METHODS = ("max", "percentile", "entropy")
ENTROPY_BINS = 2048
# onnxruntime's histogram is signed (-a..a), so 255 quantized bins = TensorRT's 128 on |x|
ENTROPY_QBINS = 255


@dataclass(frozen=True)
class Range:
    """A clipping range lo <= 0 <= hi (calibration ranges always include zero)."""

    lo: float
    hi: float

    @property
    def amax(self) -> float:
        """The symmetric range |x| <= amax that a symmetric scheme uses."""
        return max(-self.lo, self.hi)

    def to_dict(self) -> dict[str, float]:
        return {"lo": self.lo, "hi": self.hi}


@dataclass
class Calibration:
    """Ranges per site: inputs[site] (the GEMM's activation input) and, when asked for, outputs[site]."""

    method: str
    percentile: float | None
    images: int
    inputs: dict[str, Range]
    outputs: dict[str, Range] = field(default_factory=dict)

    def amax(self) -> dict[str, float]:
        """site -> symmetric input range a (|x| <= a)."""
        return {s: r.amax for s, r in self.inputs.items()}

    def record(self) -> dict[str, Any]:
        """For the manifest: the method and every range."""
        rec: dict[str, Any] = {"method": self.method, "images": self.images, "inputs": {s: r.to_dict() for s, r in self.inputs.items()}}
        if self.percentile is not None:
            rec["percentile"] = self.percentile
        if self.outputs:
            rec["outputs"] = {s: r.to_dict() for s, r in self.outputs.items()}
        return rec


class _Observer:
    """Statistics of one tensor over the calibration pass."""

    def __init__(self, method: str, percentile: float, n_images: int):
        self.method, self.p, self.n_images = method, percentile, n_images
        self.lo, self.hi = math.inf, -math.inf
        self.seen = 0
        self.keep = None  # percentile: how many of the largest |x| to keep
        self.top = torch.empty(0)
        self.hist = None  # entropy: onnxruntime's collector

    def add(self, x: torch.Tensor, batch: int) -> None:
        x = x.detach().float().flatten()
        if not x.numel():
            return
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        self.seen += x.numel()
        if self.method == "percentile":
            if self.keep is None:  # every image gives the same number of values
                total = x.numel() // batch * self.n_images
                self.keep = total - self._rank(total) + 1
            a = torch.cat([self.top, x.abs()])
            self.top = torch.topk(a, min(self.keep, a.numel())).values if a.numel() > self.keep else a
        elif self.method == "entropy":
            if self.hist is None:
                from onnxruntime.quantization.calibrate import HistogramCollector

                self.hist = HistogramCollector(
                    method="entropy",
                    symmetric=True,
                    num_bins=ENTROPY_BINS,
                    num_quantized_bins=ENTROPY_QBINS,
                    percentile=99.99,
                    scenario="same",
                )
            with contextlib.redirect_stdout(io.StringIO()):  # the collector prints progress
                self.hist.collect({"t": [x.numpy()]})

    def _rank(self, n: int) -> int:
        """Nearest rank of the p-th percentile among n values (1-based)."""
        return min(n, max(1, math.ceil(self.p / 100.0 * n - 1e-9)))

    def range(self) -> Range:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if self.method == "max":
            return Range(lo, hi)
        if self.method == "percentile":
            n = self.seen
            # the rank-th smallest of n is the (n - rank + 1)-th largest
            a = float(torch.sort(self.top, descending=True).values[n - self._rank(n)])
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                r = self.hist.compute_collection_result()["t"]
            a = float(max(abs(float(r[0])), abs(float(r[1]))))
        return Range(max(lo, -a), min(hi, a))


def feed_site_inputs(module: nn.Module, sites: dict[str, str], images: torch.Tensor, observe, batch: int = 32, outputs=None) -> None:
    """Run `module` (eager, float) over the calibration `images` in batches, calling
    observe(site, x) with the input x of every site GEMM, and outputs(site, y) with its output
    when given (hooks removed afterwards)."""
    seen: set[str] = set()

    def pre(site):
        def f(_mod, args):
            seen.add(site)
            observe(site, args[0].detach())

        return f

    def post(site):
        def f(_mod, _args, y):
            outputs(site, y.detach())

        return f

    mods = {}
    for s, path in sites.items():
        try:
            mods[s] = module.get_submodule(path)
        except AttributeError:
            raise CrateEdgeError(f"calibration: site {s}: no module {path!r} in the model") from None
    hooks = [m.register_forward_pre_hook(pre(s)) for s, m in mods.items()]
    if outputs is not None:
        hooks += [m.register_forward_hook(post(s)) for s, m in mods.items()]
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


def observe_ranges(
    module: nn.Module,
    sites: dict[str, str],
    images: torch.Tensor,
    method: str = "percentile",
    percentile: float = 99.99,
    outputs: bool = False,
    batch: int = 32,
) -> Calibration:
    """Clipping ranges of every site's input (and output when `outputs`) over `images`, with the
    method's one meaning (module docstring)."""
    if method not in METHODS:
        raise CrateEdgeError(f"calibration method {method!r}; known: {', '.join(METHODS)}")
    if method == "percentile" and not 0.0 < float(percentile) <= 100.0:
        raise CrateEdgeError(f"calibration percentile {percentile}: must be in (0, 100]")
    if method == "entropy":
        try:
            import onnxruntime.quantization.calibrate  # noqa: F401
        except ImportError:
            raise CrateEdgeError("calibration method entropy needs onnxruntime (pip install 'crate-edge[onnx]')") from None
    images = images.float()
    n = len(images)
    if n == 0:
        raise CrateEdgeError("calibration: no images")
    obs_in = {s: _Observer(method, float(percentile), n) for s in sites}
    obs_out = {s: _Observer(method, float(percentile), n) for s in sites} if outputs else {}

    # each hook fires once per site per batch; the batch size is x's leading dimension
    def on_in(site, x):
        obs_in[site].add(x, x.shape[0])

    def on_out(site, y):
        obs_out[site].add(y, y.shape[0])

    feed_site_inputs(module, sites, images, on_in, batch, on_out if outputs else None)
    return Calibration(
        method=method,
        percentile=float(percentile) if method == "percentile" else None,
        images=n,
        inputs={s: o.range() for s, o in obs_in.items()},
        outputs={s: o.range() for s, o in obs_out.items()},
    )


def calibrate(module: nn.Module, plan, outputs: bool = False, batch: int = 32) -> Calibration:
    """The ranges a crate_edge.quantize.QuantPlan asks for: its sites, its calibration images,
    its config's method and percentile. The result is also kept on the plan (plan.ranges), which
    records it in the manifest."""
    qc = plan.config
    if plan.calibration is None or len(plan.calibration) == 0:
        raise CrateEdgeError("static activations need calibration images")
    plan.ranges = observe_ranges(module, plan.sites, plan.calibration, qc.calibration, qc.percentile, outputs=outputs, batch=batch)
    return plan.ranges
