"""What bench runs: the baselines on the artifacts' source model and the artifacts themselves,
each as (name, worker init spec, static info for the report); batch sizes; the check that the
artifacts and the baselines' model are one source model."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CrateEdgeError
from ..manifest import artifact_size

BASELINES = ("upstream", "folded", "compile")
BASELINE_LABELS = {"upstream": "eager upstream", "folded": "eager folded+SDPA", "compile": "torch.compile folded+SDPA"}
FOLDED_REWRITES = ["shift_patch_norm", "fold_ista", "sdpa_attention"]

Spec = tuple[str, dict, dict]  # (contender name, worker init spec, static info)


def parse_batches(spec) -> tuple[int, ...]:
    """ "1,8,32" (or an int, or a sequence) -> (1, 8, 32)."""
    if isinstance(spec, int):
        items = [spec]
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    try:
        out = tuple(int(b) for b in items)
    except (TypeError, ValueError):
        raise CrateEdgeError(f"batch {spec!r}: expected positive integers such as 1,8,32") from None
    if not out or any(b < 1 for b in out):
        raise CrateEdgeError(f"batch {spec!r}: expected positive integers such as 1,8,32")
    return tuple(dict.fromkeys(out))


def source_model(manifests: list[dict]) -> tuple[str, tuple, dict]:
    """(sha256, input shape without the batch, config) of the one model every artifact came from."""
    shas = {m["source_model"]["sha256"] for m in manifests}
    shapes = {tuple(m["input"]["shape"][1:]) for m in manifests}
    if len(shas) > 1 or len(shapes) > 1:
        raise CrateEdgeError("the artifacts come from different source models; benchmark them separately")
    return shas.pop(), shapes.pop(), manifests[0]["source_model"]["config"]


def _resolve_model(model, sha: str, tmp: Path) -> tuple[str, str]:
    """(path a worker can load, label) for the artifacts' source model; the embedded model by
    default, which must then be the source."""
    from ..checkpoint import load_model, model_hash, save_model
    from ..zoo import embedded_model_dir

    if model is None or model == "embedded":
        path, label = str(embedded_model_dir()), "embedded reference model"
        m = load_model(path)
    elif isinstance(model, (str, os.PathLike)):
        path, label = str(model), str(model)
        m = load_model(path)
        if not (Path(path).is_dir() or Path(path).suffix == ".safetensors"):  # an upstream checkpoint: convert once
            path = str(save_model(m, tmp / "model"))
    else:
        m, label = model, "model passed to bench()"
        path = str(save_model(m, tmp / "model"))
    got = model_hash(m)
    if got != sha:
        if model is None or model == "embedded":
            raise CrateEdgeError(
                f"the artifacts were not compiled from the embedded model (source sha256 {sha[:12]}...): pass "
                "--model with their source model for the baselines, or --baselines none"
            )
        raise CrateEdgeError(f"model {label} (sha256 {got[:12]}...) is not the artifacts' source (sha256 {sha[:12]}...)")
    return path, label


def baseline_specs(baselines: tuple[str, ...], model_path: str, device: str) -> list[Spec]:
    """Eager upstream first (the reference every ratio and logit check is against), then the others."""
    return [
        (
            BASELINE_LABELS[b],
            {"kind": b, "model": model_path, "device": device},
            {"kind": "baseline", "baseline": b, "rewrites": [] if b == "upstream" else FOLDED_REWRITES},
        )
        for b in ("upstream", *[x for x in baselines if x != "upstream"])
    ]


def artifact_specs(artifacts: list[Path], manifests: list[dict], rpc: str | None, rpc_key: str | None) -> list[Spec]:
    """One contender per artifact, named by its target (and its path where two share a target);
    TVM artifacts run on the RPC server when rpc is given."""
    specs: list[Spec] = []
    names: list[str] = []
    for a, m in zip(artifacts, manifests):
        base = m["target"]["name"]
        name = base if base not in names else f"{base} ({a})"
        names.append(name)
        remote = bool(rpc) and m["backend"]["name"] == "tvm"
        info = {
            "kind": "artifact",
            "artifact": str(a),
            "target": base,
            "backend": m["backend"]["name"],
            "precision": m.get("precision", {}),
            "target_precision": m["target"]["definition"].get("precision", "fp32"),
            "rewrites": m.get("rewrites", []),
            "size_bytes": artifact_size(a, m),
            "quantization": ((m.get("quantization") or {}).get("config") or {}).get("scheme"),
        }
        spec = {"kind": "rpc" if remote else "artifact", "path": str(a.resolve()), "rpc": rpc, "rpc_key": rpc_key}
        specs.append((name + (" [rpc]" if remote else ""), spec, info))
    return specs
