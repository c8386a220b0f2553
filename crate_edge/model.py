"""CRATE: the white-box transformer of Yu et al., "White-Box Transformers via Sparse Rate
Reduction" (NeurIPS 2023), exactly as the upstream reference code (Ma-Lab-Berkeley/CRATE,
model/crate.py) computes it.

Each layer is one step of sparse rate reduction on the token matrix Z (batch, N+1, d):

    Z_half = Z + MSSA(LN1(Z))                       compression against subspaces U_1..U_K
    Z_next = ReLU(Y + eta (Y D - Y D^T D) - eta lambda),  Y = LN2(Z_half)   one ISTA step

Parameter names follow upstream's state_dict, so upstream checkpoints load without renaming
and crate-edge's safetensors files load into upstream code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrateConfig", "CRATE", "VARIANTS"]


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


@dataclass
class CrateConfig:
    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    channels: int = 3
    num_classes: int = 1000
    dim: int = 384
    depth: int = 12
    heads: int = 6
    dim_head: int = 64
    pool: str = "cls"  # "cls" or "mean"
    eta: float = 0.1  # ISTA step size (upstream's `ista` argument)
    lambd: float = 0.1  # ISTA sparsity penalty (fixed at 0.1 upstream)
    dropout: float = 0.0
    emb_dropout: float = 0.0
    mean: tuple[float, ...] | None = field(default=None)  # input normalisation, per channel
    std: tuple[float, ...] | None = field(default=None)

    FAMILY: ClassVar[str] = "crate"

    def __post_init__(self):
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together")
        if self.mean is not None and not (len(self.mean) == len(self.std) == self.channels and all(s > 0 for s in self.std)):
            raise ValueError(f"mean and std need one value per channel ({self.channels}) and std > 0; got {self.mean}, {self.std}")
        (ih, iw), (ph, pw) = _pair(self.image_size), _pair(self.patch_size)
        if ih % ph or iw % pw:
            raise ValueError(f"image size {ih}x{iw} is not divisible by patch size {ph}x{pw}")
        for name in ("channels", "num_classes", "dim", "depth", "heads", "dim_head"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_patches(self) -> int:
        (ih, iw), (ph, pw) = _pair(self.image_size), _pair(self.patch_size)
        return (ih // ph) * (iw // pw)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        ih, iw = _pair(self.image_size)
        return (self.channels, ih, iw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        if self.FAMILY != "crate":  # CRATE's dict stays as it was, so model hashes do not move
            d["family"] = self.FAMILY
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CrateConfig":
        d = dict(d)
        family = d.pop("family", "crate")
        if family != cls.FAMILY:
            raise ValueError(f"config of model family {family!r}, not {cls.FAMILY!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        for k in ("image_size", "patch_size", "mean", "std"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)


class PreNorm(nn.Module):
    """LayerNorm then fn: upstream's wrapper (keys `norm.*`, `fn.*`)."""

    def __init__(self, dim: int, fn: nn.Module, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fn = fn

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(z))


