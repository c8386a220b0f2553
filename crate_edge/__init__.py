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


__all__ = ["CRATE", "CrateConfig", "VARIANTS", "create_model", "list_variants", "load_model", "save_model",
           "import_checkpoint", "evaluate", "CrateEdgeError", "BackendUnavailable", "__version__"]
