"""ONNX Runtime: torch.export -> ONNX (dynamo exporter) -> onnxruntime (CPU; CUDA where present).
The reference-quality executor users compare against.

int8 targets (a [quantize] table, scheme int8): the fp32 ONNX export is quantized with
onnxruntime.quantization.quantize_static into a QDQ network under crate-edge's CRATE policy
(crate_edge.quantize): only the MatMul/Gemm nodes that implement plan.sites get Q/DQ on their
inputs (weights per output channel, activations per tensor, calibrated on plan.calibration);
their outputs stay float, and every other consumer of a quantized activation (the ISTA identity
path y in `ista = "update"`) is rewired to the float tensor, so Attention, LayerNormalization,
Softmax, the adds and the ReLU run in fp32. ORT's CPU provider fuses DQ -> MatMul into
MatMulIntegerToFloat (int8 GEMM, float output). The option `quantize_all_ops = true` drops the
policy (every op type ORT can quantize, shared Q/DQ pairs, quantized outputs): a deliberately
bad baseline for the parity suite.
"""

from __future__ import annotations

import ast
import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..calibration import ENTROPY_BINS, ENTROPY_QBINS, calibrate
from ..errors import CrateEdgeError
from ..runtimes import ONNX_FILE, ort_runner, ort_session, provider_gap  # noqa: F401  (ort_session, ort_runner re-exported)
from .base import Availability, Backend, Capabilities, Compiled, precision_map

MODEL = ONNX_FILE
GEMM_OPS = ("MatMul", "Gemm")
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata the dynamo exporter writes