class MSSA(nn.Module):
    """Multi-head subspace self-attention with q = k = v (paper eq. 9-11).

    w = Z U (U = qkv.weight^T, the K stacked subspace bases), per head
    o_k = softmax(w_k w_k^T / sqrt(p)) w_k, heads concatenated, then the output map.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, out_bias: bool = True):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head**-0.5
        self.qkv = nn.Linear(dim, inner, bias=False)
        # upstream skips the output map only in this degenerate case
        project_out = not (heads == 1 and dim_head == dim)
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=out_bias), nn.Dropout(dropout)) if project_out else nn.Identity()
        self.attn_dropout = nn.Dropout(dropout)

    def subspace_features(self, z: torch.Tensor) -> torch.Tensor:
        """U^T z per head: (b, n, d) -> (b, heads, n, dim_head)."""
        return self.qkv(z).unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)

    def attend(self, w: torch.Tensor) -> torch.Tensor:
        """softmax(w w^T / sqrt(p)) w per head, heads concatenated, output map."""
        a = torch.softmax((w @ w.transpose(-1, -2)) * self.scale, dim=-1)
        o = self.attn_dropout(a) @ w
        return self.to_out(o.transpose(1, 2).flatten(2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.attend(self.subspace_features(z))


class ISTA(nn.Module):
    """One proximal-gradient step towards a non-negative sparse code of z in dictionary D
    (paper eq. 15): ReLU(z + eta (z D - z D^T D) - eta lambda). No residual around it."""

    def __init__(self, dim: int, eta: float = 0.1, lambd: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))  # D
        nn.init.kaiming_uniform_(self.weight)
        self.eta, self.lambd = eta, lambd

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        D = self.weight
        x1 = F.linear(z, D)  # z D^T
        g1 = F.linear(x1, D.t())  # z D^T D
        g2 = F.linear(z, D.t())  # z D
        return F.relu(z + self.eta * (g2 - g1) - self.eta * self.lambd)


class Transformer(nn.Module):
    def __init__(self, cfg: CrateConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreNorm(cfg.dim, MSSA(cfg.dim, cfg.heads, cfg.dim_head, cfg.dropout)),
                    PreNorm(cfg.dim, ISTA(cfg.dim, cfg.eta, cfg.lambd)),
                ]
            )
            for _ in range(cfg.depth)
        )


class PatchRearrange(nn.Module):
    """b c (h p1) (w p2) -> b (h w) (p1 p2 c): upstream's einops order, not Conv2d's."""

    def __init__(self, patch_size):
        super().__init__()
        self.ph, self.pw = _pair(patch_size)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, c, H, W = img.shape
        h, w = H // self.ph, W // self.pw
        # tensors of rank <= 5 throughout, which Core ML requires
        x = img.reshape(b * c, h, self.ph, w, self.pw).permute(0, 1, 3, 2, 4)  # (b c) h w p1 p2
        return x.reshape(b, c, h * w, self.ph * self.pw).permute(0, 2, 3, 1).reshape(b, h * w, self.ph * self.pw * c)


class Classifier(nn.Module):
    """What CRATE and CRATE-α share after their layers: pool the tokens (the cls token, or the mean
    of all N+1), then `mlp_head` (LayerNorm and the classifier). A subclass gives cfg, mlp_head
    and forward_features."""

    def forward_head(self, z: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = z.mean(dim=1) if self.cfg.pool == "mean" else z[:, 0]
        return pooled if pre_logits else self.mlp_head(pooled)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(img))


class CRATE(Classifier):
    # per layer, forward_intermediates gives (MSSA features, sparse code): here the code is the
    # ISTA output Z^{l+1} itself; probe artifacts output each field for every layer, named so
    PROBE_FIELDS = ("mssa_features", "ista_out")

    def __init__(self, cfg: CrateConfig):
        super().__init__()
        self.cfg = cfg
        ph, pw = _pair(cfg.patch_size)
        patch_dim = cfg.channels * ph * pw
        self.to_patch_embedding = nn.Sequential(
            PatchRearrange(cfg.patch_size),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, cfg.dim),
            nn.LayerNorm(cfg.dim),
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, cfg.num_patches + 1, cfg.dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim))
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.transformer = Transformer(cfg)
        self.mlp_head = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.num_classes))

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Z^0: patch tokens with the cls token prepended and positions added."""
        x = self.to_patch_embedding(img)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.emb_dropout(torch.cat((cls, x), dim=1) + self.pos_embedding)

    def forward_intermediates(self, img: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(Z^L, [(U^T LN1(Z^l), Z^{l+1}) for each layer l]): the final tokens and, per layer, the
        subspace features MSSA attends with and the ISTA output (what the white-box measurements
        and the probe outputs read)."""
        z = self.embed(img)
        per_layer = []
        for mssa, ista in self.transformer.layers:
            w = mssa.fn.subspace_features(mssa.norm(z))  # U^T LN1(Z^l), per head
            z = z + mssa.fn.attend(w)  # Z^{l+1/2} = Z^l + MSSA(Z^l)
            z = ista(z)  # Z^{l+1} = ISTA(LN2(Z^{l+1/2}))
            per_layer.append((w, z))
        return z, per_layer

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """Final tokens Z^L."""
        return self.forward_intermediates(img)[0]


# Named variants, as timm does. Published ImageNet configurations (the paper's Table 1) and
# small ones for 28x28 single-channel images (MNIST / Fashion-MNIST).
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=384, depth=12, heads=6, dim_head=64),
    "small": dict(dim=576, depth=12, heads=12, dim_head=48),
    "base": dict(dim=768, depth=12, heads=12, dim_head=64),
    "large": dict(dim=1024, depth=24, heads=16, dim_head=64),
    "mnist-micro": dict(image_size=28, patch_size=4, channels=1, num_classes=10, dim=64, depth=4, heads=4, dim_head=16),
    "mnist-small": dict(image_size=28, patch_size=4, channels=1, num_classes=10, dim=128, depth=6, heads=4, dim_head=32),
    "mnist-base": dict(image_size=28, patch_size=4, channels=1, num_classes=10, dim=192, depth=6, heads=6, dim_head=32),
}
