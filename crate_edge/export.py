"""torch.export of a (rewritten) CRATE with a dynamic batch dimension: what every backend lowers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def export(module: torch.nn.Module, example: torch.Tensor, dynamic_batch: tuple[int, int] | None):
    """torch.export with a dynamic batch dimension."""
    dyn = None
    if dynamic_batch is not None:
        lo, hi = dynamic_batch
        dyn = ({0: torch.export.Dim("batch", min=lo, max=hi)},)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=dyn, strict=False)


@dataclass
class Exported:
    """What every backend's compile lowers: the rewritten eager `module` (calibration and the
    reference runners run it), its torch.export `program` with the target's batch range, the
    `example` input it was traced on, and that range (None: a static batch)."""

    module: torch.nn.Module
    program: torch.export.ExportedProgram
    example: torch.Tensor
    dynamic_batch: tuple[int, int] | None


def export_module(module: torch.nn.Module, example: torch.Tensor, dynamic_batch: tuple[int, int] | None) -> Exported:
    return Exported(module, export(module, example, dynamic_batch), example, dynamic_batch)
