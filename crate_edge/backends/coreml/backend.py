"""CoreMLBackend: conversion, optional compression, the static checks of the converted program,
and its torch reference runner."""

from __future__ import annotations

import platform
from pathlib import Path

from ...errors import CrateEdgeError
from ..base import Availability, Backend, Capabilities, Compiled, precision_map
from .conversion import PACKAGE, SOURCE, check_options, convert
from .mil import _package_bytes, _precision_by_op, _prog_inventory
from .quant import ACT_QUANT_OPS, COMPRESSED_WEIGHT_OPS, _compress, audit_compression, check_plan
from .reference import reference_runner


class CoreMLBackend(Backend):
    name = "coreml"
    capabilities = Capabilities(
        devices=("apple",),
        precisions=("fp32", "fp16"),
        quant_schemes={"int8": "symmetric", "int8_weights": "weight-only", "palettize": "weight-only"},
        compile_needs=("coremltools",),
        run_needs=("coremltools",),
        distributions=("coremltools",),
        extra="coreml",
    )

    def available(self, target=None, run: bool = False, manifest: dict | None = None) -> Availability:
        if run and platform.system() != "Darwin":
            return Availability(False, "Core ML predictions run only on macOS")
        return super().available(target, run, manifest)

    def compile(self, exported, target, out: Path, quant=None) -> Compiled:
        module, ep, example = exported.module, exported.program, exported.example
        import coremltools as ct

        tgt_name, units = check_options(target)
        if quant is not None:
            check_plan(quant, tgt_name)
        mlmodel = convert(module, ep, example, target, out, tgt_name, units)
        qinfo, sites, audit = {}, None, None
        float_bytes = None
        if quant is not None:
            import tempfile

            with tempfile.TemporaryDirectory() as td:  # the uncompressed program, for the size comparison
                mlmodel.save(str(Path(td) / PACKAGE))
                float_bytes = _package_bytes(Path(td) / PACKAGE)
            mlmodel, sites, qinfo = _compress(mlmodel, module, quant, tgt_name)
        mlmodel.save(str(out / PACKAGE))
        prog = mlmodel._mil_program
        ops, dtypes = _prog_inventory(prog)
        by_prec = _precision_by_op(prog)
        fused = ops.get("scaled_dot_product_attention", 0)
        spec = mlmodel.get_spec()
        io = {"inputs": [i.name for i in spec.description.input], "outputs": [o.name for o in spec.description.output]}
        size = _package_bytes(out / PACKAGE)
        verified = {
            "conversion": f"coremltools {ct.__version__} produced an ML program for {tgt_name} on this machine",
            "op_inventory": f"{sum(ops.values())} MIL ops; fused scaled_dot_product_attention: {fused}",
            "precision": f"output dtypes of non-const ops: {dtypes}",
            "io": f"inputs {io['inputs']}, outputs {io['outputs']}, batch {list(target.dynamic_batch or [example.shape[0]] * 2)}",
        }
        info = {
            "deployment_target": tgt_name,
            "compute_units": units,
            "mil_ops": ops,
            "mil_dtypes": dtypes,
            "fused_attention_ops": fused,
            "io": io,
            "package_bytes": size,
        }
        other_w = "fp16" if target.precision == "fp16" else "fp32"
        detail = {"ops_by_dtype": by_prec, "weights": other_w}
        site_prec = {}
        not_verified = {}
        if quant is not None:
            audit = audit_compression(prog, sites)
            n = len(sites)
            if audit["compressed_weight_linears"] != n or audit["uncompressed_sites"]:
                raise CrateEdgeError(
                    f"coreml: only {audit['compressed_weight_linears']} of {n} site weights were compressed "
                    f"(missing: {', '.join(audit['uncompressed_sites'])})"
                )
            if quant.config.scheme == "int8" and audit["quantized_input_linears"] != n:
                raise CrateEdgeError(f"coreml: activation quantization reached {audit['quantized_input_linears']} of {n} site linears")
            comp_ops = {k: v for k, v in ops.items() if k in COMPRESSED_WEIGHT_OPS or k in ACT_QUANT_OPS}
            info.update(
                quant_sites=sites,
                compression=audit,
                compression_ops=comp_ops,
                float_package_bytes=float_bytes,
                size_vs_float=round(size / float_bytes, 4),
            )
            acts = qinfo.get("activations", f"{target.precision} (weight-only compression)")
            site_prec = {s: f"weights {qinfo['weights']}; activations {acts}" for s in sorted(sites)}
            detail["weights"] = {"sites": qinfo["weights"], "other": other_w}
            if "activation_ranges" in qinfo:
                info["activation_ranges"] = qinfo["activation_ranges"]
            verified["compression"] = (
                f"{audit['compressed_weight_linears']} of {audit['linears']} MIL linears have compressed weights "
                f"(exactly the {n} sites, matched by weight value); ops {comp_ops}"
                + (f"; {audit['quantized_input_linears']} site linears read int8-quantized inputs" if quant.config.scheme == "int8" else "")
            )
        if platform.system() != "Darwin":
            if quant is None:
                how = f"by running the exported program in torch at {target.precision}"
            else:
                how = f"by torch at {target.precision} on the exported program with the weights decompressed from the .mlpackage" + (
                    " and its activation quantize/dequantize scales" if quant.config.scheme == "int8" else ""
                )
            not_verified["execution"] = f"Core ML predictions need macOS; numerics were checked {how}, not by Core ML"
            if quant is not None:
                not_verified["runtime_kernels"] = (
                    "whether Core ML on device keeps the weights compressed in memory / runs int8 "
                    "arithmetic (ANE, iOS17+/iOS18) or decompresses to fp16 is decided by the runtime "
                    "and was not observed"
                )
        if target.precision == "fp16":
            extra = [t for t in by_prec.get("fp32", []) if t != "cast"]
            if extra:  # ops coremltools kept in fp32 inside an fp16 program: the fp16 emulation does not model them
                not_verified["fp16_emulation"] = f"ops kept in fp32 by coremltools were emulated in fp16: {', '.join(extra)}"
        precision = precision_map(target.precision, site_prec, **detail)
        return Compiled(files=[PACKAGE, SOURCE], precision=precision, verified=verified, not_verified=not_verified, info=info)

    def reference_runner(self, art_dir: Path, manifest: dict):
        """Torch runs the ExportedProgram that was converted, at the compute precision (every op's
        output rounded to fp16 for fp16 programs, as Core ML's fp16 ML program stores them); for a
        compressed program, with the site weights decompressed from the saved .mlpackage and its
        activation quantize/dequantize in front of the site GEMMs."""
        return reference_runner(art_dir, manifest)
