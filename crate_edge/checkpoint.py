"""Checkpoints: crate-edge's own format and upstream CRATE and CRATE-α files.

crate-edge format: a directory with `model.safetensors` (upstream key names) and
`config.json` ({"format": "crate-edge", "version": 1, "config": {...}, ...}). The config is
also stored in the safetensors metadata, so the .safetensors file alone is self-contained.

Upstream files are read with torch.load(weights_only=True) only: the
training script's {'epoch','arch','state_dict',...}, the fine-tuning script's {'model': ...},
{'model': state_dict} and a bare state_dict, with or without the `module.` prefix. Shapes give
every field except `heads` (and `pool`), which come from the caller or a published config.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from . import crate_alpha
from .errors import CrateEdgeError
from .family import TITLES, build_model, config_from_dict, title
from .manifest import sha256_file
from .model import VARIANTS, CrateConfig
from .outputs import atomic_dir
from .zoo import embedded_model_dir

FORMAT = "crate-edge"
FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"

# (dim, depth, heads*dim_head) -> (name, heads), for the published ImageNet configurations of each
# family (CRATE-α: upstream's base and large, and crate-edge's tiny and small sized as CRATE's)
_PUBLISHED = {
    "crate": {
        (v["dim"], v["depth"], v["heads"] * v["dim_head"]): (name, v["heads"])
        for name, v in VARIANTS.items()
        if name in ("tiny", "small", "base", "large")
    },
    "crate-alpha": {
        (v["dim"], v["depth"], v["heads"] * v["dim_head"]): (name.removeprefix("crate-alpha-"), v["heads"])
        for name, v in crate_alpha.VARIANTS.items()
        if name != "crate-alpha-mnist"
    },
}


# ---------------------------------------------------------------- crate-edge format


def save_model(model, out_dir: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` in the crate-edge format, atomically; `out_dir` must be missing, empty or a
    crate-edge model (crate_edge.outputs.atomic_dir)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    cfg = model.cfg.to_dict()
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "config": cfg, "metadata": metadata or {}}
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out, "model") as tmp:
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": FORMAT, "config": json.dumps(cfg)})
        doc["sha256"] = {WEIGHTS: sha256_file(tmp / WEIGHTS)}
        (tmp / CONFIG).write_text(json.dumps(doc, indent=2) + "\n")
    return out


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CrateEdgeError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def _load_crate_edge(path: Path) -> tuple[dict[str, torch.Tensor], CrateConfig, dict]:  # CrateConfig or a subclass
    doc: dict[str, Any] = {}
    if path.is_dir():
        cfg_path, weights = path / CONFIG, path / WEIGHTS
        if not cfg_path.exists() or not weights.exists():
            raise CrateEdgeError(f"{path} is not a crate-edge model directory (needs {CONFIG} and {WEIGHTS})")
        try:
            doc = json.loads(cfg_path.read_text())
            cfg_dict = doc["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise CrateEdgeError(f"{cfg_path}: malformed crate-edge config ({e})") from None
        if doc.get("format") != FORMAT:
            raise CrateEdgeError(f"{cfg_path}: not a crate-edge config (format={doc.get('format')!r})")
        want = doc.get("sha256", {}).get(WEIGHTS)
        if want and sha256_file(weights) != want:
            raise CrateEdgeError(f"{weights}: sha256 does not match {CONFIG}; the file was modified or corrupted")
        sd, _ = _load_safetensors(weights)
    else:
        sd, meta = _load_safetensors(path)
        if meta.get("format") != FORMAT or "config" not in meta:
            raise CrateEdgeError(f"{path}: safetensors file without a crate-edge config in its metadata")
        try:
            cfg_dict = json.loads(meta["config"])
        except ValueError as e:
            raise CrateEdgeError(f"{path}: malformed config metadata ({e})") from None
    try:
        cfg = config_from_dict(cfg_dict)
    except (TypeError, ValueError) as e:
        raise CrateEdgeError(f"{path}: invalid model config: {e}") from None
    return sd, cfg, doc


# ---------------------------------------------------------------- upstream checkpoints


def read_upstream(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """torch.load(weights_only=True), unwrap the known containers, strip `module.`."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CrateEdgeError(
            f"{path}: refusing to load: the file holds objects other than tensors and plain data "
            f"(weights_only unpickling rejected it: {first[:200]})"
        ) from None
    except Exception as e:  # torch.load fails on arbitrary bytes with many types (KeyError, RuntimeError, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CrateEdgeError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {msg[:200]}") from None
    arch = None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CrateEdgeError(
            f"{path}: no CRATE or CRATE-α state_dict found (expected a state_dict, or a dict with 'state_dict' or 'model')"
        )
    sd = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        sd[k] = v
    return sd, arch


