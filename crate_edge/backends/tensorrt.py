"""TensorRT. TensorRT 10.12+/11 builds strongly typed networks: precision comes from the ONNX
network itself (fp16 tensors for fp16, Q/DQ for int8/fp8), not from builder flags.

compile() always produces (a) `model.onnx`, the network TensorRT's ONNX parser will read, typed
at the target precision with fp32 inputs/outputs, using only operators the parser supports
(checked against PARSER_OPS); then (b) when `tensorrt` is importable and a CUDA GPU is present,
the serialized engine with a timing cache; otherwise (c) `build_engine.sh`, the exact trtexec
command that finishes the build on a GPU host, and the manifest says the engine was not built.
The ONNX network's numerics are checked here with ONNX Runtime (labelled as such).

int8 / fp8 targets (a [quantize] table) get an explicit Q/DQ network: the fp16 network with
QuantizeLinear/DequantizeLinear on the inputs of CRATE's site GEMMs only (see insert_qdq).
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import numpy as np
import torch

from ..calibration import calibrate
from ..errors import BackendUnavailable, CrateEdgeError
from ..export import export
from .base import YES, Availability, Backend, Capabilities, Compiled, precision_map
from .onnxruntime import export_onnx, op_inventory, ort_runner, qdq_summary, site_nodes

ONNX, ENGINE, CACHE, SCRIPT = "model.onnx", "model.engine", "timing.cache", "build_engine.sh"

# ONNX operators TensorRT's parser supports that CRATE graphs can contain (onnx-tensorrt
# docs/operators.md for TensorRT 10.x; `Attention` (opset 23) since the 10.14 parser).
# Deliberately a short list: an exported op outside it fails the compile here rather than the
# engine build on the GPU host.
PARSER_OPS = {
    "Add",
    "Attention",
    "Cast",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",  # CRATE-α's patch embedding (2-D, kernel = stride)
    "DequantizeLinear",
    "Div",
    "Equal",
    "Erf",
    "Expand",
    "Flatten",
    "Gather",
    "Gemm",
    "Identity",
    "LayerNormalization",
    "MatMul",
    "Mul",
    "Pow",
    "QuantizeLinear",
    "ReduceMean",
    "ReduceSum",  # CRATE-α probes: the reconstruction residual's norms
    "Relu",
    "Reshape",
    "Shape",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Transpose",
    "Unsqueeze",
    "Where",
    "Range",
    "Reciprocal",
    "Tile",
    "Max",
    "Min",
    "Clip",
    "Sigmoid",
    "Tanh",
    "Neg",
}


class _Typed(torch.nn.Module):
    """fp32 in and out, the network in `dtype` (strong typing carries it into TensorRT)."""

    def __init__(self, module, dtype):
        super().__init__()
        self.module, self.dtype = module.to(dtype), dtype

    def forward(self, x):
        out = self.module(x.to(self.dtype))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


# ------------------------------------------------------------------ explicit Q/DQ (int8, fp8)
#
# TensorRT builds a strongly typed network from Q/DQ as written: a GEMM whose activation and
# weight inputs both come through DequantizeLinear runs as an int8 (or fp8) GEMM with the
# dequantization fused into its epilogue; everything else runs in the network's float type.
# CRATE's policy (crate_edge.quantize) puts Q/DQ only on the inputs of the site GEMMs:
#   * activation: QuantizeLinear -> DequantizeLinear per tensor, scale = amax / qmax from the
#     calibration (qmax 127 for int8, 448 for fp8 E4M3), zero point 0 (TensorRT is symmetric);
#   * weight: pre-quantized int8 / float8e4m3fn initializer -> DequantizeLinear per output
#     channel (axis 1 of MatMul's B (in, out); axis 0 of Gemm's B when transB = 1);
#   * scales in the network's float type (fp16): in a strongly typed network the DQ output type
#     is the scale type, so the GEMM stays fp16 in, fp16 out.
# No Q/DQ goes around the attention: TensorRT's fused MHA in Q/DQ mode wants Q/DQ on the BMM
# inputs (w for w w^T, and the softmax output for A w). CRATE keeps both products and the
# softmax in float (q = k = v multiplies the error of w by itself), so the ONNX
# Attention op gets plain fp16 inputs and TensorRT runs its fp16 fused attention kernel. Nor
# around LayerNorm, the residual adds, the ISTA identity path, threshold and ReLU.

QMAX = {"int8": 127.0, "fp8": 448.0}


def _fp8():
    import ml_dtypes

    return ml_dtypes.float8_e4m3fn


def quantize_weight(w: np.ndarray, axis: int | None, scheme: str, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weight quantization: (q, scale) with scale in `scale_dtype` (per channel along
    `axis`, or per tensor when axis is None); q int8 in [-127, 127] or float8 E4M3 in [-448, 448]."""
    w = np.asarray(w, np.float32)
    if axis is None:
        amax = np.array(np.abs(w).max(), np.float32)
    else:
        amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis)).astype(np.float32)
    scale = (np.maximum(amax, 1e-30) / QMAX[scheme]).astype(scale_dtype)
    scale = np.where(scale.astype(np.float32) > 0, scale, np.finfo(scale_dtype).smallest_subnormal).astype(scale_dtype)
    s32 = scale.astype(np.float32)
    if axis is not None:
        shape = [1] * w.ndim
        shape[axis] = -1
        s32 = s32.reshape(shape)
    r = np.clip(w / s32, -QMAX[scheme], QMAX[scheme])
    q = np.rint(r).astype(np.int8) if scheme == "int8" else r.astype(_fp8())
    return q, scale


