"""kill -9 at named moments of compile and of train (real subprocesses), and two writers of one
path at once: never a half-made artifact, a previous one stays whole, debris is cleaned."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import crate_edge
from crate_edge import CrateEdgeError
from crate_edge.outputs import KILL_ENV, MARKER, foreign_files, owned_dir
from tests.procs import CLI, debris, env, run, small_model_and_data, tiny_recipe


def _compile_args(out):
    """The cheapest real compile: a one-layer model, parity on 16 inputs (tests.procs)."""
    model, data = out.parent / "small-model", out.parent / "small-data.npz"
    return ["compile", "--target", "onnxruntime", "--model", str(model), "--parity-data", str(data), "--out", str(out)]


def _created(out: Path) -> str:
    art = crate_edge.load_artifact(out)  # verifies every hash
    return art.manifest["created"] + json.dumps(art.manifest["files"])


def test_kill_9_during_compile_never_leaves_a_half_artifact(tmp_path):
    small_model_and_data(tmp_path)
    out = tmp_path / "art"
    # no previous artifact, killed in the middle of the backend's work: nothing at the path, a
    # hidden partial directory beside it, which the next run removes
    p = subprocess.Popen(CLI + _compile_args(out), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "lowering with" in line:
            time.sleep(0.5)
            p.kill()
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not out.exists() and debris(tmp_path, "art")
    assert run(_compile_args(out), tmp_path).returncode == 0
    assert debris(tmp_path, "art") == []
    before = _created(out)
    # a previous artifact stays whole when killed at the last moment before the swap
    r = run(_compile_args(out), tmp_path, **{KILL_ENV: "before-swap"})
    assert r.returncode == -signal.SIGKILL and _created(out) == before
    # killed right after the swap: the new artifact is whole at the path; the old one is debris
    r = run(_compile_args(out), tmp_path, **{KILL_ENV: "after-swap"})
    assert r.returncode == -signal.SIGKILL
    after = _created(out)
    assert after != before and debris(tmp_path, "art")
    assert run(_compile_args(out), tmp_path).returncode == 0
    assert debris(tmp_path, "art") == [] and _created(out) != after


def test_two_compiles_to_one_path_end_with_one_verified_artifact(tmp_path):
    small_model_and_data(tmp_path)
    out = tmp_path / "art"
    ps = [
        subprocess.Popen(CLI + _compile_args(out), cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    res = [p.communicate(timeout=600) for p in ps]
    assert [p.returncode for p in ps] == [0, 0], [e[-1500:] for _, e in res]
    assert any("waiting for another crate-edge process" in e for _, e in res)  # the second one waited for the first
    art = crate_edge.load_artifact(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "manifest.json", *art.manifest["files"]])
    assert debris(tmp_path, "art") == []


def test_one_training_run_per_directory(tmp_path):
    code = (
        "import sys, time; from crate_edge.outputs import owned_dir\n"
        "with owned_dir(sys.argv[1], 'train-run'):\n    print('held', flush=True); time.sleep(30)\n"
    )
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
    recipe = tiny_recipe(tmp_path, epochs=3, limit=256)
    out = tmp_path / "run"
    # killed while writing the first checkpoint: nothing half-written to resume from
    r = run(_train_args(recipe, out), tmp_path, **{KILL_ENV: "before-swap:resume"})
    assert r.returncode == -signal.SIGKILL and not (out / "resume").exists()
    # a whole first checkpoint, then killed while writing the second: resume/ still holds epoch 1
    r = run(_train_args(recipe, out, "--until", "1"), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(_train_args(recipe, out), tmp_path, **{KILL_ENV: "before-swap:resume"})
    assert r.returncode == -signal.SIGKILL and "resuming" in r.stderr
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["epoch"] == 1 and foreign_files(out) == []
    # killed right after swapping in epoch 2's checkpoint: resume continues from epoch 2
    r = run(_train_args(recipe, out), tmp_path, **{KILL_ENV: "after-swap:resume"})
    assert r.returncode == -signal.SIGKILL
    assert json.loads((out / "resume" / "state.json").read_text())["epoch"] == 2
    r = run(_train_args(recipe, out), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr and "at epoch 2" in r.stderr
    log = json.loads((out / "train_log.json").read_text())["log"]
    assert [e["epoch"] for e in log] == [1, 2, 3]
    crate_edge.load_model(out / "model")
    assert foreign_files(out) == [] and debris(out, "resume") == [] and debris(tmp_path, "run") == []


def test_a_fresh_run_killed_after_its_first_log_resumes(tmp_path):
    # the first epoch's train_log.json is written while the marker still lists nothing: it must
    # be listed before it appears, or the resumed run would call it foreign and refuse
    recipe = tiny_recipe(tmp_path, epochs=2, limit=256)
    out = tmp_path / "run"
    r = run(_train_args(recipe, out), tmp_path, **{KILL_ENV: "after-write:train_log.json"})
    assert r.returncode == -signal.SIGKILL and (out / "train_log.json").is_file()
    assert foreign_files(out) == []
    r = run(_train_args(recipe, out), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "at epoch 1" in r.stderr
    assert [e["epoch"] for e in json.loads((out / "train_log.json").read_text())["log"]] == [1, 2]
