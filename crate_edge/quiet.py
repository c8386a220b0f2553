"""The CLI's quiet mode: `crate-edge CMD` shows crate-edge's own lines only; `crate-edge -v CMD`
shows what the libraries underneath say as well.

Only the CLI enters `quiet()` (the CLI process is the application; the library never configures
logging, warnings or streams). For the duration of a command it hides:

* Python warnings: every filter is "ignore" and `warnings.showwarning` drops what a library's own
  `catch_warnings()` block re-enables ("always"/"default"); `catch_warnings(record=True)` still
  records.
* Python logging, every logger: `logging.disable(CRITICAL)` (torch installs its own handler on
  "torch", so levels on the root logger alone would not do), plus a NullHandler on the root logger
  so a library's bare `logging.warning()` (ONNX Runtime's quantizer) cannot `basicConfig()` a
  stderr handler.
* Progress bars that third-party code draws with tqdm (coremltools' conversion passes); bars
  created from crate_edge's own modules stay.
* Native libraries writing straight to file descriptor 2 (ONNX Runtime's and TVM's C++ loggers,
  XNNPACK): fd 2 points at /dev/null, and `sys.stderr` (where crate-edge's own lines go, and
  Python tracebacks) at a duplicate of the real stderr. Child processes inherit the hidden fd 2. A native crash would go unseen there, so faulthandler prints Python's fatal-error report
  to the real stderr.
* Native log lines that reach `sys.stderr` itself: ExecuTorch's pybindings route the runtime's
  std::cerr through pybind11 into `sys.stderr.write()` (`[cpuinfo_utils.cpp:71] Reading file
  ...`), so lines of that shape (a C/C++ `file:line]` prefix) are dropped from it.

Everything is restored on exit, so an in-process invocation (click's CliRunner in the tests)
leaves the interpreter as it found it."""

from __future__ import annotations

import contextlib
import faulthandler
import io
import logging
import os
import re
import sys
import warnings

_depth = [0]  # quiet() blocks open, for active()


def _drop_warning(*args, **kwargs) -> None:
    pass


# `[cpuinfo_utils.cpp:71] Reading file ...`: ExecuTorch pybindings' log sink, arriving through
# pybind11 one `<<` fragment per write() (std::cerr is unit-buffered)
_NATIVE_LINE = re.compile(r"\[[\w./+-]+\.(?:c|cc|cpp|cxx|h|hpp|mm?):\d+\] ")
_NATIVE_START = re.compile(r"\[[\w./+-]*(?::\d*)?\]?")  # what could still grow into one


class _Stderr(io.TextIOWrapper):
    """The real stderr, less native log lines written into it through pybind11 (module docstring).
    A line that starts like one is held until it is known (at its "] " or newline); any other
    text passes at once, so progress bars still draw."""

    _held = ""
    _mode = None  # None: at the start of a line; "pass" or "drop" until its newline

    def write(self, s: str) -> int:
        if not isinstance(s, str):  # TypeError, as click's binary-stream probe expects
            return super().write(s)
        n = len(s)
        while s:
            i = s.find("\n") + 1 or len(s)
            self._feed(s[:i])
            s = s[i:]
        return n

    def _feed(self, part: str) -> None:  # part of one line, with its newline if it ends there
        if self._mode is None:
            self._held += part
            if _NATIVE_LINE.match(self._held):
                self._mode = "drop"
            elif not part.endswith("\n") and _NATIVE_START.fullmatch(self._held):
                return
            else:
                self._mode = "pass"
                super().write(self._held)
            self._held = ""
        elif self._mode == "pass":
            super().write(part)
        if part.endswith("\n"):
            self._mode = None

    def release(self) -> None:
        """At the end of the block: write out a held line start. The stream stays open: a handler
        created during the command may still hold it, and it still reaches the real stderr."""
        if self._held:
            super().write(self._held)
            self._held = ""
        self._mode = None
        self.flush()


class _NativeStderr:
    """fd 2 -> /dev/null while the block runs; sys.stderr -> the real stderr when it was fd 2."""

    def __init__(self):
        self.sink = None
        self.saved_fd = None
        self.old_stderr = None
        self.fault_was_enabled = False

    def __enter__(self):
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        try:
            self.saved_fd = os.dup(2)
        except OSError:  # no fd 2 at all: nothing native can write there either
            return self
        self.sink = open(os.devnull, "wb")
        try:
            stderr_is_fd2 = sys.stderr is not None and sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            stderr_is_fd2 = False  # e.g. CliRunner's capture: Python-level output already goes elsewhere
        os.dup2(self.sink.fileno(), 2)
        if stderr_is_fd2:
            self.old_stderr = sys.stderr
            sys.stderr = _Stderr(
                io.BufferedWriter(io.FileIO(os.dup(self.saved_fd), "w")),
                line_buffering=True,
                encoding=self.old_stderr.encoding or "utf-8",
                errors=self.old_stderr.errors or "backslashreplace",
            )
            self.fault_was_enabled = faulthandler.is_enabled()
            faulthandler.enable(file=sys.stderr)
        return self

    def __exit__(self, *exc):
        if self.saved_fd is None:
            return False
        if self.old_stderr is not None:
            ours, sys.stderr = sys.stderr, self.old_stderr
            if self.fault_was_enabled:
                faulthandler.enable(file=sys.stderr)
            else:
                faulthandler.disable()
            with contextlib.suppress(OSError, ValueError):
                ours.release()
        os.dup2(self.saved_fd, 2)
        os.close(self.saved_fd)
        self.saved_fd = None
        self.sink.close()
        return False


def _is_ours(frame) -> bool:
    """Whether the first frame outside tqdm (the code creating a bar) belongs to crate_edge."""
    while frame is not None:
        mod = frame.f_globals.get("__name__", "")
        if mod != "tqdm" and not mod.startswith("tqdm."):
            return mod == "crate_edge" or mod.startswith("crate_edge.")
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _third_party_bars_hidden():
    try:
        import tqdm.std
    except ImportError:
        yield
        return
    cls = tqdm.std.tqdm
    orig = cls.__dict__["__init__"]  # a function, or a partialmethod when TQDM_* env vars set defaults

    def __init__(self, *args, **kwargs):
        if len(args) <= 10 and not _is_ours(sys._getframe(1)):  # (disable is the 11th positional)
            kwargs["disable"] = True
        orig.__get__(self, type(self))(*args, **kwargs)

    cls.__init__ = __init__
    try:
        yield
    finally:
        cls.__init__ = orig


@contextlib.contextmanager
def quiet():
    """Hide third-party warnings, log records, progress bars and native stderr (module docstring)."""
    root = logging.getLogger()
    null = logging.NullHandler()
    disabled = logging.root.manager.disable
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        warnings.showwarning = _drop_warning
        root.addHandler(null)
        stack.callback(root.removeHandler, null)
        logging.disable(logging.CRITICAL)
        stack.callback(logging.disable, disabled)
        stack.enter_context(_third_party_bars_hidden())
        stack.enter_context(_NativeStderr())
        _depth[0] += 1
        try:
            yield
        finally:
            _depth[0] -= 1


def active() -> bool:
    """Whether library output is being hidden now (an error message may then point at -v)."""
    return _depth[0] > 0
