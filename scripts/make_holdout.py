"""Regenerate crate_edge/assets/fmnist_holdout.npz: the first 100 images of each class, in
test-set order, from the Fashion-MNIST *test* set (MIT licence, Zalando Research).
The embedded reference model never trains on the test set, so this slice is held out."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from crate_edge.data import load_dataset  # noqa: E402

PER_CLASS = 100
ds = load_dataset("fashion-mnist:test")
labels = ds.labels.numpy()
idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(10)]))
out = Path(__file__).resolve().parents[1] / "crate_edge" / "assets" / "fmnist_holdout.npz"
np.savez_compressed(
    out,
    images=ds.images.numpy()[idx, 0],
    labels=labels[idx].astype(np.int64),
    test_indices=idx.astype(np.int64),
    classes=np.array(["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]),
)
print(out, len(idx), out.stat().st_size, "bytes")
