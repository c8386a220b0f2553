"""ONNX Runtime: torch.export -> ONNX (dynamo exporter) -> onnxruntime (CPU; CUDA where present).
The reference-quality executor users compare against."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import Backend, Compiled

MODEL = "model.onnx"


def export_onnx(ep, example, path: Path, opset: int) -> None:
    """ExportedProgram -> ONNX file with weights inline, dynamic batch kept from the export."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(ep, (example,), dynamo=True, opset_version=opset, verbose=False,
                                 input_names=["images"], optimize=True)
    prog.save(str(path), external_data=False)


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


def ort_session(path: Path, threads: int | None = None, providers: list[str] | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    avail = ort.get_available_providers()
    provs = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in avail] or ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), so, providers=provs)


def ort_runner(path: Path, threads: int | None = None, providers: list[str] | None = None):
    sess = ort_session(path, threads, providers)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})


class ONNXRuntimeBackend(Backend):
    name = "onnxruntime"
    packages = ("onnx", "onnxscript", "onnxruntime")
    runtime_packages = ("onnxruntime",)
    extra = "onnx"

    def dists(self):
        return ["onnx", "onnxscript", "onnxruntime"]

    def compile(self, module, ep, example, target, out: Path) -> Compiled:
        opset = int(target.options.get("opset", 18))
        export_onnx(ep, example, out / MODEL, opset)
        ops = op_inventory(out / MODEL)
        return Compiled(files=[MODEL], precision={"*": "fp32"}, info={"opset": opset, "ops": ops},
                        verified={"execution": "onnxruntime on this machine"})

    def load(self, art_dir: Path, manifest: dict):
        opts = manifest["target"]["definition"].get("options", {})
        return ort_runner(art_dir / MODEL, opts.get("threads"), opts.get("providers"))
