"""The package's layers point only down (docs/architecture.md): no import cycle among its modules,
counting imports inside functions and the backend registry's module strings, and no backend
importing compile, parity, bench or the search."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "crate_edge"

# Lower layers first; a module may import its own layer or any below it, never above.
LAYERS = [
    [
        "crate_edge.errors",
        "crate_edge._version",
        "crate_edge.quiet",
        "crate_edge.outputs",
        "crate_edge.zoo",
        "crate_edge.whitebox",
        "crate_edge.runtimes",
        "crate_edge.manifest",
        "crate_edge.host",
        "crate_edge.isa",
    ],
    ["crate_edge.model", "crate_edge.crate_alpha", "crate_edge.family"],
    ["crate_edge.checkpoint", "crate_edge.data", "crate_edge.rewrites"],
    ["crate_edge.export"],
    ["crate_edge.calibration", "crate_edge.quantize", "crate_edge.metrics"],
    [
        "crate_edge.backends.base",
        "crate_edge.backends.onnxruntime",
        "crate_edge.backends.executorch",
        "crate_edge.backends.tvm",
        "crate_edge.backends.tvm.target",
        "crate_edge.backends.tvm.schedule",
        "crate_edge.backends.tvm.quant",
        "crate_edge.backends.tvm.attention",
        "crate_edge.backends.tvm.gemm",
        "crate_edge.backends.tvm.metaschedule",
        "crate_edge.backends.tvm.lower",
        "crate_edge.backends.tvm.backend",
        "crate_edge.backends.coreml",
        "crate_edge.backends.coreml.conversion",
        "crate_edge.backends.coreml.mil",
        "crate_edge.backends.coreml.quant",
        "crate_edge.backends.coreml.reference",
        "crate_edge.backends.coreml.backend",
        "crate_edge.backends.tensorrt",
        "crate_edge.backends.aoti",
    ],
    # the backend registry (name -> module, loaded on use), target files (which name a backend), and
    # what drives the backends: artifact loading and the compiler
    ["crate_edge.backends", "crate_edge.targets", "crate_edge.runtime", "crate_edge.compiler"],
    [
        "crate_edge.parity",
        "crate_edge.profile",
        "crate_edge.profile.report",
        "crate_edge.profile.attribution",
        "crate_edge.profile.onnxruntime",
        "crate_edge.profile.executorch",
        "crate_edge.profile.tvm",
        "crate_edge.bench",
        "crate_edge.bench.contenders",
        "crate_edge.bench.measure",
        "crate_edge.bench.worker",
        "crate_edge.bench.rpc",
        "crate_edge.bench.report",
        "crate_edge.search",
        "crate_edge.testing",
        "crate_edge.train",
        "crate_edge.demo",
    ],
    ["crate_edge.cli", "crate_edge"],
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, mods: dict) -> set[str]:
    """Every crate_edge module `name` imports, at any depth of its code, plus module strings."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
            found.update(subs or ([mod] if mod in mods else []))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            mod = node.value.split(":")[0]
            if mod in mods and mod.startswith("crate_edge."):
                found.add(mod)
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    return {name: _imports(name, p, mods) for name, p in mods.items()}


def test_every_module_has_a_layer(graph):
    missing = sorted(set(graph) - set(RANK))
    assert not missing, f"give these modules a layer in tests/test_architecture.py and docs/architecture.md: {missing}"


def test_imports_point_down(graph):
    up = [f"{a} (layer {RANK[a]}) imports {b} (layer {RANK[b]})" for a, bs in graph.items() for b in bs if RANK[b] > RANK[a]]
    assert not up, "\n".join(up)


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(w) :] + [w]))
            if w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)


def test_backends_do_not_import_compile_parity_bench_or_search(graph):
    above = {
        "crate_edge.compiler",
        "crate_edge.parity",
        "crate_edge.bench",
        "crate_edge.search",
        "crate_edge.cli",
        "crate_edge.runtime",
        "crate_edge",
    }
    bad = {
        a: sorted(b for b in bs if b in above or b.startswith("crate_edge.bench."))
        for a, bs in graph.items()
        if a.startswith("crate_edge.backends")
    }
    bad = {a: bs for a, bs in bad.items() if bs}
    assert not bad, bad


def test_the_checker_sees_function_level_imports_and_module_strings(tmp_path):
    """The graph must count what a reviewer would: a test that can fail."""
    (tmp_path / "crate_edge").mkdir()
    (tmp_path / "crate_edge" / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "crate_edge" / "b.py").write_text("X = 'crate_edge.a:Thing'\n")
    mods = {"crate_edge.a": tmp_path / "crate_edge" / "a.py", "crate_edge.b": tmp_path / "crate_edge" / "b.py"}
    assert _imports("crate_edge.a", mods["crate_edge.a"], mods) == {"crate_edge.b"}
    assert _imports("crate_edge.b", mods["crate_edge.b"], mods) == {"crate_edge.a"}


def test_code_comments_cite_no_issue_numbers_or_design_notes():
    """Comments say why; the tracker and the design notes are not where a reader of the code is."""
    import re

    pat = re.compile(r"\bissue\s*#?\d|design\.md", re.I)
    root = PKG.parent
    files = [*PKG.rglob("*.py"), *(root / "targets").glob("*.toml"), *(root / "bench").glob("*.py"), *(root / "tests").glob("*.py")]
    hits = [
        f"{p.relative_to(root)}:{i}"
        for p in files
        if p.name != "test_architecture.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pat.search(line)
    ]
    assert not hits, hits
