"""The one narrow interface every backend implements (as ExecuTorch backends do):

  * ``capabilities``: what it offers, as declared data (devices, precisions, quantization
    schemes, the modules it needs);
  * ``available(target=None, run=False, manifest=None) -> Availability``: can this machine
    compile for it (or, with run, execute its artifacts), and if not, why, as data;
  * ``compile(exported, target, out, quant=None) -> Compiled``: lower a crate_edge.export.Exported
    into files under `out`;
  * ``runner(art_dir, manifest, threads=None)``: a raw runner for a verified artifact (batches
    within its range; crate_edge.runtime.Runner wraps it), and, where artifacts cannot execute
    here, ``reference_runner`` names the closest executor of the same network.

Each backend imports its library lazily."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..runtimes import RUNNERS

DEVICES = ("cpu", "cuda", "apple")  # apple: Core ML's CPU / GPU / Neural Engine
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
ACTIVATION_SCALING = ("affine", "symmetric", "weight-only", "dynamic")


@dataclass(frozen=True)
class Availability:
    """Whether a backend can do something here; `reason` says why not (one line)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def __iter__(self):  # ok, why = backend.available(...)
        return iter((self.ok, self.reason))


YES = Availability(True)


@dataclass(frozen=True)
class Capabilities:
    """A backend's offer, declared once: `crate-edge targets`, the compiler's checks of a target
    file, the bench table and the tests read it from here."""

    devices: tuple[str, ...]  # where its artifacts execute (DEVICES)
    precisions: tuple[str, ...]  # the target `precision` values it compiles (PRECISIONS)
    # [quantize] scheme -> how its activations are scaled from crate_edge.calibration's ranges
    quant_schemes: dict[str, str] = field(default_factory=dict)
    quant_attention: bool = False  # takes [quantize] attention = "int8" (crate_edge.quantize)
    compile_needs: tuple[str, ...] = ()  # importable modules needed to compile
    run_needs: tuple[str, ...] = ()  # importable modules needed to execute its artifacts
    distributions: tuple[str, ...] = ()  # pip distributions whose versions a manifest records
    extra: str = ""  # the crate-edge pip extra that installs them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Compiled:
    """What a backend's compile returns: the files it wrote (relative to the artifact dir), its
    precision map (`precision_map`), what it verified, and anything else for the manifest."""

    files: list[str]
    precision: dict[str, Any]
    verified: dict[str, str] = field(default_factory=dict)  # what -> how / where
    not_verified: dict[str, str] = field(default_factory=dict)  # what -> why not
    info: dict[str, Any] = field(default_factory=dict)
    # the batch range the artifact accepts, when the backend pinned it (None: the target's);
    # crate_edge.runtime.Runner pads and splits inputs to it
    batch_range: tuple[int, int] | None = None
    # the CPU level its machine code was built for (crate_edge.isa: "native", "x86-64-v3", ...),
    # and features the build added beyond it; None: the runtime picks kernels when it runs
    isa: str | None = None
    isa_extra: tuple[str, ...] = ()


PRECISION_KEYS = ("default", "io", "sites", "detail")


def precision_map(default: str, sites: dict[str, str] | None = None, io: str = "fp32", **detail: Any) -> dict[str, Any]:
    """The one shape of every artifact's precision map: `default` is the precision of everything
    not listed, `io` of the inputs and outputs, `sites` the precision of each quantization site's
    GEMM (site -> description), `detail` whatever else the backend can say (op dtypes, weights)."""
    return {"default": default, "io": io, "sites": dict(sites or {}), "detail": detail}


Runner = Callable[[np.ndarray], list[np.ndarray]]  # float32 NCHW batch -> output arrays


def _missing(mods) -> list[str]:
    out = []
    for m in mods:
        try:
            if importlib.util.find_spec(m) is None:
                out.append(m)
        except (ImportError, ValueError):  # a parent package missing
            out.append(m)
    return out


def device_of(target=None, manifest: dict | None = None) -> str:
    """Where an artifact executes: its manifest's backend device, else what `target` builds for."""
    return (manifest or {}).get("backend", {}).get("device") or (target.device if target is not None else "cpu")


class Backend:
    name: str = ""
    capabilities: Capabilities

    def available(self, target=None, run: bool = False, manifest: dict | None = None) -> Availability:
        """Can this machine compile for this backend (the `target`, when given), or with `run`,
        execute its artifacts (the artifact's `manifest`, or what `target` would produce)?
        Backends with more conditions (a GPU, macOS, a C++ compiler) extend this."""
        cap = self.capabilities
        miss = _missing(cap.run_needs if run else cap.compile_needs)
        if miss:
            what = "runtime " if run else ""
            return Availability(False, f"{what}{', '.join(miss)} not installed (pip install 'crate-edge[{cap.extra}]')")
        return YES

    def compile(self, exported, target, out: Path, quant=None) -> Compiled:
        """Lower `exported` (a crate_edge.export.Exported: the rewritten eager module, its
        torch.export program with the target's batch range, and the example input) into files
        under `out`. `quant` is a crate_edge.quantize.QuantPlan for a reduced-precision target
        (else None); a backend that cannot honour it raises CrateEdgeError."""
        raise NotImplementedError

    def runner(self, art_dir: Path, manifest: dict, threads: int | None = None) -> Runner:
        """A runner for the artifact (called by crate_edge.runtime after verification). ONNX
        Runtime, TVM and Core ML artifacts run through crate_edge.runtimes' torch-free runners;
        a backend whose runtime needs torch overrides this."""
        if self.name in RUNNERS:
            return RUNNERS[self.name](art_dir, manifest, threads)[0]
        raise NotImplementedError

    def reference_runner(self, art_dir: Path, manifest: dict) -> tuple[Runner, str] | None:
        """Where artifacts cannot run here: the closest runnable executor of the exact network
        handed to the backend, and a label saying what it is. None if there is none."""
        return None

    def versions(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        out = {}
        for dist in self.capabilities.distributions:
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                pass
        return out
