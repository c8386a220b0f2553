"""ExecuTorch: torch.export -> edge dialect -> XNNPACK delegate (fp32) -> one .pte program, run by
the ExecuTorch runtime (XNNPACK for delegated work, portable kernels for anything left over).

XNNPACK refuses reshapes with a symbolic size and has no broadcast (expand) op, so with a
dynamic batch every reshape and the cls-token broadcast would stay on portable kernels and cut
the graph into ~20 delegates. Two exact edge-graph passes below fix that before partitioning."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..calibration import calibrate
from ..errors import CrateEdgeError
from ..export import export
from .base import Backend, Capabilities, Compiled, precision_map

PROGRAM = "model.pte"


# ------------------------------------------------------------------ edge passes


def _sym(a) -> bool:
    return isinstance(a, (torch.fx.Node, torch.SymInt))


def infer_symbolic_view_dims(gm: torch.fx.GraphModule) -> int:
    """view_copy(x, [s*b, 8, 4]) -> view_copy(x, [-1, 8, 4]) where exactly one size is symbolic:
    the same view (numel fixes it), and XNNPACK takes one inferred dim but no symbolic ones."""
    from executorch.exir.dialects._ops import ops as exir_ops

    n_done = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == exir_ops.edge.aten.view_copy.default:
            size = list(n.args[1])
            syms = [i for i, d in enumerate(size) if _sym(d)]
            if len(syms) == 1 and not any(isinstance(d, int) and d == -1 for d in size):
                size[syms[0]] = -1
                n.args = (n.args[0], size, *n.args[2:])
                n_done += 1
    return n_done


def broadcast_cat_as_pad(gm: torch.fx.GraphModule) -> int:
    """cat([expand(c, [b, 1, d]), x], 1) -> pad(x, 1 row before) + pad(c, N rows after): the cls
    token prepended without expand_copy (not an XNNPACK op), padding and add being XNNPACK ops.
    Exact: every element is v + 0."""
    from executorch.exir.dialects._ops import ops as exir_ops

    E = exir_ops.edge.aten
    n_done = 0
    for cat in list(gm.graph.nodes):
        if not (cat.op == "call_function" and cat.target == E.cat.default and len(cat.args[0]) == 2):
            continue
        parts = cat.args[0]
        dim = cat.args[1] if len(cat.args) > 1 else 0
        k = next((i for i, p in enumerate(parts) if p.op == "call_function" and p.target == E.expand_copy.default), None)
        if k is None:
            continue
        exp, x = parts[k], parts[1 - k]
        c = exp.args[0]
        cv, ev, xv = c.meta["val"], exp.meta["val"], x.meta["val"]
        rank = ev.dim()
        dim = dim % rank
        if not (isinstance(cv.shape[dim], int) and isinstance(xv.shape[dim], int)):
            continue  # a symbolic length along the cat dim would need a symbolic pad
        # only a pure broadcast of size-1 dims, never along the cat dim
        if (
            cv.dim() != rank
            or cv.shape[dim] != ev.shape[dim]
            or any(cv.shape[i] != 1 for i in range(rank) if i != dim and not (isinstance(ev.shape[i], int) and ev.shape[i] == cv.shape[i]))
        ):
            continue
        nc, nx = int(cv.shape[dim]), int(xv.shape[dim])
        tail = [0, 0] * (rank - 1 - dim)  # constant_pad_nd pads from the last dim backwards
        pad_x = tail + ([nc, 0] if k == 0 else [0, nc])
        pad_c = tail + ([0, nx] if k == 0 else [nx, 0])
        fake = xv.fake_mode
        with gm.graph.inserting_before(cat):
            px = gm.graph.call_function(E.constant_pad_nd.default, (x, pad_x, 0.0))
            pc = gm.graph.call_function(E.constant_pad_nd.default, (c, pad_c, 0.0))
            s = gm.graph.call_function(E.add.Tensor, (px, pc))
        with fake:  # shapes only: running pad on the symbolic shape would pin the batch to the example's
            px.meta["val"] = torch.empty_like(cat.meta["val"])
            s.meta["val"] = torch.empty_like(cat.meta["val"])
            pc.meta["val"] = torch.ops.aten.constant_pad_nd.default(cv, pad_c, 0.0)
        for new in (px, pc, s):
            new.meta["stack_trace"] = cat.meta.get("stack_trace", "")
        cat.replace_all_uses_with(s)
        gm.graph.erase_node(cat)
        if not exp.users:
            gm.graph.erase_node(exp)
        n_done += 1
    return n_done


class _Prepare:
    """The transform pass handed to to_edge_transform_and_lower; counts what it rewrote."""

    def __init__(self):
        self.counts = {"broadcast_cat_as_pad": 0, "infer_symbolic_view_dims": 0}

    def __call__(self, gm: torch.fx.GraphModule):
        from torch.fx.passes.infra.pass_base import PassResult

        a = broadcast_cat_as_pad(gm)
        b = infer_symbolic_view_dims(gm)
        self.counts["broadcast_cat_as_pad"] += a
        self.counts["infer_symbolic_view_dims"] += b
        if a or b:
            gm.graph.eliminate_dead_code()  # the sym_size/mul nodes that only fed those sizes
            gm.recompile()
        return PassResult(gm, bool(a or b))


def delegation(edge_ep) -> tuple[int, dict[str, int]]:
    """(number of delegate calls, {op: count} for every op left outside the delegates)."""
    n, left = 0, Counter()
    for node in edge_ep.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == torch.ops.higher_order.executorch_call_delegate:
            n += 1
        else:
            name = getattr(node.target, "__name__", str(node.target))
            if name != "getitem":
                left[name] += 1
    return n, dict(sorted(left.items()))


def _batch_is_dynamic(edge_ep) -> bool:
    inputs = [n for n in edge_ep.graph_module.graph.nodes if n.op == "placeholder" and n.name in edge_ep.graph_signature.user_inputs]
    return all(isinstance(n.meta["val"].shape[0], torch.SymInt) for n in inputs)


# ------------------------------------------------------------------ int8 (PT2E)
#
# torch.export -> prepare_pt2e with a quantizer that annotates ONLY the linear ops of the plan's
# sites (crate_edge.quantize policy) using XNNPACK's QuantizationSpec objects -> calibration ->
# convert_pt2e (q/dq around those linears) -> torch.export again -> the same edge passes and
# XnnpackPartitioner as fp32, which turns each dq -> linear -> q group into an XNNPACK int8
# fully-connected op. Activations: "static" (per-tensor qparams from calibration, qs8 in and out
# of each GEMM) or "dynamic" (XNNPACK qd8: per-row int8 input quantized at run time, fp32 out;
# calibration unused). Set by [quantize] activations, or [quantize.options] activations when the
# config schema only knows static/none.

_FIXED_CLS = None


def _fixed_observer_cls():
    """A MinMaxObserver that holds a range computed by crate_edge.calibration and observes
    nothing: XNNPACK's affine int8 qparams are then torchao's own arithmetic on that range."""
    global _FIXED_CLS
    if _FIXED_CLS is not None:
        return _FIXED_CLS
    from torchao.quantization.pt2e import MinMaxObserver

    class FixedRangeObserver(MinMaxObserver):
        def __init__(self, lo: float = 0.0, hi: float = 0.0, **kw):
            super().__init__(**kw)
            self.min_val = torch.tensor(float(lo))
            self.max_val = torch.tensor(float(hi))

        def forward(self, x_orig):
            return x_orig

    _FIXED_CLS = FixedRangeObserver
    return FixedRangeObserver


def activation_mode(qc) -> str:
    """static | dynamic: [quantize] activations, or [quantize.options] activations."""
    mode = str(qc.options.get("activations", qc.activations))
    if mode not in ("static", "dynamic"):
        raise CrateEdgeError(
            f'executorch int8: activations = {mode!r} is not supported; use "static" '
            f'(calibrated per-tensor) or "dynamic" (XNNPACK qd8, per-row at run time)'
        )
    return mode


def quantization_configs(qc, ranges=None):
    """XNNPACK QuantizationConfig per site: int8 weights symmetric in [-127, 127] (per output
    channel or per tensor); static activations int8 per tensor (affine, [-128, 127]) on the
    site's input and output ranges from crate_edge.calibration (`ranges`, a Calibration with
    outputs), or dynamic per-row activations (one config for every site); bias left in float
    (XNNPACK quantizes it to int32 with the input and weight scales when it builds the GEMM).
    Returns ({site: config} or {None: config} for dynamic, label)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

    per_channel = qc.weights == "per_channel"
    if activation_mode(qc) == "dynamic":
        if not per_channel:
            raise CrateEdgeError("executorch int8: XNNPACK's dynamic-activation GEMM needs per_channel weights")
        return {None: get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)}, "dynamic per-row (XNNPACK qd8, no observer)"
    base = get_symmetric_quantization_config(is_per_channel=per_channel)
    fixed = _fixed_observer_cls()

    def act(r):
        obs = fixed.with_args(lo=r.lo, hi=r.hi, eps=2**-12)
        return QuantizationSpec(
            dtype=torch.int8,
            quant_min=-128,
            quant_max=127,
            qscheme=torch.per_tensor_affine,
            is_dynamic=False,
            observer_or_fake_quant_ctr=obs,
        )

    configs = {s: QuantizationConfig(act(ranges.inputs[s]), act(ranges.outputs[s]), base.weight, None, False) for s in ranges.inputs}
    label = f"crate_edge.calibration {qc.calibration}" + (f" (p = {qc.percentile})" if qc.calibration == "percentile" else "")
    return configs, label + ", affine int8 [-128, 127] on each site's input and output range"


