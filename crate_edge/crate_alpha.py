"""CRATE-α: the scaled white-box transformer of Yang et al., "Scaling White-Box Transformers for
Vision" (NeurIPS 2024), exactly as the upstream code (UCSC-VLAA/CRATE-alpha,
torch_inference/model/crate_alpha.py) computes it.

Each layer l on the tokens Z (batch, N+1, d), with an overcomplete dictionary D and a decoding
dictionary D1 (both d x m, m = 4d) and eta = lambda = 0.1:

    Z_half = Z + MSSA(LN1(Z))                        as CRATE's MSSA, output map without bias
    x      = LN2(Z_half)
    z1     = ReLU(eta D^T x - eta lambda)            ISTA step 1, from z0 = 0
    z2     = ReLU(z1 - eta D^T (D z1 - x) - eta lambda)   ISTA step 2
    Z_next = Z_half + D1 z2                          decoded and added to the stream

Unlike CRATE, whose one ISTA step on a complete (d x d) dictionary replaces the stream, the
code z2 is 4d wide and the block is residual. Pre-norms are LayerNorm with eps 1e-6, the head's
LayerNorm keeps eps 1e-5; the patch embedding is a biased Conv2d (kernel = stride = patch); the
head pools the cls token. Shared with CRATE (crate_edge.model): MSSA, PreNorm, the config's
validation, the head (Classifier). Parameter names are upstream's, so its .pth files load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .model import MSSA, Classifier, CrateConfig, PreNorm, _pair

__all__ = ["CrateAlphaConfig", "CrateAlpha", "OvercompleteISTA", "VARIANTS"]

PRE_NORM_EPS = 1e-6


@dataclass
class CrateAlphaConfig(CrateConfig):
    overcomplete: int = 4  # m / d: width of the sparse code relative to the tokens

    FAMILY: ClassVar[str] = "crate-alpha"

    def __post_init__(self):
        super().__post_init__()
        if int(self.overcomplete) < 1:
            raise ValueError(f"overcomplete must be >= 1, got {self.overcomplete}")

    @property
    def code_dim(self) -> int:
        return self.overcomplete * self.dim


class OvercompleteISTA(nn.Module):
    """Two ISTA steps from z0 = 0 towards a non-negative sparse code of x in D, decoded with D1."""

    def __init__(self, dim: int, overcomplete: int = 4, eta: float = 0.1, lambd: float = 0.1):
        super().__init__()
        self.D = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(dim, overcomplete * dim)))
        self.D1 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(dim, overcomplete * dim)))
        self.eta, self.lambd = eta, lambd

    def sparse_code(self, x: torch.Tensor) -> torch.Tensor:
        """z2 (..., m) for tokens x (..., d)."""
        D, eta, lam = self.D, self.eta, self.lambd
        z1 = F.relu(eta * F.linear(x, D.t()) - eta * lam)  # ReLU(eta D^T x - eta lambda)
        grad = F.linear(F.linear(z1, D) - x, D.t())  # D^T (D z1 - x)
        return F.relu(z1 - eta * grad - eta * lam)

    def decode(self, z2: torch.Tensor) -> torch.Tensor:
        return F.linear(z2, self.D1)  # D1 z2

    def reconstruct(self, z2: torch.Tensor) -> torch.Tensor:
        """D z2: the tokens as the code explains them (the reconstruction residual's)."""
        return F.linear(z2, self.D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.sparse_code(x))


def reconstruction_residual(x: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """||x - D z2||_F / ||x||_F per image over the token matrix, given dz = D z2: how much of the
    tokens the sparse code leaves unexplained. x, dz (b, N, d) -> (b,)."""
    r = x - dz
    return (r * r).sum((1, 2)).sqrt() / (x * x).sum((1, 2)).sqrt()


class Transformer(nn.Module):
    def __init__(self, cfg: CrateAlphaConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreNorm(cfg.dim, MSSA(cfg.dim, cfg.heads, cfg.dim_head, cfg.dropout, out_bias=False), eps=PRE_NORM_EPS),
                    PreNorm(cfg.dim, OvercompleteISTA(cfg.dim, cfg.overcomplete, cfg.eta, cfg.lambd), eps=PRE_NORM_EPS),
                ]
            )
            for _ in range(cfg.depth)
        )


class CrateAlpha(Classifier):
    # per layer, forward_intermediates gives (MSSA features, sparse code z2, reconstruction
    # residual per image); probe artifacts output each field for every layer, named so
    PROBE_FIELDS = ("mssa_features", "ista_code", "ista_residual")

    def __init__(self, cfg: CrateAlphaConfig):
        super().__init__()
        self.cfg = cfg
        p = _pair(cfg.patch_size)
        self.conv1 = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=p, stride=p, bias=True)
        self.pos_embedding = nn.Parameter(torch.randn(1, cfg.num_patches + 1, cfg.dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim))
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.transformer = Transformer(cfg)
        self.mlp_head = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.num_classes))

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Z^0: conv patch tokens, the cls token prepended, positions added."""
        x = self.conv1(img).flatten(2).transpose(1, 2)  # (b, N, d), patches in row-major order
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.emb_dropout(torch.cat((cls, x), dim=1) + self.pos_embedding)

    def _layers(self, img: torch.Tensor, intermediates: bool):
        z = self.embed(img)
        per_layer = []
        for mssa, ista in self.transformer.layers:
            w = mssa.fn.subspace_features(mssa.norm(z))  # U^T LN1(Z^l), per head
            z = z + mssa.fn.attend(w)  # Z^{l+1/2}
            x = ista.norm(z)  # LN2(Z^{l+1/2})
            z2 = ista.fn.sparse_code(x)
            z = z + ista.fn.decode(z2)  # Z^{l+1} = Z^{l+1/2} + D1 z2
            if intermediates:
                per_layer.append((w, z2, reconstruction_residual(x, ista.fn.reconstruct(z2))))
        return z, per_layer

    def forward_intermediates(self, img: torch.Tensor):
        """(Z^L, [(U^T LN1(Z^l), z2_l, residual_l) for each layer l])."""
        return self._layers(img, True)

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        return self._layers(img, False)[0]


# Upstream's base and large; tiny and small sized as CRATE's; "mnist" for 28x28 single-channel
# images, about the embedded CRATE's parameter count (recipes/fmnist-alpha.toml).
VARIANTS: dict[str, dict[str, Any]] = {
    "crate-alpha-tiny": dict(dim=384, depth=12, heads=6, dim_head=64),
    "crate-alpha-small": dict(dim=576, depth=12, heads=12, dim_head=48),
    "crate-alpha-base": dict(dim=768, depth=12, heads=12, dim_head=64),
    "crate-alpha-large": dict(patch_size=14, dim=1024, depth=24, heads=16, dim_head=64),
    "crate-alpha-mnist": dict(image_size=28, patch_size=4, channels=1, num_classes=10, dim=64, depth=7, heads=4, dim_head=16),
}
