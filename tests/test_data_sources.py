"""Dataset loaders on small files written in the real on-disk formats (never the network)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flux_app.data import sources
from flux_app.data.sources import (
    DatasetNotFoundError,
    IDXFormatError,
    Source,
    default_data_root,
    load_source,
    read_idx,
)

IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
IDX_TYPE = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    """Write ``arr`` as an IDX file: 00 00 <type> <ndim>, big-endian dims, big-endian data."""
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    payload = bytes([0, 0, IDX_TYPE[big.dtype], arr.ndim]) + struct.pack(
        f">{arr.ndim}I", *arr.shape
    )
    payload += big.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def fake_mnist(
    rng: np.random.Generator, n_train: int = 24, n_test: int = 10
) -> dict[str, np.ndarray]:
    return {
        "x_train": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }


def write_mnist(folder: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> None:
    for part, arr in arrays.items():
        write_idx(folder / IDX_NAMES[part], arr, gz=gz)


def no_download(monkeypatch: pytest.MonkeyPatch, message: str = "network unreachable") -> list:
    """Replace torchvision.datasets with classes whose download fails; returns the calls."""
    calls: list = []

    def failing(name: str):
        def ctor(root, train=True, download=False):
            calls.append((name, root, train, download))
            raise RuntimeError(message)

        return ctor

    fake = SimpleNamespace(
        **{n: failing(n) for n in ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100")}
    )
    monkeypatch.setattr(sources, "_torchvision_datasets", lambda: fake)
    monkeypatch.delenv(sources.OFFLINE_ENV, raising=False)
    return calls


# ------------------------------------------------------------------------------------- IDX ----


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, ">i4", ">f4"])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool, dtype: str) -> None:
    values = np.arange(24).reshape(2, 3, 4)
    arr = values.astype(dtype) if dtype == np.uint8 else (values - 5).astype(dtype)
    out = read_idx(write_idx(tmp_path / "f", arr, gz=gz))
    assert out.shape == (2, 3, 4)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_read_idx_rejects_malformed(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good", np.zeros((3, 2, 2), np.uint8), gz=False).read_bytes()
    cases = {
        "magic": b"\x08\x03" + good[2:],  # nonzero leading bytes
        "type": good[:2] + b"\x07" + good[3:],  # unknown type byte
        "truncated": good[:-1],
        "trailing": good + b"\x00",
        "header": good[:6],
        "empty": b"",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(IDXFormatError):
            read_idx(tmp_path / name)
    (tmp_path / "badgz").write_bytes(gzip.compress(good)[:-8])  # cut gzip stream
    with pytest.raises(IDXFormatError, match="gzip"):
        read_idx(tmp_path / "badgz")


@pytest.mark.parametrize(
    ("name", "subdir", "gz"),
    [
        ("fmnist", "", True),
        ("fmnist", "raw", False),
        ("fmnist", "FashionMNIST/raw", True),
        ("mnist", "MNIST/raw", False),
        ("mnist", "", True),
    ],
)
def test_mnist_like_layouts(tmp_path: Path, name: str, subdir: str, gz: bool) -> None:
    arrays = fake_mnist(np.random.default_rng(1))
    write_mnist(tmp_path / subdir, arrays, gz=gz)
    src = load_source(name, str(tmp_path))
    assert src.name == name and src.num_classes == 10
    assert src.x_train.shape == (24, 1, 28, 28) and src.x_train.dtype == torch.uint8
    assert src.x_test.shape == (10, 1, 28, 28)
    assert src.y_train.dtype == torch.int64
    np.testing.assert_array_equal(src.x_train[:, 0].numpy(), arrays["x_train"])
    np.testing.assert_array_equal(src.y_test.numpy(), arrays["y_test"])
    assert load_source(name, str(tmp_path)) is src  # memoised


def test_mnist_bad_contents(tmp_path: Path) -> None:
    arrays = fake_mnist(np.random.default_rng(2))
    arrays["y_train"][0] = 12
    write_mnist(tmp_path, arrays)
    with pytest.raises(IDXFormatError, match="0..9"):
        load_source("mnist", str(tmp_path))
    arrays = fake_mnist(np.random.default_rng(2))
    arrays["y_test"] = arrays["y_test"][:-1]  # count mismatch
    write_mnist(tmp_path / "b", arrays)
    with pytest.raises(IDXFormatError, match="labels"):
        load_source("mnist", str(tmp_path / "b"))


def test_missing_fmnist_names_paths_and_remedy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = no_download(monkeypatch)
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_source("fmnist", str(root))
    err = info.value
    msg = str(err)
    assert isinstance(err, FileNotFoundError)
    assert "fmnist" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "network unreachable" in msg
    assert str(root / "train-images-idx3-ubyte.gz") in msg
    assert str(root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte") in msg
    assert err.dataset == "fmnist" and str(root / "raw" / "train-images-idx3-ubyte") in err.paths
    assert calls == [("FashionMNIST", str(root), True, True)]
    clone = pickle.loads(pickle.dumps(err))  # crosses process boundaries in simulation
    assert isinstance(clone, DatasetNotFoundError) and str(clone) == msg


def test_download_fallback_uses_torchvision_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = fake_mnist(np.random.default_rng(3))

    def fake_mnist_ctor(root, train=True, download=False):
        assert download
        write_mnist(Path(root) / "MNIST" / "raw", arrays)

    monkeypatch.setattr(
        sources, "_torchvision_datasets", lambda: SimpleNamespace(MNIST=fake_mnist_ctor)
    )
    monkeypatch.delenv(sources.OFFLINE_ENV, raising=False)
    src = load_source("mnist", str(tmp_path))
    np.testing.assert_array_equal(src.y_train.numpy(), arrays["y_train"])


def test_offline_env_skips_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = no_download(monkeypatch)
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    with pytest.raises(DatasetNotFoundError, match=sources.OFFLINE_ENV):
        load_source("mnist", str(tmp_path))
    assert calls == []


# ----------------------------------------------------------------------------------- CIFAR ----


def cifar_images(n: int, offset: int) -> np.ndarray:
    """Rows of 3072 bytes (1024 R, 1024 G, 1024 B); pixel (c, h, w) of image i encodes all four."""
    i, c, h, w = np.meshgrid(
        np.arange(n), np.arange(3), np.arange(32), np.arange(32), indexing="ij"
    )
    return ((i + offset) * 7 + c * 50 + h * 3 + w).astype(np.uint8).reshape(n, 3072)


def dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=2)  # the real files are protocol-2 pickles


def write_cifar10(root: Path, per_batch: int = 3, n_test: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    for b in range(1, 6):
        n0 = (b - 1) * per_batch
        dump(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": [(n0 + k) % 10 for k in range(per_batch)],
                "data": cifar_images(per_batch, n0),
                "filenames": [f"img_{n0 + k}.png" for k in range(per_batch)],
            },
        )
    dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [9 - k for k in range(n_test)],
            "data": cifar_images(n_test, 100),
            "filenames": [f"test_{k}.png" for k in range(n_test)],
        },
    )
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    dump(
        folder / "batches.meta",
        {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072},
    )
    return folder


def test_cifar10_python_batches(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    src = load_source("cifar10", str(tmp_path))
    assert src.x_train.shape == (15, 3, 32, 32) and src.x_train.dtype == torch.uint8
    assert src.x_test.shape == (4, 3, 32, 32)
    assert src.y_train.tolist() == [k % 10 for k in range(15)]
    assert src.y_test.tolist() == [9, 8, 7, 6]
    assert src.num_classes == 10 and src.class_names[0] == "airplane"
    # Channel-major rows: image 7 (batch 3), green channel, row 5, column 11.
    assert int(src.x_train[7, 1, 5, 11]) == (7 * 7 + 50 + 15 + 11) % 256
    assert int(src.x_test[2, 2, 31, 0]) == (102 * 7 + 100 + 93) % 256


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    for split, n in (("train", 6), ("test", 3)):
        dump(
            folder / split,
            {
                "filenames": [f"{split}_{k}.png" for k in range(n)],
                "batch_label": f"{split} batch",
                "fine_labels": [99 - k for k in range(n)],
                "coarse_labels": [k % 20 for k in range(n)],
                "data": cifar_images(n, 0),
            },
        )
    dump(
        folder / "meta",
        {
            "fine_label_names": [f"fine{k}" for k in range(100)],
            "coarse_label_names": [f"c{k}" for k in range(20)],
        },
    )
    src = load_source("cifar100", str(tmp_path))
    assert src.num_classes == 100 and len(src.class_names) == 100
    assert src.y_train.tolist() == [99, 98, 97, 96, 95, 94]
    assert src.x_train.shape == (6, 3, 32, 32)


def test_cifar_missing_and_unsafe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = no_download(monkeypatch)
    with pytest.raises(DatasetNotFoundError) as info:
        load_source("cifar10", str(tmp_path / "empty"))
    assert str(tmp_path / "empty" / "cifar-10-batches-py" / "data_batch_1") in str(info.value)
    assert calls[0][0] == "CIFAR10"
    # A batch file that references any other global is refused, not executed.
    folder = write_cifar10(tmp_path / "evil")
    dump(folder / "test_batch", {"labels": [0], "data": cifar_images(1, 0), "x": SimpleNamespace()})
    with pytest.raises(ValueError, match="refusing"):
        load_source("cifar10", str(tmp_path / "evil"))


# --------------------------------------------------------------------------- offline sources --


def test_digits_shape_range_and_fixed_split() -> None:
    src = load_source("digits")
    assert src.x_train.shape == (1437, 1, 28, 28) and src.x_test.shape == (360, 1, 28, 28)
    assert src.x_train.dtype == torch.uint8
    assert int(src.x_train.min()) == 0 and int(src.x_train.max()) >= 250
    counts = torch.bincount(src.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified
    # The run seed does not move the split (same memoised object).
    assert load_source("digits", seed=7) is src


def test_synthetic_deterministic() -> None:
    a = load_source("synthetic", seed=11)
    assert a.x_train.shape == (1000, 1, 28, 28) and a.x_test.shape == (300, 1, 28, 28)
    assert torch.bincount(a.y_train).tolist() == [100] * 10
    assert torch.bincount(a.y_test).tolist() == [30] * 10
    sources.clear_source_cache()
    b = load_source("synthetic", seed=11)
    assert b is not a
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = load_source("synthetic", seed=12)
    assert not torch.equal(a.x_train, c.x_train)


def test_names_roots_and_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="cifar100"):
        load_source("imagenet")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sources, "DEFAULT_FMNIST_ROOT", str(tmp_path / "debian"))
    assert default_data_root("mnist") == str(tmp_path / ".cache" / "flux-app" / "data" / "mnist")
    assert default_data_root("fashion-mnist").endswith("/data/fmnist")
    (tmp_path / "debian").mkdir()
    assert default_data_root("fmnist") == str(tmp_path / "debian")
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="uint8"):
        Source("bad", x.float(), y, x, y, 10)
    with pytest.raises(ValueError, match="labels outside"):
        Source("bad", x, y + 10, x, y, 10)
