"""crate-edge: take a CRATE white-box transformer from training to TensorRT, TVM, Core ML,
ExecuTorch, ONNX Runtime and AOTInductor, with proof of parity and measured speed."""
from __future__ import annotations

from .checkpoint import import_checkpoint, load_model, save_model
from .errors import BackendUnavailable, CrateEdgeError
from .model import CRATE, VARIANTS, CrateConfig, create_model, list_variants

__version__ = "0.1.0"


def evaluate(model, data: str = "fashion-mnist:test", batch_size: int = 256, progress: bool = False) -> dict:
    """Top-1 accuracy of `model` on a dataset spec (see crate_edge.data)."""
    from .data import load_dataset
    from .train import evaluate as _evaluate

    ds = load_dataset(data, "test", model.cfg.image_size, model.cfg.channels)
    return _evaluate(model, ds, model.cfg, batch_size=batch_size, progress=progress)


def compile(model=None, target: str = "onnxruntime", **kw):
    """Compile a CRATE for a target; see crate_edge.compiler.compile."""
    from .compiler import compile as _compile

    return _compile(model, target, **kw)


def load_artifact(path, reference_ok: bool = False):
    """Load a compiled artifact (hashes verified); see crate_edge.artifact.load_artifact."""
    from .artifact import load_artifact as _load

    return _load(path, reference_ok=reference_ok)


from . import bench  # noqa: E402  (a callable module: crate_edge.bench(...) runs crate_edge.bench.bench)

# submodules with the other verbs: crate_edge.parity.parity(...), crate_edge.quantize.search(...),
# crate_edge.testing.assert_parity(...)
__all__ = ["compile", "load_artifact", "bench", "CRATE", "CrateConfig", "VARIANTS", "create_model", "list_variants", "load_model", "save_model",
           "import_checkpoint", "evaluate", "CrateEdgeError", "BackendUnavailable", "__version__"]
