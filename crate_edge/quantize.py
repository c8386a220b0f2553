"""Reduced precision for CRATE, as data: a target's [quantize] table is a QuantConfig, and the
CRATE-aware precision policy below says which GEMMs a backend may quantize and what stays float.

Why the policy: MSSA's q = k = v attention multiplies the error of one shared
projection by itself, and ISTA's ReLU sits behind a small threshold (eta * lambda = 0.01), so
small errors flip which coordinates are active. Therefore, in every backend:

  * only the GEMMs with weights are quantized ("sites"): the patch embedding, each layer's
    subspace projection U (qkv), its output map, its ISTA GEMM, and the classifier head;
  * LayerNorm, softmax, the residual adds, the w w^T and A w attention products, and the ISTA
    threshold and ReLU stay in float (their inputs are dequantized before they run); the one
    exception is opt-in, `attention = "int8"`: both attention products in int8 with scales taken
    at run time from w itself (per token for w w^T, per column of w for A w, A as 255ths), where
    the backend declares it (Capabilities.quant_attention; TVM on AVX-512 VNNI) and only under
    the target's parity budget;
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

from .calibration import METHODS
from .data import open_inputs
from .errors import CrateEdgeError
from .rewrites import FoldedISTA, FoldedISTAUpdate, FoldedOvercompleteISTA, PatchLinear

SCHEMES = ("int8", "fp8", "int8_weights", "palettize", "fp16", "bf16")
SITE_KINDS = ("embed", "qkv", "out", "ista", "head")

# what never gets quantized, by op: recorded in manifests next to the sites
KEEP_FLOAT = (
    "layer_norm",
    "softmax",
    "residual_add",
    "attention_products_w_wT_and_A_w",
    "ista_threshold_relu",
    "ista_identity_path (ista = update)",
)
# the precision map's detail key by which an artifact says its attention products ran in int8
# ([quantize] attention = "int8" where the backend's kernel could run)
INT8_ATTENTION = "attention_products"


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
    attention: str = "float"  # float | int8: MSSA's two attention products (see module docstring)
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
        checks = [
            ("scheme", self.scheme, SCHEMES),
            ("weights", self.weights, ("per_channel", "per_tensor")),
            ("activations", self.activations, ("static", "dynamic", "none")),
            ("calibration", self.calibration, METHODS),
            ("ista", self.ista, ("update", "matrix")),
            ("attention", self.attention, ("float", "int8")),
        ]
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
    `calibration_record` is crate_edge.data.InputSet.record() of those images (for the manifest);
    `ranges` is the crate_edge.calibration.Calibration the backend quantized with (set by
    crate_edge.calibration.calibrate; recorded in the manifest)."""

    config: QuantConfig
    sites: dict[str, str]
    calibration: torch.Tensor
    calibration_record: dict[str, Any] | None = None
    ranges: Any = None

    def manifest(self, precision: dict[str, Any] | None = None) -> dict[str, Any]:
        """The manifest's quantization block; `precision` (the artifact's precision map) says
        whether the attention products ran in int8, which only then leave keep_float."""
        cal = self.calibration_record or {"spec": self.config.calibration_data, "split": "train", "images": int(len(self.calibration))}
        att8 = INT8_ATTENTION in (precision or {}).get("detail", {})
        keep = [k for k in KEEP_FLOAT if not (att8 and k.startswith("attention_products"))]
        out = {"config": self.config.to_dict(), "sites": sorted(self.sites), "keep_float": keep, "calibration": dict(cal)}
        if self.ranges is not None:
            out["ranges"] = self.ranges.record()
        return out


def quant_rewrites(rewrites: list[str], qc: "QuantConfig | None", family: str = "crate") -> list[str]:
    """The target's rewrite list with the ISTA fold the config asks for (and, for CRATE-α, its
    Conv2d patch embedding as a Linear, the embedding site both families share)."""
    if qc is None:
        return list(rewrites)
    fold = {"fold_ista", "fold_ista_update"}
    out = [qc.ista_rewrite() if r in fold else r for r in rewrites]
    if not fold & set(rewrites):
        out.append(qc.ista_rewrite())
    if family == "crate-alpha" and "patch_linear" not in out:
        out.insert(0, "patch_linear")
    return out


