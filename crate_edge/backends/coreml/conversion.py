"""Conversion: the target's Core ML options, and coremltools.convert of the ExportedProgram into an
ML program (the ExportedProgram saved beside it, for the off-macOS numeric check)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import CrateEdgeError
from ...runtimes import COREML_PACKAGE

PACKAGE = COREML_PACKAGE
SOURCE = "source.pt2"  # the exact ExportedProgram converted, for the off-macOS numeric check


def check_options(target) -> tuple[str, str]:
    """(minimum_deployment_target, compute_units) of the target, refused unless coremltools knows them."""
    import coremltools as ct

    opts = target.options
    tgt_name = opts.get("minimum_deployment_target", "iOS18")
    if not hasattr(ct.target, tgt_name):
        raise CrateEdgeError(f"target {target.name}: unknown minimum_deployment_target {tgt_name!r}")
    if target.precision not in ("fp16", "fp32"):
        raise CrateEdgeError(
            f"target {target.name}: Core ML compute precision must be fp16 or fp32 (int8 weights / activations go in the [quantize] table)"
        )
    units = opts.get("compute_units", "ALL")
    if not hasattr(ct.ComputeUnit, units):
        raise CrateEdgeError(f"target {target.name}: unknown compute_units {units!r}")
    return tgt_name, units


def convert(module, ep, example, target, out: Path, tgt_name: str, units: str):
    """coremltools.convert of `ep` (decomposed to Core ATen) into an ML program, not loaded; `ep`
    itself is saved as out/SOURCE."""
    import coremltools as ct

    shape = list(example.shape)
    if target.dynamic_batch:
        lo, hi = target.dynamic_batch
        shape[0] = ct.RangeDim(lo, hi, default=min(max(shape[0], lo), hi))
    with torch.no_grad():
        sample = module(example)
    n_out = len(sample) if isinstance(sample, tuple) else 1
    names = ["logits"] + [f"out_{i}" for i in range(1, n_out)]
    prec = ct.precision.FLOAT16 if target.precision == "fp16" else ct.precision.FLOAT32
    ep_core = ep.run_decompositions({})
    torch.export.save(ep, str(out / SOURCE))
    mlmodel = ct.convert(
        ep_core,
        inputs=[ct.TensorType(name="images", shape=ct.Shape(shape), dtype=np.float32)],
        outputs=[ct.TensorType(name=n, dtype=np.float32) for n in names],
        minimum_deployment_target=getattr(ct.target, tgt_name),
        compute_precision=prec,
        compute_units=getattr(ct.ComputeUnit, units),
        convert_to="mlprogram",
        skip_model_load=True,
    )
    return mlmodel
