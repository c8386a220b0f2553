"""What a user would pick instead of crate-edge, as in-process callables for the measurement
scripts: torch.compile of the model, and OpenVINO (the optional `openvino` extra: `pip install
'crate-edge[openvino]'`) at f32, at its default precision for this CPU (bf16 where the CPU has
AVX-512 BF16 or AMX) and NNCF int8. Each returns {name: fn(x) -> logits} and {name: why skipped}:
a package that is missing or a conversion that fails is skipped with the reason, never dropped.
"""

from __future__ import annotations

import numpy as np
import torch


def torch_compile(model, x: np.ndarray) -> tuple[dict, dict]:
    try:
        cm = torch.compile(model)
        with torch.no_grad():
            cm(torch.from_numpy(x))  # compiles here, not in the timed calls
    except Exception as e:  # noqa: BLE001 - reported as the reason
        return {}, {"torch.compile": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}

    def run(inp):
        with torch.no_grad():
            return cm(torch.from_numpy(inp)).numpy()

    return {"torch.compile": run}, {}


def openvino(model, x: np.ndarray, calibration: np.ndarray, threads: int) -> tuple[dict, dict]:
    """OpenVINO f32, default precision and NNCF int8 (calibrated on `calibration`, the same
    training images crate-edge's int8 targets calibrate on)."""
    names = ("openvino f32", "openvino default", "openvino+nncf int8")
    try:
        import openvino as ov
    except ImportError:
        why = "openvino is not installed (pip install 'crate-edge[openvino]')"
        return {}, {n: why for n in names}
    core = ov.Core()
    try:
        ov_model = ov.convert_model(model, example_input=torch.from_numpy(x))
    except Exception as e:  # noqa: BLE001
        why = f"openvino.convert_model failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return {}, {n: why for n in names}
    fns, skipped = {}, {}
    base = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY"}
    for name, cfg in (("openvino f32", {**base, "INFERENCE_PRECISION_HINT": "f32"}), ("openvino default", base)):
        fns[name] = _compiled(core.compile_model(ov_model, "CPU", cfg))
    try:
        import nncf

        q = nncf.quantize(ov_model, nncf.Dataset([c[None] for c in calibration]), model_type=nncf.ModelType.TRANSFORMER)
        fns["openvino+nncf int8"] = _compiled(core.compile_model(q, "CPU", base))
    except ImportError:
        skipped["openvino+nncf int8"] = "nncf is not installed (pip install 'crate-edge[openvino]')"
    except Exception as e:  # noqa: BLE001
        skipped["openvino+nncf int8"] = f"nncf.quantize failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return fns, skipped


def _compiled(cm):
    req = cm.create_infer_request()

    def run(inp):
        return req.infer([inp])[cm.output(0)].copy()

    try:  # what OpenVINO chose: f32, or bf16 on a CPU with bf16 dot products
        hint = str(cm.get_property("INFERENCE_PRECISION_HINT"))  # e.g. "<Type: 'bfloat16'>"
    except Exception:  # noqa: BLE001 - older OpenVINO: not reported
        hint = ""
    run.precision = next(
        (p for key, p in (("bfloat16", "bf16"), ("bf16", "bf16"), ("float16", "fp16"), ("f16", "fp16")) if key in hint), "fp32"
    )
    return run
