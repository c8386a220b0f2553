"""`crate_edge.runtime.load(artifact_dir)`: the one code path that runs compiled artifacts.

    runner = crate_edge.runtime.load("artifacts/onnxruntime", threads=2)
    logits = runner(images)            # float32 (N, C, H, W) numpy, any N
    runner.outputs(images)             # [logits, ...] (probe builds: per-layer features too)
    runner.input_shape, runner.precision, runner.executor, runner.detail

`load` reads the manifest and verifies every file's sha256 before anything runs, then picks the
runner by the manifest's backend: ONNX Runtime, TVM and Core ML artifacts run through their
runtime alone (crate_edge.runtimes), without importing torch; ExecuTorch, AOTInductor and TensorRT
through their backend module, whose runtimes' Python bindings need torch. `Runner.outputs` is
the one place batches are checked and split: inputs above the artifact's batch range run in
chunks, inputs below it are padded. compile's parity check, `crate-edge run`, the parity suite
and `crate-edge bench` all run artifacts through here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import isa
from .errors import BackendUnavailable, CrateEdgeError
from .manifest import read_verified
from .runtimes import RUNNERS

RawRunner = Callable[[np.ndarray], list]  # float32 NCHW batch within the batch range -> output arrays

# pip extra that installs each backend's runtime, for the message when it is missing
RUNTIME_EXTRAS = {"onnxruntime": "onnx", "tensorrt": "tensorrt", "executorch": "executorch", "tvm": "tvm", "coreml": "coreml"}


class Runner:
    """A loaded, verified artifact. Call it on float32 (N, C, H, W) numpy inputs for logits;
    `outputs(x)` gives every output (logits, then a probe build's per-layer features)."""

    def __init__(self, path: Path, manifest: dict[str, Any], run: RawRunner, executor: str, detail: str = "", threads: int | None = None):
        self.path, self.manifest, self._run = Path(path), manifest, run
        self.executor = executor  # the backend's name when it runs natively, else what stood in for it
        self.detail = detail  # e.g. the ONNX Runtime provider, the TVM device
        self.threads = threads
        # a GPU runner's tensor-in, tensor-out entry, for bench's GPU-resident timing
        self.device_call = getattr(run, "device_call", None)

    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def probe(self) -> bool:
        return bool(self.manifest.get("probe"))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image."""
        return tuple(self.manifest["input"]["shape"][1:])

    @property
    def batch_range(self) -> tuple[int, int]:
        lo, hi = self.manifest["input"].get("batch_range") or [1, 1 << 30]
        return int(lo), int(hi)

    @property
    def precision(self) -> dict[str, Any]:
        return self.manifest.get("precision", {})

    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        want = self.input_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != want or len(x) == 0:
            raise CrateEdgeError(f"input has shape {tuple(x.shape)}; the {self.target} artifact takes (batch, {', '.join(map(str, want))})")
        lo, hi = self.batch_range
        parts = []
        for i in range(0, len(x), hi):
            c = x[i : i + hi]
            n = len(c)
            if n < lo:  # below a static or minimum batch: pad with the last image, keep the first n
                c = np.concatenate([c, np.repeat(c[-1:], lo - n, axis=0)])
            parts.append([np.asarray(o)[:n] for o in self._run(c)])
        return parts[0] if len(parts) == 1 else [np.concatenate(p) for p in zip(*parts)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x)[0]

    def __repr__(self) -> str:
        return f"Runner({str(self.path)!r}, target={self.target}, executor={self.executor}{', ' + self.detail if self.detail else ''})"


def load(art_dir: str | os.PathLike, threads: int | None = None, reference_ok: bool = False) -> Runner:
    """Verify and load an artifact for execution here (module docstring). `threads` overrides the
    target's thread setting. With `reference_ok`, an artifact that cannot execute here (Core ML
    off macOS, TensorRT without TensorRT and a GPU, a CUDA build without a GPU) runs its closest
    executor instead, and `Runner.executor` says which; otherwise that is BackendUnavailable."""
    return runner_for(Path(art_dir), read_verified(art_dir), threads, reference_ok)


def _reference(d: Path, m: dict):
    """The backend's stand-in executor for an artifact that cannot run here, or None."""
    from .backends import get_backend

    return get_backend(m["backend"]["name"]).reference_runner(d, m)


def runner_for(art_dir: Path, manifest: dict[str, Any], threads: int | None = None, reference_ok: bool = False) -> Runner:
    """`load` for a manifest that crate_edge.manifest.read_verified has already checked (bench times the
    verification and the runtime's load apart)."""
    d, m = Path(art_dir), manifest
    try:
        isa.check(m, d)  # code built for another CPU is refused before any of it is loaded
    except CrateEdgeError:
        ref = _reference(d, m) if reference_ok else None
        if ref is None:
            raise
        return Runner(d, m, ref[0], ref[1], "reference", threads)
    be = m["backend"]["name"]
    try:
        if be in RUNNERS:
            run, detail = RUNNERS[be](d, m, threads)
            return Runner(d, m, run, be, detail, threads)
        from .backends import get_backend  # here, not at the top: these runtimes' bindings need torch

        backend = get_backend(be)
        ok, why = backend.available(run=True, manifest=m)
        if ok:
            return Runner(d, m, backend.runner(d, m, threads=threads), be, threads=threads)
    except BackendUnavailable as e:
        why = str(e)
    except ImportError as e:
        why = f"its runtime is not installed ({e.name or e}; pip install 'crate-edge[{RUNTIME_EXTRAS.get(be, be)}]')"
    ref = _reference(d, m) if reference_ok else None
    if ref is not None:
        return Runner(d, m, ref[0], ref[1], "reference", threads)
    raise BackendUnavailable(f"cannot run {m['target']['name']} artifact here: {why}")
