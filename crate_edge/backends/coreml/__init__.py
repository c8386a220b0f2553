"""Core ML: coremltools.convert on the ExportedProgram -> .mlpackage (ML program).

Options: minimum_deployment_target (iOS17, iOS18, macOS15, ...; iOS18+ keeps MSSA as one fused
scaled_dot_product_attention op), compute_units (ALL, CPU_ONLY, CPU_AND_GPU, CPU_AND_NE);
precision fp16 or fp32 compute. Predictions need macOS. Elsewhere the converted program is
verified statically (op inventory, tensor precisions, input/output shapes), and its numerics
are checked by running the exact ExportedProgram handed to coremltools in torch at the
target's compute precision, which is labelled as such and never reported as Core ML.

Reduced precision (a target's [quantize] table), applied with coremltools.optimize.coreml
to the converted program, ONLY on the CRATE policy's sites (plan.sites: the weight GEMMs):

  * int8_weights: per-channel (or per-tensor) symmetric int8 weights
    (constexpr_blockwise_shift_scale on iOS18, constexpr_affine_dequantize before);
  * palettize: n-bit k-means look-up tables (constexpr_lut_to_dense), per tensor or per grouped
    channel, optionally with per-channel scales (iOS18);
  * int8: int8 weights and int8 activations at the site linears' inputs (quantize/dequantize
    pairs, iOS17+). Activation ranges are calibrated in torch on the plan's training images
    (Core ML predictions, which coremltools' own calibration uses, need a Mac) and handed to
    coremltools' insert_prefix_quantize_dequantize_pair pass for the site linears only.

Sites are matched to MIL `linear` ops by the weight values themselves (the const feeding the
linear equals the torch weight at the program's precision), never by name guessing; every
site must match exactly one linear and every compressed weight must belong to a site.

Off macOS the numerics of a compressed program are checked by torch on the converted
ExportedProgram with the site weights replaced by the values decompressed from the saved
.mlpackage (and, for int8, the activation quantize/dequantize scales read back from it), at the
program's compute precision. That is what Core ML computes up to its kernels' arithmetic; it is
labelled "not Core ML".

Modules: conversion (options, coremltools.convert), mil (reading the ML program: op inventory,
precisions, weight producers), quant (sites <-> MIL linears, activation calibration, compression
and its audit), reference (the torch reference runner, with the weights read back from the
.mlpackage), backend (CoreMLBackend).
"""

from __future__ import annotations

from .backend import CoreMLBackend
from .conversion import PACKAGE, SOURCE
from .mil import _weight_producer
from .quant import (
    ACT_QUANT_OPS,
    COMPRESSED_WEIGHT_OPS,
    LINEAR_OPTIONS,
    MIN_TARGET,
    PALETTE_OPTIONS,
    QUANT_SCHEMES,
    audit_compression,
    check_plan,
    map_sites,
)
from .reference import load_with_program_weights, read_compressed

__all__ = [
    "ACT_QUANT_OPS",
    "COMPRESSED_WEIGHT_OPS",
    "CoreMLBackend",
    "LINEAR_OPTIONS",
    "MIN_TARGET",
    "PACKAGE",
    "PALETTE_OPTIONS",
    "QUANT_SCHEMES",
    "SOURCE",
    "_weight_producer",
    "audit_compression",
    "check_plan",
    "load_with_program_weights",
    "map_sites",
    "read_compressed",
]
