"""Reduced precision with coremltools.optimize.coreml, on the quantization policy's sites only:
matching sites to MIL linears by weight value, activation calibration in torch, the plan check,
the compression itself, and the audit of what the compressed program holds."""

from __future__ import annotations

import numpy as np
import torch

from ...calibration import calibrate
from ...errors import CrateEdgeError
from .mil import _main_ops, _weight_producer

COMPRESSED_WEIGHT_OPS = (
    "constexpr_blockwise_shift_scale",
    "constexpr_affine_dequantize",
    "constexpr_lut_to_dense",
    "constexpr_sparse_to_dense",
    "constexpr_cast",
)
ACT_QUANT_OPS = ("quantize", "dequantize")
QUANT_SCHEMES = ("int8_weights", "palettize", "int8")
LINEAR_OPTIONS = ("weight_mode",)  # [quantize.options] per scheme
PALETTE_OPTIONS = ("mode", "granularity", "group_size", "per_channel_scale")
# first Core ML release that runs each compression (coremltools refuses or skips below it)
MIN_TARGET = {"int8_weights": "iOS16", "palettize": "iOS16", "int8": "iOS17"}


def _site_weight(module: torch.nn.Module, path: str) -> np.ndarray:
    try:
        sub = module.get_submodule(path)
    except AttributeError:
        raise CrateEdgeError(f"quantization site {path!r} is not a submodule of the compiled model") from None
    w = getattr(sub, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise CrateEdgeError(f"quantization site {path!r} has no 2-D weight")
    return w.detach().float().numpy()


def map_sites(prog, module: torch.nn.Module, sites: dict[str, str]) -> dict[str, dict[str, str]]:
    """site -> {"linear": MIL op name, "weight": const name, "x": input var name, "param": torch
    parameter FQN}, by matching the float const feeding each MIL linear against the site's torch
    weight rounded to that const's precision (exact equality). Raises unless every site matches
    exactly one linear."""
    linears = []
    for op in _main_ops(prog):
        if op.op_type != "linear":
            continue
        wv = op.inputs["weight"]
        if wv.op is None or wv.op.op_type != "const" or wv.val is None:
            continue
        linears.append((op, np.asarray(wv.val)))
    out: dict[str, dict[str, str]] = {}
    used: set[str] = set()
    for site, path in sites.items():
        w = _site_weight(module, path)
        hits = [op for op, val in linears if val.shape == w.shape and np.array_equal(val, w.astype(val.dtype))]
        if len(hits) != 1:
            raise CrateEdgeError(f"quantization site {site} ({path}): {len(hits)} MIL linear ops carry its weight; expected exactly 1")
        op = hits[0]
        if op.name in used:
            raise CrateEdgeError(f"quantization site {site}: MIL op {op.name} already matched another site")
        used.add(op.name)
        out[site] = {
            "linear": op.name,
            "weight": op.inputs["weight"].op.name,
            "x": op.inputs["x"].name,
            "param": f"{path}.weight",
            "shape": list(w.shape),
        }
    return out


def _weight_config(qc, tgt_name: str):
    import coremltools.optimize.coreml as cto

    opts = dict(qc.options or {})
    known = PALETTE_OPTIONS if qc.scheme == "palettize" else LINEAR_OPTIONS
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise CrateEdgeError(f"coreml: unknown quantize.options {', '.join(unknown)} for scheme {qc.scheme}; known: {', '.join(known)}")
    if qc.scheme in ("int8_weights", "int8"):
        if qc.nbits not in (4, 8):
            raise CrateEdgeError(f"coreml: linear weight quantization takes nbits 4 or 8, not {qc.nbits}")
        mode = opts.get("weight_mode", "linear_symmetric")
        try:
            cfg = cto.OpLinearQuantizerConfig(mode=mode, dtype=f"int{qc.nbits}", granularity=qc.weights, weight_threshold=0)
        except ValueError as e:
            raise CrateEdgeError(f"coreml: bad weight quantization options: {e}") from None
        return cfg, f"int{qc.nbits} {qc.weights.replace('_', '-')} {mode}"
    # palettize
    if qc.nbits not in (1, 2, 3, 4, 6, 8):
        raise CrateEdgeError(f"coreml: palettization takes nbits 1, 2, 3, 4, 6 or 8, not {qc.nbits}")
    gran = opts.get("granularity", "per_tensor")
    group = int(opts.get("group_size", 32))
    pcs = bool(opts.get("per_channel_scale", False))
    mode = opts.get("mode", "kmeans")
    if (gran != "per_tensor" or pcs) and _target_rank(tgt_name) < _target_rank("iOS18"):
        raise CrateEdgeError(
            f"coreml: palettization granularity {gran} / per_channel_scale needs minimum_deployment_target iOS18+, not {tgt_name}"
        )
    try:
        cfg = cto.OpPalettizerConfig(
            mode=mode, nbits=qc.nbits, granularity=gran, group_size=group, enable_per_channel_scale=pcs, weight_threshold=0
        )
    except ValueError as e:
        raise CrateEdgeError(f"coreml: bad palettization options: {e}") from None
    desc = (
        f"{qc.nbits}-bit {mode} LUT, {gran}"
        + (f" (groups of {group} output channels)" if gran != "per_tensor" else "")
        + (", per-channel scales" if pcs else "")
    )
    return cfg, desc


def _target_rank(name: str) -> int:
    import coremltools as ct

    t = getattr(ct.target, name, None)
    return int(t.value) if t is not None else -1


def check_plan(plan, tgt_name: str):
    """Refuse what this backend cannot honour, before converting: (weight config, description)."""
    qc = plan.config
    if qc.scheme not in QUANT_SCHEMES:
        raise CrateEdgeError(
            f"backend coreml: quantize.scheme {qc.scheme!r} is not supported; use one of {', '.join(QUANT_SCHEMES)} "
            "(fp16 compute is the target's precision)"
        )
    need = MIN_TARGET[qc.scheme]
    if _target_rank(tgt_name) < _target_rank(need):
        raise CrateEdgeError(f"backend coreml: {qc.scheme} needs minimum_deployment_target {need}+, not {tgt_name}")
    if not plan.sites:
        raise CrateEdgeError("backend coreml: the quantization plan has no sites")
    if qc.scheme == "int8":
        if qc.activations != "static":
            raise CrateEdgeError(
                "backend coreml: scheme int8 quantizes activations (activations = static); use int8_weights for weight-only"
            )
    return _weight_config(qc, tgt_name)


def _compress(mlmodel, module, plan, tgt_name: str):
    """Apply the plan to the converted model. Returns (compressed mlmodel, site map, info)."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    from coremltools.models import utils as mutils
    from coremltools.optimize.coreml._quantization_passes import insert_prefix_quantize_dequantize_pair

    qc = plan.config
    wcfg, wdesc = check_plan(plan, tgt_name)
    sites = map_sites(mlmodel._mil_program, module, plan.sites)
    info = {"weights": wdesc}
    if qc.scheme == "int8":
        ranges = calibrate(module, plan).amax()  # linear_symmetric: |x| <= amax
        stats = {sites[s]["x"]: {"rmin": -ranges[s], "rmax": ranges[s]} for s in sites}
        # two sites never share an input var here (each site GEMM reads its own LayerNorm / attention output)
        acfg = cto.OptimizationConfig(
            op_name_configs={
                sites[s]["linear"]: cto.OpLinearQuantizerConfig(
                    mode="linear_symmetric", dtype="int8", granularity="per_tensor", weight_threshold=0
                )
                for s in sites
            }
        )
        p = insert_prefix_quantize_dequantize_pair(config=acfg)  # prefix only: site inputs, never outputs
        p.activation_stats = stats
        mlmodel = mutils._apply_graph_pass(mlmodel, [p], spec_version=ct.target.iOS17, skip_model_load=True)
        info["activations"] = (
            f"int8 per-tensor symmetric at the inputs of the {len(sites)} site linears, crate_edge.calibration "
            f"({qc.calibration}{' ' + str(qc.percentile) if qc.calibration == 'percentile' else ''}) "
            f"on {len(plan.calibration)} training images"
        )
        info["activation_ranges"] = {s: round(v, 6) for s, v in sorted(ranges.items())}
    per_site = {s: wcfg for s in sites}
    if qc.scheme == "palettize" and wcfg.granularity.name == "PER_GROUPED_CHANNEL":
        # coremltools skips a weight whose output channels do not split into whole groups (the
        # 10-class head with groups of 16): give such a site the largest group that divides it
        for s, v in sites.items():
            c, g = v["shape"][0], wcfg.group_size
            if c % g:
                g2 = max(d for d in range(1, g + 1) if c % d == 0)
                per_site[s] = cto.OpPalettizerConfig(
                    mode=wcfg.mode,
                    nbits=wcfg.nbits,
                    granularity=wcfg.granularity,
                    group_size=g2,
                    enable_per_channel_scale=wcfg.enable_per_channel_scale,
                    weight_threshold=0,
                )
                info.setdefault("group_size_adjusted", {})[s] = g2
    config = cto.OptimizationConfig(op_name_configs={sites[s]["weight"]: per_site[s] for s in sites})
    if qc.scheme == "palettize":
        mlmodel = cto.palettize_weights(mlmodel, config)
    else:
        mlmodel = cto.linear_quantize_weights(mlmodel, config)
    return mlmodel, sites, info


def audit_compression(prog, sites: dict[str, dict[str, str]]) -> dict:
    """What the final program really holds: per site linear the ops producing its weight, and
    which linears have compressed weights / quantized inputs. Raises if anything is off-policy."""
    site_ops = {v["linear"]: s for s, v in sites.items()}
    compressed, act_q, weight_chain = set(), set(), {}
    n_linear = 0
    for op in _main_ops(prog):
        if op.op_type != "linear":
            continue
        n_linear += 1
        chain = [o.op_type for o in _weight_producer(op)]
        if any(t.startswith("constexpr_") for t in chain):
            compressed.add(op.name)
        x = op.inputs["x"].op
        if x is not None and x.op_type == "dequantize":
            act_q.add(op.name)
        if op.name in site_ops:
            weight_chain[site_ops[op.name]] = chain
    missing = sorted(set(site_ops) - {o.name for o in _main_ops(prog) if o.op_type == "linear"})
    if missing:
        raise CrateEdgeError(f"coreml: site linear op(s) {', '.join(missing)} vanished from the compressed program")
    off = sorted(compressed - set(site_ops))
    if off:
        raise CrateEdgeError(f"coreml: weights compressed outside the quantization sites: {', '.join(off)}")
    # every quantize op must feed a dequantize that feeds a site linear's input
    for op in _main_ops(prog):
        if op.op_type == "dequantize":
            users = [c for c in op.outputs[0].child_ops]
            if not users or any(c.op_type != "linear" or c.name not in site_ops for c in users):
                raise CrateEdgeError(f"coreml: activation quantization outside the site linears at {op.name}")
    return {
        "linears": n_linear,
        "compressed_weight_linears": len(compressed),
        "quantized_input_linears": len(act_q),
        "uncompressed_sites": sorted(site_ops[o] for o in set(site_ops) - compressed),
        "weight_ops_by_site": dict(sorted(weight_chain.items())),
    }
