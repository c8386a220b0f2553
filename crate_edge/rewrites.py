"""CRATE-aware rewrites: small named passes over an eval-mode CRATE, each computing the same
function (tests hold every pass to <= 1e-5 in fp32) in a form some backend runs faster.

  fold_ista         ISTA's three GEMMs become one: ReLU(y A - eta lambda),
                    A = I + eta (D - D^T D), folded in float64 then cast. On CRATE-α (as
                    fold_ista_update there) the scalars go into the dictionaries: four
                    nn.Linear GEMMs enc = eta D^T, syn = D, res = -eta D^T (both biased
                    -eta lambda), dec = D1, so z1 = ReLU(enc x), z2 = ReLU(z1 + res(syn z1 - x)),
                    out = dec z2; z1 and x stay float paths (adds) when the GEMMs are quantized
  fold_ista_update  the same single GEMM on the update only: ReLU(y + y dA - eta lambda),
                    dA = eta (D - D^T D) in an nn.Linear `update`, so that a quantizer can
                    quantize dA while the identity path y stays in float (crate_edge.quantize's policy)
  ista_gemm         ISTA as one GEMM with A = I + eta (D - D^T D) computed from D at every call:
                    differentiable in D, for training (fold_ista is the deployment form)
  sdpa_attention    MSSA's attention as scaled_dot_product_attention(w, w, w): one fused op
                    for backends with a fused attention kernel (Core ML iOS18, ONNX Attention,
                    TVM R.nn.attention, TensorRT)
  bmm_attention     attention as 3-D bmm over (batch*heads, N, dim_head): XNNPACK delegates
                    bmm but not the expand_copy that 4-D batched matmul lowers to
  linear_layernorm  LayerNorm as mean/variance through F.linear with a 1/d row: XNNPACK has no
                    layer_norm, but linear/sub/mul/add/rsqrt delegate
  channel_major_patches
                    CRATE's patches in Conv2d's (c, p1, p2) order, the patch LayerNorm's
                    affine and the embedding Linear's columns permuted to match: both
                    rearranging permutes move whole pixel rows, where upstream's (p1, p2, c)
                    puts channels innermost (a gather at stride c)
  gemm_rows         each biased nn.Linear applied to its input as a (rows, features) matrix
                    and reshaped back: the ONNX exporter's Gemm (bias inside), which ONNX
                    Runtime quantizes into one QGemm, where a batched MatMul + Add became
                    MatMulIntegerToFloat and a separate Add
  patch_linear      CRATE-α's Conv2d patch embedding (kernel = stride = patch) as patches
                    flattened in Conv2d's (c, p1, p2) order times an nn.Linear over the conv's
                    weight: the quantizers' embedding site is a Linear in both families
  shift_patch_norm  the patch LayerNorm computed on x - x[..., 0] (LN is shift invariant): a
                    near-uniform patch (background, sky, upsampled images) has variance << eps,
                    so LN multiplies the rounding error of its mean by up to eps^-1/2 = 316;
                    after the shift that mean is taken over small numbers (shifted-data
                    variance). Measured on CRATE-Tiny/224 and upsampled Fashion-MNIST: layer-0
                    MSSA features 7.7e-5 -> 2.2e-6 from float64 in eager, 3.4e-3 -> 1.2e-4
                    under Inductor; logits 3.1e-5 -> 3.3e-6 under Inductor

Passes never modify their input: `apply(model, names)` returns a rewritten deep copy; with
share_parameters=True the copy keeps the input's parameter tensors (a faster view of the same
model to train through, while the model itself stays the reference formulation). Each pass
builds new modules over the old ones' parameters: no flags, no class swaps.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .crate_alpha import CrateAlpha, OvercompleteISTA
from .errors import CrateEdgeError
from .model import CRATE, ISTA, MSSA

PASSES: dict[str, Callable[[CRATE], CRATE]] = {}


def register(name: str):
    def deco(fn):
        PASSES[name] = fn
        return fn

    return deco


def apply(model: CRATE, names: list[str], share_parameters: bool = False) -> CRATE:
    """A copy of `model` with the named passes applied in order: a deep copy in eval mode, or,
    with share_parameters, a copy of the module tree over the same parameter tensors, in the
    model's own mode (see the module docstring)."""
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise CrateEdgeError(f"unknown rewrite(s) {', '.join(unknown)}; known: {', '.join(PASSES)}")
    if share_parameters:
        m = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
    else:
        m = copy.deepcopy(model).eval()
    for n in names:
        m = PASSES[n](m)
    return m


