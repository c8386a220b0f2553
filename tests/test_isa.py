"""Artifacts say which CPU they need (crate_edge.isa): the manifest's `requires`, a one-line
refusal before any compiled code runs on a host without those features (faked here with
CRATE_EDGE_CPU_FLAGS), builds for a named level, and no reuse of code built for another CPU."""

import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import crate_edge
from crate_edge import isa
from crate_edge.backends import get_backend
from crate_edge.errors import CrateEdgeError
from crate_edge.runtime import load
from crate_edge.targets import load_target

V3_ONLY = " ".join(isa.LEVELS["x86-64-v3"] + ("sse", "sse2", "sse4_1", "sse4_2", "ssse3"))


def test_levels_nest_and_native_is_this_host():
    assert set(isa.LEVELS["x86-64-v3"]) < set(isa.LEVELS["x86-64-v4"])
    assert set(isa.native_features()) <= isa.host_flags()
    req = isa.requirement("x86-64-v3")
    assert req["isa"] == "x86-64-v3" and req["arch"] == isa.host_arch() and "avx2" in req["features"]
    assert isa.requirement(None)["features"] == []  # run-time dispatch: the architecture only
    with pytest.raises(CrateEdgeError, match="unknown isa"):
        isa.requirement("x86-64-v9")


def test_refusal_names_the_missing_features(monkeypatch):
    m = {"requires": {"arch": isa.host_arch(), "isa": "x86-64-v4", "features": list(isa.LEVELS["x86-64-v4"]), "built_on": "somewhere"}}
    monkeypatch.setenv(isa.ENV, V3_ONLY)
    with pytest.raises(CrateEdgeError) as e:
        isa.check(m, "art")
    msg = str(e.value)
    assert "avx512f" in msg and "avx512bw" in msg and "avx2" not in msg.split("lacks:")[1].split("(")[0]
    assert 'isa = "x86-64-v3"' in msg and "\n" not in msg
    other = {"requires": {"arch": "aarch64" if isa.host_arch() != "aarch64" else "x86_64", "features": []}}
    with pytest.raises(CrateEdgeError, match="was compiled for"):
        isa.check(other, "art")
    monkeypatch.setenv(isa.ENV, " ".join(isa.LEVELS["x86-64-v4"]) + " " + V3_ONLY)
    isa.check(m, "art")  # a host with them: no refusal


def test_reuse_only_for_this_hosts_cpu(monkeypatch):
    native = {"requires": isa.requirement("native")}
    assert isa.fits_host(native)
    assert not isa.fits_host({})  # made before manifests recorded it: rebuilt
    monkeypatch.setenv(isa.ENV, V3_ONLY)
    assert not isa.fits_host(native) or set(isa.native_features()) == set(native["requires"]["features"])
    assert isa.fits_host({"requires": isa.requirement("x86-64-v3")})


def test_target_files_take_a_level(tmp_path):
    t = load_target("tvm")
    assert t.isa == "native"
    bad = tmp_path / "bad.toml"
    bad.write_text('backend = "tvm"\nisa = "pentium"\n')
    with pytest.raises(CrateEdgeError, match="isa must be one of native, x86-64-v3, x86-64-v4, aarch64"):
        load_target(bad)


def _tiny(tmp_path):
    import torch

    torch.manual_seed(0)
    m = crate_edge.create_model("mnist-micro", depth=1, dim=32, heads=2, dim_head=16).eval()
    return crate_edge.save_model(m, tmp_path / "model")