def _tensor(name, arr, elem):
    import onnx

    if elem == onnx.TensorProto.FLOAT8E4M3FN:
        raw = np.ascontiguousarray(arr).view(np.uint8).tobytes()
        return onnx.helper.make_tensor(name, elem, list(arr.shape), raw, raw=True)
    return onnx.numpy_helper.from_array(np.ascontiguousarray(arr), name)


def insert_qdq(model, site_map: dict[str, str], amax: dict[str, float], scheme: str, per_channel: bool) -> dict:
    """Put Q/DQ on the inputs of the site GEMMs of a float (fp16 or fp32) ONNX network, in place
    (see the comment above). Returns per-site scales and axes for the manifest."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes = {n.name: n for n in g.node}
    prod = {o: n for n in g.node for o in n.output}
    qelem = TensorProto.INT8 if scheme == "int8" else TensorProto.FLOAT8E4M3FN
    zero = np.zeros((), np.int8) if scheme == "int8" else np.zeros((), _fp8())
    new_nodes: dict[str, list] = {}
    info = {}
    for site, nname in sorted(site_map.items()):
        node = nodes[nname]
        wname = node.input[1]
        if wname not in inits:
            p = prod.get(wname)
            raise CrateEdgeError(
                f"site {site}: weight of {node.op_type} {nname} is not an initializer (produced by {p.op_type if p is not None else '?'})"
            )
        w = numpy_helper.to_array(inits[wname])
        if w.ndim != 2:
            raise CrateEdgeError(f"site {site}: weight of {nname} has rank {w.ndim}, expected 2")
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0):
                raise CrateEdgeError(f"site {site}: Gemm with transA is not supported")
            axis = 0 if attrs.get("transB", 0) else 1
        else:
            axis = 1
        sdt = w.dtype if w.dtype in (np.float16, np.float32) else np.float32
        # activation: Q -> DQ per tensor, dedicated to this node (other consumers keep float)
        x = node.input[0]
        a_scale = np.array(max(amax[site], 1e-30) / QMAX[scheme], dtype=sdt)
        if float(a_scale) == 0.0:
            a_scale = np.array(np.finfo(sdt).smallest_subnormal, sdt)
        pre = f"crate_qdq.{site}"
        g.initializer.extend([numpy_helper.from_array(a_scale, f"{pre}.x_scale"), _tensor(f"{pre}.x_zero", zero, qelem)])
        q = helper.make_node("QuantizeLinear", [x, f"{pre}.x_scale", f"{pre}.x_zero"], [f"{pre}.x_q"], name=f"{pre}.x_Q")
        dq = helper.make_node("DequantizeLinear", [f"{pre}.x_q", f"{pre}.x_scale", f"{pre}.x_zero"], [f"{pre}.x_dq"], name=f"{pre}.x_DQ")
        # weight: pre-quantized initializer -> DQ per output channel
        wq, w_scale = quantize_weight(w, axis if per_channel else None, scheme, sdt)
        g.initializer.extend([_tensor(f"{pre}.w_q", wq, qelem), numpy_helper.from_array(w_scale, f"{pre}.w_scale")])
        dq_attrs = {"axis": axis} if per_channel else {}
        wdq = helper.make_node("DequantizeLinear", [f"{pre}.w_q", f"{pre}.w_scale"], [f"{pre}.w_dq"], name=f"{pre}.w_DQ", **dq_attrs)
        node.input[0], node.input[1] = f"{pre}.x_dq", f"{pre}.w_dq"
        new_nodes[nname] = [q, dq, wdq]
        ws = w_scale.astype(np.float32)
        info[site] = {
            "node": nname,
            "op": node.op_type,
            "weight_axis": axis if per_channel else None,
            "x_amax": float(amax[site]),
            "x_scale": float(a_scale),
            "w_scale_min": float(ws.min()),
            "w_scale_max": float(ws.max()),
            "scales_subnormal": int((np.abs(np.append(ws, float(a_scale))) < np.finfo(np.float16).tiny).sum()) if sdt == np.float16 else 0,
        }
    # drop float weights no node reads any more; insert the Q/DQ nodes before their consumers
    used = {t for n in g.node for t in n.input}
    keep = [i for i in g.initializer if i.name in used or i.name.startswith("crate_qdq.")]
    del g.initializer[:]
    g.initializer.extend(keep)
    ordered = []
    for n in g.node:
        ordered.extend(new_nodes.get(n.name, []))
        ordered.append(n)
    del g.node[:]
    g.node.extend(ordered)
    onnx.checker.check_model(model)
    return info


def _gpu() -> bool:
    return torch.cuda.is_available()


class TensorRTBackend(Backend):
    name = "tensorrt"
    # compiling produces the ONNX network and its build script; the engine needs tensorrt and a GPU
    capabilities = Capabilities(
        devices=("cuda",),
        precisions=("fp32", "fp16", "int8", "fp8"),
        quant_schemes={"int8": "symmetric", "fp8": "symmetric"},
        compile_needs=("onnx", "onnxscript"),
        run_needs=("tensorrt",),
        distributions=("onnx", "onnxscript", "tensorrt", "torch-tensorrt"),
        extra="tensorrt",
    )

    def available(self, target=None, run: bool = False, manifest: dict | None = None) -> Availability:
        if not run:
            return super().available(target)
        if importlib.util.find_spec("tensorrt") is None:
            return Availability(False, "tensorrt is not installed (it comes from NVIDIA's index on a GPU host)")
        if not _gpu():
            return Availability(False, "no CUDA GPU present")
        return YES

    def compile(self, exported, target, out: Path, quant=None) -> Compiled:
        module, ep, example = exported.module, exported.program, exported.example
        opset = int(target.options.get("opset", 23))
        prec = target.precision
        qinfo = None
        if quant is not None:
            qc = quant.config
            if qc.scheme not in QMAX or qc.activations != "static":
                raise CrateEdgeError(
                    f"target {target.name}: TensorRT quantizes scheme int8 or fp8 with static activations "
                    f"(explicit Q/DQ); got scheme {qc.scheme}, activations {qc.activations}"
                )
            if qc.scheme == "fp8" and opset < 19:
                raise CrateEdgeError(f"target {target.name}: float8 QuantizeLinear needs ONNX opset >= 19 (options.opset = {opset})")
            net = str(target.options.get("network_precision", "fp16"))
            if net not in ("fp16", "fp32"):
                raise CrateEdgeError(f"target {target.name}: options.network_precision = {net!r}; allowed: fp16, fp32")
            amax = calibrate(module, quant).amax()  # on the fp32 module, before it is cast
            prec = net
        elif prec not in ("fp32", "fp16"):
            raise CrateEdgeError(f"target {target.name}: precision {prec} needs the quantization flow (a [quantize] table: int8/fp8 Q/DQ)")
        prefix = ""
        if prec == "fp16":
            module = _Typed(module, torch.float16)
            prefix = "module."
            ep = export(module, example, target.dynamic_batch)
        export_onnx(ep, example, out / ONNX, opset)
        if quant is not None:
            import onnx

            m = onnx.load(str(out / ONNX))
            smap = site_nodes(m.graph, quant.sites, prefix)
            sites = insert_qdq(m, smap, amax, quant.config.scheme, quant.config.weights == "per_channel")
            onnx.save(m, str(out / ONNX))
            placement = qdq_summary(m)
            stray = sorted(set(placement["nodes"]) - set(smap.values()))
            if stray:
                raise CrateEdgeError(f"target {target.name}: Q/DQ reached non-site nodes {', '.join(stray[:5])}")
            qinfo = {
                "scheme": quant.config.scheme,
                "qdq_dtype": "int8" if quant.config.scheme == "int8" else "float8e4m3fn",
                "network": prec,
                "sites": sites,
                "qdq_consumers": placement["by_op"],
            }
        ops = op_inventory(out / ONNX)
        bad = sorted(set(ops) - PARSER_OPS)
        if bad:
            raise CrateEdgeError(f"target {target.name}: the ONNX network uses operators TensorRT's parser does not take: {', '.join(bad)}")
        shapes = self._shapes(example, target)
        cmd = self.trtexec_command(shapes, target)
        need = "TensorRT >= 10.14"
        if qinfo is not None and qinfo["scheme"] == "fp8":
            need += " and an FP8 GPU (compute capability >= 8.9: Ada, Hopper, Blackwell)"
        (out / SCRIPT).write_text(
            f"#!/usr/bin/env bash\n# Build the TensorRT engine on a GPU host with {need} installed.\n"
            'set -euo pipefail\ncd "$(dirname "$0")"\n' + cmd + "\n"
        )
        (out / SCRIPT).chmod(0o755)
        files = [ONNX, SCRIPT]
        verified = {
            "onnx_network": f"opset {opset}, {sum(ops.values())} nodes, every op in TensorRT's parser list",
            "numerics": "ONNX Runtime (CPU) on the exact ONNX network handed to TensorRT",
        }
        not_verified = {}
        info = {
            "opset": opset,
            "ops": ops,
            "fused_attention_ops": ops.get("Attention", 0),
            "strongly_typed": True,
            "shapes": shapes,
            "build_command": cmd,
        }
        site_prec = {}
        if qinfo is not None:
            info["quantized"] = qinfo
            verified["qdq_placement"] = (
                f"Q/DQ ({qinfo['qdq_dtype']}) only on the inputs of the {len(qinfo['sites'])} site GEMMs; "
                "none around Attention, LayerNormalization, Softmax, adds"
            )
            site_prec = {
                s: f"{qinfo['scheme']} GEMM (weights {quant.config.weights} symmetric, activations per_tensor symmetric static)"
                for s in qinfo["sites"]
            }
            not_verified["tensorrt_kernels"] = (
                "which GEMMs TensorRT actually runs in " + qinfo["scheme"] + " (check the engine's layer information on the GPU host)"
            )
        precision = precision_map(prec, site_prec, network=prec)
        ok, why = self.available(target, run=True)
        if ok:
            self._build_engine(out, shapes, target)
            files += [ENGINE, CACHE]
            verified["engine"] = f"built with TensorRT on {torch.cuda.get_device_name(0)}"
            info["engine_built"] = True
        else:
            not_verified["engine"] = f"not built here ({why}); run {SCRIPT} on a GPU host"
            not_verified["tensorrt_execution"] = "TensorRT itself did not run on this machine"
            info["engine_built"] = False
        return Compiled(files=files, precision=precision, verified=verified, not_verified=not_verified, info=info)

    @staticmethod
    def _shapes(example, target) -> dict[str, str]:
        c, h, w = example.shape[1:]
        lo, hi = target.dynamic_batch or (example.shape[0], example.shape[0])
        opt = int(target.options.get("opt_batch", min(max(1, example.shape[0]), hi)))
        return {k: f"images:{b}x{c}x{h}x{w}" for k, b in (("min", lo), ("opt", opt), ("max", hi))}

    @staticmethod
    def trtexec_command(shapes, target) -> str:
        args = [
            "trtexec",
            f"--onnx={ONNX}",
            "--stronglyTyped",
            f"--saveEngine={ENGINE}",
            f"--timingCacheFile={CACHE}",
            f"--minShapes={shapes['min']}",
            f"--optShapes={shapes['opt']}",
            f"--maxShapes={shapes['max']}",
        ]
        if "workspace_mib" in target.options:
            args.append(f"--memPoolSize=workspace:{int(target.options['workspace_mib'])}M")
        return " ".join(shlex.quote(a) for a in args)

    def _build_engine(self, out: Path, shapes, target):  # pragma: no cover - needs TensorRT and a GPU
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(out / ONNX)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise CrateEdgeError(f"TensorRT could not parse the ONNX network: {errs}")
        config = builder.create_builder_config()
        cache = config.create_timing_cache((out / CACHE).read_bytes() if (out / CACHE).exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        if "workspace_mib" in target.options:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(target.options["workspace_mib"]) << 20)
        profile = builder.create_optimization_profile()
        dims = {k: tuple(int(d) for d in v.split(":")[1].split("x")) for k, v in shapes.items()}
        profile.set_shape("images", dims["min"], dims["opt"], dims["max"])
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise CrateEdgeError("TensorRT engine build failed (see the TensorRT log above)")
        (out / ENGINE).write_bytes(bytes(engine))
        (out / CACHE).write_bytes(bytes(config.get_timing_cache().serialize()))

    def runner(self, art_dir: Path, manifest: dict, threads: int | None = None):  # pragma: no cover - needs TensorRT and a GPU
        if not (art_dir / ENGINE).exists():
            raise BackendUnavailable(f"{art_dir} has no TensorRT engine yet: run {SCRIPT} there on a GPU host")
        import tensorrt as trt

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine((art_dir / ENGINE).read_bytes())
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        stream = torch.cuda.Stream()

        def call(xt: torch.Tensor):
            xt = xt.contiguous()
            context.set_input_shape("images", tuple(xt.shape))
            context.set_tensor_address("images", xt.data_ptr())
            res = []
            for n in outs:
                t = torch.empty(tuple(context.get_tensor_shape(n)), dtype=torch.float32, device="cuda")
                context.set_tensor_address(n, t.data_ptr())
                res.append(t)
            stream.wait_stream(torch.cuda.current_stream())  # the input was written on torch's stream
            context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
            return res

        def run(x: np.ndarray):
            return [t.cpu().numpy() for t in call(torch.from_numpy(x).cuda())]

        run._keep = (runtime, engine, context)  # the context must not outlive its engine
        run.device_call = ("cuda", call)  # for `bench`: timed on GPU-resident inputs
        return run

    def reference_runner(self, art_dir: Path, manifest: dict):
        if importlib.util.find_spec("onnxruntime") is None:
            return None
        return ort_runner(
            art_dir / ONNX, threads=None, providers=["CPUExecutionProvider"]
        ), "onnxruntime CPU on the ONNX network handed to TensorRT, not TensorRT"
