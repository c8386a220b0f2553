"""The TVM target of a target table, and the backend's progress lines."""

from __future__ import annotations

import sys

from ...errors import CrateEdgeError


def _say(msg: str) -> None:
    print(f"[tvm] {msg}", file=sys.stderr, flush=True)


def make_target(spec):
    """tvm.target.Target from the target table; llvm mcpu "native" becomes this CPU's name."""
    import tvm
    from tvm.target import codegen

    if not isinstance(spec, dict) or "kind" not in spec:
        raise CrateEdgeError(
            f'tvm: options.target must be a table such as {{kind = "llvm", mcpu = "native"}}, got {spec!r} '
            "(TVM 0.27 rejects target strings)"
        )
    spec = dict(spec)
    host = spec.pop("host", None)
    if spec["kind"] == "llvm":
        if spec.get("mcpu") == "native":
            spec["mcpu"] = codegen.llvm_get_system_cpu()
        # lets LLVM vectorise the LayerNorm/softmax row sums; the GEMMs are vectorised by hand
        spec.setdefault("fast-math-reassoc", True)
        spec.setdefault("fast-math-nsz", True)
    elif host is None:
        host = {"kind": "llvm"}
    try:
        return tvm.target.Target(spec, host=host) if host else tvm.target.Target(spec)
    except Exception as e:  # TVM's message names the bad key
        raise CrateEdgeError(f"tvm: invalid target {spec}: {str(e).splitlines()[0]}") from None