def _stack_paths(node) -> set[str]:
    out = set()
    for v in node.meta.get("nn_module_stack", {}).values():
        path = v[0] if isinstance(v, (tuple, list)) else str(v)
        for pre in ("L['self'].", "L__self__."):
            if path.startswith(pre):
                path = path[len(pre) :]
        out.add(path)
    return out


def _site_quantizer(paths: dict[str, str], configs: dict):
    """A torchao Quantizer that annotates exactly one aten.linear per site (the linear whose
    nn_module_stack holds the site's module path) with that site's config (configs[site], or
    configs[None] for every site) and nothing else: no add/mul/softmax/layer_norm/bmm
    annotation, and no propagation through views."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import OP_TO_ANNOTATOR
    from torchao.quantization.pt2e.quantizer import Quantizer

    by_path = {p: s for s, p in paths.items()}

    class SiteLinearQuantizer(Quantizer):
        def __init__(self):
            super().__init__()
            self.annotated: dict[str, list[str]] = {}

        def annotate(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
            def site_of(n):
                hit = [by_path[p] for p in _stack_paths(n) if p in by_path]
                return hit[0] if len(hit) == 1 else None

            for site in paths:
                config = configs[None] if None in configs else configs[site]
                for part in OP_TO_ANNOTATOR["linear"](gm, config, lambda n, site=site: site_of(n) == site) or []:
                    self.annotated.setdefault(site, []).append(part[0].name)
            return gm

        def validate(self, gm: torch.fx.GraphModule) -> None:
            missing = sorted(set(paths) - set(self.annotated))
            many = sorted(s for s, v in self.annotated.items() if len(v) != 1)
            if missing or many:
                raise CrateEdgeError(
                    f"executorch int8: site(s) without exactly one linear to quantize: {', '.join(missing + many)} "
                    f"(site module paths: {', '.join(paths[s] for s in missing + many)})"
                )

    return SiteLinearQuantizer()


def quantize_pt2e(module: torch.nn.Module, example: torch.Tensor, target, plan):
    """(re-exported quantized ExportedProgram, {site: [linear node]}, observer label). Static
    activations take crate_edge.calibration's ranges of the eager `module` (held by fixed
    observers), so no calibration pass runs through the prepared graph; one call on `example`
    lets the weight observers see the weights."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    ranges = None if activation_mode(plan.config) == "dynamic" else calibrate(module, plan, outputs=True)
    configs, label = quantization_configs(plan.config, ranges)
    quantizer = _site_quantizer(plan.sites, configs)
    gm = export(module, example, target.dynamic_batch).module()
    prepared = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        prepared(example)
    converted = convert_pt2e(prepared)
    return export(converted, example, target.dynamic_batch), quantizer.annotated, label, _input_qparams(converted, quantizer.annotated)


