"""Quiet by default: a CLI command's stderr carries crate-edge's own lines only, `crate-edge -v`
shows the libraries' warnings and logs again, and the library itself never configures the root
logger (crate_edge.quiet is the CLI's, and undoes itself)."""

import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# crate-edge's own stderr lines: `[onnxruntime] ...` progress (a target or stage name in
# brackets), `wrote ...`, `note: ...`, `error: ...`
OWN = re.compile(r"(\[[a-z0-9][a-z0-9-]*\] |wrote |note: |error: )")


def _cli():
    exe = Path(sys.executable).parent / "crate-edge"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "crate_edge.cli"]


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("CRATE_EDGE_DEBUG", "PYTHONWARNINGS", "TORCH_LOGS")}


def test_compile_is_quiet_and_verbose_is_not(tmp_path):
    """`crate-edge compile --target onnxruntime` (the cheapest command that makes the libraries
    talk: torch's ONNX exporter logs "torchvision is not installed" four times): only crate-edge's
    lines without -v; the exporter's lines with -v."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tests.procs import small_model_and_data

    model, data = small_model_and_data(tmp_path)  # the cheapest real compile
    runs = {}
    for flags in ([], ["-v"]):
        out = tmp_path / ("verbose" if flags else "quiet")
        r = subprocess.run(
            _cli() + flags + ["compile", "--target", "onnxruntime", "--model", str(model), "--parity-data", str(data), "--out", str(out)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=600,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().endswith("parity passed"), r.stdout
        runs[bool(flags)] = [line for line in r.stderr.splitlines() if line.strip()]
    quiet, verbose = runs[False], runs[True]
    foreign = [line for line in quiet if not OWN.match(line)]
    assert not foreign, "third-party lines without -v:\n" + "\n".join(foreign)
    assert any(line.startswith("[onnxruntime] wrote ") for line in quiet), quiet
    shown = [line for line in verbose if not OWN.match(line)]
    assert shown, (
        "-v showed no library line; the exporter's 'torchvision is not installed' lines were expected "
        "(if the libraries went quiet on their own, pick another command here):\n" + "\n".join(verbose)
    )


_PROBE = textwrap.dedent(r"""
    import logging, os, sys, warnings
    import click
    import crate_edge, crate_edge.cli, crate_edge.backends.onnxruntime  # importing configures nothing
    from crate_edge.quiet import quiet, active
    root = logging.getLogger()
    state = lambda: (root.level, list(root.handlers), logging.root.manager.disable, warnings.showwarning,
                     list(warnings.filters), sys.stderr, os.fstat(2).st_ino)
    before = state()
    assert before[:3] == (logging.WARNING, [], 0), before
    own_lib = {"__name__": "crate_edge.fake"}
    other_lib = {"__name__": "somelib.progress"}
    bar = "from tqdm import tqdm\nfor _ in tqdm(range(3), desc=DESC, file=sys.stderr if OWN else None): pass\n"
    with quiet():
        click.echo("[demo] own line", err=True)
        print("wrote own line", file=sys.stderr)
        warnings.warn("third-party warning")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("third-party warning inside catch_warnings")
        logging.getLogger("somelib").warning("third-party log record")
        logging.warning("third-party bare logging.warning")
        lg = logging.getLogger("otherlib")
        lg.addHandler(logging.StreamHandler(sys.stderr))
        lg.error("third-party record with its own handler")
        exec(bar, {**other_lib, "sys": sys, "DESC": "third-party-bar", "OWN": False})
        exec(bar, {**own_lib, "sys": sys, "DESC": "own-bar", "OWN": True})
        sys.stderr.write("\n")
        for part in ["[", "cpuinfo_utils.cpp", ":", "71", "] ", "native line through pybind11", "\n"]:
            sys.stderr.write(part)
            sys.stderr.flush()
        os.write(2, b"native line on fd 2\n")
        assert active()
    after = state()
    assert not active()
    assert after == before, (before, after)
    print("after the block", file=sys.stderr)
    warnings.warn("warning after the block")
    print("restored")
""")


def test_quiet_hides_each_kind_and_restores():
    """Each kind of library output is hidden (warnings, also inside catch_warnings; log records,
    also through a library's own handler; third-party tqdm bars; native writes to fd 2 and native
    log lines through sys.stderr) while crate-edge's own lines and bars stay; afterwards the
    interpreter is as before, and importing crate_edge configured nothing."""
    pytest.importorskip("tqdm")
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "restored", r.stdout + r.stderr
    lines = [line.strip() for line in re.split(r"[\r\n]+", r.stderr) if line.strip()]
    assert not any("third-party" in line or "native line" in line for line in lines), r.stderr
    assert lines[:2] == ["[demo] own line", "wrote own line"], lines
    assert any("own-bar" in line and "3/3" in line for line in lines), lines
    assert "after the block" in lines and any("warning after the block" in line for line in lines), lines


def test_cli_in_process_leaves_the_interpreter_as_it_was():
    """click's CliRunner (the tests' in-process CLI) still captures the command's output, and the
    quiet mode is undone afterwards."""
    from click.testing import CliRunner

    from crate_edge.cli import main

    root = logging.getLogger()
    import warnings

    before = (root.level, list(root.handlers), logging.root.manager.disable, warnings.showwarning, sys.stderr, os.fstat(2).st_ino)
    r = CliRunner().invoke(main, ["run", "/nonexistent/artifact"])
    assert r.exit_code == 2 and r.output.startswith("error: "), r.output
    assert (root.level, list(root.handlers), logging.root.manager.disable, warnings.showwarning, sys.stderr, os.fstat(2).st_ino) == before


def test_library_quantization_leaves_the_root_logger_alone(tmp_path):
    """ONNX Runtime's quantizer logs a pre-processing hint with logging.warning() on the root
    logger. The library neither raises the root level around it nor adds or removes handlers:
    the record reaches the application's handler, and the root logger is as before."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import numpy as np
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from crate_edge.backends.onnxruntime import quantize_int8_qdq
    from crate_edge.quantize import QuantConfig, QuantPlan

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["images", "w"], ["logits"], name="mm")],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [w],
    )
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))
    plan = QuantPlan(QuantConfig(calibration="max"), {}, torch.randn(16, 4))

    root = logging.getLogger()
    seen = []

    class Record(logging.Handler):
        def emit(self, record):
            seen.append((record.getMessage(), root.level))

    h = Record()
    level, handlers = root.level, list(root.handlers)
    root.addHandler(h)
    try:
        root.setLevel(logging.WARNING)  # the application's choice, which the library must keep
        info = quantize_int8_qdq(fp32, tmp_path / "q.onnx", plan, {"quantize_all_ops": True})
        assert root.level == logging.WARNING and h in root.handlers and len(root.handlers) == len(handlers) + 1
    finally:
        root.removeHandler(h)
        root.setLevel(level)
    assert info["op_types_quantized"] == ["MatMul"], info
    hints = [(m, lv) for m, lv in seen if "pre-processing" in m]
    assert hints, f"ONNX Runtime's pre-processing hint did not reach the root logger's handler: {seen}"
    assert all(lv == logging.WARNING for _, lv in hints), hints
    assert list(root.handlers) == handlers and root.level == level