def _shape(sd, key, path, family="crate"):
    if key not in sd:
        raise CrateEdgeError(f"{path}: not a {TITLES[family]} checkpoint: key {key!r} is missing")
    return tuple(sd[key].shape)


def family_of_state_dict(sd: dict[str, torch.Tensor], path) -> str:
    """ "crate" (a patch LayerNorm + Linear embedding and one square ISTA dictionary per layer) or
    "crate-alpha" (a Conv2d embedding and the dictionaries D, D1 per layer), by the keys."""
    if "conv1.weight" in sd or "transformer.layers.0.1.fn.D" in sd:
        return "crate-alpha"
    if "to_patch_embedding.1.weight" in sd or "transformer.layers.0.1.fn.weight" in sd:
        return "crate"
    some = ", ".join(sorted(sd)[:3])
    raise CrateEdgeError(
        f"{path}: not a CRATE or CRATE-α checkpoint: neither CRATE's to_patch_embedding.* nor CRATE-α's conv1.* keys (it has {some}, ...)"
    )


def infer_config(
    sd: dict[str, torch.Tensor], path, heads: int | None = None, pool: str | None = None, arch: str | None = None, **overrides
) -> CrateConfig:
    """Every shape-derived field from the weights (the family from the keys); heads from the
    caller, the published configurations, the checkpoint's `arch`, or (CRATE-α without an
    output map) 1; pool from the caller (default cls)."""
    fam = family_of_state_dict(sd, path)
    dim = _shape(sd, "cls_token", path, fam)[-1]
    n_tokens = _shape(sd, "pos_embedding", path, fam)[1]
    num_classes = _shape(sd, "mlp_head.1.weight", path, fam)[0]
    depth = len({m.group(1) for k in sd if (m := re.match(r"transformer\.layers\.(\d+)\.", k))})
    if depth == 0:
        raise CrateEdgeError(f"{path}: not a {TITLES[fam]} checkpoint: no transformer.layers.* keys")
    inner = _shape(sd, "transformer.layers.0.0.fn.qkv.weight", path, fam)[0]
    extra: dict = {}
    if fam == "crate-alpha":
        conv = _shape(sd, "conv1.weight", path, fam)
        if len(conv) != 4:
            raise CrateEdgeError(f"{path}: conv1.weight has shape {conv}, expected (dim, channels, patch, patch)")
        code = _shape(sd, "transformer.layers.0.1.fn.D", path, fam)
        if len(code) != 2 or code[0] != dim or code[1] % dim:
            raise CrateEdgeError(f"{path}: transformer.layers.0.1.fn.D has shape {code}, expected ({dim}, k*{dim})")
        extra["overcomplete"] = code[1] // dim
        overrides.setdefault("channels", conv[1])
        overrides.setdefault("patch_size", conv[2] if conv[2] == conv[3] else (conv[2], conv[3]))
        if heads is None and "transformer.layers.0.0.fn.to_out.0.weight" not in sd:
            heads = 1  # upstream drops the output map only for one head of width dim
        patch_dim = None
    else:
        patch_dim = _shape(sd, "to_patch_embedding.1.weight", path, fam)[0]

    channels = overrides.pop("channels", None)
    if channels is None:
        for c in (3, 1):
            if patch_dim % c == 0 and math.isqrt(patch_dim // c) ** 2 == patch_dim // c:
                channels = c
                break
        else:
            raise CrateEdgeError(f"{path}: cannot infer channels and patch size from patch_dim={patch_dim}; pass channels= and patch_size=")
    patch = overrides.pop("patch_size", None)
    if patch is None:
        patch = math.isqrt(patch_dim // channels)
    n = n_tokens - 1
    image = overrides.pop("image_size", None)
    if image is None:
        side = math.isqrt(n)
        if side * side != n:
            raise CrateEdgeError(f"{path}: {n} patches is not a square grid; pass image_size=(H, W)")
        image = (side * patch, side * patch) if isinstance(patch, int) else (side * patch[0], side * patch[1])
        image = image[0] if image[0] == image[1] else image

    if heads is None:
        published = _PUBLISHED[fam]
        known = published.get((dim, depth, inner))
        arch_name = (arch or "").lower().replace("crate_", "").replace("crate-", "").replace("alpha-", "").replace("alpha_", "")
        by_arch = {name: h for (d, _, _), (name, h) in published.items() if d == dim}
        if arch_name in by_arch:
            heads = by_arch[arch_name]
        elif known:
            heads = known[1]
        else:
            raise CrateEdgeError(
                f"{path}: cannot tell the number of heads from the weights (qkv is {inner}x{dim} = heads*dim_head x dim, "
                f"not a published {TITLES[fam]} configuration); pass --heads H (Python: heads=H)"
            )
    heads = int(heads)
    if heads < 1 or inner % heads:
        raise CrateEdgeError(f"{path}: heads={heads} does not divide the qkv width {inner}")
    try:
        return (crate_alpha.CrateAlphaConfig if fam == "crate-alpha" else CrateConfig)(
            image_size=image,
            patch_size=patch,
            channels=channels,
            num_classes=num_classes,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=inner // heads,
            pool=pool or "cls",
            **extra,
            **overrides,
        )
    except (TypeError, ValueError) as e:
        raise CrateEdgeError(f"{path}: {e}") from None


def build(sd: dict[str, torch.Tensor], cfg: CrateConfig, path):
    """Instantiate the model of cfg's family and load weights strictly, with messages that name the keys."""
    model = build_model(cfg)
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unknown = sorted(set(sd) - set(want))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[0]}")
        if unknown:
            parts.append(f"unknown {len(unknown)} key(s) e.g. {unknown[0]}")
        raise CrateEdgeError(f"{path}: weights do not fit {title(cfg)} {cfg.dim}d x{cfg.depth}: " + "; ".join(parts))
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CrateEdgeError(
                f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)} for heads={cfg.heads}, dim_head={cfg.dim_head}"
            )
        if not sd[k].is_floating_point():
            raise CrateEdgeError(f"{path}: {k} has dtype {sd[k].dtype}, expected floating point")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