def _input_qparams(gm, annotated: dict[str, list[str]]) -> dict[str, dict]:
    """What the converted program quantizes each site's input with (static activations): the
    scale, zero point and integer range of the dequantize that feeds the site's linear."""
    lin = {n.name: n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default}
    out = {}
    for site, names in annotated.items():
        dq = lin[names[0]].args[0] if names and names[0] in lin else None
        if "dequantize_per_tensor" in _fname(dq) and not isinstance(dq.args[1], torch.fx.Node):
            scale, zp, qmin, qmax = dq.args[1:5]
            out[site] = {"scale": float(scale), "zero_point": int(zp), "qmin": int(qmin), "qmax": int(qmax)}
    return out


def _fname(n) -> str:
    return getattr(n.target, "__name__", str(n.target)) if isinstance(n, torch.fx.Node) and n.op == "call_function" else ""


def _dynamic_act(dq) -> bool:
    """dq <- quantize(x, scale, zp) whose qparams come from choose_qparams at run time."""
    q = dq.args[0] if isinstance(dq, torch.fx.Node) and dq.args else None
    if "quantize" not in _fname(q):
        return False
    for a in q.all_input_nodes[1:]:
        src = a.args[0] if _fname(a) == "getitem" else a
        if "choose_qparams" in _fname(src):
            return True
    return False


