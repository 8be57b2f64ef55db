"""Image sources: the raw train/test tensors of every dataset the app knows.

A :class:`Source` holds a dataset exactly once per process, as ``uint8`` images ``[N, C, H, W]``
and ``int64`` labels; clients convert their own share to ``float32`` in ``[0, 1]``
(:mod:`flux_app.data.shifts`). :func:`load_source` is memoised because simulation actors call it
for every message.

Datasets
--------
``digits``     scikit-learn's bundled 8x8 digits (1797 images, no download), upscaled to 28x28;
               a fixed stratified 80/20 split (seed 0, whatever the run seed).
``fmnist``     Fashion-MNIST, ``mnist``: MNIST - IDX files (``.gz`` or raw) read by
               :func:`read_idx`. Looked up in ``data_root``, ``data_root/raw`` and torchvision's
               ``data_root/FashionMNIST/raw`` / ``data_root/MNIST/raw``.
``cifar10``    CIFAR-10 / ``cifar100`` CIFAR-100 (fine labels) - the "python version" batch files
               (``cifar-10-batches-py/``, ``cifar-100-python/``) under ``data_root``.
``synthetic``  10 classes of smooth random prototypes plus noise; tiny and deterministic from the
               seed, for fast tests.

When a dataset is missing, one download through torchvision is tried (set the environment
variable ``FLUX_APP_OFFLINE=1`` to skip it); if that fails too, :class:`DatasetNotFoundError`
lists every path looked at and how to get the files.

CIFAR batches are Python pickles. They are read with an unpickler that only accepts the few
numpy globals a real batch file uses, so a planted file in a shared data directory cannot run
code (torchvision's reader, which would also insist on the exact MD5 of each file, uses plain
``pickle``).
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DEFAULT_FMNIST_ROOT",
    "OFFLINE_ENV",
    "DatasetNotFoundError",
    "IDXFormatError",
    "Source",
    "clear_source_cache",
    "default_data_root",
    "load_source",
    "read_idx",
]

DATASETS = ("digits", "fmnist", "mnist", "cifar10", "cifar100", "synthetic")
_ALIASES = {
    "fashion-mnist": "fmnist",
    "fashion_mnist": "fmnist",
    "fashionmnist": "fmnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}
DEFAULT_FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
OFFLINE_ENV = "FLUX_APP_OFFLINE"
_CACHE_ROOT = "~/.cache/flux-app/data"


# --------------------------------------------------------------------------------------------
# Source and errors
# --------------------------------------------------------------------------------------------


# eq=False: comparing tensors field by field is ambiguous; a Source is equal only to itself
# (and hashable by identity, so it can key caches).
@dataclass(frozen=True, eq=False)
class Source:
    """One dataset in memory, shared read-only by every client of the process.

    Attributes
    ----------
    name : str
        Canonical dataset name (one of :data:`DATASETS`).
    x_train, x_test : torch.Tensor
        ``uint8`` images ``[N, C, H, W]``.
    y_train, y_test : torch.Tensor
        ``int64`` labels ``[N]`` in ``0 .. num_classes - 1``.
    num_classes : int
        Number of classes.
    class_names : tuple of str
        Human-readable class names where the dataset ships them (else empty).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(
                    f"{self.name}: x_{split} must be uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise ValueError(
                    f"{self.name}: y_{split} must be int64 [{len(x)}], got {y.dtype} {tuple(y.shape)}"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"{self.name}: y_{split} has labels outside 0..{self.num_classes - 1}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train and test images differ in shape")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def describe(self) -> str:
        """One-line summary, e.g. for logs."""
        c, h, w = self.image_shape
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test images "
            f"{c}x{h}x{w}, {self.num_classes} classes"
        )


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not on disk and could not be downloaded.

    The message names the dataset, every path looked at and how to get the files. The
    constructor accepts the message alone so the exception survives pickling (Ray, Flower).
    """

    def __init__(self, message: str, *, dataset: str = "", paths: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.dataset = dataset
        self.paths = tuple(paths)

    def __str__(self) -> str:  # OSError would otherwise format (errno, strerror) pairs
        return str(self.args[0]) if self.args else ""


class IDXFormatError(ValueError):
    """An IDX file is truncated, has a bad magic number or unexpected contents."""


_HOW_TO_GET = {
    "fmnist": (
        "`apt-get install dataset-fashion-mnist` (files land in {debian}), or on a machine with "
        "internet run `python -c \"import torchvision; torchvision.datasets.FashionMNIST('DIR', "
        'download=True)"`, copy DIR here and pass data-root=DIR'
    ),
    "mnist": (
        'on a machine with internet run `python -c "import torchvision; '
        "torchvision.datasets.MNIST('DIR', download=True)\"`, copy DIR here and pass data-root=DIR"
    ),
    "cifar10": (
        'on a machine with internet run `python -c "import torchvision; '
        "torchvision.datasets.CIFAR10('DIR', download=True)\"` (or unpack cifar-10-python.tar.gz "
        "into DIR), copy DIR here and pass data-root=DIR"
    ),
    "cifar100": (
        'on a machine with internet run `python -c "import torchvision; '
        "torchvision.datasets.CIFAR100('DIR', download=True)\"` (or unpack "
        "cifar-100-python.tar.gz into DIR), copy DIR here and pass data-root=DIR"
    ),
}


def _not_found(dataset: str, looked: list[str], download_error: str) -> DatasetNotFoundError:
    paths = list(dict.fromkeys(looked))  # de-duplicated, order kept
    how = _HOW_TO_GET[dataset].format(debian=DEFAULT_FMNIST_ROOT)
    lines = [f"dataset '{dataset}' not found. Looked at:"]
    lines += [f"  {p}" for p in paths]
    lines.append(f"Download attempt: {download_error}")
    lines.append(f"To get it: {how}.")
    return DatasetNotFoundError("\n".join(lines), dataset=dataset, paths=tuple(paths))


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return key


def default_data_root(name: str) -> str:
    """Where ``name`` is looked for when no data-root is given.

    Fashion-MNIST: the Debian package's :data:`DEFAULT_FMNIST_ROOT` if it exists; everything
    else (and Fashion-MNIST without the package): ``~/.cache/flux-app/data/<name>``.
    """
    key = _canonical(name)
    if key == "fmnist" and os.path.isdir(DEFAULT_FMNIST_ROOT):
        return DEFAULT_FMNIST_ROOT
    return os.path.join(os.path.expanduser(_CACHE_ROOT), key)


def load_source(name: str, data_root: str = "", seed: int = 0) -> Source:
    """Load a dataset (memoised per process).

    Parameters
    ----------
    name : str
        One of :data:`DATASETS` (a few aliases such as ``fashion-mnist`` are accepted).
    data_root : str
        Directory holding the files; ``""`` means :func:`default_data_root`. Ignored by
        ``digits`` and ``synthetic``.
    seed : int
        Only used by ``synthetic``; every other dataset is the same whatever the seed.

    Returns
    -------
    Source
        The same object for the same effective arguments; treat its tensors as read-only.

    Raises
    ------
    ValueError
        Unknown dataset name, or a malformed file.
    DatasetNotFoundError
        Files missing and the download failed.
    """
    key = _canonical(name)
    if key in ("digits", "synthetic"):
        root = ""
    else:
        root = (
            os.path.abspath(os.path.expanduser(data_root)) if data_root else default_data_root(key)
        )
    # Normalise the cache key so that, e.g., five seeds of an fmnist sweep share one copy.
    return _load_cached(key, root, int(seed) if key == "synthetic" else 0)


def clear_source_cache() -> None:
    """Forget every memoised :class:`Source` (tests; freeing memory)."""
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=8)
def _load_cached(key: str, root: str, seed: int) -> Source:
    if key == "digits":
        return _load_digits()
    if key == "synthetic":
        return _load_synthetic(seed)
    if key in ("fmnist", "mnist"):
        return _load_mnist_like(key, root)
    return _load_cifar(key, root)


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

# IDX type byte -> numpy dtype (multi-byte types are big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_DIR = {"fmnist": "FashionMNIST", "mnist": "MNIST"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw, detected from its first bytes).

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    numpy.ndarray
        Native-endian array with the dimensions stored in the header.

    Raises
    ------
    IDXFormatError
        Bad gzip stream, bad magic number, unknown type, or a payload that does not match the
        header's dimensions.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise IDXFormatError(f"{path}: corrupt gzip stream ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise IDXFormatError(
            f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'}; expected "
            "00 00 <type 08..0e> <ndim >= 1>)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise IDXFormatError(
            f"{path}: header says {dims} x {dtype.itemsize} bytes = {count * dtype.itemsize} "
            f"bytes of data, file has {len(raw) - header}"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # native order, writable copy


def _find_idx(key: str, root: str, looked: list[str]) -> dict[str, Path] | None:
    dirs = [Path(root), Path(root) / "raw", Path(root) / _TORCHVISION_DIR[key] / "raw"]
    for d in dirs:
        found: dict[str, Path] = {}
        for part, stem in _IDX_FILES.items():
            for candidate in (d / stem, d / f"{stem}.gz"):
                looked.append(str(candidate))
                if candidate.is_file():
                    found[part] = candidate
                    break
        if len(found) == len(_IDX_FILES):
            return found
    return None


def _load_mnist_like(key: str, root: str) -> Source:
    looked: list[str] = []
    files = _find_idx(key, root, looked)
    if files is None:
        cls = "FashionMNIST" if key == "fmnist" else "MNIST"
        # One call fetches all four files into <root>/<cls>/raw.
        error = _try_download(lambda tvd: getattr(tvd, cls)(root, train=True, download=True))
        files = _find_idx(key, root, []) if error is None else None
        if files is None:
            raise _not_found(
                key, looked, error or "reported success but the files are still missing"
            )
    arrays = {part: read_idx(path) for part, path in files.items()}
    tensors: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise IDXFormatError(
                f"{files[f'x_{split}']}: expected uint8 images [N, H, W], got {x.dtype} {x.shape}"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise IDXFormatError(
                f"{files[f'y_{split}']}: expected {len(x)} labels, got shape {y.shape}"
            )
        if len(y) and int(y.max()) > 9:
            raise IDXFormatError(
                f"{files[f'y_{split}']}: labels must be 0..9, found {int(y.max())}"
            )
        tensors[f"x_{split}"] = torch.from_numpy(x).unsqueeze(1)
        tensors[f"y_{split}"] = torch.from_numpy(y.astype(np.int64))
    return Source(name=key, num_classes=10, **tensors)


def _torchvision_datasets() -> Any:
    """``torchvision.datasets``, imported only when a download is needed (tests replace this)."""
    import torchvision.datasets

    return torchvision.datasets


def _try_download(fetch: Callable[[Any], object]) -> str | None:
    """Run ``fetch(torchvision.datasets)``; ``None`` on success, else why it failed."""
    if os.environ.get(OFFLINE_ENV, "").strip() not in ("", "0"):
        return f"skipped ({OFFLINE_ENV} is set)"
    try:
        fetch(_torchvision_datasets())
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", reported below
        return f"torchvision download failed: {type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------------------------
# CIFAR (python batch layout)
# --------------------------------------------------------------------------------------------

_CIFAR = {
    # key: (folder, train files, test files, meta file, label key, names key, torchvision class)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
        "CIFAR10",
    ),
    "cifar100": (
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        "fine_labels",
        "fine_label_names",
        "CIFAR100",
    ),
}

# Every global a genuine CIFAR batch pickle refers to (numpy 1.x and 2.x spellings, and the
# _codecs.encode that Python 3 uses for bytes in protocol 2).
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: not part of a CIFAR batch file"
        )


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        # latin1: the batches were written by Python 2; this maps its byte strings losslessly.
        obj = _DataUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a CIFAR python batch file ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _find_cifar(key: str, root: str, looked: list[str]) -> Path | None:
    folder, train, test, meta = _CIFAR[key][:4]
    for d in (Path(root) / folder, Path(root)):
        missing = False
        for fname in (*train, *test, meta):
            looked.append(str(d / fname))
            if not (d / fname).is_file():
                missing = True
                break
        if not missing:
            return d
    return None


def _read_cifar_batches(paths: list[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for path in paths:
        batch = _read_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise ValueError(
                f"{path}: CIFAR batch lacks 'data' or '{label_key}' (keys: {sorted(batch)})"
            )
        data = np.asarray(batch["data"])
        labels = np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}"
            )
        if labels.shape != (len(data),):
            raise ValueError(f"{path}: {len(data)} images but {labels.size} labels")
        xs.append(data.reshape(-1, 3, 32, 32))  # rows are 1024 R, 1024 G, 1024 B, row-major
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _load_cifar(key: str, root: str) -> Source:
    _, train, test, meta, label_key, names_key, cls = _CIFAR[key]
    looked: list[str] = []
    folder = _find_cifar(key, root, looked)
    if folder is None:
        error = _try_download(lambda tvd: getattr(tvd, cls)(root, train=True, download=True))
        folder = _find_cifar(key, root, []) if error is None else None
        if folder is None:
            raise _not_found(
                key, looked, error or "reported success but the files are still missing"
            )
    x_train, y_train = _read_cifar_batches([folder / f for f in train], label_key)
    x_test, y_test = _read_cifar_batches([folder / f for f in test], label_key)
    names = _read_pickle(folder / meta).get(names_key)
    expected = 10 if key == "cifar10" else 100
    if not isinstance(names, list) or len(names) != expected:
        raise ValueError(f"{folder / meta}: '{names_key}' must list {expected} class names")
    return Source(key, x_train, y_train, x_test, y_test, expected, tuple(str(n) for n in names))


# --------------------------------------------------------------------------------------------
# Offline sources
# --------------------------------------------------------------------------------------------


def _load_digits() -> Source:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    images = torch.nn.functional.interpolate(
        images, size=(28, 28), mode="bilinear", align_corners=False
    )
    x = images.round().clamp_(0, 255).to(torch.uint8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    # Fixed seed 0: the test set must not move with the run seed.
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=digits.target, random_state=0
    )
    idx_train, idx_test = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_test))
    return Source(
        "digits",
        x[idx_train],
        y[idx_train],
        x[idx_test],
        y[idx_test],
        10,
        tuple(str(i) for i in range(10)),
    )


SYNTHETIC_CLASSES = 10
SYNTHETIC_TRAIN_PER_CLASS = 100
SYNTHETIC_TEST_PER_CLASS = 30


def _smooth_noise(gen: torch.Generator, n: int, grid: int) -> torch.Tensor:
    """``n`` smooth random fields ``[n, 1, 28, 28]``: Gaussian noise on a coarse grid, upsampled."""
    coarse = torch.randn(n, 1, grid, grid, generator=gen)
    return torch.nn.functional.interpolate(
        coarse, size=(28, 28), mode="bicubic", align_corners=False
    )


def _load_synthetic(seed: int) -> Source:
    gen = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    protos = _smooth_noise(gen, SYNTHETIC_CLASSES, 6)
    lo = protos.amin(dim=(1, 2, 3), keepdim=True)
    hi = protos.amax(dim=(1, 2, 3), keepdim=True)
    protos = (protos - lo) / (hi - lo)  # each prototype spans [0, 1]

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(SYNTHETIC_CLASSES).repeat_interleave(per_class)
        n = len(y)
        # Smooth per-sample deformation plus pixel noise: learnable, but not trivially so.
        x = (
            protos[y]
            + 0.15 * _smooth_noise(gen, n, 4)
            + 0.1 * torch.randn(n, 1, 28, 28, generator=gen)
        )
        order = torch.randperm(n, generator=gen)
        return (x[order].clamp(0, 1) * 255).round().to(torch.uint8), y[order]

    x_train, y_train = draw(SYNTHETIC_TRAIN_PER_CLASS)
    x_test, y_test = draw(SYNTHETIC_TEST_PER_CLASS)
    return Source("synthetic", x_train, y_train, x_test, y_test, SYNTHETIC_CLASSES)
