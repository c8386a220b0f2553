"""An artifact's manifest.json: reading it, and verifying every file it lists against its sha256
before anything runs. Imports no torch (devices that have only an artifact's runtime use it)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import CrateEdgeError

MANIFEST = "manifest.json"
ARTIFACT_FORMAT = "crate-edge-artifact"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def read_verified(art_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an artifact directory, after checking every file it lists."""
    m = read_manifest(art_dir)
    verify(art_dir, m)
    return m


def artifact_size(art_dir: str | os.PathLike, manifest: dict) -> int:
    """Bytes of the files the artifact runs from (its manifest's files, plus the manifest)."""
    d = Path(art_dir)
    return sum((d / rel).stat().st_size for rel in manifest["files"]) + (d / MANIFEST).stat().st_size
