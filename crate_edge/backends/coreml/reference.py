"""The torch reference runner: off macOS, torch runs the converted ExportedProgram at the compute
precision, for a compressed program with the weights (and activation quantize/dequantize) read back
from the saved .mlpackage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import CrateEdgeError
from .conversion import PACKAGE, SOURCE
from .mil import _dtype_name, _main_ops


def read_compressed(package: Path, sites: dict[str, dict[str, str]]) -> dict[str, dict]:
    """From a saved .mlpackage: per site, the decompressed weight of its MIL linear (numpy, at
    the program's precision) and, where its input is quantized, (scale, zero_point, qmin, qmax)."""
    import coremltools as ct
    from coremltools.models import utils as mutils
    from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    prog = mutils._apply_graph_pass(
        mlmodel, [WeightDecompressor(op_selector=lambda op: True)], return_pymil_prog=True, skip_model_load=True
    )
    by_name = {op.name: op for op in _main_ops(prog) if op.op_type == "linear"}
    out = {}
    for s, v in sites.items():
        op = by_name.get(v["linear"])
        if op is None or op.inputs["weight"].val is None:
            raise CrateEdgeError(f"{package}: site {s} linear {v['linear']} not found with a constant weight")
        d = {"weight": np.asarray(op.inputs["weight"].val)}
        x = op.inputs["x"].op
        if x is not None and x.op_type == "dequantize":
            q = x.inputs["input"].op
            if q is None or q.op_type != "quantize":
                raise CrateEdgeError(f"{package}: site {s}: dequantize without quantize")
            zp = q.inputs.get("zero_point")
            dt = _dtype_name(q.outputs[0].dtype)
            lo, hi = {"int8": (-128, 127), "uint8": (0, 255)}[dt]
            d["act"] = (float(np.asarray(q.inputs["scale"].val)), float(np.asarray(zp.val)) if zp is not None else 0.0, lo, hi)
        out[s] = d
    return out


def _fake_quant(x: torch.Tensor, scale: float, zp: float, lo: int, hi: int) -> torch.Tensor:
    """Core ML quantize -> dequantize: clip(round(x / scale) + zp, lo, hi), then (q - zp) * scale."""
    q = torch.clamp(torch.round(x / scale) + zp, lo, hi)
    return (q - zp) * scale


def load_with_program_weights(gm: torch.fx.GraphModule, comp: dict[str, dict], sites: dict[str, dict[str, str]]):
    """Put the Core ML program's decompressed weights into the exported module's site parameters
    and its activation quantize/dequantize in front of the site GEMMs (FX rewrite)."""
    for s, v in sites.items():
        p = gm.get_parameter(v["param"]) if "." in v["param"] else getattr(gm, v["param"])
        w = torch.from_numpy(comp[s]["weight"].astype(np.float32))
        if p.shape != w.shape:
            raise CrateEdgeError(f"site {s}: program weight {tuple(w.shape)} vs parameter {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(w)
    acts = {v["param"]: comp[s]["act"] for s, v in sites.items() if "act" in comp[s]}
    if acts:
        g = gm.graph
        done = set()
        for node in list(g.nodes):
            if node.op != "call_function" or len(node.args) < 2:
                continue
            w = node.args[1]
            if getattr(w, "op", None) == "get_attr" and w.target in acts:
                with g.inserting_before(node):
                    fq = g.call_function(_fake_quant, (node.args[0], *acts[w.target]))
                node.args = (fq, *node.args[1:])
                done.add(w.target)
        if done != set(acts):
            raise CrateEdgeError(f"could not place activation quantization for {', '.join(sorted(set(acts) - done))}")
        g.lint()
        gm.recompile()
    return gm


def reference_runner(art_dir: Path, manifest: dict):
    """(run, label) for CoreMLBackend.reference_runner."""
    gm = torch.export.load(str(art_dir / SOURCE)).module()
    half = manifest["precision"]["default"] == "fp16"
    sites = manifest["backend"].get("quant_sites")
    what = "the exported program given to coremltools"
    if sites:
        comp = read_compressed(art_dir / PACKAGE, sites)
        gm = load_with_program_weights(gm, comp, sites)
        acts = any("act" in c for c in comp.values())
        what = "the exported program with the Core ML program's decompressed weights" + (
            " and activation quantize/dequantize" if acts else ""
        )
    if half:
        gm = gm.half()

    def run(x: np.ndarray):
        with torch.no_grad():
            t = torch.from_numpy(x)
            out = gm(t.half() if half else t)
        out = out if isinstance(out, (list, tuple)) else [out]
        return [o.float().numpy() for o in out]

    dt = "float16" if half else "float32"
    label = f"not Core ML: torch ({dt}) on {what}" if sites else f"torch ({dt}) on {what}, not Core ML"
    return run, label
