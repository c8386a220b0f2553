"""TensorRT. TensorRT 10.12+/11 builds strongly typed networks: precision comes from the ONNX
network itself (fp16 tensors for fp16, Q/DQ for int8/fp8), not from builder flags.

compile() always produces (a) `model.onnx`, the network TensorRT's ONNX parser will read, typed
at the target precision with fp32 inputs/outputs, using only operators the parser supports
(checked against PARSER_OPS); then (b) when `tensorrt` is importable and a CUDA GPU is present,
the serialized engine with a timing cache; otherwise (c) `build_engine.sh`, the exact trtexec
command that finishes the build on a GPU host, and the manifest says the engine was not built.
The ONNX network's numerics are checked here with ONNX Runtime (labelled as such).
"""
from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendUnavailable, CrateEdgeError
from .base import Backend, Compiled
from .onnxruntime import export_onnx, op_inventory, ort_runner

ONNX, ENGINE, CACHE, SCRIPT = "model.onnx", "model.engine", "timing.cache", "build_engine.sh"

# ONNX operators TensorRT's parser supports that CRATE graphs can contain (onnx-tensorrt
# docs/operators.md for TensorRT 10.x; `Attention` (opset 23) since the 10.14 parser).
# Deliberately a short list: an exported op outside it fails the compile here rather than the
# engine build on the GPU host.
PARSER_OPS = {
    "Add", "Attention", "Cast", "Concat", "Constant", "ConstantOfShape", "DequantizeLinear", "Div", "Equal", "Erf",
    "Expand", "Flatten", "Gather", "Gemm", "Identity", "LayerNormalization", "MatMul", "Mul", "Pow", "QuantizeLinear",
    "ReduceMean", "Relu", "Reshape", "Shape", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Transpose",
    "Unsqueeze", "Where", "Range", "Reciprocal", "Tile", "Max", "Min", "Clip", "Sigmoid", "Tanh", "Neg",
}


class _Typed(torch.nn.Module):
    """fp32 in and out, the network in `dtype` (strong typing carries it into TensorRT)."""

    def __init__(self, module, dtype):
        super().__init__()
        self.module, self.dtype = module.to(dtype), dtype

    def forward(self, x):
        out = self.module(x.to(self.dtype))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def _gpu() -> bool:
    return torch.cuda.is_available()


class TensorRTBackend(Backend):
    name = "tensorrt"
    packages = ("onnx", "onnxscript")  # to produce the network; the engine needs tensorrt + a GPU
    runtime_packages = ("tensorrt",)
    extra = "tensorrt"

    def dists(self):
        return ["onnx", "onnxscript", "tensorrt", "torch-tensorrt"]

    def can_run(self, manifest: dict | None = None):
        if importlib.util.find_spec("tensorrt") is None:
            return False, "tensorrt is not installed (it comes from NVIDIA's index on a GPU host)"
        if not _gpu():
            return False, "no CUDA GPU present"
        return True, ""

    def compile(self, module, ep, example, target, out: Path) -> Compiled:
        opset = int(target.options.get("opset", 23))
        prec = target.precision
        if prec not in ("fp32", "fp16"):
            raise CrateEdgeError(f"target {target.name}: precision {prec} needs the quantization flow (int8/fp8 Q/DQ)")
        if prec == "fp16":
            from ..compiler import export

            module = _Typed(module, torch.float16)
            ep = export(module, example, target.dynamic_batch)
        export_onnx(ep, example, out / ONNX, opset)
        ops = op_inventory(out / ONNX)
        bad = sorted(set(ops) - PARSER_OPS)
        if bad:
            raise CrateEdgeError(f"target {target.name}: the ONNX network uses operators TensorRT's parser does not take: {', '.join(bad)}")
        shapes = self._shapes(example, target)
        cmd = self.trtexec_command(shapes, target)
        (out / SCRIPT).write_text("#!/usr/bin/env bash\n# Build the TensorRT engine on a GPU host with TensorRT >= 10.14 installed.\n"
                                  "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n" + cmd + "\n")
        (out / SCRIPT).chmod(0o755)
        files = [ONNX, SCRIPT]
        verified = {"onnx_network": f"opset {opset}, {sum(ops.values())} nodes, every op in TensorRT's parser list",
                    "numerics": "ONNX Runtime (CPU) on the exact ONNX network handed to TensorRT"}
        not_verified = {}
        info = {"opset": opset, "ops": ops, "fused_attention_ops": ops.get("Attention", 0), "strongly_typed": True,
                "shapes": shapes, "build_command": cmd}
        ok, why = self.can_run()
        if ok:
            self._build_engine(out, shapes, target)
            files += [ENGINE, CACHE]
            verified["engine"] = f"built with TensorRT on {torch.cuda.get_device_name(0)}"
            info["engine_built"] = True
        else:
            not_verified["engine"] = f"not built here ({why}); run {SCRIPT} on a GPU host"
            not_verified["tensorrt_execution"] = "TensorRT itself did not run on this machine"
            info["engine_built"] = False
        return Compiled(files=files, precision={"network": prec, "io": "fp32"}, verified=verified,
                        not_verified=not_verified, info=info)

    @staticmethod
    def _shapes(example, target) -> dict[str, str]:
        c, h, w = example.shape[1:]
        lo, hi = target.dynamic_batch or (example.shape[0], example.shape[0])
        opt = int(target.options.get("opt_batch", min(max(1, example.shape[0]), hi)))
        return {k: f"images:{b}x{c}x{h}x{w}" for k, b in (("min", lo), ("opt", opt), ("max", hi))}

    @staticmethod
    def trtexec_command(shapes, target) -> str:
        args = ["trtexec", f"--onnx={ONNX}", "--stronglyTyped", f"--saveEngine={ENGINE}", f"--timingCacheFile={CACHE}",
                f"--minShapes={shapes['min']}", f"--optShapes={shapes['opt']}", f"--maxShapes={shapes['max']}"]
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

    def load(self, art_dir: Path, manifest: dict):  # pragma: no cover - needs TensorRT and a GPU
        if not (art_dir / ENGINE).exists():
            raise BackendUnavailable(f"{art_dir} has no TensorRT engine yet: run {SCRIPT} there on a GPU host")
        import tensorrt as trt

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine((art_dir / ENGINE).read_bytes())
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        stream = torch.cuda.Stream()

        def run(x: np.ndarray):
            xt = torch.from_numpy(x).cuda()
            context.set_input_shape("images", tuple(xt.shape))
            context.set_tensor_address("images", xt.data_ptr())
            res = []
            for n in outs:
                t = torch.empty(tuple(context.get_tensor_shape(n)), dtype=torch.float32, device="cuda")
                context.set_tensor_address(n, t.data_ptr())
                res.append(t)
            context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
            return [t.cpu().numpy() for t in res]

        run._keep = (runtime, engine, context)  # the context must not outlive its engine
        return run

    def reference_runner(self, art_dir: Path, manifest: dict):
        if importlib.util.find_spec("onnxruntime") is None:
            return None
        return ort_runner(art_dir / ONNX, threads=None, providers=["CPUExecutionProvider"]), \
            "onnxruntime CPU on the ONNX network handed to TensorRT, not TensorRT"
