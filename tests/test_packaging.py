"""The package as a user installs it: a wheel built from this checkout, installed into a fresh
venv and run from outside the checkout, finds every built-in target (the checkout's top-level
targets/, shipped as crate_edge/builtin_targets/) and the embedded model assets. And no tracked
symlink in the repository dangles."""

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = sorted(p.stem for p in (ROOT / "targets").glob("*.toml"))
ASSETS = [
    "crate_edge/assets/fmnist_holdout.npz",
    "crate_edge/assets/reference/config.json",
    "crate_edge/assets/reference/model.safetensors",
]
# what a build must not see: the dev venv, caches, earlier builds (setuptools' build/lib keeps
# files that were since removed), outputs
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "node_modules", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs", "out", "artifacts"
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if not (ROOT / "pyproject.toml").exists() or not TARGETS:
        pytest.skip(f"not a source checkout with targets/*.toml: {ROOT}")
    r = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"pip is not available to {sys.executable}: {r.stderr.strip()}")
    if tuple(int(x) for x in r.stdout.split()[1].split(".")[:2]) < (22, 3):
        pytest.skip(f"pip {r.stdout.split()[1]} lacks --python (needs >= 22.3)")
    try:
        import setuptools  # noqa: F401  (--no-build-isolation builds with this environment's setuptools)
    except ModuleNotFoundError:
        pytest.skip("setuptools is not installed in the test environment (needed for --no-build-isolation)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so the build neither writes into the checkout nor reuses a stale build/
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE, symlinks=True)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src], cwd=tmp)
    wheels = list((tmp / "dist").glob("crate_edge-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory):
    """A fresh venv with only the wheel installed; the test environment's third-party packages are
    importable through a plain path line in a .pth (site does not run the .pth files in a
    directory added that way, so the dev venv's editable-install finder stays out)."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    if not py.exists():
        pytest.skip(f"no {py} (a POSIX venv layout is assumed)")
    site_dir = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    dev_dirs = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site_dir / "dev-env.pth").write_text("".join(f"{d}\n" for d in dev_dirs))
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel])
    cwd = tmp_path_factory.mktemp("elsewhere")  # outside the checkout: '' on sys.path must not find it
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE")}
    env["PYTHONNOUSERSITE"] = "1"
    return {"venv": venv.resolve(), "py": py, "bin": venv / "bin", "cwd": cwd, "env": env}


def test_wheel_contents(wheel):
    """Every built-in target (byte for byte), the embedded model assets and every module of the
    checkout are in the wheel; nothing is left at the old crate_edge/targets/ location."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for t in TARGETS:
            member = f"crate_edge/builtin_targets/{t}.toml"
            assert member in names, f"{member} missing from {wheel.name}"
            assert _sha(z.read(member)) == _sha((ROOT / "targets" / f"{t}.toml").read_bytes()), member
        shipped = {n for n in names if n.startswith("crate_edge/builtin_targets/")}
        assert shipped == {f"crate_edge/builtin_targets/{t}.toml" for t in TARGETS}, shipped
        for a in ASSETS:
            assert a in names, f"{a} missing from {wheel.name}"
            assert _sha(z.read(a)) == _sha((ROOT / a).read_bytes()), a
        modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "crate_edge").rglob("*.py") if "__pycache__" not in p.parts}
        assert modules - names == set(), (
            f"modules missing from the wheel (add their package to [tool.setuptools] packages): {sorted(modules - names)}"
        )
        assert not any(n.startswith("crate_edge/targets/") for n in names)


def test_installed_package_is_the_wheel(fresh):
    """The fresh venv imports crate_edge from its own site-packages (not the checkout, not the dev
    venv's editable install) and loads built-in targets by name from there."""
    code = (
        "import sys, crate_edge\n"
        "from crate_edge.targets import targets_dir, load_target, list_targets\n"
        "print(crate_edge.__file__); print(targets_dir()); print(load_target('onnxruntime').path)\n"
        "print(','.join(list_targets()))\n"
        "print(any('editable' in type(f).__name__.lower() or 'editable' in getattr(f, '__module__', '') for f in sys.meta_path))\n"
    )
    out = _run([fresh["py"], "-c", code], cwd=fresh["cwd"], env=fresh["env"]).stdout.splitlines()
    pkg_file, tdir, onnx_path, listed, editable_finder = (
        Path(out[0]).resolve(),
        Path(out[1]).resolve(),
        Path(out[2]).resolve(),
        out[3].split(","),
        out[4],
    )
    assert pkg_file.is_relative_to(fresh["venv"]), f"crate_edge imported from {pkg_file}, not from the fresh venv {fresh['venv']}"
    assert tdir.is_relative_to(fresh["venv"]) and tdir.name == "builtin_targets", tdir
    assert onnx_path == tdir / "onnxruntime.toml", onnx_path
    assert listed == TARGETS
    assert editable_finder == "False", "the dev venv's editable-install finder got into the fresh venv"


def test_installed_cli(fresh):
    """`crate-edge targets` from outside the checkout lists every built-in target; `compile --help` works."""
    exe = fresh["bin"] / "crate-edge"
    assert exe.exists(), f"the wheel installed no {exe}"
    r = _run([exe, "targets"], cwd=fresh["cwd"], env=fresh["env"])
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert set(TARGETS) <= listed, f"missing from `crate-edge targets`: {sorted(set(TARGETS) - listed)}\n{r.stdout}"
    r = _run([exe, "compile", "--help"], cwd=fresh["cwd"], env=fresh["env"])
    assert "--target" in r.stdout, r.stdout


def test_editable_install_reads_the_checkout():
    """In the checkout's own (editable) install the definitions are read from top-level targets/."""
    import crate_edge
    from crate_edge.targets import list_targets, targets_dir

    if not Path(crate_edge.__file__).resolve().is_relative_to(ROOT):
        pytest.skip(f"crate_edge is imported from {crate_edge.__file__}, not from this checkout")
    assert targets_dir() == ROOT / "targets"
    assert list_targets() == TARGETS
    assert not (ROOT / "crate_edge" / "targets").exists(), "a second copy of the targets under crate_edge/"


def test_no_dangling_tracked_symlinks():
    """Every symlink git tracks resolves to something in the working tree."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    r = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-s", "-z"], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {ROOT} ({r.stderr.decode(errors='replace').strip()})")
    links = [e.split("\t", 1)[1] for e in r.stdout.decode().split("\0") if e.startswith("120000 ")]
    dangling = [p for p in links if (ROOT / p).is_symlink() and not (ROOT / p).exists()]
    assert not dangling, f"tracked symlinks that resolve to nothing: {dangling}"
