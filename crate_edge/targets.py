"""Declarative target definitions: one TOML file per target variant, in the checkout's top-level
targets/ (installed from a wheel as crate_edge/builtin_targets/; targets_dir() finds either).
`--target NAME` resolves to NAME.toml there; a path to a user's own .toml works too."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import BACKENDS
from .backends.base import PRECISIONS
from .errors import CrateEdgeError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclass
class Target:
    name: str
    backend: str
    precision: str = "fp32"
    description: str = ""
    rewrites: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # backend options
    example_batch: int = 2
    dynamic_batch: tuple[int, int] | None = (1, 64)  # None: static batch
    parity: dict[str, float] = field(default_factory=dict)  # max_abs, min_top1_agreement, min_cosine
    bench: dict[str, Any] = field(default_factory=dict)
    quantize: dict[str, Any] = field(default_factory=dict)
    isa: str = "native"  # the CPU level compiled code may assume (crate_edge.isa); TVM and AOTInductor bake it in
    path: str = ""
    sha256: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> str:
        """Where the target's artifacts execute: "cuda" (options.device, a TVM cuda target, or
        TensorRT), "apple" (Core ML) or "cpu"."""
        tgt = self.options.get("target")
        if self.backend == "coreml":
            return "apple"
        if self.options.get("device") == "cuda" or (isinstance(tgt, dict) and tgt.get("kind") == "cuda") or self.backend == "tensorrt":
            return "cuda"
        return "cpu"

    @property
    def tolerances(self) -> dict[str, float]:
        return tolerances_for(self.raw or {"precision": self.precision, "quantize": self.quantize, "parity": self.parity})


FP32_TOLERANCES = {"max_abs": 1e-4, "min_top1_agreement": 0.999, "min_cosine": 0.99999}


def tolerances_for(definition: dict) -> dict[str, float]:
    """A target definition's parity tolerances: its [parity] table, over the fp32 defaults for
    float32 targets (a reduced-precision target states its own budget)."""
    fp32 = definition.get("precision", "fp32") == "fp32" and not definition.get("quantize")
    return {**(FP32_TOLERANCES if fp32 else {}), **dict(definition.get("parity") or {})}


_KEYS = {"name", "backend", "precision", "description", "rewrites", "options", "input", "parity", "bench", "quantize", "isa"}


def targets_dir() -> Path:
    """The built-in target definitions: crate_edge/builtin_targets/ in an installed wheel, the
    checkout's top-level targets/ in an editable install or with the checkout on PYTHONPATH. (An
    editable install cannot import crate_edge.builtin_targets itself: setuptools' editable finder
    does not resolve a namespace subpackage mapped outside its parent, pypa/setuptools#4943, so
    this looks the directory up instead of importing it.)"""
    here = Path(__file__).resolve().parent
    installed, checkout = here / "builtin_targets", here.parent / "targets"
    if installed.is_dir():
        return installed
    if checkout.is_dir() and (here.parent / "pyproject.toml").is_file():
        return checkout
    raise CrateEdgeError(
        f"the built-in target definitions are missing: neither {installed} (an installed wheel) "
        f"nor {checkout} (a source checkout) exists; reinstall crate-edge"
    )


def list_targets() -> list[str]:
    return sorted(p.stem for p in targets_dir().glob("*.toml"))


def load_target(name_or_path: str | Path) -> Target:
    p = Path(name_or_path)
    if not (p.suffix == ".toml" and p.exists()):
        p = targets_dir() / f"{name_or_path}.toml"
        if not p.exists():
            raise CrateEdgeError(f"unknown target {name_or_path!r}; known: {', '.join(list_targets())} (or a path to a .toml)")
    raw_bytes = p.read_bytes()
    try:
        doc = tomllib.loads(raw_bytes.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CrateEdgeError(f"target file {p}: invalid TOML ({e})") from None
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise CrateEdgeError(f"target file {p}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
    if "backend" not in doc:
        raise CrateEdgeError(f"target file {p}: 'backend' is required")
    if doc["backend"] not in BACKENDS:
        raise CrateEdgeError(f"target file {p}: unknown backend {doc['backend']!r}; known: {', '.join(BACKENDS)}")
    prec = doc.get("precision", "fp32")
    if prec not in PRECISIONS:
        raise CrateEdgeError(f"target file {p}: precision must be one of {', '.join(PRECISIONS)}")
    inp = doc.get("input", {})
    dyn = inp.get("dynamic_batch", [1, 64])
    if dyn is not None and dyn is not False:
        if not (isinstance(dyn, list) and len(dyn) == 2 and 1 <= dyn[0] <= dyn[1]):
            raise CrateEdgeError(f"target file {p}: input.dynamic_batch must be [min, max] with 1 <= min <= max, or false")
        dyn = (int(dyn[0]), int(dyn[1]))
    else:
        dyn = None
    from .isa import ISA_LEVELS
    from .rewrites import PASSES  # here: the rewrites import torch, and listing targets needs none

    if doc.get("isa", "native") not in ISA_LEVELS:
        raise CrateEdgeError(f"target file {p}: isa must be one of {', '.join(ISA_LEVELS)}, got {doc.get('isa')!r}")

    bad = [r for r in doc.get("rewrites", []) if r not in PASSES]
    if bad:
        raise CrateEdgeError(f"target file {p}: unknown rewrite(s) {', '.join(bad)}; known: {', '.join(PASSES)}")
    return Target(
        name=doc.get("name", p.stem),
        backend=doc["backend"],
        precision=prec,
        description=doc.get("description", ""),
        rewrites=list(doc.get("rewrites", [])),
        options=dict(doc.get("options", {})),
        example_batch=int(inp.get("example_batch", 2)),
        dynamic_batch=dyn,
        parity=dict(doc.get("parity", {})),
        bench=dict(doc.get("bench", {})),
        quantize=dict(doc.get("quantize", {})),
        isa=str(doc.get("isa", "native")),
        path=str(p),
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
        raw=doc,
    )
