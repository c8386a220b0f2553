"""Core ML: coremltools.convert on the ExportedProgram -> .mlpackage (ML program).

Options: minimum_deployment_target (iOS17, iOS18, macOS15, ...; iOS18+ keeps MSSA as one fused
scaled_dot_product_attention op), compute_units (ALL, CPU_ONLY, CPU_AND_GPU, CPU_AND_NE);
precision fp16 or fp32 compute. Predictions need macOS. Elsewhere the converted program is
verified statically (op inventory, tensor precisions, input/output shapes), and its numerics
are checked by running the exact ExportedProgram handed to coremltools in torch at the
target's compute precision, which is labelled as such and never reported as Core ML.

Reduced precision (a target's [quantize] table), applied with coremltools.optimize.coreml
to the converted program, ONLY on the CRATE policy's sites (plan.sites: the weight GEMMs):

  * int8_weights: per-channel (or per-tensor) symmetric int8 weights
    (constexpr_blockwise_shift_scale on iOS18, constexpr_affine_dequantize before);
  * palettize: n-bit k-means look-up tables (constexpr_lut_to_dense), per tensor or per grouped
    channel, optionally with per-channel scales (iOS18);
  * int8: int8 weights and int8 activations at the site linears' inputs (quantize/dequantize
    pairs, iOS17+). Activation ranges are calibrated in torch on the plan's training images
    (Core ML predictions, which coremltools' own calibration uses, need a Mac) and handed to
    coremltools' insert_prefix_quantize_dequantize_pair pass for the site linears only.

Sites are matched to MIL `linear` ops by the weight values themselves (the const feeding the
linear equals the torch weight at the program's precision), never by name guessing; every
site must match exactly one linear and every compressed weight must belong to a site.

Off macOS the numerics of a compressed program are checked by torch on the converted
ExportedProgram with the site weights replaced by the values decompressed from the saved
.mlpackage (and, for int8, the activation quantize/dequantize scales read back from it), at the
program's compute precision. That is what Core ML computes up to its kernels' arithmetic; it is
labelled "not Core ML".
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import torch

from ..calibration import feed_site_inputs
from ..errors import CrateEdgeError
from ..runtimes import COREML_PACKAGE
from .base import Backend, Compiled

PACKAGE = COREML_PACKAGE
SOURCE = "source.pt2"  # the exact ExportedProgram converted, for the off-macOS numeric check

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


def _dtype_name(t) -> str:
    from coremltools.converters.mil.mil import types

    try:
        return types.builtin_to_string(t)
    except Exception:  # noqa: BLE001 - tensor / list types
        return getattr(t, "__name__", str(t))


def _main_ops(prog):
    return list(prog.functions["main"].operations)


def _mil_inventory(mlmodel) -> tuple[dict[str, int], dict[str, int]]:
    """(op type -> count, output dtype -> count) over the ML program's main function."""
    return _prog_inventory(mlmodel._mil_program)


def _prog_inventory(prog) -> tuple[dict[str, int], dict[str, int]]:
    ops: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    for op in _main_ops(prog):
        ops[op.op_type] = ops.get(op.op_type, 0) + 1
        if op.op_type != "const" and not op.op_type.startswith("constexpr_"):
            for o in op.outputs:
                name = _dtype_name(o.dtype)
                dtypes[name] = dtypes.get(name, 0) + 1
    return dict(sorted(ops.items())), dict(sorted(dtypes.items()))


def _precision_by_op(prog) -> dict[str, list[str]]:
    """float dtype -> sorted op types whose float outputs have it (non-const ops): the exact
    precision map of the converted program."""
    by: dict[str, set[str]] = {}
    for op in _main_ops(prog):
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            continue
        for o in op.outputs:
            d = _dtype_name(o.dtype)
            if d in ("fp16", "fp32", "fp64", "bf16"):
                by.setdefault(d, set()).add(op.op_type)
    return {k: sorted(v) for k, v in sorted(by.items())}


def _package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _weight_producer(op):
    """The chain of ops producing a linear's weight input, nearest first (const / constexpr_*)."""
    chain = []
    v = op.inputs["weight"]
    while v is not None and v.op is not None and (v.op.op_type == "const" or v.op.op_type.startswith("constexpr_")):
        chain.append(v.op)
        nxt = [i for k, i in v.op.inputs.items() if k in ("data", "quantized_data", "indices", "input")]
        v = next((i for i in nxt if i.op is not None and i.op.op_type.startswith("constexpr_")), None)
    return chain


