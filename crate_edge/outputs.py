"""What crate-edge writes, and what it never touches: the one way every command writes a directory.

Every verb that writes a directory (an artifact, a model, a training run, a report) goes through
`atomic_dir` or `owned_dir`:

* The path must be missing, an empty directory, or a directory crate-edge wrote. crate-edge's
  directories carry a marker, `.crate-edge.json`, listing every file crate-edge put there
  (directories written before the marker existed are recognised by their artifact manifest,
  model config or training log, which list their files). A directory holding anything else is
  refused with one line naming the path and a file crate-edge did not write, and nothing is
  touched. There is no option that deletes files crate-edge did not write.
* New content is built in a hidden sibling, `.NAME.partial-PID-XXXX`, and swapped in with one
  atomic rename (Linux renameat2(RENAME_EXCHANGE), macOS renamex_np(RENAME_SWAP)): at every
  instant the path holds either the old whole directory or the new whole one. On a filesystem
  without an exchange, the old directory is first moved to `.NAME.old-PID`; a writer killed
  between the two renames is repaired by the next one, which moves it back.
* One writer per path: an flock on a sibling `.NAME.lock` (removed on release). A second process
  waits (`atomic_dir`) or is refused with a line naming the holder (`owned_dir`, for training).
* The next writer of NAME removes what a killed writer left (`.NAME.partial-*`, a stale lock).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ._version import __version__
from .errors import CrateEdgeError

MARKER = ".crate-edge.json"
MARKER_FORMAT = "crate-edge-output"
KINDS = ("artifact", "model", "train-run", "resume", "report")


# ------------------------------------------------------------------ ownership


def _transient(name: str) -> bool:
    """crate-edge's own in-flight siblings (locks, partial and displaced directories)."""
    return name.startswith(".") and (name.endswith(".lock") or ".partial-" in name or ".old-" in name)


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _listed(d: Path) -> tuple[set[str], set[str]] | None:
    """(files, owned subdirectories) crate-edge wrote in `d`, from its marker or, for directories
    written before markers, from the artifact manifest, model config or training log; None when
    nothing says crate-edge wrote `d`."""
    m = _read_json(d / MARKER)
    if isinstance(m, dict) and m.get("format") == MARKER_FORMAT and isinstance(m.get("files"), list):
        return set(m["files"]) | {MARKER}, set(m.get("dirs") or [])
    man = _read_json(d / "manifest.json")
    if isinstance(man, dict) and man.get("format") == "crate-edge-artifact" and isinstance(man.get("files"), dict):
        return set(man["files"]) | {"manifest.json"}, set()
    cfg = _read_json(d / "config.json")
    if isinstance(cfg, dict) and cfg.get("format") == "crate-edge":
        return {"config.json", "model.safetensors"}, set()
    log = _read_json(d / "train_log.json")
    if isinstance(log, dict) and {"recipe", "log"} <= set(log):
        return {"train_log.json"}, {"resume", "model"}
    rep = _read_json(d / "parity.json")
    if isinstance(rep, dict) and rep.get("format") == "crate-edge-parity":
        return {"parity.json", "parity.md", "parity.png"}, set()
    st = _read_json(d / "state.json")  # a training run's resume/ directory
    if isinstance(st, dict) and {"epoch", "recipe"} <= set(st):
        return {"state.json", "state.safetensors"}, set()
    return None


def foreign_files(d: str | os.PathLike) -> list[str]:
    """Files under directory `d` that crate-edge did not write, as paths relative to `d` (empty
    for a missing or empty directory, or one that crate-edge wrote entirely)."""
    d = Path(d)
    if not d.is_dir():
        return []
    listed = _listed(d)
    files, dirs = listed if listed is not None else (set(), set())
    out: list[str] = []

    def walk(p: Path, rel: str):
        with os.scandir(p) as it:
            for e in sorted(it, key=lambda e: e.name):
                r = f"{rel}{e.name}"
                if not rel and _transient(e.name):
                    continue
                if e.is_dir(follow_symlinks=False):
                    if r in dirs:
                        out.extend(f"{r}/{f}" for f in foreign_files(e.path))
                    else:
                        walk(Path(e.path), r + "/")
                elif r not in files:
                    out.append(r)

    walk(d, "")
    return out


def check_writable(path: str | os.PathLike) -> Path:
    """Raise CrateEdgeError (one line, nothing touched) unless crate-edge may write `path`: missing,
    an empty directory, or a directory crate-edge wrote."""
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise CrateEdgeError(f"{p} exists and is not a directory crate-edge wrote; refusing to replace it (choose another output path)")
    foreign = foreign_files(p)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise CrateEdgeError(
            f"{p} holds files crate-edge did not write ({foreign[0]}{more}); refusing to touch it: "
            f"choose another output path, or move them away"
        )
    return p


def _write_marker(d: Path, kind: str, dirs: tuple[str, ...] = (), also: tuple[str, ...] = ()) -> None:
    files = sorted(
        {
            r
            for q in d.rglob("*")
            if (q.is_file() or q.is_symlink())
            and (r := str(q.relative_to(d))) != MARKER
            and not _transient(r.split("/")[0])
            and r.split("/")[0] not in dirs
        }
        | set(also)
    )
    doc = {"format": MARKER_FORMAT, "version": 1, "kind": kind, "crate_edge": __version__, "files": files, "dirs": list(dirs)}
    atomic_write(d / MARKER, json.dumps(doc, indent=1) + "\n")


