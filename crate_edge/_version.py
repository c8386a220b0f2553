__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)


def code_sha256() -> str:
    """sha256 over crate-edge's own Python sources: an artifact is reused only by the code that
    built it (the version string stays the same between releases, the code does not)."""
    import hashlib
    from pathlib import Path

    global _CODE
    if _CODE is None:
        root = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for p in sorted(root.rglob("*.py")):
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
        _CODE = h.hexdigest()
    return _CODE


_CODE: str | None = None
