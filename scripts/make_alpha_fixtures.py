"""Make the CRATE-α test fixtures by running the upstream model code (UCSC-VLAA/CRATE-alpha,
torch_inference/model/crate_alpha.py). Upstream code is read from a path given here and never
copied into the repository; only the small outputs under tests/fixtures/crate_alpha/ are
committed.

    git clone https://github.com/UCSC-VLAA/CRATE-alpha /tmp/CRATE-alpha
    pip install --target /tmp/einops einops            # upstream imports einops
    PYTHONPATH=/tmp/einops python scripts/make_alpha_fixtures.py \
        --upstream /tmp/CRATE-alpha/torch_inference/model/crate_alpha.py

Per case, at shapes no crate-edge test was built on (non-square images, patch 14, heads x
dim_head != dim, a single head with no output map, tiny token scales where LayerNorm's eps
matters), it writes
  <case>.pth   the upstream model's state_dict, in the container the case names
  <case>.npz   input images, upstream's float64 logits, and per layer, read from upstream's own
               forward pass (its F.relu calls and its qkv Linear): the zero fraction of z2, the
               reconstruction residual ||x - D z2|| / ||x|| (x = the block's input, LN2's
               output), and the coding rate R^c of the qkv features (eps 0.01)
and a cases.json with each case's constructor arguments, container and upstream commit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "crate_alpha"

CASES = {
    # non-square image, heads * dim_head = 60 != dim 48, 7 classes; fine-tuning script's container
    "rect-40x24-p8": dict(
        args=dict(image_size=(40, 24), patch_size=8, num_classes=7, dim=48, depth=2, heads=3, dim_head=20),
        container="model+module",
        heads_needed=True,
    ),
    # patch 14 (as CRATE-α-L), dim_head 24 * 2 heads = 48 != 32, tokens at a scale of 1e-2 (LN eps 1e-6 vs 1e-5 shows)
    "p14-small-scale": dict(
        args=dict(image_size=42, patch_size=14, num_classes=5, dim=32, depth=3, heads=2, dim_head=24),
        container="state_dict+module",
        scale_embedding=0.01,
        heads_needed=True,
    ),
    # one head of width dim: upstream drops the output map (to_out is Identity); bare state_dict
    "one-head-identity": dict(
        args=dict(image_size=32, patch_size=16, num_classes=3, dim=40, depth=2, heads=1, dim_head=40),
        container="plain",
        heads_needed=False,  # no output map: one head
    ),
}


def load_upstream(path: Path):
    spec = importlib.util.spec_from_file_location("upstream_crate_alpha", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def coding_rate(w: np.ndarray, eps: float = 0.01) -> np.ndarray:
    """R^c per image of qkv features w (b, heads, N, p), float64, from design.md section 2."""
    w = w / np.linalg.norm(w, axis=-1, keepdims=True)
    b, k, n, p = w.shape
    out = np.zeros(b)
    for i in range(b):
        for h in range(k):
            g = np.eye(n) + (p / (n * eps)) * (w[i, h] @ w[i, h].T)
            out[i] += 0.5 * np.linalg.slogdet(g)[1]
    return out


def run_case(up, name: str, case: dict, upstream_commit: str):
    torch.manual_seed(sum(map(ord, name)))
    m = up.CRATE(**case["args"]).double().eval()
    with torch.no_grad():  # every parameter away from its init value, so that no term is a no-op
        for pname, p in m.named_parameters():
            if "norm" in pname or "mlp_head.0" in pname:
                p.add_(0.1 * torch.randn_like(p))
            elif pname.endswith("D1"):
                p.mul_(0.1)
        if "scale_embedding" in case:
            for p in (m.conv1.weight, m.conv1.bias, m.pos_embedding, m.cls_token):
                p.mul_(case["scale_embedding"])
    ih, iw = (case["args"]["image_size"],) * 2 if isinstance(case["args"]["image_size"], int) else case["args"]["image_size"]
    x = torch.rand(4, 3, ih, iw, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    # read z1, z2 from upstream's own F.relu calls, its block inputs and its qkv outputs
    relus, block_in, qkv = [], [], []
    real_relu = up.F.relu

    class _F:
        def __getattr__(self, a):
            return getattr(torch.nn.functional, a)

        @staticmethod
        def relu(t, *a, **k):
            out = real_relu(t, *a, **k)
            relus.append(out)
            return out

    up.F = _F()
    hooks = []
    for attn, ff in m.transformer.layers:
        hooks.append(ff.fn.register_forward_pre_hook(lambda mod, inp: block_in.append(inp[0])))
        hooks.append(attn.fn.qkv.register_forward_hook(lambda mod, inp, out: qkv.append(out)))
    with torch.no_grad():
        logits = m(x)
    up.F = torch.nn.functional
    for h in hooks:
        h.remove()
    depth = case["args"]["depth"]
    assert len(relus) == 2 * depth and len(block_in) == depth and len(qkv) == depth
    heads = case["args"]["heads"]
    zero_frac, resid, cr = [], [], []
    for l, (attn, ff) in enumerate(m.transformer.layers):
        z2 = relus[2 * l + 1]
        xin = block_in[l]
        dz = torch.einsum("dp,nlp->nld", ff.fn.D.detach(), z2)  # upstream's decoding einsum, with D
        zero_frac.append((z2 == 0).flatten(1).double().mean(1).numpy())
        resid.append(((xin - dz).flatten(1).norm(dim=1) / xin.flatten(1).norm(dim=1)).numpy())
        w = qkv[l].reshape(qkv[l].shape[0], qkv[l].shape[1], heads, -1).permute(0, 2, 1, 3).numpy()
        cr.append(coding_rate(w))

    sd = {k: v.float() for k, v in m.state_dict().items()}
    c = case["container"]
    if c == "plain":
        obj = sd
    elif c == "model+module":
        obj = {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}
    elif c == "state_dict+module":
        obj = {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3, "best_acc1": 0.5}
    torch.save(obj, OUT / f"{name}.pth")
    np.savez_compressed(
        OUT / f"{name}.npz",
        images=x.float().numpy(),
        logits=logits.numpy(),
        zero_fraction=np.stack(zero_frac, 1),
        residual=np.stack(resid, 1),
        coding_rate=np.stack(cr, 1),
    )
    return {"args": case["args"], "container": c, "heads_needed": case["heads_needed"], "upstream_commit": upstream_commit}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, type=Path, help="path to upstream torch_inference/model/crate_alpha.py")
    ap.add_argument("--upstream-commit", help="the upstream commit, when the file is not inside a git checkout")
    a = ap.parse_args()
    up = load_upstream(a.upstream)
    commit = a.upstream_commit
    try:
        commit = (
            commit
            or subprocess.run(
                ["git", "-C", str(a.upstream.parent), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit = commit or "unknown"
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {name: run_case(up, name, case, commit) for name, case in CASES.items()}
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    for f in sorted(OUT.iterdir()):
        print(f"{f.relative_to(OUT.parents[2])}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