# ------------------------------------------------------------------ sites <-> MIL ops


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


def calibrate_inputs(
    module: torch.nn.Module,
    sites: dict[str, str],
    images: torch.Tensor,
    method: str = "percentile",
    percentile: float = 99.99,
    batch: int = 64,
    max_values: int = 4_000_000,
) -> dict[str, float]:
    """Symmetric range |x| <= a of each site GEMM's input over the calibration images, in torch
    fp32 on the (float) module handed to the backend: site -> a."""
    if method not in ("max", "percentile"):
        raise CrateEdgeError(f"coreml: activation calibration {method!r} is not supported; use max or percentile")

    store: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    feed_site_inputs(module, sites, images, lambda s, x: store[s].append(x.abs().flatten().float()), batch)
    out = {}
    for s, parts in store.items():
        a = torch.cat(parts)
        if method == "max":
            out[s] = float(a.max())
        else:
            if a.numel() > max_values:  # a fixed stride keeps it deterministic
                a = a[:: -(-a.numel() // max_values)]
            out[s] = float(torch.quantile(a.double(), percentile / 100.0))
    return out


# ------------------------------------------------------------------ compression


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
        if qc.calibration not in ("max", "percentile"):
            raise CrateEdgeError(f"backend coreml: activation calibration {qc.calibration!r} is not supported; use max or percentile")
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
        ranges = calibrate_inputs(module, plan.sites, plan.calibration, qc.calibration, qc.percentile)
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
            f"int8 per-tensor symmetric at the inputs of the {len(sites)} site linears, calibrated in torch "
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


def read_compressed(package: Path, sites: dict[str, dict[str, str]]) -> dict[str, dict]:
    """From a saved .mlpackage: per site, the decompressed weight of its MIL linear (numpy, at
    the program's precision) and, where its input is quantized, (scale, zero_point, qmin, qmax)."""
    import coremltools as ct
    from coremltools.models import utils as mutils
    from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    prog = mutils._apply_graph_pass(
        mlmodel, [WeightDecompressor(op_selector=lambda op: True)], return_pymil_prog=True, skip_model_load=True
    )
    by_name = {op.name: op for op in _main_ops(prog) if op.op_type == "linear"}
    out = {}
    for s, v in sites.items():
        op = by_name.get(v["linear"])
        if op is None or op.inputs["weight"].val is None:
            raise CrateEdgeError(f"{package}: site {s} linear {v['linear']} not found with a constant weight")
        d = {"weight": np.asarray(op.inputs["weight"].val)}
        x = op.inputs["x"].op
        if x is not None and x.op_type == "dequantize":
            q = x.inputs["input"].op
            if q is None or q.op_type != "quantize":
                raise CrateEdgeError(f"{package}: site {s}: dequantize without quantize")
            zp = q.inputs.get("zero_point")
            dt = _dtype_name(q.outputs[0].dtype)
            lo, hi = {"int8": (-128, 127), "uint8": (0, 255)}[dt]
            d["act"] = (float(np.asarray(q.inputs["scale"].val)), float(np.asarray(zp.val)) if zp is not None else 0.0, lo, hi)
        out[s] = d
    return out


def _fake_quant(x: torch.Tensor, scale: float, zp: float, lo: int, hi: int) -> torch.Tensor:
    """Core ML quantize -> dequantize: clip(round(x / scale) + zp, lo, hi), then (q - zp) * scale."""
    q = torch.clamp(torch.round(x / scale) + zp, lo, hi)
    return (q - zp) * scale


def load_with_program_weights(gm: torch.fx.GraphModule, comp: dict[str, dict], sites: dict[str, dict[str, str]]):
    """Put the Core ML program's decompressed weights into the exported module's site parameters
    and its activation quantize/dequantize in front of the site GEMMs (FX rewrite)."""
    for s, v in sites.items():
        p = gm.get_parameter(v["param"]) if "." in v["param"] else getattr(gm, v["param"])
        w = torch.from_numpy(comp[s]["weight"].astype(np.float32))
        if p.shape != w.shape:
            raise CrateEdgeError(f"site {s}: program weight {tuple(w.shape)} vs parameter {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(w)
    acts = {v["param"]: comp[s]["act"] for s, v in sites.items() if "act" in comp[s]}
    if acts:
        g = gm.graph
        done = set()
        for node in list(g.nodes):
            if node.op != "call_function" or len(node.args) < 2:
                continue
            w = node.args[1]
            if getattr(w, "op", None) == "get_attr" and w.target in acts:
                with g.inserting_before(node):
                    fq = g.call_function(_fake_quant, (node.args[0], *acts[w.target]))
                node.args = (fq, *node.args[1:])
                done.add(w.target)
        if done != set(acts):
            raise CrateEdgeError(f"could not place activation quantization for {', '.join(sorted(set(acts) - done))}")
        g.lint()
        gm.recompile()
    return gm


class CoreMLBackend(Backend):
    name = "coreml"
    packages = ("coremltools",)
    extra = "coreml"

    def dists(self):
        return ["coremltools"]

    def can_run(self, manifest: dict | None = None):
        if platform.system() != "Darwin":
            return False, "Core ML predictions run only on macOS"
        return super().can_run(manifest)

    def compile(self, module, ep, example, target, out: Path, quant=None) -> Compiled:
        import coremltools as ct

        opts = target.options
        tgt_name = opts.get("minimum_deployment_target", "iOS18")
        if not hasattr(ct.target, tgt_name):
            raise CrateEdgeError(f"target {target.name}: unknown minimum_deployment_target {tgt_name!r}")
        if target.precision not in ("fp16", "fp32"):
            raise CrateEdgeError(
                f"target {target.name}: Core ML compute precision must be fp16 or fp32 "
                "(int8 weights / activations go in the [quantize] table)"
            )
        units = opts.get("compute_units", "ALL")
        if not hasattr(ct.ComputeUnit, units):
            raise CrateEdgeError(f"target {target.name}: unknown compute_units {units!r}")
        if quant is not None:
            check_plan(quant, tgt_name)
        shape = list(example.shape)
        if target.dynamic_batch:
            lo, hi = target.dynamic_batch
            shape[0] = ct.RangeDim(lo, hi, default=min(max(shape[0], lo), hi))
        with torch.no_grad():
            sample = module(example)
        n_out = len(sample) if isinstance(sample, tuple) else 1
        names = ["logits"] + [f"out_{i}" for i in range(1, n_out)]
        prec = ct.precision.FLOAT16 if target.precision == "fp16" else ct.precision.FLOAT32
        ep_core = ep.run_decompositions({})
        torch.export.save(ep, str(out / SOURCE))
        mlmodel = ct.convert(
            ep_core,
            inputs=[ct.TensorType(name="images", shape=ct.Shape(shape), dtype=np.float32)],
            outputs=[ct.TensorType(name=n, dtype=np.float32) for n in names],
            minimum_deployment_target=getattr(ct.target, tgt_name),
            compute_precision=prec,
            compute_units=getattr(ct.ComputeUnit, units),
            convert_to="mlprogram",
            skip_model_load=True,
        )
        qinfo, sites, audit = {}, None, None
        float_bytes = None
        if quant is not None:
            import tempfile

            with tempfile.TemporaryDirectory() as td:  # the uncompressed program, for the size comparison
                mlmodel.save(str(Path(td) / PACKAGE))
                float_bytes = _package_bytes(Path(td) / PACKAGE)
            mlmodel, sites, qinfo = _compress(mlmodel, module, quant, tgt_name)
        mlmodel.save(str(out / PACKAGE))
        prog = mlmodel._mil_program
        ops, dtypes = _prog_inventory(prog)
        by_prec = _precision_by_op(prog)
        fused = ops.get("scaled_dot_product_attention", 0)
        spec = mlmodel.get_spec()
        io = {"inputs": [i.name for i in spec.description.input], "outputs": [o.name for o in spec.description.output]}
        size = _package_bytes(out / PACKAGE)
        verified = {
            "conversion": f"coremltools {ct.__version__} produced an ML program for {tgt_name} on this machine",
            "op_inventory": f"{sum(ops.values())} MIL ops; fused scaled_dot_product_attention: {fused}",
            "precision": f"output dtypes of non-const ops: {dtypes}",
            "io": f"inputs {io['inputs']}, outputs {io['outputs']}, batch {list(target.dynamic_batch or [example.shape[0]] * 2)}",
        }
        info = {
            "deployment_target": tgt_name,
            "compute_units": units,
            "mil_ops": ops,
            "mil_dtypes": dtypes,
            "fused_attention_ops": fused,
            "io": io,
            "package_bytes": size,
        }
        other_w = "fp16" if target.precision == "fp16" else "fp32"
        precision = {"compute": target.precision, "io": "fp32", "ops_by_dtype": by_prec, "weights": other_w}
        not_verified = {}
        if quant is not None:
            audit = audit_compression(prog, sites)
            n = len(sites)
            if audit["compressed_weight_linears"] != n or audit["uncompressed_sites"]:
                raise CrateEdgeError(
                    f"coreml: only {audit['compressed_weight_linears']} of {n} site weights were compressed "
                    f"(missing: {', '.join(audit['uncompressed_sites'])})"
                )
            if quant.config.scheme == "int8" and audit["quantized_input_linears"] != n:
                raise CrateEdgeError(f"coreml: activation quantization reached {audit['quantized_input_linears']} of {n} site linears")
            comp_ops = {k: v for k, v in ops.items() if k in COMPRESSED_WEIGHT_OPS or k in ACT_QUANT_OPS}
            info.update(
                quant_sites=sites,
                compression=audit,
                compression_ops=comp_ops,
                float_package_bytes=float_bytes,
                size_vs_float=round(size / float_bytes, 4),
            )
            precision["weights"] = {"sites": f"{qinfo['weights']} ({n} site linears: {', '.join(sorted(sites))})", "other": other_w}
            precision["activations"] = qinfo.get("activations", f"{target.precision} (weight-only compression)")
            if "activation_ranges" in qinfo:
                info["activation_ranges"] = qinfo["activation_ranges"]
            verified["compression"] = (
                f"{audit['compressed_weight_linears']} of {audit['linears']} MIL linears have compressed weights "
                f"(exactly the {n} sites, matched by weight value); ops {comp_ops}"
                + (f"; {audit['quantized_input_linears']} site linears read int8-quantized inputs" if quant.config.scheme == "int8" else "")
            )
        if platform.system() != "Darwin":
            if quant is None:
                how = f"by running the exported program in torch at {target.precision}"
            else:
                how = f"by torch at {target.precision} on the exported program with the weights decompressed from the .mlpackage" + (
                    " and its activation quantize/dequantize scales" if quant.config.scheme == "int8" else ""
                )
            not_verified["execution"] = f"Core ML predictions need macOS; numerics were checked {how}, not by Core ML"
            if quant is not None:
                not_verified["runtime_kernels"] = (
                    "whether Core ML on device keeps the weights compressed in memory / runs int8 "
                    "arithmetic (ANE, iOS17+/iOS18) or decompresses to fp16 is decided by the runtime "
                    "and was not observed"
                )
        if target.precision == "fp16":
            extra = [t for t in by_prec.get("fp32", []) if t != "cast"]
            if extra:  # ops coremltools kept in fp32 inside an fp16 program: the fp16 emulation does not model them
                not_verified["fp16_emulation"] = f"ops kept in fp32 by coremltools were emulated in fp16: {', '.join(extra)}"
        return Compiled(files=[PACKAGE, SOURCE], precision=precision, verified=verified, not_verified=not_verified, info=info)

    def reference_runner(self, art_dir: Path, manifest: dict):
        """Torch runs the ExportedProgram that was converted, at the compute precision (every op's
        output rounded to fp16 for fp16 programs, as Core ML's fp16 ML program stores them); for a
        compressed program, with the site weights decompressed from the saved .mlpackage and its
        activation quantize/dequantize in front of the site GEMMs."""
        gm = torch.export.load(str(art_dir / SOURCE)).module()
        half = manifest["precision"].get("compute") == "fp16"
        sites = manifest["backend"].get("quant_sites")
        what = "the exported program given to coremltools"
        if sites:
            comp = read_compressed(art_dir / PACKAGE, sites)
            gm = load_with_program_weights(gm, comp, sites)
            acts = any("act" in c for c in comp.values())
            what = "the exported program with the Core ML program's decompressed weights" + (
                " and activation quantize/dequantize" if acts else ""
            )
        if half:
            gm = gm.half()

        def run(x: np.ndarray):
            with torch.no_grad():
                t = torch.from_numpy(x)
                out = gm(t.half() if half else t)
            out = out if isinstance(out, (list, tuple)) else [out]
            return [o.float().numpy() for o in out]

        dt = "float16" if half else "float32"
        label = f"not Core ML: torch ({dt}) on {what}" if sites else f"torch ({dt}) on {what}, not Core ML"
        return run, label