def _zmm(path) -> int:
    """AVX-512 register uses in a shared library's code (objdump)."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True, check=True).stdout
    return out.count("%zmm")


def _level_target(tmp_path, base: str, level: str):
    text = load_target(base).path
    body = open(text).read()
    body = "\n".join(line for line in body.splitlines() if not line.startswith("isa ")) + "\n"
    body = body.replace(f'name = "{base}"', f'name = "{base}-{level}"', 1).replace("rewrites =", f'isa = "{level}"\nrewrites =', 1)
    p = tmp_path / f"{base}-{level}.toml"
    p.write_text(body)
    return load_target(p)


@pytest.mark.skipif(isa.host_arch() != "x86_64" or "avx2" not in isa.host_flags(), reason="x86-64-v3 needs an x86 host with AVX2")
def test_tvm_built_for_x86_64_v3_runs_here_and_says_so(tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    if not get_backend("tvm").available(load_target("tvm")).ok:
        pytest.skip("tvm cannot compile here")
    model = _tiny(tmp_path)
    t = _level_target(tmp_path, "tvm", "x86-64-v3")
    art = crate_edge.compile(model, t, out=tmp_path / "v3", log=lambda s: None)
    req = art.manifest["requires"]
    assert req["isa"] == "x86-64-v3" and req["features"] == sorted(isa.LEVELS["x86-64-v3"])
    assert "x86-64-v3" in art.manifest["backend"]["target"]
    if shutil.which("objdump"):
        assert _zmm(tmp_path / "v3" / "model.so") == 0  # no AVX-512 code: it runs on an AVX2-only CPU
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    y = art(x)
    # on a faked AVX2-only host the v3 build still loads and gives the same logits
    monkeypatch.setenv(isa.ENV, V3_ONLY)
    np.testing.assert_array_equal(load(art.path)(x), y)
    # a native build (this CPU) is refused there before its library is opened
    monkeypatch.delenv(isa.ENV)
    nat = crate_edge.compile(model, "tvm", out=tmp_path / "native", log=lambda s: None)
    assert nat.manifest["requires"]["isa"] == "native"
    if shutil.which("objdump") and "avx512f" in isa.host_flags():
        assert _zmm(tmp_path / "native" / "model.so") > 0  # the check above can fail: native code here does use AVX-512
    monkeypatch.setenv(isa.ENV, "sse sse2")
    (tmp_path / "native" / "model.so").chmod(0o000)  # any attempt to open it would fail differently
    try:
        with pytest.raises(CrateEdgeError, match="needs CPU features this host lacks: .*avx2"):
            load(nat.path)
    finally:
        (tmp_path / "native" / "model.so").chmod(0o644)
    # and the CLI says so in one line, exit 2
    env = {"PATH": "/usr/bin:/bin", isa.ENV: "sse sse2", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "crate_edge.cli", "run", str(nat.path)], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "needs CPU features this host lacks" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(isa.host_arch() != "x86_64" or "avx2" not in isa.host_flags(), reason="x86-64-v3 needs an x86 host with AVX2")
def test_aoti_built_for_x86_64_v3(tmp_path):
    if not get_backend("aoti").available(load_target("aoti")).ok:
        pytest.skip("aoti cannot compile here")
    model = _tiny(tmp_path)
    t = _level_target(tmp_path, "aoti", "x86-64-v3")
    art = crate_edge.compile(model, t, out=tmp_path / "v3", log=lambda s: None)
    req = art.manifest["requires"]
    assert req["isa"] == "x86-64-v3" and set(isa.LEVELS["x86-64-v3"]) <= set(req["features"])
    assert not any(f.startswith("avx512") for f in req["features"])
    assert art.manifest["backend"]["inductor_configs"]["cpp.march"] == "x86-64-v3"
    if shutil.which("objdump"):
        with zipfile.ZipFile(tmp_path / "v3" / "model.pt2") as z:
            libs = [n for n in z.namelist() if n.endswith(".so")]
            assert libs
            for n in libs:
                (tmp_path / "lib.so").write_bytes(z.read(n))
                assert _zmm(tmp_path / "lib.so") == 0, n
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    assert art(x).shape == (2, 10)
    assert json.loads((tmp_path / "v3" / "manifest.json").read_text())["requires"] == req


@pytest.mark.skipif(isa.host_arch() != "x86_64", reason="the aarch64 cross build is tested from an x86 host")
def test_tvm_cross_build_for_aarch64(tmp_path):
    pytest.importorskip("tvm")
    from crate_edge.backends.tvm.target import CROSS

    cc = CROSS["aarch64"]["cc"]
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} is not installed (Debian: {CROSS['aarch64']['package']}; ./dev.sh setup installs it)")
    model = _tiny(tmp_path)
    t = _level_target(tmp_path, "tvm", "aarch64")
    art = crate_edge.compile(model, t, out=tmp_path / "arm", log=lambda s: None)
    m = art.manifest
    assert m["requires"] == {**m["requires"], "arch": "aarch64", "isa": "aarch64", "features": ["asimd"]}
    assert "aarch64" in m["backend"]["target"] and "execution" in m["not_verified"]
    assert m["parity"]["passed"] and "not the aarch64 library" in m["parity"]["executor"]
    with open(tmp_path / "arm" / "model.so", "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # e_machine EM_AARCH64
    assert m["backend"]["attention"]["fused"] == 1  # the fused attention is generic vector TIR: NEON here
    # this x86 host refuses to load it, in one line, before the library is opened
    with pytest.raises(CrateEdgeError, match="was compiled for aarch64, this host is x86_64"):
        load(art.path)
    # the int8 kernels are x86 code: a clear refusal, nothing written
    q = _level_target(tmp_path, "tvm-int8", "aarch64")
    with pytest.raises(CrateEdgeError, match="needs AVX2"):
        crate_edge.compile(model, q, out=tmp_path / "arm8", log=lambda s: None, calibration_images=8)
    assert not (tmp_path / "arm8").exists()
