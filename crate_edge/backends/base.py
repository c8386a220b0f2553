"""The one narrow interface every backend implements (as ExecuTorch backends do): is it
available here, compile, load, run. Each backend imports its library lazily."""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import BackendUnavailable
from ..runtimes import RUNNERS


@dataclass
class Compiled:
    """What a backend's compile returns: the files it wrote (relative to the artifact dir),
    its precision map, what it verified, and anything else for the manifest."""

    files: list[str]
    precision: dict[str, str] = field(default_factory=dict)
    verified: dict[str, str] = field(default_factory=dict)  # what -> how / where
    not_verified: dict[str, str] = field(default_factory=dict)  # what -> why not
    info: dict[str, Any] = field(default_factory=dict)


Runner = Callable[[np.ndarray], list[np.ndarray]]  # float32 NCHW batch -> output arrays


class Backend:
    name: str = ""
    packages: tuple[str, ...] = ()  # importable modules needed to compile
    runtime_packages: tuple[str, ...] | None = None  # needed to run (default: packages)
    extra: str = ""  # pip extra that installs them

    def missing(self, mods) -> list[str]:
        return [m for m in mods if importlib.util.find_spec(m) is None]

    def available(self) -> tuple[bool, str]:
        """Can this machine compile for the backend? (ok, reason when not)"""
        miss = self.missing(self.packages)
        if miss:
            return False, f"{', '.join(miss)} not installed (pip install 'crate-edge[{self.extra}]')"
        return True, ""

    def can_compile(self, target) -> tuple[bool, str]:
        """Can this machine compile this target? available(), unless the target needs more."""
        return self.available()

    def can_run_target(self, target) -> tuple[bool, str]:
        """can_run for the artifacts a target file would produce (before compiling one)."""
        return self.can_run({"backend": {"device": target.device}, "target": {"definition": target.raw}})

    def can_run(self, manifest: dict | None = None) -> tuple[bool, str]:
        """Can this machine execute the backend's artifacts?"""
        miss = self.missing(self.runtime_packages if self.runtime_packages is not None else self.packages)
        if miss:
            return False, f"runtime {', '.join(miss)} not installed"
        return True, ""

    def require(self):
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(f"backend {self.name} unavailable: {why}")

    def versions(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        out = {}
        for dist in self.dists():
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                pass
        return out

    def dists(self) -> list[str]:
        return []

    def compile(
        self, module: torch.nn.Module, ep: "torch.export.ExportedProgram", example: torch.Tensor, target, out: Path, quant=None
    ) -> Compiled:
        """Lower `ep` (torch.export of the rewritten `module`, dynamic batch) into files under `out`.
        `quant` is a crate_edge.quantize.QuantPlan for a reduced-precision target (else None);
        a backend that cannot honour it raises CrateEdgeError."""
        raise NotImplementedError

    def load(self, art_dir: Path, manifest: dict, threads: int | None = None) -> Runner:
        """A runner for the artifact (called by crate_edge.runtime.load after verification):
        ONNX Runtime, TVM and Core ML artifacts run through crate_edge.runtimes' torch-free
        runners; a backend whose runtime needs torch overrides this."""
        if self.name in RUNNERS:
            return RUNNERS[self.name](art_dir, manifest, threads)[0]
        raise NotImplementedError

    def reference_runner(self, art_dir: Path, manifest: dict) -> tuple[Runner, str] | None:
        """Where artifacts cannot run here: the closest runnable executor of the exact network
        handed to the backend, and a label saying what it is. None if there is none."""
        return None


def host_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = []
    try:
        txt = Path("/proc/cpuinfo").read_text()
        fl = next((l.split(":", 1)[1].split() for l in txt.splitlines() if l.startswith("flags")), [])
        flags = sorted(f for f in fl if f.startswith(("avx", "amx", "fma", "sse4", "neon", "asimd")) or f in ("f16c",))
    except (OSError, StopIteration):
        pass
    import os

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": flags,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def unavailable(name: str, why: str) -> BackendUnavailable:
    return BackendUnavailable(f"backend {name} unavailable: {why}")
