"""A site's own data: a folder of images (or a flwr-datasets partition) on the SuperNode.

The folder layout (the contract, README "Deployment onto real sites")::

    <data-path>/
      train/<label>/<any name>.png|.jpg|.jpeg     labelled training images
      test/<label>/...                            optional; else a seeded share of train/
      unlabeled/<any name>.png|...                optional: inputs without labels
      group.txt                                   optional: ground-truth group (metrics only)

``<label>`` is a class index ``0..num-classes-1`` or a name listed in run-config ``class-names``
(which defines the index order); never the sorted local folder names, which would disagree
between two sites as soon as one lacks a class. Images are converted to the run's input shape
(``channels`` x ``image-size`` x ``image-size``). A file that cannot be read is skipped with one
log line and counted; a folder with no usable image is an error naming the path.

A partition written by ``flwr-datasets`` (Hugging Face ``save_to_disk``, columns ``image`` and
``label``) is read when the optional ``datasets`` extra is installed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flux_app.data.shifts import ClientData

logger = logging.getLogger("flwr")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
#: group of a node whose data has no known ground truth
UNKNOWN_GROUP = -1


class DataFolderError(ValueError):
    """A node's data folder is missing, empty or does not follow the layout."""


@dataclass
class FolderData:
    """What a folder gives: the client data plus its unlabeled inputs and what was skipped."""

    data: ClientData
    unlabeled: torch.Tensor
    unlabeled_names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def load_folder(
    path: str,
    *,
    channels: int,
    image_size: int,
    num_classes: int,
    class_names: Sequence[str] = (),
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FolderData:
    """Read a node's data folder (or a ``save_to_disk`` partition) into tensors.

    Parameters
    ----------
    path : str
        The node-config ``data-path``.
    channels, image_size : int
        The run's input shape: images are converted (``L`` or ``RGB``) and resized to it.
    num_classes : int
        Labels must be ``0..num_classes-1`` (or names in ``class_names``).
    class_names : sequence of str
        Run-config ``class-names``: a label folder may be one of these names.
    val_fraction, test_fraction : float
        Share of train held out as validation; share of train used as test when there is no
        ``test/`` folder (both seeded by ``seed``).

    Raises
    ------
    DataFolderError
        Missing folder, no usable image, an unknown label name.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise DataFolderError(f"data-path {path!r} is not a folder")
    if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
        os.path.join(path, "dataset_dict.json")
    ):
        return _load_saved_dataset(
            path, channels, image_size, num_classes, val_fraction, test_fraction, seed
        )
    skipped: list[str] = []
    train_x, train_y = _labelled(
        os.path.join(path, "train"), channels, image_size, num_classes, class_names, skipped
    )
    test_x, test_y = _labelled(
        os.path.join(path, "test"), channels, image_size, num_classes, class_names, skipped
    )
    unl_x, unl_names = _unlabeled(os.path.join(path, "unlabeled"), channels, image_size, skipped)
    if not len(train_y) and not len(test_y) and not len(unl_names):
        raise DataFolderError(
            f"no usable image in {path!r} (expected train/<label>/*.png|jpg|jpeg, test/<label>/... "
            f"or unlabeled/*; {len(skipped)} file(s) could not be read)"
        )
    data = _split(
        train_x, train_y, test_x, test_y, path, num_classes, val_fraction, test_fraction, seed
    )
    return FolderData(data, unl_x, unl_names, skipped)


def _split(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    path: str,
    num_classes: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> ClientData:
    """Seeded shuffle of train; a test share when there is no test set; the validation share."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7])
    order = torch.from_numpy(rng.permutation(len(train_y)))
    train_x, train_y = train_x[order], train_y[order]
    if not len(test_y) and len(train_y):  # no test/: a seeded share of train is the test set
        n_test = int(round(test_fraction * len(train_y)))
        test_x, test_y = train_x[:n_test], train_y[:n_test]
        train_x, train_y = train_x[n_test:], train_y[n_test:]
    n_val = int(round(val_fraction * len(train_y)))
    return ClientData(
        x_train=train_x[n_val:],
        y_train=train_y[n_val:],
        x_val=train_x[:n_val],
        y_val=train_y[:n_val],
        x_test=test_x,
        y_test=test_y,
        group=read_group(path),
        num_classes=num_classes,
        shift="site",
        source_name=os.path.basename(path),
    )


def read_group(path: str) -> int:
    """The ground-truth group in ``<path>/group.txt`` (metrics only), else :data:`UNKNOWN_GROUP`."""
    file = os.path.join(path, "group.txt")
    if not os.path.exists(file):
        return UNKNOWN_GROUP
    with open(file) as fh:
        text = fh.read().strip()
    if not re.fullmatch(r"\d+", text):
        raise DataFolderError(f"{file}: expected one non-negative integer, got {text[:40]!r}")
    return int(text)


def label_index(name: str, num_classes: int, class_names: Sequence[str]) -> int:
    """Class index of a label folder: a name of ``class-names``, or an index."""
    if class_names and name in class_names:
        return list(class_names).index(name)
    if re.fullmatch(r"\d+", name) and int(name) < num_classes:
        return int(name)
    known = f"one of {list(class_names)} or " if class_names else ""
    raise DataFolderError(
        f"label folder {name!r} is not a class: expected {known}an index 0..{num_classes - 1}"
    )


def read_image(path: str, channels: int, image_size: int) -> torch.Tensor:
    """One image as float32 ``[channels, image_size, image_size]`` in [0, 1] (raises on a bad file)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def _images(folder: str) -> list[str]:
    return sorted(
        f
        for f in os.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    )


def _read_many(
    folder: str, names: list[str], channels: int, size: int, skipped: list[str]
) -> tuple[list[torch.Tensor], list[str]]:
    out, kept = [], []
    for name in names:
        file = os.path.join(folder, name)
        try:
            out.append(read_image(file, channels, size))
            kept.append(name)
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, never a crash
            logger.warning("data: skipped unreadable image %s (%s)", file, err)
            skipped.append(file)
    return out, kept


def _labelled(
    folder: str,
    channels: int,
    size: int,
    num_classes: int,
    class_names: Sequence[str],
    skipped: list[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    xs: list[torch.Tensor] = []
    ys: list[int] = []
    if os.path.isdir(folder):
        for label in sorted(os.listdir(folder)):
            sub = os.path.join(folder, label)
            if not os.path.isdir(sub) or label.startswith("."):
                continue
            y = label_index(label, num_classes, class_names)
            got, _ = _read_many(sub, _images(sub), channels, size, skipped)
            xs.extend(got)
            ys.extend([y] * len(got))
    return _stack(xs, channels, size), torch.tensor(ys, dtype=torch.int64)


def _unlabeled(
    folder: str, channels: int, size: int, skipped: list[str]
) -> tuple[torch.Tensor, list[str]]:
    if not os.path.isdir(folder):
        return _stack([], channels, size), []
    got, kept = _read_many(folder, _images(folder), channels, size, skipped)
    return _stack(got, channels, size), kept


def _stack(xs: list[torch.Tensor], channels: int, size: int) -> torch.Tensor:
    return torch.stack(xs) if xs else torch.zeros(0, channels, size, size)


def _load_saved_dataset(
    path: str,
    channels: int,
    size: int,
    num_classes: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> FolderData:
    try:
        import datasets
    except ImportError:
        raise DataFolderError(
            f"{path!r} is a Hugging Face dataset (flwr-datasets partition); reading it needs the "
            "optional extra: pip install 'flux-app[datasets]'"
        ) from None
    ds = datasets.load_from_disk(path)
    parts = ds if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    xs: dict[str, list[torch.Tensor]] = {}
    ys: dict[str, list[int]] = {}
    skipped: list[str] = []
    for split, part in parts.items():
        if "image" not in part.column_names or "label" not in part.column_names:
            raise DataFolderError(f"{path!r} split {split!r}: needs columns 'image' and 'label'")
        for i, row in enumerate(part):
            try:
                img = row["image"].convert("L" if channels == 1 else "RGB").resize((size, size))
                arr = np.asarray(img, dtype=np.uint8)
                arr = arr[:, :, None] if arr.ndim == 2 else arr
                y = int(row["label"])
                if not 0 <= y < num_classes:
                    raise ValueError(f"label {y} outside 0..{num_classes - 1}")
            except Exception as err:  # noqa: BLE001
                logger.warning("data: skipped row %d of %s/%s (%s)", i, path, split, err)
                skipped.append(f"{split}[{i}]")
                continue
            xs.setdefault(split, []).append(
                torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
            )
            ys.setdefault(split, []).append(y)
    if not any(ys.values()):
        raise DataFolderError(f"no usable row in {path!r}")

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _stack(xs.get(split, []), channels, size), torch.tensor(
            ys.get(split, []), dtype=torch.int64
        )

    data = _split(
        *tensors("train"), *tensors("test"), path, num_classes, val_fraction, test_fraction, seed
    )
    return FolderData(data, _stack([], channels, size), [], skipped)


__all__ = [
    "IMAGE_EXTENSIONS",
    "UNKNOWN_GROUP",
    "DataFolderError",
    "FolderData",
    "label_index",
    "load_folder",
    "read_group",
    "read_image",
]
