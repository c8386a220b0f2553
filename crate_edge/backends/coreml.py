"""Core ML: coremltools.convert on the ExportedProgram -> .mlpackage (ML program).

Options: minimum_deployment_target (iOS17, iOS18, macOS15, ...; iOS18+ keeps MSSA as one fused
scaled_dot_product_attention op), compute_units (ALL, CPU_ONLY, CPU_AND_GPU, CPU_AND_NE);
precision fp16 or fp32 compute. Predictions need macOS. Elsewhere the converted program is
verified statically (op inventory, tensor precisions, input/output shapes), and its numerics
are checked by running the exact ExportedProgram handed to coremltools in torch at the
target's compute precision, which is labelled as such and never reported as Core ML.
"""
from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np
import torch

from ..errors import CrateEdgeError
from .base import Backend, Compiled

PACKAGE = "model.mlpackage"
SOURCE = "source.pt2"  # the exact ExportedProgram converted, for the off-macOS numeric check


def _mil_inventory(mlmodel) -> tuple[dict[str, int], dict[str, int]]:
    """(op type -> count, output dtype -> count) over the ML program's main function."""
    ops: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        ops[op.op_type] = ops.get(op.op_type, 0) + 1
        if op.op_type != "const":
            for o in op.outputs:
                name = getattr(o.dtype, "__name__", str(o.dtype))
                dtypes[name] = dtypes.get(name, 0) + 1
    return dict(sorted(ops.items())), dict(sorted(dtypes.items()))


class CoreMLBackend(Backend):
    name = "coreml"
    packages = ("coremltools",)
    extra = "coreml"

    def dists(self):
        return ["coremltools"]

    def can_run(self, manifest: dict | None = None):
        if platform.system() != "Darwin":
            return False, "Core ML predictions run only on macOS"
        return super().can_run(manifest)

    def compile(self, module, ep, example, target, out: Path) -> Compiled:
        import coremltools as ct

        logging.getLogger("coremltools").setLevel(logging.ERROR)
        opts = target.options
        tgt_name = opts.get("minimum_deployment_target", "iOS18")
        if not hasattr(ct.target, tgt_name):
            raise CrateEdgeError(f"target {target.name}: unknown minimum_deployment_target {tgt_name!r}")
        if target.precision not in ("fp16", "fp32"):
            raise CrateEdgeError(f"target {target.name}: Core ML compute precision must be fp16 or fp32")
        units = opts.get("compute_units", "ALL")
        if not hasattr(ct.ComputeUnit, units):
            raise CrateEdgeError(f"target {target.name}: unknown compute_units {units!r}")
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
            ep_core, inputs=[ct.TensorType(name="images", shape=ct.Shape(shape), dtype=np.float32)],
            outputs=[ct.TensorType(name=n, dtype=np.float32) for n in names],
            minimum_deployment_target=getattr(ct.target, tgt_name), compute_precision=prec,
            compute_units=getattr(ct.ComputeUnit, units), convert_to="mlprogram", skip_model_load=True)
        mlmodel.save(str(out / PACKAGE))
        ops, dtypes = _mil_inventory(mlmodel)
        fused = ops.get("scaled_dot_product_attention", 0)
        spec = mlmodel.get_spec()
        io = {"inputs": [i.name for i in spec.description.input], "outputs": [o.name for o in spec.description.output]}
        verified = {
            "conversion": f"coremltools {ct.__version__} produced an ML program for {tgt_name} on this machine",
            "op_inventory": f"{sum(ops.values())} MIL ops; fused scaled_dot_product_attention: {fused}",
            "precision": f"output dtypes of non-const ops: {dtypes}",
            "io": f"inputs {io['inputs']}, outputs {io['outputs']}, batch {list(target.dynamic_batch or [example.shape[0]] * 2)}",
        }
        not_verified = {}
        if platform.system() != "Darwin":
            not_verified["execution"] = ("Core ML predictions need macOS; numerics were checked by running the exported "
                                         f"program in torch at {target.precision}, not by Core ML")
        return Compiled(files=[PACKAGE, SOURCE], precision={"compute": target.precision, "io": "fp32"},
                        verified=verified, not_verified=not_verified,
                        info={"deployment_target": tgt_name, "compute_units": units, "mil_ops": ops,
                              "mil_dtypes": dtypes, "fused_attention_ops": fused, "io": io})

    def load(self, art_dir: Path, manifest: dict):
        import coremltools as ct

        units = manifest["backend"].get("compute_units", "ALL")
        mlmodel = ct.models.MLModel(str(art_dir / PACKAGE), compute_units=getattr(ct.ComputeUnit, units))
        names = manifest["backend"]["io"]["outputs"]

        def run(x: np.ndarray):
            out = mlmodel.predict({"images": x})
            return [np.asarray(out[n], dtype=np.float32) for n in names]

        return run

    def reference_runner(self, art_dir: Path, manifest: dict):
        """Torch runs the ExportedProgram that was converted, at the compute precision."""
        gm = torch.export.load(str(art_dir / SOURCE)).module()
        half = manifest["precision"].get("compute") == "fp16"
        if half:
            gm = gm.half()

        def run(x: np.ndarray):
            with torch.no_grad():
                t = torch.from_numpy(x)
                out = gm(t.half() if half else t)
            out = out if isinstance(out, (list, tuple)) else [out]
            return [o.float().numpy() for o in out]

        label = f"torch ({'float16' if half else 'float32'}) on the exported program given to coremltools, not Core ML"
        return run, label
