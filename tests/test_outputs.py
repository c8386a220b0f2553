"""What crate-edge writes, and what it never touches: ownership rules and atomic replacement in
process, and every writing verb refusing a user's directory (real CLI subprocesses)."""

import json

import pytest
from click.testing import CliRunner

import crate_edge
from crate_edge import CrateEdgeError
from crate_edge.cli import main
from crate_edge.outputs import MARKER, atomic_dir, check_writable, foreign_files
from tests.procs import debris, small_model_and_data, tiny_recipe

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
    assert debris(tmp_path, "d") == []


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
    recipe = tiny_recipe(tmp_path, epochs=1, limit=128)
    ckpt = tmp_path / "up.pth"
    import torch

    m = crate_edge.load_model()
    torch.save({"state_dict": m.state_dict()}, ckpt)
    small, small_data = small_model_and_data(tmp_path)
    art = crate_edge.compile(small, "onnxruntime", out=tmp_path / "art", parity_data=small_data, log=lambda s: None)
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
    for verb, args in cmds.items():  # the CLI in process (a refusal needs no second process)
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (verb, r.output[-2000:])
        assert "holds files crate-edge did not write (thesis.tex)" in r.stderr, (verb, r.stderr)
        assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), verb
        assert sorted(p.name for p in users.iterdir()) == ["thesis.tex"], verb
    from crate_edge.search import search
    from crate_edge.train import train

    twins = {
        "compile": lambda: crate_edge.compile(None, "onnxruntime", out=users, log=lambda s: None),
        "save_model": lambda: crate_edge.save_model(m, users),
        "import_checkpoint": lambda: crate_edge.import_checkpoint(ckpt, users, heads=m.cfg.heads),
        "search": lambda: search(None, "onnxruntime-int8", users, data="embedded", limit=16, log=lambda s: None),
        "train": lambda: train(recipe, users, progress=False),
        "parity report": lambda: crate_edge.parity.parity([art], reference=small, data=small_data, progress=False).write(users),
    }
    for verb, fn in twins.items():
        with pytest.raises(CrateEdgeError, match="did not write"):
            fn()
        assert sorted(p.name for p in users.iterdir()) == ["thesis.tex"], verb
    assert (users / "thesis.tex").read_text() == "months of work"
