"""torch.export of a (rewritten) CRATE with a dynamic batch dimension: what every backend lowers."""

from __future__ import annotations

import torch


def export(module: torch.nn.Module, example: torch.Tensor, dynamic_batch: tuple[int, int] | None):
    """torch.export with a dynamic batch dimension."""
    dyn = None
    if dynamic_batch is not None:
        lo, hi = dynamic_batch
        dyn = ({0: torch.export.Dim("batch", min=lo, max=hi)},)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=dyn, strict=False)
