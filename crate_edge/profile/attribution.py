"""Attribution shared by the runtimes: the op kind (KINDS) of a kernel from its class and block
(_kind, for every runtime), and the call-order segmentation for the runtimes whose profilers give
no module path (ExecuTorch, TVM): _segment, or _unattributed where it does not verify.

Call order: every CRATE block starts with a LayerNorm (each layer is [PreNorm(MSSA), PreNorm(ISTA)],
the head LayerNorm then Linear), so the last 2 * depth + 1 LayerNorms in call order start
layer0.mssa, layer0.ista, ..., layer{L-1}.ista and the head; everything before is the embedding,
and kernels that only move data right before the head's LayerNorm (the cls-token pick) are the
head's. A LayerNorm is a kernel of class layernorm: a layer_norm kernel, or XNNPACK's nine
operators of crate_edge.rewrites.LinearLayerNorm, which executorch.py marks as one beforehand. The
result is checked: exactly one softmax (or fused attention) in every MSSA block and none
elsewhere. Where that fails, nothing is guessed: kernels are reported under "delegate" (XNNPACK)
or "other" with their op kinds.

In an MSSA block, the kernels from the last GEMM before its softmax to the first GEMM after it
(w w^T, its scale, softmax, A w) are the attention; the other GEMMs, and an elementwise kernel
right after one (its unfused bias or residual add), are the projections.
"""

from __future__ import annotations

from .report import Kernel


def _kind(cls: str, block: str, role: str | None = None) -> str:
    """The op kind (KINDS) of a kernel of class `cls` in `block`; `role` says, for an MSSA kernel,
    whether it is a projection or part of the attention (None: neither, e.g. a residual add)."""
    if cls in ("quant", "layout", "layernorm"):
        return cls
    if block == "embed":
        return "embed"
    if block == "head":
        return "head"
    if block.endswith(".ista"):
        return "ista"
    if block.endswith(".mssa"):
        if cls in ("softmax", "attention"):
            return "attention"
        return role or "other"
    return "attention" if cls in ("softmax", "attention") else "other"


def _segment(ks: list[Kernel], depth: int) -> bool:
    """Attribute kernels in call order to blocks and kinds (module docstring); False, touching
    nothing, when the structure does not verify."""
    starts = [i for i, k in enumerate(ks) if k.cls == "layernorm" and (k.ln_start or i == 0 or ks[i - 1].cls != "layernorm")]
    need = 2 * depth + 1
    if depth < 1 or len(starts) < need:
        return False
    s = starts[-need:]
    names = [f"layer{l}.{p}" for l in range(depth) for p in ("mssa", "ista")] + ["head"]
    blocks = ["embed"] * s[0]
    for j, name in enumerate(names):
        end = s[j + 1] if j + 1 < len(s) else len(ks)
        blocks += [name] * (end - s[j])
    i = s[-1] - 1  # data movement right before the head's LayerNorm: the cls-token pick
    while i >= 0 and ks[i].cls == "layout" and blocks[i] != "embed":
        blocks[i] = "head"
        i -= 1
    for name in set(blocks):
        n_att = sum(1 for k, b in zip(ks, blocks) if b == name and k.cls in ("softmax", "attention"))
        if n_att != (1 if name.endswith(".mssa") else 0):
            return False
    roles: dict[int, str] = {}
    for name in (n for n in names if n.endswith(".mssa")):
        idx = [i for i, b in enumerate(blocks) if b == name]
        p = next(i for i in idx if ks[i].cls in ("softmax", "attention"))
        gemms = [i for i in idx if ks[i].cls == "gemm"]
        a0 = max([i for i in gemms if i < p], default=p) if ks[p].cls == "softmax" else p
        a1 = min([i for i in gemms if i > p], default=p) if ks[p].cls == "softmax" else p
        for i in idx:
            if a0 <= i <= a1:
                roles[i] = "attention"
            elif ks[i].cls == "gemm" or (ks[i].cls == "elementwise" and roles.get(i - 1) == "mssa_projection"):
                roles[i] = "mssa_projection"  # a projection, and the unfused epilogue (bias, residual add) right after it
    for i, (k, b) in enumerate(zip(ks, blocks)):
        k.block, k.kind = b, _kind(k.cls, b, roles.get(i))
    return True


def _unattributed(ks: list[Kernel], backend: str) -> None:
    for k in ks:
        k.block = "delegate" if backend == "executorch" and k.engine in ("delegate", "int8", "quant") else "other"
        k.kind = _kind(k.cls, "other")
