"""Models that ship inside the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import CrateEdgeError

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def embedded_model_dir() -> Path:
    """The embedded reference model (recipes/fmnist-reference.toml), crate-edge format."""
    p = Path(str(resources.files("crate_edge") / "assets" / "reference"))
    if not (p / "config.json").exists():
        raise CrateEdgeError(f"the embedded reference model is missing from the package ({p}); reinstall crate-edge")
    return p
