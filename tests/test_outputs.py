"""What crate-edge writes, and what it never touches: ownership, atomic replacement, kill -9 at
named moments (real subprocesses), two writers at once."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import crate_edge
from crate_edge import CrateEdgeError
from crate_edge.outputs import KILL_ENV, MARKER, atomic_dir, check_writable, foreign_files, owned_dir

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "crate_edge.cli"]


def _env(**kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw}
    env.pop(KILL_ENV, None)
    env.update(kw)
    return env


def _run(args, cwd, **env):
    return subprocess.run(CLI + args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600)


def _debris(parent: Path, name: str):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ------------------------------------------------------------------ in-process rules

def test_missing_empty_and_own_directories_are_writable_and_foreign_ones_refused(tmp_path):
    check_writable(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    check_writable(tmp_path / "empty")
    with atomic_dir(tmp_path / "rep", "report") as tmp:
        (tmp / "a.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert json.loads((tmp_path / "rep" / MARKER).read_text())["files"] == ["a.json", "sub/b.txt"]
    check_writable(tmp_path / "rep")
    (tmp_path / "rep" / "sub" / "mine.txt").write_text("the user's")  # a user's file inside our directory
    assert foreign_files(tmp_path / "rep") == ["sub/mine.txt"]
    with pytest.raises(CrateEdgeError, match=r"holds files crate-edge did not write \(sub/mine.txt\)"):
        with atomic_dir(tmp_path / "rep", "report") as tmp:
            raise AssertionError("must not get here")
    assert (tmp_path / "rep" / "sub" / "mine.txt").read_text() == "the user's"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CrateEdgeError, match="is not a directory"):
        check_writable(tmp_path / "afile")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(CrateEdgeError, match="is not a directory"):
        check_writable(tmp_path / "link")


def test_replacement_is_whole_or_nothing(tmp_path):
    out = tmp_path / "d"
    with atomic_dir(out, "report") as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, "report") as tmp:
            (tmp / "v").write_text("2")
            (tmp / "half").write_text("?")
            raise RuntimeError("failed half-way")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "v"] and (out / "v").read_text() == "1"
    with atomic_dir(out, "report") as tmp:
        (tmp / "w").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "w"]  # the old content went with the old directory
    assert _debris(tmp_path, "d") == []


def test_directories_written_before_markers_are_recognised(tmp_path):
    art = tmp_path / "old-artifact"
    art.mkdir()
    (art / "model.onnx").write_bytes(b"x")
    (art / "manifest.json").write_text(json.dumps({"format": "crate-edge-artifact", "files": {"model.onnx": "0"}}))
    assert foreign_files(art) == []
    (art / "notes.txt").write_text("mine")
    assert foreign_files(art) == ["notes.txt"]
    run = tmp_path / "run"
    (run / "resume").mkdir(parents=True)
    (run / "train_log.json").write_text(json.dumps({"recipe": {}, "log": []}))
    (run / "resume" / "state.json").write_text(json.dumps({"epoch": 1, "recipe": {}}))
    (run / "resume" / "state.safetensors").write_bytes(b"")
    assert foreign_files(run) == []
    (run / "resume" / "x").write_text("")
    assert foreign_files(run) == ["resume/x"]


def test_every_writing_verb_refuses_a_users_directory(tmp_path):
    """compile, import, quantize, train, bench, parity, inspect and demo, CLI and Python."""
    users = tmp_path / "results"
    users.mkdir()
    (users / "thesis.tex").write_text("months of work")
    recipe = tmp_path / "r.toml"
    recipe.write_text((ROOT / "tests" / "test_train.py").read_text().split('TINY = """')[1].split('"""')[0]
                      .format(epochs=1, fused="true", limit=128))
    ckpt = tmp_path / "up.pth"
    import torch

    m = crate_edge.load_model()
    torch.save({"state_dict": m.state_dict()}, ckpt)
    art = crate_edge.compile(None, "onnxruntime", out=tmp_path / "art", log=lambda s: None)
    cmds = {
        "compile": ["compile", "--target", "onnxruntime", "--out", str(users)],
        "import": ["import", str(ckpt), "--heads", str(m.cfg.heads), "--out", str(users)],
        "quantize": ["quantize", "--target", "onnxruntime-int8", "--data", "embedded", "--limit", "16", "--out", str(users)],
        "train": ["train", str(recipe), "--out", str(users)],
        "bench": ["bench", str(art.path), "--iters", "2", "--baselines", "none", "--out", str(users)],
        "parity": ["parity", str(art.path), "--data", "embedded", "--limit", "8", "--out", str(users)],
        "inspect": ["inspect", "--n", "4", "--out", str(users)],
        "demo": ["demo", "--out", str(users)],
    }
    for verb, args in cmds.items():
        r = _run(args, tmp_path)
        assert r.returncode == 2, (verb, r.stderr[-2000:])
        assert "holds files crate-edge did not write (thesis.tex)" in r.stderr and "Traceback" not in r.stderr, (verb, r.stderr)
        assert sorted(p.name for p in users.iterdir()) == ["thesis.tex"], verb
    from crate_edge.quantize import search
    from crate_edge.train import train

    twins = {
        "compile": lambda: crate_edge.compile(None, "onnxruntime", out=users, log=lambda s: None),
        "save_model": lambda: crate_edge.save_model(m, users),
        "import_checkpoint": lambda: crate_edge.import_checkpoint(ckpt, users, heads=m.cfg.heads),
        "search": lambda: search(None, "onnxruntime-int8", users, data="embedded", limit=16, log=lambda s: None),
        "train": lambda: train(recipe, users, progress=False),
        "parity report": lambda: crate_edge.parity.parity([art], data="embedded", limit=8, progress=False).write(users),
    }
    for verb, fn in twins.items():
        with pytest.raises(CrateEdgeError, match="did not write"):
            fn()
        assert sorted(p.name for p in users.iterdir()) == ["thesis.tex"], verb
    assert (users / "thesis.tex").read_text() == "months of work"


# ------------------------------------------------------------------ kill -9, two writers

def _compile_args(out):
    return ["compile", "--target", "onnxruntime", "--out", str(out)]


def _created(out: Path) -> str:
    art = crate_edge.load_artifact(out)  # verifies every hash
    return art.manifest["created"] + json.dumps(art.manifest["files"])


def test_kill_9_during_compile_never_leaves_a_half_artifact(tmp_path):
    out = tmp_path / "art"
    # no previous artifact: killed before the swap, nothing at the path, debris cleaned next time
    r = _run(_compile_args(out), tmp_path, **{KILL_ENV: "before-swap"})
    assert r.returncode == -signal.SIGKILL
    assert not out.exists() and _debris(tmp_path, "art")  # a partial directory beside it, hidden
    assert _run(_compile_args(out), tmp_path).returncode == 0
    assert _debris(tmp_path, "art") == []
    before = _created(out)
    # a previous artifact stays whole when killed while lowering (timed) or just before the swap
    p = subprocess.Popen(CLI + _compile_args(out), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:  # kill in the middle of the backend's work
        if "lowering with" in line:
            time.sleep(0.5)
            p.kill()
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL and _created(out) == before
    r = _run(_compile_args(out), tmp_path, **{KILL_ENV: "before-swap"})
    assert r.returncode == -signal.SIGKILL and _created(out) == before
    # killed right after the swap: the new artifact is whole at the path; the old one is debris
    r = _run(_compile_args(out), tmp_path, **{KILL_ENV: "after-swap"})
    assert r.returncode == -signal.SIGKILL
    after = _created(out)
    assert after != before and _debris(tmp_path, "art")
    assert _run(_compile_args(out), tmp_path).returncode == 0
    assert _debris(tmp_path, "art") == [] and _created(out) != after


def test_two_compiles_to_one_path_end_with_one_verified_artifact(tmp_path):
    out = tmp_path / "art"
    ps = [subprocess.Popen(CLI + _compile_args(out), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for _ in range(2)]
    res = [p.communicate(timeout=600) for p in ps]
    assert [p.returncode for p in ps] == [0, 0], [e[-1500:] for _, e in res]
    assert any("waiting for another crate-edge process" in e for _, e in res)  # the second one waited for the first
    art = crate_edge.load_artifact(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "manifest.json", *art.manifest["files"]])
    assert _debris(tmp_path, "art") == []


def test_one_training_run_per_directory(tmp_path):
    code = ("import sys, time; from crate_edge.outputs import owned_dir\n"
            "with owned_dir(sys.argv[1], 'train-run'):\n    print('held', flush=True); time.sleep(30)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(CrateEdgeError, match=rf"another crate-edge process \(pid {p.pid}\) is writing"):
            with owned_dir(tmp_path / "run", "train-run"):
                pass
    finally:
        p.kill()
        p.wait()
    with owned_dir(tmp_path / "run", "train-run"):  # a killed holder's lock is no obstacle
        pass


def _train_args(recipe, out, *extra):
    return ["train", str(recipe), "--out", str(out), *extra]


def test_kill_9_during_training_resumes_from_the_last_whole_checkpoint(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text((ROOT / "tests" / "test_train.py").read_text().split('TINY = """')[1].split('"""')[0]
                      .format(epochs=3, fused="true", limit=256))
    out = tmp_path / "run"
    # killed while writing the first checkpoint: nothing half-written to resume from
    r = _run(_train_args(recipe, out), tmp_path, **{KILL_ENV: "before-swap:resume"})
    assert r.returncode == -signal.SIGKILL and not (out / "resume").exists()
    # a whole first checkpoint, then killed while writing the second: resume/ still holds epoch 1
    r = _run(_train_args(recipe, out, "--until", "1"), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(_train_args(recipe, out), tmp_path, **{KILL_ENV: "before-swap:resume"})
    assert r.returncode == -signal.SIGKILL and "resuming" in r.stderr
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["epoch"] == 1 and foreign_files(out) == []
    # killed right after swapping in epoch 2's checkpoint: resume continues from epoch 2
    r = _run(_train_args(recipe, out), tmp_path, **{KILL_ENV: "after-swap:resume"})
    assert r.returncode == -signal.SIGKILL
    assert json.loads((out / "resume" / "state.json").read_text())["epoch"] == 2
    r = _run(_train_args(recipe, out), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr and "at epoch 2" in r.stderr
    log = json.loads((out / "train_log.json").read_text())["log"]
    assert [e["epoch"] for e in log] == [1, 2, 3]
    crate_edge.load_model(out / "model")
    assert foreign_files(out) == [] and _debris(out, "resume") == [] and _debris(tmp_path, "run") == []