def linear_inventory(edge_ep) -> dict[str, int]:
    """Linears inside the XNNPACK delegates (the partitions' original edge graphs) by precision:
    int8_static_act / int8_dynamic_act when the weight is a dequantize of int8 data, else fp32."""
    inv = Counter()
    gm = edge_ep.graph_module
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.higher_order.executorch_call_delegate:
            continue
        lowered = getattr(gm, node.args[0].target)
        for n in lowered.original_module.graph_module.graph.nodes:
            if not _fname(n).startswith("aten.linear"):
                continue
            if "dequantize" in _fname(n.args[1]):
                inv["int8_dynamic_act" if _dynamic_act(n.args[0]) else "int8_static_act"] += 1
            else:
                inv["fp32"] += 1
    return dict(sorted(inv.items()))


def compile_int8(module, ep, example, target, out: Path, plan) -> Compiled:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    qc = plan.config
    if qc.scheme != "int8":
        raise CrateEdgeError(f'backend executorch: quantize.scheme = {qc.scheme!r} is not supported; it builds "int8" (XNNPACK)')
    if not plan.sites:
        raise CrateEdgeError("backend executorch: the quantization plan has no sites")
    mode = activation_mode(qc)
    qep, annotated, label, qparams = quantize_pt2e(module, example, target, plan)
    prep = _Prepare()
    try:
        edge = to_edge_transform_and_lower(qep, transform_passes=[prep], partitioner=[XnnpackPartitioner()])
        n, left = delegation(edge.exported_program())
        inv = linear_inventory(edge.exported_program())
        pte = edge.to_executorch()
    except Exception as e:  # the lowering stack raises many types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CrateEdgeError(f"executorch int8 lowering failed ({type(e).__name__}: {msg[:200]})") from e
    if target.dynamic_batch is not None and not _batch_is_dynamic(edge.exported_program()):
        raise CrateEdgeError(
            f"executorch int8 lowering pinned the batch to {len(example)} instead of keeping it dynamic "
            f"{list(target.dynamic_batch)}; set [input] dynamic_batch = false in the target"
        )
    n_int8 = inv.get("int8_static_act", 0) + inv.get("int8_dynamic_act", 0)
    if n_int8 != len(plan.sites):
        raise CrateEdgeError(
            f"executorch int8: XNNPACK took {n_int8} int8 linears, expected one per site ({len(plan.sites)}); "
            f"left outside the delegates: {left}"
        )
    (out / PROGRAM).write_bytes(pte.buffer)
    batch = f"dynamic {list(target.dynamic_batch)}" if target.dynamic_batch else f"static {len(example)}"
    w = "per-channel" if qc.weights == "per_channel" else "per-tensor"
    a = "int8 per-tensor affine static, output int8" if mode == "static" else "int8 per-row dynamic"
    info = {
        "partitioner": f"XnnpackPartitioner (int8 {'qs8' if mode == 'static' else 'qd8'} linears + fp32)",
        "batch": batch,
        "xnnpack_delegates": n,
        "outside_delegates": left,
        "edge_passes": prep.counts,
        "int8": {
            "activations": mode,
            "observer": label,
            "quantized_sites": len(annotated),
            "input_qparams": qparams,
            "delegated_linears": inv,
            "program_bytes": len(pte.buffer),
        },
    }
    return Compiled(
        files=[PROGRAM],
        precision=precision_map("fp32", {s: f"int8 GEMM (weights int8 {w} symmetric, activations {a})" for s in sorted(plan.sites)}),
        info=info,
        verified={
            "execution": "ExecuTorch runtime (XNNPACK + portable kernels) on this machine",
            "int8 linears": f"{n_int8} of the delegated linears take int8 weights (one per site)",
        },
    )


