"""Copy a finished training run of recipes/fmnist-reference.toml into the package as the
embedded reference model, with its provenance (recipe, epochs, time, host, test top-1)."""

import json
import platform
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import crate_edge  # noqa: E402
from crate_edge.host import host_info  # noqa: E402

run = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "runs" / "fmnist-reference")
log = json.loads((run / "train_log.json").read_text())
m = crate_edge.load_model(run / "model")
ev = crate_edge.evaluate(m, "fashion-mnist:test")
last = log["log"][-1]
prov = {
    "recipe": "recipes/fmnist-reference.toml",
    "epochs": last["epoch"],
    "train_seconds": round(sum(e["seconds"] for e in log["log"])),
    "device": last["device"],
    "host": host_info()["cpu"],
    "platform": platform.platform(),
    "test_top1": ev["top1"],
    "test_n": ev["n"],
    "final_epoch": last,
}
dst = ROOT / "crate_edge" / "assets" / "reference"
crate_edge.save_model(m, dst, metadata=prov)
shutil.copy(run / "train_log.json", ROOT / "recipes" / "fmnist-reference.train_log.json")
print(json.dumps(prov, indent=1))
