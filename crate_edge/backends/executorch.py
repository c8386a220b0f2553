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

from ..errors import CrateEdgeError
from .base import Backend, Compiled

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
        if cv.dim() != rank or cv.shape[dim] != ev.shape[dim] or any(
                cv.shape[i] != 1 for i in range(rank) if i != dim and not (isinstance(ev.shape[i], int) and ev.shape[i] == cv.shape[i])):
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
    inputs = [n for n in edge_ep.graph_module.graph.nodes if n.op == "placeholder"
              and n.name in edge_ep.graph_signature.user_inputs]
    return all(isinstance(n.meta["val"].shape[0], torch.SymInt) for n in inputs)


# ------------------------------------------------------------------ backend

def set_threads(n: int) -> None:
    """XNNPACK's thread pool is one per process: this sets it for every loaded program."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != n:
        portable_lib._unsafe_reset_threadpool(n)


class ExecuTorchBackend(Backend):
    name = "executorch"
    packages = ("executorch",)
    runtime_packages = ("executorch.runtime",)
    extra = "executorch"

    def dists(self):
        return ["executorch"]

    def compile(self, module, ep, example, target, out: Path) -> Compiled:
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
                f"set [input] dynamic_batch = false in the target to build for the static batch {len(example)}") from e
        if target.dynamic_batch is not None and not _batch_is_dynamic(edge.exported_program()):
            raise CrateEdgeError(f"executorch lowering pinned the batch to {len(example)} instead of keeping it dynamic "
                                 f"{list(target.dynamic_batch)}; set [input] dynamic_batch = false in the target to build for that batch")
        (out / PROGRAM).write_bytes(pte.buffer)
        batch = f"dynamic {list(target.dynamic_batch)}" if target.dynamic_batch else f"static {len(example)}"
        info = {"partitioner": "XnnpackPartitioner (fp32)", "batch": batch, "xnnpack_delegates": n,
                "outside_delegates": left, "edge_passes": prep.counts}
        return Compiled(files=[PROGRAM], precision={"*": "fp32"}, info=info,
                        verified={"execution": "ExecuTorch runtime (XNNPACK + portable kernels) on this machine"})

    def load(self, art_dir: Path, manifest: dict):
        from executorch.runtime import Runtime

        threads = manifest["target"]["definition"].get("options", {}).get("threads")
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
