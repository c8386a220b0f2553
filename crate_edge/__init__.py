"""crate-edge: take a CRATE or CRATE-α white-box transformer from training to TensorRT, TVM, Core ML,
ExecuTorch, ONNX Runtime and AOTInductor, with proof of parity and measured speed.

Importing the package imports no torch: the model and checkpoint names below load their
modules on first use, so that a device with only an artifact's runtime can use
crate_edge.runtime."""

from __future__ import annotations

import importlib

from ._version import __version__
from .errors import BackendUnavailable, CrateEdgeError

_LAZY = {
    "import_checkpoint": "checkpoint",
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    "CRATE": "model",
    "CrateConfig": "model",
    "CrateAlpha": "crate_alpha",
    "CrateAlphaConfig": "crate_alpha",
    "VARIANTS": "family",
    "create_model": "family",
    "list_variants": "family",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'crate_edge' has no attribute {name!r}")


def evaluate(model, data="fashion-mnist:test", batch_size: int = 256, progress: bool = False) -> dict:
    """Top-1 accuracy and mean cross-entropy of `model` on labelled data: any crate_edge.data
    spec (test split), e.g. an .npz with float32 `x` and labels `y`. Unlabelled data is an error."""
    from .data import open_inputs
    from .train import evaluate as _evaluate

    ds = open_inputs(data, model.cfg, "test").require_labels("evaluation", model.cfg.num_classes)
    return _evaluate(model, ds, batch_size=batch_size, progress=progress)


def compile(model=None, target: str = "onnxruntime", **kw):
    """Compile a CRATE for a target; see crate_edge.compiler.compile."""
    from .compiler import compile as _compile

    return _compile(model, target, **kw)


def load_artifact(path, reference_ok: bool = False, threads: int | None = None):
    """Load a compiled artifact (every hash verified first) as a callable runner; see
    crate_edge.runtime.load."""
    from .runtime import load

    return load(path, threads=threads, reference_ok=reference_ok)


# crate_edge.bench is the function, not the subpackage of the same name. Importing the subpackage
# binds the name to the module (the import system sets the attribute once, when the subpackage is
# first loaded); this line, run while the package itself loads, rebinds it to the function, and
# later imports of crate_edge.bench.* find the subpackage in sys.modules and leave it alone. So
# `crate_edge.bench(...)`, `from crate_edge import bench` and `from crate_edge.bench import BenchReport`
# all work; `import crate_edge.bench as b` gives the function too. Torch-free: bench imports
# numpy and the manifest reader only.
from .bench import bench  # noqa: E402

# submodules with the other verbs: crate_edge.parity.parity(...), crate_edge.search.search(...),
# crate_edge.runtime.load(...), crate_edge.testing.assert_parity(...)
__all__ = [
    "compile",
    "load_artifact",
    "bench",
    "CRATE",
    "CrateConfig",
    "CrateAlpha",
    "CrateAlphaConfig",
    "VARIANTS",
    "create_model",
    "list_variants",
    "load_model",
    "save_model",
    "import_checkpoint",
    "evaluate",
    "CrateEdgeError",
    "BackendUnavailable",
    "__version__",
]
