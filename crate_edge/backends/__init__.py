"""Backends, one module each, behind crate_edge.backends.base.Backend."""

from __future__ import annotations

import importlib

from ..errors import CrateEdgeError

BACKENDS = {
    "executorch": "crate_edge.backends.executorch:ExecuTorchBackend",
    "tvm": "crate_edge.backends.tvm:TVMBackend",
    "coreml": "crate_edge.backends.coreml:CoreMLBackend",
    "tensorrt": "crate_edge.backends.tensorrt:TensorRTBackend",
    "onnxruntime": "crate_edge.backends.onnxruntime:ONNXRuntimeBackend",
    "aoti": "crate_edge.backends.aoti:AOTIBackend",
}


def get_backend(name: str):
    if name not in BACKENDS:
        raise CrateEdgeError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    mod, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(mod), cls)()