def load_model(path: str | os.PathLike | None = None, heads: int | None = None, pool: str | None = None, **overrides):
    """Load a CRATE or CRATE-α in eval mode from a crate-edge directory or .safetensors file, or from an
    upstream checkpoint (.pth/.pth.tar/.pt). `path=None` gives the embedded reference model.
    `heads`/`pool` are needed only for upstream files whose heads cannot be inferred."""
    if path is None:
        path = embedded_model_dir()
    p = Path(path)
    if not p.exists():
        raise CrateEdgeError(f"model {p} not found")
    if pool is not None and pool not in ("cls", "mean"):
        raise CrateEdgeError(f"pool must be cls or mean, got {pool!r}")
    if p.is_dir() or p.suffix == ".safetensors" or _is_safetensors(p):
        sd, cfg, _ = _load_crate_edge(p)
        if pool is not None and pool != cfg.pool:
            cfg = type(cfg).from_dict({**cfg.to_dict(), "pool": pool})
        return build(sd, cfg, p)
    sd, arch = read_upstream(p)
    cfg = infer_config(sd, p, heads=heads, pool=pool, arch=arch, **overrides)
    return build(sd, cfg, p)


def _is_safetensors(p: Path) -> bool:
    """safetensors starts with an 8-byte little-endian header length, then '{'."""
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def import_checkpoint(src, out_dir, heads: int | None = None, pool: str | None = None, **overrides) -> Path:
    """Convert an upstream checkpoint to the crate-edge format."""
    model = load_model(src, heads=heads, pool=pool, **overrides)
    return save_model(model, out_dir, metadata={"imported_from": str(Path(src).name), "source_sha256": sha256_file(src)})


def model_hash(model) -> str:
    """sha256 over config and weights: identifies the source model of an artifact."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()
