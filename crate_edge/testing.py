"""Assertions for tests, in the spirit of torch.testing.assert_close.

from crate_edge.testing import assert_parity
assert_parity("artifacts/onnxruntime", min_support_iou=0.99, min_sqnr_db=60)
"""

from __future__ import annotations

from .parity import LAYER_TOLERANCES, ParityReport, parity


def assert_parity(
    artifact,
    reference=None,
    data: str = "embedded",
    limit: int | None = None,
    *,
    batch_size: int | None = None,
    progress: bool = False,
    **tolerances,
) -> ParityReport:
    """Run the parity suite (crate_edge.parity.parity) on one artifact and raise AssertionError
    when it is outside its tolerances: the artifact target's [parity] table, overridden by the
    keyword `tolerances` (max_abs, min_top1_agreement, min_cosine, max_top1_drop,
    min_support_iou, max_coding_rate_rel, min_sqnr_db). The message names the worst layer and
    metric. A per-layer tolerance given here on an artifact without probe outputs also fails
    (it cannot be checked). Returns the report on success."""
    report = parity(artifact, reference=reference, data=data, limit=limit, batch_size=batch_size, tolerances=tolerances, progress=progress)
    for r in report.results:
        if not r.passed:
            lines = [f"parity failed on {report.n} images of {report.data} against {report.reference['name']}: {r.message()}"]
            lines += [f"  {t}" for t in r.failures]
            raise AssertionError("\n".join(lines))
        asked = [k for k in tolerances if k in LAYER_TOLERANCES and k in r.unchecked]
        if asked:
            raise AssertionError(
                f"{r.label}: cannot check {', '.join(asked)}: the artifact is not a probe build "
                "(compile with probe=True for per-layer parity)"
            )
        if "max_top1_drop" in tolerances and "max_top1_drop" in r.unchecked:
            raise AssertionError(f"{r.label}: cannot check max_top1_drop: {report.data} has no labels")
    return report
