"""Calibration: running the float model over calibration images and handing each quantization
site's GEMM input to a backend's observer."""

from __future__ import annotations

import torch
from torch import nn

from .errors import CrateEdgeError


def feed_site_inputs(module: nn.Module, sites: dict[str, str], images: torch.Tensor, observe, batch: int = 32) -> None:
    """Run `module` (eager, float) over the calibration `images` in batches, calling
    observe(site, x) with the input x of every site GEMM (forward pre-hooks, removed afterwards).
    Each backend keeps its own statistics; this is the one loop that feeds them."""
    seen: set[str] = set()

    def hook(site):
        def f(_mod, args):
            seen.add(site)
            observe(site, args[0].detach())

        return f

    hooks = [module.get_submodule(path).register_forward_pre_hook(hook(s)) for s, path in sites.items()]
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                module(images[i : i + batch])
    finally:
        for h in hooks:
            h.remove()
    missing = sorted(set(sites) - seen)
    if missing:
        raise CrateEdgeError(f"calibration: site(s) {', '.join(missing)} never executed")