# ------------------------------------------------------------------ fault injection for the tests

KILL_ENV = "CRATE_EDGE_TEST_KILL_AT"


def _kill_point(point: str, target: Path) -> None:
    """Tests set CRATE_EDGE_TEST_KILL_AT=POINT[:NAME] to SIGKILL this process at a named moment
    of a write (of the directory NAME), the way a power cut or OOM kill would."""
    want = os.environ.get(KILL_ENV)
    if want and want.partition(":")[0] == point and want.partition(":")[2] in ("", target.name):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------ locking

_HELD: dict[str, int] = {}  # lock files this process holds -> depth (re-entry does not self-deadlock)


class _Lock:
    """flock on PARENT/.NAME.lock. The file is unlinked while still locked on release, so nothing
    stays behind; a waiter that then wins the lock on the unlinked file notices and retries.
    Re-entrant within one process (a quantization search holds its output while it compiles)."""

    def __init__(self, target: Path, wait: bool, say: Callable[[str], None] | None):
        self.path = target.parent / f".{target.name}.lock"
        self.key = os.path.abspath(self.path)
        self.target, self.wait, self.say = target, wait, say
        self.fd = None

    def __enter__(self):
        if self.key in _HELD:
            _HELD[self.key] += 1
            return self
        try:
            import fcntl
        except ImportError:  # no flock (Windows): atomic replacement still holds, writers are not serialised
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if not self.wait:
                    os.close(fd)
                    raise CrateEdgeError(
                        f"another crate-edge process (pid {holder}) is writing {self.target}; "
                        f"wait for it to finish or choose another output path"
                    ) from None
                (self.say or _stderr)(f"waiting for another crate-edge process (pid {holder}) writing {self.target}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self.fd = fd
                _HELD[self.key] = 1
                return self
            os.close(fd)  # the holder unlinked the file we locked: lock the new one

    def __exit__(self, *exc):
        if _HELD.get(self.key, 0) > 1:
            _HELD[self.key] -= 1
            return False
        _HELD.pop(self.key, None)
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None
        return False


def _stderr(s: str) -> None:
    print(s, file=sys.stderr)


# ------------------------------------------------------------------ atomic replacement


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the OS or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        r = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        r = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        return False
    if r == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), str(a))


def _tidy(target: Path) -> None:
    """Under the lock: remove what killed writers of `target` left, and put back a directory
    displaced by the two-rename fallback if the writer died before the second rename."""
    parent, name = target.parent, target.name
    old = sorted(parent.glob(f".{name}.old-*"))
    if old and not target.exists():
        os.rename(old.pop(), target)
    mine = f".{name}.partial-{os.getpid()}-"  # this process's own work in progress (a search's tries)
    for p in old + [q for q in sorted(parent.glob(f".{name}.partial-*")) if not q.name.startswith(mine)]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)  # onto nothing (or an empty directory made meanwhile): atomic
        return
    if _exchange(tmp, target):
        _kill_point("after-swap", target)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous directory
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, old)
    _kill_point("mid-swap", target)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, kind: str, say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling directory; when the block completes it replaces `target`
    in one atomic step, with a marker listing what was written. `target` must be writable by
    crate-edge (see check_writable); on any error, Ctrl-C or kill, `target` is left as it was."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(target, wait=True, say=say):
        _tidy(target)
        check_writable(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the result from other users
            yield tmp
            _write_marker(tmp, kind)
            _kill_point("before-swap", target)
            check_writable(target)  # a user may have put files there while we worked
            _swap_in(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


# directories this process holds with owned_dir -> (kind, dirs): atomic_write into one lists the
# file in its marker before the file appears, so a run killed at any moment leaves a directory
# that crate-edge recognises as its own and resumes into
_OWNED: dict[str, tuple[str, tuple[str, ...]]] = {}


@contextlib.contextmanager
def owned_dir(target: str | os.PathLike, kind: str, dirs: tuple[str, ...] = (), say=None) -> Iterator[Path]:
    """A directory crate-edge fills over time (a training run): claimed for the whole block by
    one process (a second is refused), created if missing, refused if it holds anything
    crate-edge did not write. Its files are written with atomic_write and its `dirs` with
    atomic_dir; the marker lists them as they appear."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(target, wait=False, say=say):
        check_writable(target)
        target.mkdir(exist_ok=True)
        for p in target.iterdir():  # a killed run's partial files (we hold the lock: nobody else writes here)
            if _transient(p.name) and not p.name.endswith(".lock"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        _write_marker(target, kind, dirs)
        key = str(target.resolve())
        _OWNED[key] = (kind, dirs)
        try:
            yield target
        finally:
            _OWNED.pop(key, None)
            if target.is_dir():
                _write_marker(target, kind, dirs)


def output_lock(target: str | os.PathLike, say=None) -> _Lock:
    """Hold the write lock of `target` across several steps (atomic_dir inside re-enters it)."""
    return _Lock(Path(target), wait=True, say=say)


def work_dir(target: str | os.PathLike, tag: str) -> Path:
    """A scratch directory beside `target` for work that precedes writing it, named so that the
    next writer of `target` removes it if this process is killed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-{tag}-", dir=target.parent))


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write one file so that readers see the old content or the new, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        owner = _OWNED.get(str(path.parent.resolve())) if path.name != MARKER else None
        if owner is not None:
            _write_marker(path.parent, *owner, also=(path.name,))
        os.replace(tmp, path)
        _kill_point("after-write", path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u
