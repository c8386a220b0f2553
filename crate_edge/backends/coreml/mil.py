"""Reading a converted ML program (MIL): op inventory, output precisions, package size, and the
ops producing a linear's weight."""

from __future__ import annotations

from pathlib import Path


def _dtype_name(t) -> str:
    from coremltools.converters.mil.mil import types

    try:
        return types.builtin_to_string(t)
    except Exception:  # noqa: BLE001 - tensor / list types
        return getattr(t, "__name__", str(t))


def _main_ops(prog):
    return list(prog.functions["main"].operations)


def _mil_inventory(mlmodel) -> tuple[dict[str, int], dict[str, int]]:
    """(op type -> count, output dtype -> count) over the ML program's main function."""
    return _prog_inventory(mlmodel._mil_program)


def _prog_inventory(prog) -> tuple[dict[str, int], dict[str, int]]:
    ops: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    for op in _main_ops(prog):
        ops[op.op_type] = ops.get(op.op_type, 0) + 1
        if op.op_type != "const" and not op.op_type.startswith("constexpr_"):
            for o in op.outputs:
                name = _dtype_name(o.dtype)
                dtypes[name] = dtypes.get(name, 0) + 1
    return dict(sorted(ops.items())), dict(sorted(dtypes.items()))


def _precision_by_op(prog) -> dict[str, list[str]]:
    """float dtype -> sorted op types whose float outputs have it (non-const ops): the exact
    precision map of the converted program."""
    by: dict[str, set[str]] = {}
    for op in _main_ops(prog):
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            continue
        for o in op.outputs:
            d = _dtype_name(o.dtype)
            if d in ("fp16", "fp32", "fp64", "bf16"):
                by.setdefault(d, set()).add(op.op_type)
    return {k: sorted(v) for k, v in sorted(by.items())}


def _package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _weight_producer(op):
    """The chain of ops producing a linear's weight input, nearest first (const / constexpr_*)."""
    chain = []
    v = op.inputs["weight"]
    while v is not None and v.op is not None and (v.op.op_type == "const" or v.op.op_type.startswith("constexpr_")):
        chain.append(v.op)
        nxt = [i for k, i in v.op.inputs.items() if k in ("data", "quantized_data", "indices", "input")]
        v = next((i for i in nxt if i.op is not None and i.op.op_type.startswith("constexpr_")), None)
    return chain
