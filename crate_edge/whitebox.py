"""The white-box measurements of CRATE and CRATE-α (coding rate and sparsity per layer, and for
CRATE-α the reconstruction residual), as upstream's vis_utils compute them.

Per layer l, on a batch of images:
  coding rate   R^c(Z^l) = 1/2 sum_k logdet(I_N + p/(N eps) W_k W_k^T),  eps = 0.01,
                W_k = U_k^T LN1(Z^l) (N x p) with each token row normalised to unit length;
  sparsity      the fraction of exact zeros in the layer's sparse code: CRATE's ISTA output
                Z^{l+1} (over N x d), CRATE-α's z2 (over N x 4d);
  residual      CRATE-α only: ||x - D z2||_F / ||x||_F over the token matrix, x = LN2(Z^{l+1/2}):
                how much of the tokens the sparse code leaves unexplained.
All are computed per image, then reported as mean and std over the images (coding rate with
the n-1 std, sparsity and residual with the n std, as upstream's code does for sparsity).
The model's forward_intermediates gives, per layer, (features, code) or (features, code, residual).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

EPS = 0.01


def coding_rate(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """R^c per image for subspace features w of shape (b, heads, N, p); float64 throughout."""
    w = w.double()
    w = w / w.norm(dim=-1, keepdim=True)
    b, k, n, p = w.shape
    gram = w @ w.transpose(-1, -2)  # (b, k, N, N)
    eye = torch.eye(n, dtype=w.dtype, device=w.device)
    return 0.5 * torch.logdet(eye + (p / (n * eps)) * gram).sum(dim=1)


def zero_fraction(z: torch.Tensor) -> torch.Tensor:
    """Fraction of exact zeros per image in tokens z (b, N, d)."""
    return (z == 0).flatten(1).double().mean(dim=1)


def support_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection-over-union of the non-zero sets of two ISTA outputs, per image."""
    na, nb = (a != 0).flatten(1), (b != 0).flatten(1)
    inter = (na & nb).sum(1).double()
    union = (na | nb).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