# ------------------------------------------------------------------ backend


def set_threads(n: int) -> None:
    """XNNPACK's thread pool is one per process: this sets it for every loaded program."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != n:
        portable_lib._unsafe_reset_threadpool(n)


class ExecuTorchBackend(Backend):
    name = "executorch"
    capabilities = Capabilities(
        devices=("cpu",),
        precisions=("fp32", "int8"),
        # static: affine int8 from the calibrated ranges; [quantize.options] activations = "dynamic": XNNPACK qd8
        quant_schemes={"int8": "affine"},
        compile_needs=("executorch",),
        run_needs=("executorch.runtime",),
        distributions=("executorch",),
        extra="executorch",
    )

    def compile(self, exported, target, out: Path, quant=None) -> Compiled:
        module, ep, example = exported.module, exported.program, exported.example
        if quant is not None:
            return compile_int8(module, ep, example, target, out, quant)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        prep = _Prepare()
        try:
            edge = to_edge_transform_and_lower(ep, transform_passes=[prep], partitioner=[XnnpackPartitioner()])
            n, left = delegation(edge.exported_program())  # before to_executorch rewrites ops to out variants
            pte = edge.to_executorch()
        except Exception as e:  # the lowering stack raises many types; say which batch failed
            if target.dynamic_batch is None:
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CrateEdgeError(
                f"executorch could not lower the dynamic batch {list(target.dynamic_batch)} ({type(e).__name__}: {msg[:200]}); "
                f"set [input] dynamic_batch = false in the target to build for the static batch {len(example)}"
            ) from e
        if target.dynamic_batch is not None and not _batch_is_dynamic(edge.exported_program()):
            raise CrateEdgeError(
                f"executorch lowering pinned the batch to {len(example)} instead of keeping it dynamic "
                f"{list(target.dynamic_batch)}; set [input] dynamic_batch = false in the target to build for that batch"
            )
        (out / PROGRAM).write_bytes(pte.buffer)
        batch = f"dynamic {list(target.dynamic_batch)}" if target.dynamic_batch else f"static {len(example)}"
        info = {
            "partitioner": "XnnpackPartitioner (fp32)",
            "batch": batch,
            "xnnpack_delegates": n,
            "outside_delegates": left,
            "edge_passes": prep.counts,
        }
        return Compiled(
            files=[PROGRAM],
            precision=precision_map("fp32"),
            info=info,
            verified={"execution": "ExecuTorch runtime (XNNPACK + portable kernels) on this machine"},
        )

    def runner(self, art_dir: Path, manifest: dict, threads: int | None = None):
        from executorch.runtime import Runtime

        threads = threads or manifest["target"]["definition"].get("options", {}).get("threads")
        if threads:
            set_threads(int(threads))
        rt = Runtime.get()
        # From bytes, not the path: loading a delegated program by path segfaults in 1.5.1.
        program = rt.load_program((art_dir / PROGRAM).read_bytes())
        method = program.load_method("forward")
        keep = (rt, program, method)  # the Program must outlive its Method, or execute() crashes

        def run(x: np.ndarray):
            outs = keep[2].execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
            return [o.numpy().copy() for o in outs]

        return run
