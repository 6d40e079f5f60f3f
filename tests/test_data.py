"""Datasets (kernel/data.py): built-in sets, loaders for local files the test writes itself, broken
files as one-line DataErrors, and the run's deterministic test/warm/pool/edge split."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest

from kernel.config import DataConfig, RunConfig, load_config
from kernel.data import Dataset, load_dataset, make_splits, read_idx
from kernel.errors import DataError, FogflError


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"error message must be one line: {msg!r}"
    assert isinstance(exc.value, FogflError)
    return msg


def _load(dataset: str, path, **kw) -> Dataset:
    return load_dataset(DataConfig(dataset=dataset, path=str(path), **kw))


def _load_err(dataset: str, path, **kw) -> str:
    with pytest.raises(DataError) as e:
        _load(dataset, path, **kw)
    return _one_line(e)


def _check_images(ds: Dataset, shape: tuple[int, ...]) -> None:
    assert ds.x.shape == shape and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and ds.y.shape == (shape[0],)
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
    assert ds.x.flags.c_contiguous


# --------------------------------------------------------------------------- built-in sets


def test_digits():
    ds = load_dataset(DataConfig(dataset="digits"))
    _check_images(ds, (1797, 1, 8, 8))
    assert ds.num_classes == 10 and ds.shape == (1, 8, 8) and len(ds) == 1797
    assert float(ds.x.max()) == 1.0 and set(np.unique(ds.y)) == set(range(10))


def test_mnist5k():
    ds = load_dataset(DataConfig(dataset="mnist5k"))
    _check_images(ds, (5000, 1, 28, 28))
    assert ds.num_classes == 10 and float(ds.x.max()) == pytest.approx(1.0)


def test_path_required_and_must_exist(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(DataConfig(dataset="mnist"))
    assert "data.path" in _one_line(e)
    assert "does not exist" in _load_err("cifar10", tmp_path / "nowhere")


# --------------------------------------------------------------------------- MNIST IDX


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}[arr.dtype]
    return struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) \
        + arr.tobytes()


def _write_idx(path, arr: np.ndarray, gz: bool) -> None:
    data = _idx_bytes(arr)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _mnist_folder(folder, gz: bool, n_train: int = 12, n_test: int = 5, sep: str = "-"):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        x[0, 0, 0], x[0, 0, 1] = 0, 255
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(folder / f"{split}-images{sep}idx3-ubyte", x, gz)
        _write_idx(folder / f"{split}-labels{sep}idx1-ubyte", y, gz)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_idx_loader(tmp_path, gz, name):
    arrays = _mnist_folder(tmp_path / "m", gz)
    ds = _load(name, tmp_path / "m")
    _check_images(ds, (17, 1, 28, 28))
    x = np.concatenate([arrays["train"][0], arrays["t10k"][0]])  # train first, then t10k
    y = np.concatenate([arrays["train"][1], arrays["t10k"][1]])
    np.testing.assert_allclose(ds.x[:, 0], x / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, y)
    assert ds.x[0, 0, 0, 0] == 0.0 and ds.x[0, 0, 0, 1] == 1.0


def test_mnist_idx_dotted_names(tmp_path):
    _mnist_folder(tmp_path / "m", gz=False, sep=".")
    assert len(_load("mnist", tmp_path / "m")) == 17


def test_read_idx_other_element_types(tmp_path):
    a = np.arange(12, dtype=">i4").reshape(3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(a))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), a)
    f = np.linspace(0, 1, 6, dtype=">f4")
    (tmp_path / "f").write_bytes(_idx_bytes(f))
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), f)


def test_broken_mnist_files(tmp_path):
    def case(name: str, mutate) -> str:
        folder = tmp_path / name
        _mnist_folder(folder, gz=False)
        mutate(folder)
        return _load_err("mnist", folder)

    assert "t10k-labels" in case("missing", lambda f: (f / "t10k-labels-idx1-ubyte").unlink())
    assert "bad magic" in case("magic", lambda f: (f / "train-images-idx3-ubyte").write_bytes(b"GIF89a" * 10))

    def truncate(f):
        p = f / "train-images-idx3-ubyte"
        p.write_bytes(p.read_bytes()[:-7])

    assert "header says" in case("truncated", truncate)
    assert "truncated IDX header" in case(
        "short-head", lambda f: (f / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x03\0\0"))
    assert "element type" in case(
        "dtype", lambda f: (f / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x07\x01\0\0\0\x01x"))
    # a header claiming 2**31 x 2**31 x 4 elements: a clean error, no overflow
    assert "header says" in case("huge", lambda f: (f / "train-images-idx3-ubyte").write_bytes(
        struct.pack(">BBBBIII", 0, 0, 8, 3, 2**31, 2**31, 4)))

    def mismatch(f):
        (f / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, dtype=np.uint8)))

    assert "differ in count" in case("count", mismatch)

    def swapped(f):
        (f / "train-images-idx3-ubyte").write_bytes((f / "train-labels-idx1-ubyte").read_bytes())

    assert "3-d" in case("swapped", swapped)


def test_broken_gz_files(tmp_path):
    for name, mutate in (
        ("truncated", lambda b: b[: len(b) // 2]),
        ("not-gz", lambda b: b"plain bytes, not gzip" * 20),
        ("flipped", lambda b: b[:40] + bytes([b[40] ^ 0x55]) + b[41:]),
    ):
        folder = tmp_path / name
        _mnist_folder(folder, gz=True, n_train=60)
        p = folder / "train-images-idx3-ubyte.gz"
        p.write_bytes(mutate(p.read_bytes()))
        assert str(p) in _load_err("mnist", folder), name


def test_corrupt_deflate_stream_is_a_data_error(tmp_path):
    """Some flipped bytes inside a gzip member make zlib itself fail (zlib.error, not OSError)."""
    rng = np.random.default_rng(0)
    blob = gzip.compress(_idx_bytes(rng.integers(0, 255, size=(20, 28, 28), dtype=np.uint8)))
    p = tmp_path / "x.gz"
    kinds = set()
    for off in range(10, len(blob) - 8, 37):
        b = bytearray(blob)
        b[off] ^= 0x55
        p.write_bytes(bytes(b))
        with pytest.raises(DataError) as e:
            read_idx(p)
        kinds.add(_one_line(e).rsplit("(", 1)[-1])
    assert kinds  # every corruption, zlib's own failures included, surfaced as a DataError


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_batch(path, n: int, seed: int, override: dict | None = None) -> dict:
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"x", b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
         b"labels": rng.integers(0, 10, size=n).tolist(), b"filenames": [b"f"] * n}
    d.update(override or {})
    with open(path, "wb") as f:
        pickle.dump(d, f)
    return d


def test_cifar10_loader(tmp_path):
    b1 = _cifar_batch(tmp_path / "data_batch_1", 4, 1)
    b2 = _cifar_batch(tmp_path / "data_batch_2", 3, 2)
    t = _cifar_batch(tmp_path / "test_batch", 2, 3)
    (tmp_path / "batches.meta").write_bytes(b"ignored")
    ds = _load("cifar10", tmp_path)
    _check_images(ds, (9, 3, 32, 32))
    np.testing.assert_array_equal(ds.y, b1[b"labels"] + b2[b"labels"] + t[b"labels"])
    # rows are R(1024) G(1024) B(1024), each row-major 32x32
    row = b1[b"data"][1]
    assert ds.x[1, 1, 0, 0] == pytest.approx(row[1024] / 255.0)
    assert ds.x[1, 2, 31, 31] == pytest.approx(row[3071] / 255.0)
    assert ds.x[1, 0, 1, 0] == pytest.approx(row[32] / 255.0)
    assert ds.x[4, 0, 0, 5] == pytest.approx(b2[b"data"][0][5] / 255.0)


def test_broken_cifar10(tmp_path):
    assert "no CIFAR-10 batches" in _load_err("cifar10", tmp_path)

    def folder(name):
        f = tmp_path / name
        f.mkdir()
        return f

    f = folder("garbage")
    (f / "data_batch_1").write_bytes(b"not a pickle at all")
    assert "data_batch_1" in _load_err("cifar10", f)

    f = folder("truncated")
    _cifar_batch(f / "data_batch_1", 4, 0)
    (f / "data_batch_1").write_bytes((f / "data_batch_1").read_bytes()[:500])
    assert "not a CIFAR-10 batch" in _load_err("cifar10", f)

    f = folder("nolabels")
    with open(f / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, fh)
    assert "KeyError" in _load_err("cifar10", f)

    f = folder("list")
    with open(f / "data_batch_1", "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    assert "not a CIFAR-10 batch" in _load_err("cifar10", f)

    f = folder("badshape")
    _cifar_batch(f / "data_batch_1", 2, 0, {b"data": np.zeros((2, 100), np.uint8)})
    assert "not a CIFAR-10 batch" in _load_err("cifar10", f)

    f = folder("count")
    _cifar_batch(f / "data_batch_1", 3, 0, {b"labels": [1, 2]})
    assert "3 images but 2 labels" in _load_err("cifar10", f)


# --------------------------------------------------------------------------- image folder


def _png(path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def test_image_folder_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {}
    for cls, n in (("cat", 2), ("ant", 3)):  # class ids follow sorted names: ant=0, cat=1
        (tmp_path / cls).mkdir()
        for i in range(n):
            a = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
            _png(tmp_path / cls / f"{i}.png", a)
            imgs[(cls, i)] = a
    (tmp_path / "cat" / "notes.txt").write_text("not an image, skipped")
    ds = _load("folder", tmp_path)
    _check_images(ds, (5, 1, 6, 5))
    assert ds.y.tolist() == [0, 0, 0, 1, 1] and ds.num_classes == 2
    np.testing.assert_allclose(ds.x[3, 0], imgs[("cat", 0)] / 255.0, rtol=1e-6)


def test_image_folder_rgb_and_resize(tmp_path):
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i, size in enumerate(((8, 8), (10, 12))):  # differing sizes, fixed by image_size
            _png(tmp_path / cls / f"{i}.png", rng.integers(0, 256, size=(*size, 3), dtype=np.uint8))
    assert "image_size" in _load_err("folder", tmp_path)
    ds = _load("folder", tmp_path, image_size=4)
    _check_images(ds, (4, 3, 4, 4))


def test_broken_image_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no class sub-folders" in _load_err("folder", empty)

    noimg = tmp_path / "noimg"
    (noimg / "a").mkdir(parents=True)
    (noimg / "a" / "readme.txt").write_text("x")
    assert "no images" in _load_err("folder", noimg)

    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    _png(bad / "a" / "ok.png", np.zeros((4, 4), np.uint8))
    (bad / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert "broken.png" in _load_err("folder", bad)

    trunc = tmp_path / "trunc"
    (trunc / "a").mkdir(parents=True)
    _png(trunc / "a" / "x.png", np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8))
    (trunc / "a" / "x.png").write_bytes((trunc / "a" / "x.png").read_bytes()[:100])
    assert "x.png" in _load_err("folder", trunc)


# --------------------------------------------------------------------------- npz


def test_npz_loader(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(6, 7, 7)).astype(np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(6) % 3)
    ds = _load("npz", tmp_path / "a.npz")
    _check_images(ds, (6, 1, 7, 7))  # (N, H, W) gets a channel axis; 0..255 scaled to [0, 1]
    np.testing.assert_allclose(ds.x[:, 0], x / 255.0, rtol=1e-6)
    assert ds.num_classes == 3

    x4 = np.random.default_rng(1).random((4, 3, 5, 5)).astype(np.float64)
    np.savez_compressed(tmp_path / "b.npz", x=x4, y=[1, 0, 1, 0])
    ds = _load("npz", tmp_path / "b.npz")
    _check_images(ds, (4, 3, 5, 5))
    np.testing.assert_allclose(ds.x, x4, rtol=1e-6)  # already in [0, 1]: untouched


def test_broken_npz(tmp_path):
    good = tmp_path / "good.npz"
    np.savez_compressed(good, x=np.random.default_rng(0).random((50, 8, 8)), y=np.arange(50))
    raw = good.read_bytes()
    cases = {
        "garbage.npz": b"this is not an npz",
        "truncated.npz": raw[: len(raw) // 2],
        "flipped.npz": raw[:80] + bytes([raw[80] ^ 0xFF]) + raw[81:],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert name in _load_err("npz", tmp_path / name), name
    np.savez(tmp_path / "noy.npz", x=np.zeros((2, 4, 4)))
    assert "x and y" in _load_err("npz", tmp_path / "noy.npz")
    np.save(tmp_path / "plain.npy", np.zeros((2, 4, 4)))
    assert "plain.npy" in _load_err("npz", tmp_path / "plain.npy")
    np.savez(tmp_path / "count.npz", x=np.zeros((3, 4, 4)), y=[0, 1])
    assert "one label per sample" in _load_err("npz", tmp_path / "count.npz")
    np.savez(tmp_path / "ndim.npz", x=np.zeros((3, 4)), y=[0, 1, 2])
    assert "(N, C, H, W)" in _load_err("npz", tmp_path / "ndim.npz")


# --------------------------------------------------------------------------- splits


def _cfg(*sets: str) -> RunConfig:
    return load_config(sets=["topology.fogs=2", "topology.edges_per_fog=3", "cloud.warm_start.per_class=5",
                             *sets], use_env=False)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataConfig(dataset="digits"))


def test_splits_deterministic_by_seed(digits):
    a, b = make_splits(_cfg(), digits), make_splits(_cfg(), digits)
    for name in ("test", "warm", "pool"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert all(np.array_equal(p, q) for p, q in zip(a.edges, b.edges, strict=True))
    c = make_splits(_cfg("seed=1"), digits)
    assert not np.array_equal(a.test, c.test)
    assert not all(np.array_equal(p, q) for p, q in zip(a.edges, c.edges, strict=True))


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "classes"])
def test_splits_disjoint_warm_per_class_edges_cover_pool(digits, partition):
    cfg = _cfg(f"data.partition={partition}", "data.alpha=0.3")
    s = make_splits(cfg, digits)
    n = len(digits)
    test, warm, pool = set(s.test.tolist()), set(s.warm.tolist()), set(s.pool.tolist())
    assert len(test) == len(s.test) and len(warm) == len(s.warm) and len(pool) == len(s.pool)
    assert not (test & warm) and not (test & pool) and not (warm & pool)
    assert test | warm | pool == set(range(n))  # nothing lost without max_samples
    assert len(s.test) == round(n * cfg.data.test_fraction)
    assert np.bincount(digits.y[s.warm], minlength=10).tolist() == [5] * 10

    assert len(s.edges) == cfg.num_edges() == 6
    edge_all = np.concatenate(s.edges)
    assert len(edge_all) == len(set(edge_all.tolist())), "edge partitions overlap"
    if partition != "classes" or cfg.num_edges() >= len(cfg.data.class_split):
        np.testing.assert_array_equal(np.sort(edge_all), np.sort(s.pool))
    assert all(len(e) > 0 for e in s.edges)


def test_splits_max_samples_and_no_warm_start(digits):
    s = make_splits(_cfg("data.max_samples=300", "cloud.warm_start.per_class=0"), digits)
    assert len(s.warm) == 0 and s.warm.dtype.kind == "i"
    assert len(s.test) + len(s.pool) == 300 and len(s.test) == 60
    assert sum(len(e) for e in s.edges) == len(s.pool)