def export_onnx(ep, example, path: Path, opset: int) -> None:
    """ExportedProgram -> ONNX file with weights inline, dynamic batch kept from the export."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(ep, (example,), dynamo=True, opset_version=opset, verbose=False, input_names=["images"], optimize=True)
    prog.save(str(path), external_data=False)


ATTENTION_LAYOUTS = {  # options.attention_layout: what the ONNX Attention nodes take and give
    "tokens": "3-D (batch, tokens, heads x dim) with q_num_heads / kv_num_heads: no head transposes around it",
    "heads": "4-D (batch, heads, tokens, dim) as exported, a Reshape and a Transpose on each side",
}


def attention_tokens(path: Path) -> int:
    """Rewrite the file's q = k = v Attention nodes from the exporter's 4-D form,
    Reshape(x, [-1, N, H, D]) -> Transpose(0, 2, 1, 3) -> Attention -> Transpose(0, 2, 1, 3) ->
    Reshape, into Attention(x, x, x, q_num_heads = kv_num_heads = H) -> that Reshape, on the
    token-major tensor (ONNX opset 23's 3-D form: same default scale 1/sqrt(D), same output).
    Where each intermediate has that one use. CRATE-Tiny b1 2 threads, AMX Xeon, one process:
    onnxruntime 15.15 -> 14.45 ms, onnxruntime-int8 9.57 -> 8.95. Returns the nodes rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    made = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    for o in g.output:  # a graph output (a probe build's per-layer features) is one more use
        users.setdefault(o.name, []).append(None)
    consts = {i.name: i for i in g.initializer}

    def perm0213(n):
        return n is not None and n.op_type == "Transpose" and [list(a.ints) for a in n.attribute if a.name == "perm"] == [[0, 2, 1, 3]]

    drop, new = set(), {}
    for att in [n for n in g.node if n.op_type == "Attention"]:
        q = att.input[0]
        if list(att.input) != [q, q, q] or {a.name for a in att.attribute} & {"q_num_heads", "kv_num_heads"}:
            continue
        t1 = made.get(q)
        r1 = made.get(t1.input[0]) if perm0213(t1) and len(users[q]) == 3 else None
        if r1 is None or r1.op_type != "Reshape" or r1.input[1] not in consts or len(users[t1.input[0]]) != 1:
            continue
        shape = numpy_helper.to_array(consts[r1.input[1]])
        after = users.get(att.output[0], [])
        t2 = after[0] if len(after) == 1 and perm0213(after[0]) else None
        r2 = users.get(t2.output[0], []) if t2 is not None else []
        if len(shape) != 4 or len(r2) != 1 or r2[0] is None or r2[0].op_type != "Reshape":
            continue
        H, x = int(shape[2]), r1.input[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in att.attribute}
        # the Reshape after stays, now on the 3-D output (same element order as the 4-D transposed
        # back), which also serves an exporter that merged it with the next GEMM's flattening
        new[id(att)] = helper.make_node("Attention", [x, x, x], [t2.output[0]], name=att.name, q_num_heads=H, kv_num_heads=H, **attrs)
        new[id(att)].metadata_props.extend(att.metadata_props)  # its name scope: the profile's block
        drop |= {id(r1), id(t1), id(t2)}
    if new:
        nodes = [new.get(id(n), n) for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(nodes)
        written = {o for n in nodes for o in n.output}  # shapes only of tensors a node still writes,
        changed = {o for n in new.values() for o in n.output}  # not the 4-D shape of the new outputs
        info = [v for v in g.value_info if v.name in written - changed]
        del g.value_info[:]
        g.value_info.extend(info)
        onnx.save(m, str(path))
    return len(new)


def op_inventory(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    m = onnx.load(str(path), load_external_data=False)

    def walk(g):
        for n in g.node:
            key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
            counts[key] = counts.get(key, 0) + 1
            for a in n.attribute:
                if a.g is not None and a.g.node:
                    walk(a.g)

    walk(m.graph)
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------ quantization helpers
# (shared with the TensorRT backend, which builds its own explicit Q/DQ network)


def node_scope(node) -> str | None:
    """The innermost module path a dynamo-exported node came from. Its name-scope metadata is
    the module path hierarchy ending with the FX node name, e.g. ['', 'mlp_head', 'mlp_head.1',
    'linear_19'] for the classifier's Linear; the entry before the FX node name is the module."""
    for p in node.metadata_props:
        if p.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if isinstance(scopes, list) and len(scopes) >= 2 else None
    return None


def site_nodes(graph, sites: dict[str, str], prefix: str = "") -> dict[str, str]:
    """site name -> name of the one MatMul/Gemm node that implements it. A site's module path
    (e.g. "transformer.layers.3.1.fn.update") is matched against each GEMM node's innermost
    name scope (`prefix` + path: a wrapper module's attribute, e.g. "module.")."""
    by_path: dict[str, list[str]] = {}
    for n in graph.node:
        if n.op_type in GEMM_OPS:
            s = node_scope(n)
            if s is not None:
                by_path.setdefault(s, []).append(n.name)
    out, missing = {}, []
    for site, path in sites.items():
        found = by_path.get(prefix + path, [])
        if len(found) != 1:
            missing.append(f"{site} ({prefix + path}: {len(found)} GEMM nodes)")
        else:
            out[site] = found[0]
    if missing:
        raise CrateEdgeError("cannot map quantization sites to exactly one ONNX MatMul/Gemm each: " + ", ".join(missing))
    return out


def _ort_method(qc):
    from onnxruntime.quantization import CalibrationMethod

    return {"max": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[
        qc.calibration
    ]


def _reader(name: str, x: torch.Tensor, bs: int = 32):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(x):
                return None
            b = x[self.i : self.i + bs].numpy().astype(np.float32)
            self.i += bs
            return {name: b}

        def rewind(self):
            self.i = 0

    return Reader()


def _ort_calibrate(fp32_path: Path, op_types, plan, input_name: str, work: Path, cache: Path, symmetric: bool) -> None:
    """quantize_all_ops only (every tensor, not the sites): onnxruntime's own calibrators, set to
    crate_edge.calibration's meanings (max: MinMax; percentile: p of |x| on a 2048-bin
    histogram; entropy: 2048 bins, 255 quantized bins), written to a calibration cache."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    qc = plan.config
    opts: dict = {}
    if qc.calibration == "max":
        opts["symmetric"] = symmetric
    elif qc.calibration == "percentile":
        opts.update(symmetric=True, percentile=float(qc.percentile), num_bins=ENTROPY_BINS)
    else:
        opts.update(symmetric=True, num_bins=ENTROPY_BINS, num_quantized_bins=ENTROPY_QBINS)
    cal = create_calibrator(
        Path(fp32_path), op_types, augmented_model_path=str(work / "augmented.onnx"), calibrate_method=_ort_method(qc), extra_options=opts
    )
    cal.collect_data(_reader(input_name, plan.calibration))
    save_tensors_data(cal.compute_data(), cache)
    del cal


def _site_ranges_cache(graph, site_map: dict[str, str], ranges, cache: Path) -> dict[str, str]:
    """Write crate_edge.calibration's input range of every site as onnxruntime's calibration
    cache (keyed by the ONNX tensor each site's MatMul/Gemm reads). Returns site -> tensor."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    nodes = {n.name: n for n in graph.node}
    tensors = {site: nodes[n].input[0] for site, n in site_map.items()}
    data = {}
    for site, t in tensors.items():
        r = ranges.inputs[site]
        data[t] = TensorData(lowest=np.array(r.lo, np.float32), highest=np.array(r.hi, np.float32))
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
    return tensors


def _restore_float_consumers(model, quantized_nodes: set[str]) -> int:
    """ORT points *every* consumer of a quantized activation at its DequantizeLinear output.
    Rewire the consumers outside `quantized_nodes` (e.g. the ISTA identity add) to the float
    tensor the QuantizeLinear read. Returns how many inputs were rewired."""
    inits = {i.name for i in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}
    fixed = 0
    for n in model.graph.node:
        if n.name in quantized_nodes or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, t in enumerate(n.input):
            dq = prod.get(t)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
                continue
            q = prod.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[i] = q.input[0]
                fixed += 1
    return fixed


def qdq_summary(path_or_model) -> dict:
    """What a QDQ network quantizes: per consumer op type, how many of its inputs come from a
    DequantizeLinear (activation vs weight), and which nodes."""
    import onnx

    m = onnx.load(str(path_or_model)) if isinstance(path_or_model, (str, Path)) else path_or_model
    inits = {i.name: i for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    by_op: dict[str, dict[str, int]] = {}
    nodes = []
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        kinds = []
        for t in n.input:
            p = prod.get(t)
            if p is not None and p.op_type == "DequantizeLinear":
                src = inits.get(p.input[0])
                kinds.append("activation" if src is None else "bias" if src.data_type == onnx.TensorProto.INT32 else "weight")
        if kinds:
            d = by_op.setdefault(n.op_type, {"nodes": 0, "activation_inputs": 0, "weight_inputs": 0, "bias_inputs": 0})
            d["nodes"] += 1
            for k in ("activation", "weight", "bias"):
                d[f"{k}_inputs"] += kinds.count(k)
            nodes.append(n.name)
    return {"by_op": dict(sorted(by_op.items())), "nodes": nodes}


def quantize_int8_qdq(fp32_path: Path, out_path: Path, plan, opts: dict, ranges=None, input_name: str = "images") -> dict:
    """quantize_static on the fp32 export under the CRATE policy (module docstring), with the
    site ranges `ranges` (a crate_edge.calibration.Calibration); returns what was done, for the
    manifest."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    qc = plan.config
    act = str(opts.get("activation_type", "uint8"))
    if act not in ("uint8", "int8"):
        raise CrateEdgeError(f"onnxruntime int8: options.activation_type = {act!r}; allowed: uint8, int8")
    wt = str(opts.get("weight_type", "int8"))
    if wt not in ("uint8", "int8"):
        raise CrateEdgeError(f"onnxruntime int8: options.weight_type = {wt!r}; allowed: uint8, int8")
    qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    reduce_range = bool(opts.get("reduce_range", False))
    all_ops = bool(opts.get("quantize_all_ops", False))
    per_channel = qc.weights == "per_channel"
    sym = bool(opts.get("activation_symmetric", act == "int8"))
    extra = {"ActivationSymmetric": sym, "WeightSymmetric": True}
    model = onnx.load(str(fp32_path))
    if all_ops:  # the deliberately bad baseline: every op type ORT quantizes, plus Attention
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        present = {n.op_type for n in model.graph.node}
        op_types = sorted((set(QDQRegistry) | set(QLinearOpsRegistry) | {"Attention", "LayerNormalization", "Softmax"}) & present)
        nodes = None
        site_map = {}
    else:
        site_map = site_nodes(model.graph, plan.sites)
        op_types = list(GEMM_OPS)
        nodes = sorted(site_map.values())
        extra["OpTypesToExcludeOutputQuantization"] = list(GEMM_OPS)  # GEMM outputs stay float
    # ORT's quantizer also logs a pre-processing hint with logging.warning() on the root logger;
    # that is the application's to show or hide (the CLI hides it unless -v), not this library's
    with tempfile.TemporaryDirectory(prefix="crate-ort-q-") as td, contextlib.redirect_stdout(io.StringIO()):
        tmp, cache = Path(td) / "q.onnx", Path(td) / "ranges.json"
        if all_ops:
            _ort_calibrate(fp32_path, op_types, plan, input_name, Path(td), cache, sym)
            method = _ort_method(qc)
        else:
            _site_ranges_cache(model.graph, site_map, ranges, cache)
            method = CalibrationMethod.MinMax  # the cache holds the ranges; no ORT calibration runs
        quantize_static(
            str(fp32_path),
            str(tmp),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=qt[act],
            weight_type=qt[wt],
            nodes_to_quantize=nodes,
            calibrate_method=method,
            extra_options=extra,
            calibration_cache_path=str(cache),
        )
        q = onnx.load(str(tmp))
    rewired = 0 if all_ops else _restore_float_consumers(q, set(site_map.values()))
    onnx.save(q, str(out_path))
    summ = qdq_summary(q)
    if not all_ops:
        stray = sorted(set(summ["nodes"]) - set(site_map.values()))
        if stray:
            raise CrateEdgeError(f"onnxruntime int8: Q/DQ reached non-site nodes {', '.join(stray[:5])}")
        unq = sorted(s for s, n in site_map.items() if n not in summ["nodes"])
        if unq:
            raise CrateEdgeError(f"onnxruntime int8: sites left unquantized: {', '.join(unq)}")
    return {
        "tool": "onnxruntime.quantization.quantize_static (QDQ)",
        "activation_type": act,
        "weight_type": wt,
        "activation_symmetric": sym,
        "reduce_range": reduce_range,
        "per_channel": per_channel,
        "calibration": f"onnxruntime calibrators ({_ort_method(qc).name}) on every tensor"
        if all_ops
        else "crate_edge.calibration ranges of the site inputs, given to quantize_static as its calibration cache",
        "policy": "all_ops (deliberately bad)" if all_ops else "crate",
        "op_types_quantized": op_types,
        "site_nodes": site_map,
        "float_inputs_restored": rewired,
        "qdq_consumers": summ["by_op"],
    }


class ONNXRuntimeBackend(Backend):
    name = "onnxruntime"
    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        precisions=("fp32", "int8"),
        # uint8 activations with a zero point by default; options.activation_type = "int8" makes them symmetric
        quant_schemes={"int8": "affine"},
        compile_needs=("onnx", "onnxscript", "onnxruntime"),
        run_needs=("onnxruntime",),
        distributions=("onnx", "onnxscript", "onnxruntime"),
        extra="onnx",
    )

    def available(self, target=None, run: bool = False, manifest: dict | None = None) -> Availability:
        """Runs wherever onnxruntime imports; a target that names only GPU providers (no
        CPUExecutionProvider) also needs one of them in this onnxruntime build to run."""
        ok = super().available(target, run, manifest)
        if ok and run:
            definition = (manifest or {}).get("target", {}).get("definition") or (target.raw if target is not None else {})
            gap = provider_gap(definition.get("options", {}).get("providers"))
            if gap:
                return Availability(False, gap)
        return ok

    def compile(self, exported, target, out: Path, quant=None) -> Compiled:
        module, ep, example = exported.module, exported.program, exported.example
        opset = int(target.options.get("opset", 18))
        layout = str(target.options.get("attention_layout", "tokens"))
        if layout not in ATTENTION_LAYOUTS:
            raise CrateEdgeError(f"onnxruntime: options.attention_layout = {layout!r}; known: {', '.join(ATTENTION_LAYOUTS)}")

        def export(path):
            export_onnx(ep, example, path, opset)
            return {"attention_layout": layout, "attention_nodes_rewritten": attention_tokens(path) if layout == "tokens" else 0}

        if quant is None:
            if target.precision not in ("fp32",):
                raise CrateEdgeError(f"target {target.name}: precision {target.precision} needs a [quantize] table (scheme int8)")
            att = export(out / MODEL)
            ops = op_inventory(out / MODEL)
            gap = provider_gap(target.options.get("providers"))
            return Compiled(
                files=[MODEL],
                precision=precision_map("fp32"),
                info={"opset": opset, "ops": ops, "device": target.device, **att},
                verified={
                    "execution": "the same ONNX file on onnxruntime's CPU provider (parity)" if gap else "onnxruntime on this machine"
                },
                not_verified={"execution": gap} if gap else {},
            )
        qc = quant.config
        if qc.scheme != "int8" or qc.activations != "static":
            raise CrateEdgeError(
                f"target {target.name}: onnxruntime quantizes scheme int8 with static activations only "
                f"(got scheme {qc.scheme}, activations {qc.activations})"
            )
        opts = {**target.options, **qc.options}
        with tempfile.TemporaryDirectory(prefix="crate-ort-") as td:
            fp32 = Path(td) / "fp32.onnx"
            att = export(fp32)
            ranges = None if opts.get("quantize_all_ops") else calibrate(module, quant)
            qinfo = quantize_int8_qdq(fp32, out / MODEL, quant, opts, ranges)
        ops = op_inventory(out / MODEL)
        if qinfo["policy"] == "crate":
            act = f"{qinfo['activation_type']} per_tensor {'symmetric' if qinfo['activation_symmetric'] else 'affine'} static"
            prec = precision_map(
                "fp32",
                {s: f"int8 GEMM (weights int8 {qc.weights} symmetric, activations {act})" for s in qinfo["site_nodes"]},
                float_ops="LayerNorm, Attention with its softmax, residual adds, ISTA identity path, threshold, ReLU",
            )
        else:
            prec = precision_map("fp32", quantize_all_ops="int8 wherever onnxruntime quantizes: " + ", ".join(qinfo["op_types_quantized"]))
        return Compiled(
            files=[MODEL],
            precision=prec,
            info={"opset": opset, "ops": ops, "quantized": qinfo, **att},
            verified={"execution": "onnxruntime on this machine"},
        )

    def reference_runner(self, art_dir: Path, manifest: dict):
        """A GPU-provider artifact on a host without that provider: the same file on the CPU provider."""
        return ort_runner(
            art_dir / MODEL, None, ["CPUExecutionProvider"]
        ), "onnxruntime CPU provider on the same ONNX file, not the CUDA provider"
