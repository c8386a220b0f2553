"""crate-edge demo: compile, parity and bench in one run, one report. On the small one-layer model
with three targets (one fp32 that runs here, one int8 with a probe build, TensorRT whose network
is checked by ONNX Runtime): the HTML report has a row per target and embeds its charts, the JSON
and Markdown agree with it, and a second run reuses every artifact."""

import json
from html.parser import HTMLParser

import pytest

from crate_edge.demo import demo


class _Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.images, self._row, self._cell = {}, [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-target" in a:
            self._row = a["data-target"]
            self.rows[self._row] = []
        elif tag == "td" and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None and self._cell is not None:
            self.rows[self._row].append(self._cell)
            self._cell = None
        elif tag == "tr":
            self._row = None


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from tests.procs import small_model_and_data

    tmp = tmp_path_factory.mktemp("demo")
    return small_model_and_data(tmp)[0], tmp


def test_demo_report_has_a_row_per_target_and_reuses_artifacts(small):
    from crate_edge.data import load_dataset
    from crate_edge.errors import CrateEdgeError

    model, tmp = small
    targets = ["onnxruntime", "tensorrt", "aoti-cuda"]
    try:
        load_dataset("fashion-mnist", "train")
        targets.append("onnxruntime-int8")  # calibration needs the training split
    except CrateEdgeError as e:
        print(f"onnxruntime-int8 left out: {e}")
    out = tmp / "out"
    logs: list[str] = []
    rep = demo(targets, out=out, model=str(model), threads=1, log=logs.append)
    assert any("compiling" in s for s in logs) and any("bench" in s for s in logs)
    assert all(s.startswith("[") and " s] " in s[:12] for s in logs)  # every progress line carries the elapsed time

    # HTML: self-contained, a row per target with its status, charts embedded
    page = (out / "report.html").read_text()
    p = _Rows()
    p.feed(page)
    assert set(p.rows) == set(targets)
    assert p.rows["onnxruntime"][2] == "ok" and p.rows["onnxruntime"][3].endswith("%")
    assert p.rows["onnxruntime"][8] != "-" and p.rows["onnxruntime"][9].endswith("x")  # batch-1 ms and speed-up
    notes = {t: n for t, (_, n) in rep.notes().items()}
    assert p.rows["tensorrt"][2] == "stand-in" and p.rows["tensorrt"][-1].startswith("note ") and "not TensorRT" in notes["tensorrt"]
    assert f'<li id="note-{rep.notes()["tensorrt"][0]}" data-target="tensorrt">' in page
    if p.rows["aoti-cuda"][2] == "skipped":  # no CUDA GPU here: listed with why
        assert "cannot compile here" in notes["aoti-cuda"]
    order = [r["target"] for r in rep.rows]
    assert order.index("onnxruntime") < order.index("tensorrt")  # benchmarked rows first
    assert len(p.images) == 3 and all(src.startswith("data:image/png;base64,") for src in p.images)
    assert "http://" not in page and "https://" not in page  # nothing fetched when opened
    if "onnxruntime-int8" in targets:
        assert p.rows["onnxruntime-int8"][6] != "-"  # per-layer ISTA IoU from its probe build

    # JSON and Markdown say the same
    data = json.loads((out / "report.json").read_text())
    assert data["format"] == "crate-edge-demo" and sorted(r["target"] for r in data["targets"]) == sorted(targets)
    assert data["reused"] == 0 and set(data["baselines"]) == {"eager upstream", "eager folded+SDPA"}
    md = (out / "report.md").read_text()
    for t in targets:
        assert f"| {t} |" in md
    for png in ("latency.png", "parity.png", "whitebox.png"):
        assert (out / png).stat().st_size > 1000
    assert "onnxruntime" in rep.table()

    # a second run reuses every artifact of the first
    again = demo(targets, out=out, model=str(model), threads=1, log=lambda s: None)
    assert again.data["reused"] == again.data["compiled"] > 0


def test_demo_refuses_unknown_targets_and_foreign_output(small, tmp_path):
    from crate_edge.errors import CrateEdgeError

    model, _ = small
    with pytest.raises(CrateEdgeError, match="unknown target"):
        demo(["no-such-target"], out=tmp_path / "o", model=str(model))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(CrateEdgeError, match="did not write"):
        demo(["onnxruntime"], out=tmp_path / "mine", model=str(model), log=lambda s: None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
