"""README.md is a newcomer's page: short, no issue numbers, every relative link in it and in
docs/ resolves, and its CLI cheat-sheet and Python example work as written.

Cheap cheat-sheet lines run for real, in order, in a temporary working directory (paths of the
checkout, such as recipes/ or the shipped model, are made absolute; what a line writes, such as
artifacts/onnxruntime, lands in that directory for the next lines). The expensive ones (bench,
quantize, train, demo) run `CMD --help` instead, and every option the README gives them must be
in that help."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

CHEAP = ("targets", "compile", "run", "parity", "import", "eval", "inspect")
HELP_ONLY = ("bench", "quantize", "train", "demo")
CHECKOUT_DIRS = ("crate_edge", "recipes", "targets", "examples")  # what a line may read from the checkout
ISSUE = re.compile(r"\bissues?\s*[#-]?\s*\d+", re.IGNORECASE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("crate-edge")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("crate-edge")
    return [found] if found else [sys.executable, "-m", "crate_edge.cli"]


def _block(lang: str, must_contain: str) -> str:
    blocks = re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.DOTALL | re.MULTILINE)
    hits = [b for b in blocks if must_contain in b]
    assert len(hits) == 1, f"README.md: expected one ```{lang} block containing {must_contain!r}, found {len(hits)}"
    return hits[0]


def _cheat_sheet() -> list[list[str]]:
    """The cheat-sheet's commands as argv lists (comments dropped), in README order."""
    cmds = [shlex.split(line, comments=True) for line in _block("sh", "crate-edge targets").splitlines()]
    return [c for c in cmds if c]


def _options(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv[2:] if a.startswith("-")]


def _absolute(argv: list[str]) -> list[str]:
    """Arguments naming a file of the checkout (recipes/..., crate_edge/assets/...) made absolute,
    so that the command can run in another directory; everything else as written."""
    out = []
    for a in argv:
        p = ROOT / a
        out.append(str(p) if "/" in a and a.split("/", 1)[0] in CHECKOUT_DIRS and p.exists() else a)
    return out


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CRATE_EDGE_DEBUG"}
    return subprocess.run(_cli() + argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _fashion_mnist_present() -> bool:
    try:
        from crate_edge import data
    except ImportError:
        return False
    dirs = [os.environ.get("CRATE_EDGE_FASHION_MNIST_DIR")] + list(getattr(data, "FASHION_MNIST_DIRS", []))
    return any(d and Path(d).is_dir() and any(Path(d).iterdir()) for d in dirs)


def _need_runtime():
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed (the cheat-sheet compiles for it): install crate-edge[onnx]")
    if not _fashion_mnist_present():
        pytest.skip("Fashion-MNIST not found (int8 calibration and parity use it): apt-get install dataset-fashion-mnist")


# ------------------------------------------------------------------ the page itself


def test_readme_is_short_and_has_no_issue_numbers():
    text = README.read_text()
    n = len(text.splitlines())
    assert n <= 160, f"README.md has {n} lines; keep it at most 160 and move detail into docs/"
    hits = ISSUE.findall(text)
    assert not hits, f"README.md names issue numbers: {hits}"


def test_readme_sections_in_order():
    text = README.read_text()
    assert text.count("<!-- demo-table -->") == 1, "README.md: exactly one <!-- demo-table --> marker"
    order = ["## Set-up", "## What the demo shows", "<!-- demo-table -->", "```sh\ncrate-edge targets", "```python", "## Targets"]
    at = [text.find(s) for s in order]
    assert all(i >= 0 for i in at), dict(zip(order, at))
    assert at == sorted(at), f"README.md sections out of order: {dict(zip(order, at))}"


def test_targets_table_lists_every_target_file():
    table = README.read_text().split("## Targets", 1)[1]
    missing = [p.stem for p in sorted((ROOT / "targets").glob("*.toml")) if f"| `{p.stem}` |" not in table]
    assert not missing, f"README.md's targets table lacks: {missing}"


def test_cheat_sheet_covers_every_command():
    cmds = _cheat_sheet()
    assert all(c[0] == "crate-edge" for c in cmds), [c for c in cmds if c[0] != "crate-edge"]
    used = {c[1] for c in cmds}
    assert used == set(CHEAP) | set(HELP_ONLY), f"cheat-sheet commands {sorted(used)}"
    compiled = [c for c in cmds if c[1] == "compile"]
    assert any("int8" in " ".join(c) for c in compiled) and any("int8" not in " ".join(c) for c in compiled)


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    text = FENCE.sub("", page.read_text())
    bad = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            bad.append(target)
    assert not bad, f"{page.relative_to(ROOT)}: links to missing files: {bad}"


def _slug(heading: str) -> str:
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.*)$", FENCE.sub("", page.read_text()), re.MULTILINE)}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_anchors_resolve(page):
    text = FENCE.sub("", page.read_text())
    bad = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or "#" not in target:
            continue
        path, anchor = target.split("#", 1)
        dest = (page.parent / path) if path else page
        if dest.suffix == ".md" and dest.exists() and anchor not in _anchors(dest):
            bad.append(target)
    assert not bad, f"{page.relative_to(ROOT)}: links to missing headings: {bad}"


# ------------------------------------------------------------------ the cheat-sheet, run


@pytest.fixture(scope="module")
def cheat_runs(tmp_path_factory):
    """Every cheap cheat-sheet line, run once in order in one working directory: {line: result}."""
    _need_runtime()
    cwd = tmp_path_factory.mktemp("readme-cli")
    results = {}
    for argv in _cheat_sheet():
        if argv[1] in CHEAP:
            t0 = time.perf_counter()
            results[shlex.join(argv)] = _run([argv[1], *_absolute(argv[2:])], cwd)
            print(f"{time.perf_counter() - t0:6.1f} s  {shlex.join(argv)}")  # shown with pytest -s
    return results


@pytest.mark.parametrize("line", [shlex.join(c) for c in _cheat_sheet() if c[1] in CHEAP])
def test_cheat_sheet_line_runs(cheat_runs, line):
    r = cheat_runs[line]
    assert r.returncode == 0, f"{line}\nexit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert "error:" not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("line", [shlex.join(c) for c in _cheat_sheet() if c[1] in HELP_ONLY])
def test_cheat_sheet_expensive_line_options_exist(line, tmp_path):
    argv = shlex.split(line)
    r = _run([argv[1], "--help"], tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    missing = [o for o in _options(argv) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", r.stdout)]
    assert not missing, f"`crate-edge {argv[1]} --help` has no {missing}, which README.md uses"
    for a in argv[2:]:  # files of the checkout that the line names exist
        if not a.startswith("-") and a.endswith((".toml", ".safetensors")):
            assert (ROOT / a).exists(), f"{line}: {a} is not in the checkout"


# ------------------------------------------------------------------ the Python example, run


def test_python_example_runs(tmp_path, monkeypatch):
    _need_runtime()
    code = _block("python", "import crate_edge")
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md (python example)", "exec"), ns)
    tests = [f for name, f in ns.items() if name.startswith("test_") and callable(f)]
    assert tests, "the README's Python example defines no test_ function"
    for i, f in enumerate(tests):
        d = tmp_path / f"t{i}"
        d.mkdir()
        f(d)