def all_sites(model: nn.Module) -> dict[str, str]:
    """Every quantizable GEMM of a (rewritten, possibly Probe-wrapped) CRATE or CRATE-α:
    site name ("embed", "3.qkv", "3.out", "3.ista", "head"; CRATE-α's folded ISTA has four,
    "3.ista.enc", "3.ista.syn", "3.ista.res", "3.ista.dec", all of kind "ista") -> module path in
    `model`. The module at that path is an nn.Linear, or a FoldedISTA (F.linear on its own weight)."""
    prefix = ""
    inner = model
    if not hasattr(inner, "transformer") and hasattr(inner, "model"):
        inner, prefix = inner.model, "model."
    if hasattr(inner, "to_patch_embedding"):
        sites = {"embed": f"{prefix}to_patch_embedding.2"}
    else:  # CRATE-α: a site once patch_linear has made its Conv2d a Linear
        sites = {"embed": f"{prefix}conv1.linear"} if isinstance(inner.conv1, PatchLinear) else {}
    for i, (mssa, ista) in enumerate(inner.transformer.layers):
        base = f"{prefix}transformer.layers.{i}"
        sites[f"{i}.qkv"] = f"{base}.0.fn.qkv"
        if isinstance(mssa.fn.to_out, nn.Sequential):
            sites[f"{i}.out"] = f"{base}.0.fn.to_out.0"
        if isinstance(ista.fn, FoldedISTAUpdate):
            sites[f"{i}.ista"] = f"{base}.1.fn.update"
        elif isinstance(ista.fn, FoldedISTA):
            sites[f"{i}.ista"] = f"{base}.1.fn"
        elif isinstance(ista.fn, FoldedOvercompleteISTA):
            for part in ("enc", "syn", "res", "dec"):
                sites[f"{i}.ista.{part}"] = f"{base}.1.fn.{part}"
        # an unfolded ISTA (GEMMs on shared dictionaries) is not a quantization site
    sites["head"] = f"{prefix}mlp_head.1"
    return sites


def quant_sites(model: nn.Module, qc: QuantConfig) -> dict[str, str]:
    """The sites the config quantizes (policy: kinds in qc.sites, minus blocks in float_layers)."""
    keep = set(qc.float_layers)
    out = {}
    for name, path in all_sites(model).items():
        parts = name.split(".")
        layer, kind = (int(parts[0]), parts[1]) if len(parts) > 1 else (None, parts[0])
        if kind in qc.sites and (layer is None or layer not in keep):
            out[name] = path
    return out


def calibration_set(cfg, qc: QuantConfig, data=None):
    """The calibration images as a crate_edge.data.InputSet: qc.calibration_images evenly spaced
    images (a fixed stride, so every class of a class-sorted set is represented) of the training
    split of `data` (default qc.calibration_data; any data spec; an .npz or image folder is used
    whole). Fewer images than qc.calibration_images is an error, not a smaller calibration set.
    The held-out parity slice comes from the test split."""
    spec = qc.calibration_data if data is None else data
    try:
        ds = open_inputs(spec, cfg, "train")
    except CrateEdgeError as e:
        raise CrateEdgeError(f"calibration data: {e}") from None
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise CrateEdgeError(f"calibration data {spec!r}: {type(e).__name__}: {e}") from None
    return ds.spread(
        int(qc.calibration_images),
        purpose="calibration",
        hint="lower the target's [quantize].calibration_images, e.g. --calibration-images N, or give more images",
    )


def calibration_images(cfg, qc: QuantConfig) -> torch.Tensor:
    """Prepared model inputs for calibration (see `calibration_set`), float32 NCHW."""
    return calibration_set(cfg, qc).tensors()[0]
