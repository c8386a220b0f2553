"""An independent float64 implementation of upstream CRATE, written from the equations of
upstream's model/crate.py (explicit per-head loop, no crate_edge code), used as a test oracle for
checkpoints of shapes the shared reference does not cover."""

import math

import torch


def ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def upstream_logits(sd, img, heads, pool="cls", eta=0.1, lambd=0.1):
    sd = {k.removeprefix("module."): v.double() for k, v in sd.items()}
    x = img.double()
    b, c, H, W = x.shape
    patch_dim = sd["to_patch_embedding.1.weight"].shape[0]
    p = math.isqrt(patch_dim // c)
    # (p1 p2 c) flattening of each p x p patch, patches in row-major order
    tokens = []
    for i in range(H // p):
        for j in range(W // p):
            patch = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # b c p1 p2
            tokens.append(patch.permute(0, 2, 3, 1).reshape(b, -1))
    t = torch.stack(tokens, 1)
    t = ln(t, sd["to_patch_embedding.1.weight"], sd["to_patch_embedding.1.bias"])
    t = t @ sd["to_patch_embedding.2.weight"].T + sd["to_patch_embedding.2.bias"]
    t = ln(t, sd["to_patch_embedding.3.weight"], sd["to_patch_embedding.3.bias"])
    z = torch.cat([sd["cls_token"].expand(b, 1, -1), t], 1) + sd["pos_embedding"]
    depth = len({k.split(".")[2] for k in sd if k.startswith("transformer.layers.")})
    for l in range(depth):
        pre = f"transformer.layers.{l}."
        y = ln(z, sd[pre + "0.norm.weight"], sd[pre + "0.norm.bias"])
        U = sd[pre + "0.fn.qkv.weight"].T  # d x (heads*dim_head)
        dh = U.shape[1] // heads
        outs = []
        for k in range(heads):
            w = y @ U[:, k * dh : (k + 1) * dh]
            a = torch.softmax(w @ w.transpose(1, 2) / math.sqrt(dh), -1)
            outs.append(a @ w)
        o = torch.cat(outs, -1)
        if pre + "0.fn.to_out.0.weight" in sd:
            o = o @ sd[pre + "0.fn.to_out.0.weight"].T + sd[pre + "0.fn.to_out.0.bias"]
        z = z + o
        y = ln(z, sd[pre + "1.norm.weight"], sd[pre + "1.norm.bias"])
        D = sd[pre + "1.fn.weight"]
        z = torch.relu(y + eta * (y @ D - y @ D.T @ D) - eta * lambd)
    pooled = z.mean(1) if pool == "mean" else z[:, 0]
    h = ln(pooled, sd["mlp_head.0.weight"], sd["mlp_head.0.bias"])
    return h @ sd["mlp_head.1.weight"].T + sd["mlp_head.1.bias"]


def random_upstream_state_dict(image, patch, channels, dim, depth, heads, dim_head, classes, seed=0):
    """Weights in upstream's key layout with upstream-like initial scales (random, not trained)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    pd, n, inner = channels * patch * patch, (image // patch) ** 2, heads * dim_head
    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embedding": r(1, n + 1, dim),
        "to_patch_embedding.1.weight": 1 + r(pd, scale=0.1),
        "to_patch_embedding.1.bias": r(pd, scale=0.1),
        "to_patch_embedding.2.weight": r(dim, pd, scale=pd**-0.5),
        "to_patch_embedding.2.bias": r(dim, scale=0.1),
        "to_patch_embedding.3.weight": 1 + r(dim, scale=0.1),
        "to_patch_embedding.3.bias": r(dim, scale=0.1),
        "mlp_head.0.weight": 1 + r(dim, scale=0.1),
        "mlp_head.0.bias": r(dim, scale=0.1),
        "mlp_head.1.weight": r(classes, dim, scale=dim**-0.5),
        "mlp_head.1.bias": r(classes, scale=0.1),
    }
    for l in range(depth):
        pre = f"transformer.layers.{l}."
        sd.update(
            {
                pre + "0.norm.weight": 1 + r(dim, scale=0.1),
                pre + "0.norm.bias": r(dim, scale=0.1),
                pre + "0.fn.qkv.weight": r(inner, dim, scale=dim**-0.5),
                pre + "1.norm.weight": 1 + r(dim, scale=0.1),
                pre + "1.norm.bias": r(dim, scale=0.1),
                pre + "1.fn.weight": r(dim, dim, scale=dim**-0.5),
            }
        )
        if not (heads == 1 and dim_head == dim):
            sd[pre + "0.fn.to_out.0.weight"] = r(dim, inner, scale=inner**-0.5)
            sd[pre + "0.fn.to_out.0.bias"] = r(dim, scale=0.1)
    return sd