@dataclass
class WhiteBox:
    """Per-layer arrays (length depth), mean and std over the images."""

    coding_rate_mean: np.ndarray
    coding_rate_std: np.ndarray
    zero_fraction_mean: np.ndarray
    zero_fraction_std: np.ndarray
    n_images: int = 0
    per_image: dict = field(default_factory=dict, repr=False)
    residual_mean: np.ndarray | None = None  # CRATE-α: ||x - D z2|| / ||x||
    residual_std: np.ndarray | None = None

    def __getitem__(self, key):  # measure(...)["coding_rate_mean"] works too
        return getattr(self, key)

    def keys(self):
        keys = ["coding_rate_mean", "coding_rate_std", "zero_fraction_mean", "zero_fraction_std"]
        return keys + (["residual_mean", "residual_std"] if self.residual_mean is not None else [])

    def to_dict(self) -> dict:
        d = {k: [float(v) for v in getattr(self, k)] for k in self.keys()}
        d["n_images"] = self.n_images
        return d

    def table(self) -> str:
        alpha = self.residual_mean is not None
        code = "zero fraction of z2" if alpha else "zero fraction of Z^(l+1)"
        rows = [f"{'layer':>5}  {'coding rate R^c':>22}  {code:>26}" + (f"  {'residual |x-Dz2|/|x|':>22}" if alpha else "")]
        for i in range(len(self.coding_rate_mean)):
            rows.append(
                f"{i:>5}  {self.coding_rate_mean[i]:>12.3f} ± {self.coding_rate_std[i]:<7.3f}  "
                f"{self.zero_fraction_mean[i]:>16.4f} ± {self.zero_fraction_std[i]:<7.4f}"
                + (f"  {self.residual_mean[i]:>12.4f} ± {self.residual_std[i]:<7.4f}" if alpha else "")
            )
        return "\n".join(rows)

    def plot(self, path, title: str = "CRATE white-box measurements", reference: "WhiteBox | None" = None):
        """Both curves across layers, optionally against a reference, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = np.arange(1, len(self.coding_rate_mean) + 1)
        alpha = self.residual_mean is not None
        fig, axes = plt.subplots(1, 3 if alpha else 2, figsize=(15 if alpha else 10, 4))
        a1, a2 = axes[0], axes[1]
        for wb, label, style in ((reference, "reference", "--"), (self, "model" if reference else None, "-")):
            if wb is None:
                continue
            a1.errorbar(layers, wb.coding_rate_mean, yerr=wb.coding_rate_std, fmt="o" + style, capsize=3, label=label)
            a2.errorbar(layers, 1 - wb.zero_fraction_mean, yerr=wb.zero_fraction_std, fmt="o" + style, capsize=3, label=label)
            if alpha and wb.residual_mean is not None:
                axes[2].errorbar(layers, wb.residual_mean, yerr=wb.residual_std, fmt="o" + style, capsize=3, label=label)
        a1.set(xlabel="layer", ylabel="coding rate $R^c$ of $U^T$LN($Z^l$)", title="compression (MSSA)")
        if alpha:
            a2.set(xlabel="layer", ylabel="$\\|z_2\\|_0$ / (N 4d)", title="sparsity (ISTA): non-zero fraction of $z_2$")
            axes[2].set(xlabel="layer", ylabel="$\\|x - D z_2\\| / \\|x\\|$", title="reconstruction residual of the code")
        else:
            a2.set(xlabel="layer", ylabel="$\\|Z^{l+1}\\|_0$ / (N d)", title="sparsity (ISTA): non-zero fraction")
        for a in axes:
            a.grid(alpha=0.3)
            if reference is not None:
                a.legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def probe(model, images: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """Logits and per-layer (U^T LN1(Z^l), sparse code[, residual]) of the eager model."""
    z, feats = model.forward_intermediates(images)
    return model.forward_head(z), feats


@torch.no_grad()
def measure(model, images, batch_size: int = 64) -> WhiteBox:
    """White-box measurements of `model` on `images` (float model inputs, (B, C, H, W))."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    model.eval()
    rates, zeros, resid = [], [], []
    for i in range(0, len(images), batch_size):
        _, feats = probe(model, images[i : i + batch_size].float())
        rates.append(torch.stack([coding_rate(f[0]) for f in feats], 1))
        zeros.append(torch.stack([zero_fraction(f[1]) for f in feats], 1))
        if len(feats[0]) > 2:
            resid.append(torch.stack([f[2].double() for f in feats], 1))
    r, zf = torch.cat(rates).numpy(), torch.cat(zeros).numpy()  # (images, layers)
    # Upstream's conventions, kept so the numbers compare: coding_rate.py reduces with torch's
    # std (unbiased, n-1); plot.py reduces sparsity with numpy's std (n).
    r_std = r.std(axis=0, ddof=1) if len(r) > 1 else np.zeros(r.shape[1])
    per_image = {"coding_rate": r, "zero_fraction": zf}
    res = torch.cat(resid).numpy() if resid else None
    if res is not None:
        per_image["residual"] = res
    return WhiteBox(
        r.mean(0),
        r_std,
        zf.mean(0),
        zf.std(axis=0),
        len(r),
        per_image,
        residual_mean=None if res is None else res.mean(0),
        residual_std=None if res is None else res.std(axis=0),
    )


@torch.no_grad()
def trace(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every intermediate of the eager forward pass, named as upstream's reference trace:
    patch_tokens, z0, layer{i}/{qkv,attn,mssa_out,z_half,ln2,z_out}, final_tokens, pooled, logits."""
    model.eval()
    t: dict[str, torch.Tensor] = {}
    t["patch_tokens"] = model.to_patch_embedding(images)
    z = t["z0"] = model.embed(images)
    for i, (mssa, ista) in enumerate(model.transformer.layers):
        w = mssa.fn.subspace_features(mssa.norm(z))
        a = torch.softmax((w @ w.transpose(-1, -2)) * mssa.fn.scale, dim=-1)
        out = mssa.fn.attend(w)
        z_half = z + out
        y = ista.norm(z_half)
        z = ista.fn(y)
        t.update(
            {
                f"layer{i}/qkv": w,
                f"layer{i}/attn": a,
                f"layer{i}/mssa_out": out,
                f"layer{i}/z_half": z_half,
                f"layer{i}/ln2": y,
                f"layer{i}/z_out": z,
            }
        )
    t["final_tokens"] = z
    t["pooled"] = model.forward_head(z, pre_logits=True)
    t["logits"] = model.forward_head(z)
    return t
