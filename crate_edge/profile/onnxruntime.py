"""ONNX Runtime: SessionOptions.enable_profiling on a session built by
crate_edge.runtimes.ort_session (its options, with profiling and the optimized-graph dump added):
one `kernel_time` event per node per run (op type, duration in us), and per run `model_run`, the
total. Nodes are named as in the optimized graph ORT runs, which is saved beside the trace.

Attribution by module path: a node is attributed by the module path in the name-scope metadata of
the exported node of the same name (or the node that produced its output, for nodes ORT fused:
SkipLayerNormalization carries the MSSA residual add into the ISTA block's LayerNorm). Nodes the
exporter left without a module scope (the attention of F.scaled_dot_product_attention, reshapes,
the residual adds, the cls-token concat) take the latest block among their inputs; nodes fed by
nothing attributed (the shape arithmetic of the cls broadcast) take the earliest block among
their consumers; an unscoped node whose consumers are all the head (the cls-token pick or mean
pool) is the head's. In an MSSA block, qkv and to_out are the projections, and the rest of MSSA
(scoped to it, or an unscoped GEMM) is the attention.

Op classes (_ort_class) come from the op type; a Cast to or from int8/uint8 is a quant kernel.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import CrateEdgeError
from ..runtimes import ONNX_FILE, ort_session
from .attribution import _kind
from .report import Kernel

_ORT_INT8 = {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "ConvInteger", "QAttention", "QOrderedMatMul"}
_ORT_QUANT = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_ORT_LN = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
_ORT_ATTN = {"Attention", "MultiHeadAttention", "QAttention", "GroupQueryAttention"}
_ORT_GEMM = {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulNBits", "Conv", "FusedConv"} | _ORT_INT8
_ORT_LAYOUT = frozenset(
    "Reshape Transpose Concat Slice Gather Expand Shape Squeeze Unsqueeze Identity Split Flatten Pad ReorderInput ReorderOutput MemcpyToHost MemcpyFromHost".split()
)


def _ort_class(op: str, int8_cast: bool = False) -> tuple[str, str]:
    if op in _ORT_QUANT or (op == "Cast" and int8_cast):
        return "quant", "quant"
    if op in _ORT_ATTN:
        return "attention", "int8" if op in _ORT_INT8 else "float"
    if op in _ORT_GEMM or op.startswith("QLinear"):
        return "gemm", "int8" if op in _ORT_INT8 or op.startswith("QLinear") else "float"
    if op in _ORT_LN:
        return "layernorm", "float"
    if op == "Softmax":
        return "softmax", "float"
    if op in _ORT_LAYOUT:
        return "layout", "float"
    return "elementwise", "float"


def _profile_onnxruntime(path: Path, m: dict, x: np.ndarray, iters: int, warmup: int, threads, tick):
    import onnx
    import onnxruntime as ort

    opts = m["target"]["definition"].get("options", {})
    model_file = path / ONNX_FILE
    dis = opts.get("disabled_optimizers")
    base = ort_session(model_file, threads, opts.get("providers"), dis)  # the project's options, unchanged
    so = base.get_session_options()
    providers, popts = base.get_providers(), base.get_provider_options()
    del base
    with tempfile.TemporaryDirectory(prefix="crate-edge-profile-") as td:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(td) / "ort")
        so.optimized_model_filepath = str(Path(td) / "optimized.onnx")
        so.log_severity_level = 3  # the dump's "hardware specific optimizations" warning: this is that hardware
        sess = ort.InferenceSession(
            str(model_file),
            so,
            providers=providers,
            provider_options=[popts.get(p, {}) for p in providers],
            disabled_optimizers=dis or None,
        )
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(warmup):
            sess.run(None, feed)
        for _ in range(iters):
            sess.run(None, feed)
            tick()
        trace = json.loads(Path(sess.end_profiling()).read_text())
        optimized = onnx.load(so.optimized_model_filepath, load_external_data=False)
    original = onnx.load(str(model_file), load_external_data=False)

    runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])[-iters:]
    if len(runs) < iters:
        raise CrateEdgeError(f"onnxruntime's profile holds {len(runs)} model_run events for {iters} runs")
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in runs]
    totals = [float(e["dur"]) for e in runs]
    nodes = list(optimized.graph.node)
    kernels: dict[str, Kernel] = {n.name: Kernel(n.name, n.op_type, *_ort_class(n.op_type), per_run=[0.0] * iters) for n in nodes}
    seen = set()
    suffix = "_kernel_time"
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith(suffix):
            continue
        r = next((i for i, (a, b) in enumerate(windows) if a <= e["ts"] <= b), None)
        if r is None:  # a warmup run
            continue
        name = e["name"][: -len(suffix)]
        args = e.get("args", {})
        op = args.get("op_name", "?")
        k = kernels.get(name)
        if k is None:
            k = kernels[name] = Kernel(name, op, *_ort_class(op), per_run=[0.0] * iters)
        if op == "Cast" and _int8_typed(args):
            k.cls, k.engine = "quant", "quant"
        k.per_run[r] += float(e["dur"])
        seen.add(name)
    depth = int(m["source_model"]["config"]["depth"])
    _ort_attribute(original, nodes, kernels, depth)
    ks = [k for k in kernels.values() if k.name in seen]
    desc = f"onnxruntime {ort.__version__} SessionOptions.enable_profiling (per-node kernel_time events, {providers[0]})"
    return ks, [], totals, desc, []


def _int8_typed(args: dict) -> bool:
    types = [t for key in ("input_type_shape", "output_type_shape") for d in args.get(key, []) for t in d]
    return any(t in ("int8", "uint8") for t in types)


_LAYER_RE = re.compile(r"(?:^|\.)transformer\.layers\.(\d+)\.([01])(?:\.|$)")
_EMBED_RE = re.compile(r"(?:^|\.)(?:to_patch_embedding|conv1)(?:\.|$)")
_HEAD_RE = re.compile(r"(?:^|\.)mlp_head(?:\.|$)")
_PROJ_RE = re.compile(r"\.(?:qkv|to_out)(?:\.|$)")


def _block_of_scope(scope: str | None) -> str | None:
    if not scope:
        return None
    mt = _LAYER_RE.search(scope)
    if mt:
        return f"layer{mt.group(1)}.{'mssa' if mt.group(2) == '0' else 'ista'}"
    if _EMBED_RE.search(scope):
        return "embed"
    if _HEAD_RE.search(scope):
        return "head"
    return None


def _rank(block: str, depth: int) -> int:
    if block == "embed":
        return 0
    if block == "head":
        return 2 * depth + 1
    mt = re.match(r"layer(\d+)\.(mssa|ista)", block)
    return 1 + 2 * int(mt.group(1)) + (mt.group(2) == "ista")


def _ort_attribute(original, nodes, kernels: dict[str, Kernel], depth: int) -> None:
    """Block and kind of every optimized-graph node (module docstring)."""
    from ..backends.onnxruntime import node_scope

    orig_scope = {n.name: node_scope(n) for n in original.graph.node}
    out_scope = {o: orig_scope[n.name] for n in original.graph.node for o in n.output}
    scope, block = {}, {}
    for n in nodes:
        s = orig_scope.get(n.name) if _block_of_scope(orig_scope.get(n.name)) else None
        if s is None:
            s = next((out_scope[o] for o in n.output if _block_of_scope(out_scope.get(o))), None)
        scope[n.name], block[n.name] = s, _block_of_scope(s)
    scoped = {k for k, b in block.items() if b is not None}
    producer = {o: n.name for n in nodes for o in n.output}
    consumers: dict[str, list[str]] = defaultdict(list)
    for n in nodes:
        for i in n.input:
            if i in producer:
                consumers[producer[i]].append(n.name)
    rank = lambda b: _rank(b, depth)  # noqa: E731
    for n in nodes:  # unscoped: the latest block among its inputs
        if block[n.name] is None:
            ps = [block[producer[i]] for i in n.input if i in producer and block[producer[i]] is not None]
            if ps:
                block[n.name] = max(ps, key=rank)
    for n in reversed(nodes):  # fed by nothing attributed: the earliest block among its consumers
        if block[n.name] is None:
            cs = [block[c] for c in consumers[n.name] if block[c] is not None]
            if cs:
                block[n.name] = min(cs, key=rank)
    for n in reversed(nodes):  # the cls-token pick / pool: only the head consumes it
        cs = consumers[n.name]
        if n.name not in scoped and cs and all(block[c] == "head" for c in cs):
            block[n.name] = "head"
    for n in nodes:
        k = kernels[n.name]
        b = block[n.name] or "other"
        s = scope[n.name]
        role = None
        if b.endswith(".mssa"):
            if s and _PROJ_RE.search(s):
                role = "mssa_projection"
            elif s and re.search(r"\.0\.fn$", s):  # inside MSSA itself, outside qkv / to_out: the attention
                role = "attention"
            elif k.cls == "gemm":
                role = "attention"  # an unscoped GEMM in MSSA is w w^T or A w (qkv and to_out carry their scope)
        k.block, k.kind, k.scope = b, _kind(k.cls, b, role), s
