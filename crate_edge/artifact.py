"""Compiled artifacts: one directory per compile, holding the backend file(s), caches, and
manifest.json (versions, target, source model hash, file hashes, input spec, precision map,
rewrites, parity summary, host). `load_artifact` verifies every hash before loading."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import get_backend
from .checkpoint import sha256_file
from .errors import BackendUnavailable, CrateEdgeError

MANIFEST = "manifest.json"
ARTIFACT_FORMAT = "crate-edge-artifact"


def file_hashes(root: Path, files: list[str]) -> dict[str, str]:
    out = {}
    for f in files:
        p = root / f
        if p.is_dir():
            for q in sorted(x for x in p.rglob("*") if x.is_file()):
                out[str(q.relative_to(root))] = sha256_file(q)
        elif p.is_file():
            out[f] = sha256_file(p)
        else:
            raise CrateEdgeError(f"backend reported {f} but did not write it")
    return out


def read_manifest(art_dir: str | os.PathLike) -> dict[str, Any]:
    d = Path(art_dir)
    mp = d / MANIFEST
    if not d.is_dir() or not mp.exists():
        raise CrateEdgeError(f"{d} is not a crate-edge artifact (no {MANIFEST})")
    try:
        m = json.loads(mp.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CrateEdgeError(f"{mp}: corrupt manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != ARTIFACT_FORMAT or not isinstance(m.get("files"), dict):
        raise CrateEdgeError(f"{mp}: not a crate-edge artifact manifest")
    return m


def verify(art_dir: str | os.PathLike, manifest: dict) -> None:
    d = Path(art_dir)
    for rel, want in manifest["files"].items():
        p = d / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise CrateEdgeError(f"{d}: manifest names a file outside the artifact: {rel}")
        if not p.is_file():
            raise CrateEdgeError(f"{d}: {rel} is missing")
        if sha256_file(p) != want:
            raise CrateEdgeError(f"{d}: {rel} does not match its sha256 in {MANIFEST}: the artifact was modified or corrupted")


@dataclass
class Artifact:
    """A loaded artifact: call it on a float32 NCHW numpy batch to get logits (or, for probe
    builds, `outputs(x)` for logits plus per-layer features)."""

    path: Path
    manifest: dict[str, Any]
    runner: Any = None
    executor: str = ""

    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def probe(self) -> bool:
        return bool(self.manifest.get("probe"))

    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        want = tuple(self.manifest["input"]["shape"][1:])
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise CrateEdgeError(f"input has shape {tuple(x.shape)}; {self.target} artifact takes (batch, {', '.join(map(str, want))})")
        lo, hi = self.manifest["input"].get("batch_range") or [x.shape[0], x.shape[0]]
        if not lo <= x.shape[0] <= hi:
            if x.shape[0] > hi:  # split into batches the artifact accepts
                parts = [self.outputs(x[i : i + hi]) for i in range(0, x.shape[0], hi)]
                return [np.concatenate(p) for p in zip(*parts)]
            raise CrateEdgeError(f"batch {x.shape[0]} is outside the artifact's batch range [{lo}, {hi}]")
        return [np.asarray(o) for o in self.runner(x)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x)[0]


def load_artifact(art_dir: str | os.PathLike, reference_ok: bool = False) -> Artifact:
    """Verify hashes and load an artifact for execution on this machine. With reference_ok,
    a backend that cannot execute here (Core ML off macOS, TensorRT without a GPU) runs its
    closest executor instead, and `Artifact.executor` says which."""
    d = Path(art_dir)
    m = read_manifest(d)
    verify(d, m)
    be = get_backend(m["backend"]["name"])
    ok, why = be.can_run(m)
    if ok:
        return Artifact(d, m, be.load(d, m), executor=be.name)
    if reference_ok:
        ref = be.reference_runner(d, m)
        if ref is not None:
            return Artifact(d, m, ref[0], executor=ref[1])
    raise BackendUnavailable(f"cannot run {m['target']['name']} artifact here: {why}")