# ------------------------------------------------------------------ ISTA


class FoldedISTA(nn.Module):
    """ReLU(y A - eta lambda) as one linear with bias: weight = A^T (so F.linear(y, A^T) = y A)."""

    def __init__(self, ista: ISTA):
        super().__init__()
        D = ista.weight.detach().double()
        A = torch.eye(D.shape[0], dtype=torch.float64) + ista.eta * (D - D.t() @ D)
        self.weight = nn.Parameter(A.t().contiguous().to(ista.weight.dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.full((D.shape[0],), -ista.eta * ista.lambd, dtype=ista.weight.dtype), requires_grad=False)
        self.eta, self.lambd = ista.eta, ista.lambd

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.relu(F.linear(y, self.weight, self.bias))


class FoldedOvercompleteISTA(nn.Module):
    """CRATE-α's two ISTA steps and decoding with eta and lambda folded into four nn.Linear GEMMs
    (weights scaled in float64, then cast): z1 = ReLU(enc x), z2 = ReLU(z1 + res(syn z1 - x)),
    out = dec z2, with enc = eta D^T, res = -eta D^T (both biased -eta lambda), syn = D, dec = D1.
    res carries the minus sign (exact) so that no two sites hold the same weight tensor: Core ML's
    quantizer finds a site's op by its weight."""

    def __init__(self, ista: OvercompleteISTA):
        super().__init__()
        D, D1 = ista.D.detach().double(), ista.D1.detach()
        d, m = D.shape
        dt, eta, lam = ista.D.dtype, ista.eta, ista.lambd
        self.enc, self.res = nn.Linear(d, m), nn.Linear(d, m)
        self.syn, self.dec = nn.Linear(m, d, bias=False), nn.Linear(m, d, bias=False)
        with torch.no_grad():
            for lin, sign in ((self.enc, 1.0), (self.res, -1.0)):
                lin.weight.copy_((sign * eta * D.t()).to(dt))
                lin.bias.fill_(-eta * lam)
            self.syn.weight.copy_(ista.D.detach())
            self.dec.weight.copy_(D1)
        self.requires_grad_(False)
        self.eta, self.lambd = eta, lam

    def sparse_code(self, x: torch.Tensor) -> torch.Tensor:
        z1 = F.relu(self.enc(x))
        return F.relu(z1 + self.res(self.syn(z1) - x))

    def decode(self, z2: torch.Tensor) -> torch.Tensor:
        return self.dec(z2)

    def reconstruct(self, z2: torch.Tensor) -> torch.Tensor:
        """D z2, for the reconstruction residual. A probe gives the block its own copy `rec` of
        -D (see Probe): a weight shared with the `syn` site would get one run-time transpose from
        the ONNX exporter, which no quantizer can calibrate, and Core ML's quantizer finds a site's
        op by its weight, so the copy is negated (exactly) to differ from D."""
        return -self.rec(z2) if hasattr(self, "rec") else self.syn(z2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.sparse_code(x))


def _fold_alpha(model) -> bool:
    """CRATE-α's fold (both ISTA folds name it there); True if `model` is a CRATE-α."""
    if not isinstance(model, CrateAlpha):
        return False
    for _, ista in model.transformer.layers:
        if isinstance(ista.fn, OvercompleteISTA):
            ista.fn = FoldedOvercompleteISTA(ista.fn)
    return True


@register("fold_ista")
def fold_ista(model: CRATE) -> CRATE:
    if _fold_alpha(model):
        return model
    for _, ista in model.transformer.layers:
        if isinstance(ista.fn, ISTA):
            ista.fn = FoldedISTA(ista.fn)
    return model


class FoldedISTAUpdate(nn.Module):
    """ReLU(y + y dA - eta lambda), dA = eta (D - D^T D) folded in float64: the identity path is
    an add, so quantizing `update` leaves it exact."""

    def __init__(self, ista: ISTA):
        super().__init__()
        D = ista.weight.detach().double()
        dA = ista.eta * (D - D.t() @ D)
        d = D.shape[0]
        self.update = nn.Linear(d, d, bias=True)
        with torch.no_grad():
            self.update.weight.copy_(dA.t().to(ista.weight.dtype))
            self.update.bias.fill_(-ista.eta * ista.lambd)
        self.update.requires_grad_(False)
        self.eta, self.lambd = ista.eta, ista.lambd

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.relu(y + self.update(y))


class ISTAGemm(nn.Module):
    """ReLU(y A - eta lambda) with A = I + eta (D - D^T D) formed from D at every call: one
    GEMM over the tokens instead of three, and still differentiable in D."""

    def __init__(self, ista: ISTA):
        super().__init__()
        self.weight = ista.weight  # D, the same parameter
        self.eta, self.lambd = ista.eta, ista.lambd

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        D = self.weight
        A = torch.eye(D.shape[0], dtype=D.dtype, device=D.device) + self.eta * (D - D.t() @ D)
        return F.relu(y @ A - self.eta * self.lambd)


@register("ista_gemm")
def ista_gemm(model: CRATE) -> CRATE:
    for _, ista in model.transformer.layers:
        if isinstance(ista.fn, ISTA):
            ista.fn = ISTAGemm(ista.fn)
    return model


@register("fold_ista_update")
def fold_ista_update(model: CRATE) -> CRATE:
    if _fold_alpha(model):
        return model
    for _, ista in model.transformer.layers:
        if isinstance(ista.fn, ISTA):
            ista.fn = FoldedISTAUpdate(ista.fn)
    return model


# ------------------------------------------------------------------ MSSA


class _MSSAForm(nn.Module):
    """MSSA over an existing MSSA's projections (the same qkv, to_out and dropout modules); a
    subclass gives the attention its own form."""

    def __init__(self, mssa: MSSA):
        super().__init__()
        self.qkv, self.to_out, self.attn_dropout = mssa.qkv, mssa.to_out, mssa.attn_dropout
        self.heads, self.dim_head, self.scale = mssa.heads, mssa.dim_head, mssa.scale

    subspace_features = MSSA.subspace_features
    forward = MSSA.forward

    def attend(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SDPAMSSA(_MSSAForm):
    def attend(self, w: torch.Tensor) -> torch.Tensor:
        # q = k = v: exactly SDPA(w, w, w) with its default scale dim_head^-0.5 = upstream's
        o = F.scaled_dot_product_attention(w, w, w, dropout_p=self.attn_dropout.p if self.training else 0.0)
        return self.to_out(o.transpose(1, 2).flatten(2))


class BmmMSSA(_MSSAForm):
    def attend(self, w: torch.Tensor) -> torch.Tensor:
        b, h, n, p = w.shape
        w3 = w.reshape(b * h, n, p)
        a = torch.softmax(torch.bmm(w3, w3.transpose(1, 2)) * self.scale, dim=-1)
        o = torch.bmm(a, w3).reshape(b, h, n, p)
        return self.to_out(o.transpose(1, 2).reshape(b, n, h * p))


def _replace_mssa(model: CRATE, cls: type) -> CRATE:
    for mssa, _ in model.transformer.layers:
        mssa.fn = cls(mssa.fn)
    return model


@register("sdpa_attention")
def sdpa_attention(model: CRATE) -> CRATE:
    return _replace_mssa(model, SDPAMSSA)


@register("bmm_attention")
def bmm_attention(model: CRATE) -> CRATE:
    return _replace_mssa(model, BmmMSSA)


# ------------------------------------------------------------------ LayerNorm


class LinearLayerNorm(nn.Module):
    """LayerNorm over the last dim computed with F.linear averaging (eps as nn.LayerNorm's)."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        (d,) = ln.normalized_shape
        self.register_buffer("avg", torch.full((1, d), 1.0 / d, dtype=ln.weight.dtype))
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = F.linear(x, self.avg)
        xc = x - mu
        var = F.linear(xc * xc, self.avg)
        return xc * torch.rsqrt(var + self.eps) * self.weight + self.bias


@register("linear_layernorm")
def linear_layernorm(model: CRATE) -> CRATE:
    for mod in model.modules():
        if isinstance(mod, ShiftedLayerNorm) and mod.pick is None:
            d = mod.ln.normalized_shape[0] if isinstance(mod.ln, nn.LayerNorm) else mod.ln.avg.shape[1]
            e0 = torch.zeros(1, d, dtype=mod.ln.weight.dtype)
            e0[0, 0] = 1.0
            mod.pick = e0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(mod, child_name, LinearLayerNorm(child))
    return model


# ------------------------------------------------------------------ patch LayerNorm


class ShiftedLayerNorm(nn.Module):
    """LN(x - x[..., :1]) = LN(x), better conditioned when x is nearly constant along the last dim.
    With `pick` set (linear_layernorm does), x[..., :1] is taken as F.linear(x, e_0), which is
    exact (1 * x_0 plus zeros) and which XNNPACK delegates, unlike the slice."""

    def __init__(self, ln: nn.Module):
        super().__init__()
        self.ln = ln
        self.register_buffer("pick", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = x[..., :1] if self.pick is None else F.linear(x, self.pick)
        return self.ln(x - x0)


@register("shift_patch_norm")
def shift_patch_norm(model: CRATE) -> CRATE:
    if isinstance(model, CrateAlpha):  # no patch LayerNorm: a Conv2d embeds the raw pixels
        return model
    emb = model.to_patch_embedding
    if not isinstance(emb[1], ShiftedLayerNorm):
        emb[1] = ShiftedLayerNorm(emb[1])
    return model


# ------------------------------------------------------------------ patch order


def channel_major_patches(img: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """b c (h p1) (w p2) -> b (h w) (c p1 p2), Conv2d's order. Both permutes move whole rows of
    pw pixels (then whole ph x pw planes), where upstream's (p1 p2 c) order puts the channels
    innermost, a gather of single floats at stride c. Rank <= 5 throughout (Core ML)."""
    b, c, H, W = img.shape
    h, w = H // ph, W // pw
    x = img.reshape(b * c, h, ph, w, pw).permute(0, 1, 3, 2, 4)  # (b c) h w p1 p2
    return x.reshape(b, c, h * w, ph * pw).permute(0, 2, 1, 3).reshape(b, h * w, c * ph * pw)


class ChannelMajorPatches(nn.Module):
    def __init__(self, ph: int, pw: int):
        super().__init__()
        self.ph, self.pw = ph, pw

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return channel_major_patches(img, self.ph, self.pw)


@register("channel_major_patches")
def channel_major_patches_pass(model: CRATE) -> CRATE:
    """Patches in (c p1 p2) order, with the patch LayerNorm's affine and the embedding Linear's
    input columns permuted to match (new parameter tensors: a deployment form, not a view to
    train through with share_parameters): the same function (LayerNorm's mean and variance do not
    depend on the order; element 0 is pixel (0, 0) of channel 0 in both orders, so
    shift_patch_norm's pick is unchanged), a cheaper rearrange."""
    if isinstance(model, CrateAlpha):  # its Conv2d reads (c p1 p2) already (patch_linear)
        return model
    emb = model.to_patch_embedding
    if isinstance(emb[0], ChannelMajorPatches):
        return model
    ph, pw = emb[0].ph, emb[0].pw
    c = model.cfg.channels
    # column j of the new order, (c, p1, p2), is column perm[j] of upstream's (p1, p2, c)
    perm = torch.arange(ph * pw * c).reshape(ph * pw, c).t().reshape(-1)
    shifted = isinstance(emb[1], ShiftedLayerNorm)
    ln, lin = copy.copy(emb[1].ln if shifted else emb[1]), copy.copy(emb[2])
    for m, names in ((ln, ("weight", "bias")), (lin, ("weight",))):
        m._parameters = dict(m._parameters)  # new tensors: the input's stay as they are
        for n in names:
            t = getattr(m, n)
            if t is not None:
                setattr(m, n, nn.Parameter(t.detach()[..., perm].clone(), requires_grad=t.requires_grad))
    emb[0], emb[2] = ChannelMajorPatches(ph, pw), lin
    if shifted:
        emb[1].ln = ln
    else:
        emb[1] = ln
    return model


# ------------------------------------------------------------------ CRATE-α patch embedding


class PatchLinear(nn.Module):
    """Conv2d(kernel = stride = patch) as patches times a Linear over the same weights, returned
    in the conv's (b, d, h, w) layout, so CrateAlpha.embed is unchanged."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        d, c, ph, pw = conv.weight.shape
        self.ph, self.pw = ph, pw
        self.linear = nn.Linear(c * ph * pw, d, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.detach().flatten(1))  # (d, c*ph*pw), Conv2d's (c, p1, p2) order
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias.detach())
        self.linear.requires_grad_(conv.weight.requires_grad)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[2] // self.ph, img.shape[3] // self.pw
        return self.linear(channel_major_patches(img, self.ph, self.pw)).transpose(1, 2).unflatten(2, (h, w))


@register("patch_linear")
def patch_linear(model: CRATE) -> CRATE:
    if isinstance(model, CrateAlpha) and isinstance(model.conv1, nn.Conv2d):
        model.conv1 = PatchLinear(model.conv1)
    return model


# ------------------------------------------------------------------ GEMMs over rows


class RowsLinear(nn.Linear):
    """nn.Linear applied to x as a (rows, features) matrix, then the leading shape back: the
    exporter's Gemm (bias inside) instead of a batched MatMul and an Add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(-1, *x.shape[1:-1], y.shape[-1]) if x.dim() > 2 else y


@register("gemm_rows")
def gemm_rows(model: CRATE) -> CRATE:
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Linear and child.bias is not None:
                new = RowsLinear(child.in_features, child.out_features, device=child.weight.device, dtype=child.weight.dtype)
                new.weight, new.bias = child.weight, child.bias
                setattr(mod, name, new)
    return model


# ------------------------------------------------------------------ probe outputs


class Probe(nn.Module):
    """Wraps a (rewritten) model so that it also returns its per-layer fields (the model's
    PROBE_FIELDS), for per-layer parity: CRATE's MSSA features U^T LN1(Z^l) (b, heads, N, p) and
    ISTA output Z^{l+1} (b, N, d); CRATE-α's features, code z2 (b, N, 4d) and reconstruction
    residual (b,). Outputs: (logits, field 0 of layers 0..L-1, field 1 of layers 0..L-1, ...)."""

    def __init__(self, model: CRATE):
        super().__init__()
        self.model = model
        for mod in model.modules():
            if isinstance(mod, FoldedOvercompleteISTA) and not hasattr(mod, "rec"):
                mod.rec = nn.Linear(mod.syn.in_features, mod.syn.out_features, bias=False).requires_grad_(False)
                with torch.no_grad():
                    mod.rec.weight.copy_(-mod.syn.weight)

    def forward(self, x: torch.Tensor):
        z, feats = self.model.forward_intermediates(x)
        logits = self.model.forward_head(z)
        return (logits, *[f[i] for i in range(len(feats[0])) for f in feats])


def probe_output_names(model) -> list[str]:
    """Names of a Probe's outputs after the logits: {field}_{layer}, field by field."""
    return [f"{name}_{i}" for name in type(model).PROBE_FIELDS for i in range(model.cfg.depth)]


def split_probe_outputs(outputs, depth: int):
    """(logits, [field 0 per layer], [field 1 per layer], ...) from a probe model's flat output tuple."""
    n = (len(outputs) - 1) // depth
    return (outputs[0], *[list(outputs[1 + k * depth : 1 + (k + 1) * depth]) for k in range(n)])
