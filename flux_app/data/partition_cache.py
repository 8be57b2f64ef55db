"""A node's prepared partition on disk: a deployment message loads it in milliseconds.

Flower 1.42 starts a fresh ClientApp process for every message, and in a large simulation an
actor serves more partitions than it keeps in memory; both would rebuild the partition (load the
dataset, draw the shift, transform every image) on every message. This cache keeps the built
:class:`~flux_app.data.shifts.ClientData` as a ``torch.save`` file of tensors and plain values,
read back with ``torch.load(..., weights_only=True, mmap=True)`` (no pickle, no copy until
used).

Where: ``$FLUX_APP_PARTITION_CACHE`` (a folder; ``off`` disables the cache), by default
``~/.cache/flux-app/partitions``. Key: the SHA-256 of everything that defines a partition (the
dataset, its data root, the shift settings, the number of partitions and the partition id) plus
this module's format and the source code of ``flux_app/data`` (a change of the partitioning code
invalidates every entry). A dataset file replaced in place under the same data root is not
noticed: clear the folder then. A file that does not load or whose key differs is rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import torch

from flux_app.data.shifts import ClientData

logger = logging.getLogger("flwr")

FORMAT = 1
ENV = "FLUX_APP_PARTITION_CACHE"
DEFAULT = "~/.cache/flux-app/partitions"


def cache_folder() -> str | None:
    """The cache folder, or ``None`` when ``$FLUX_APP_PARTITION_CACHE`` is ``off``."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "false", "no"):
        return None
    return os.path.abspath(os.path.expanduser(value or DEFAULT))


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of the source of ``flux_app/data`` (what builds a partition)."""
    folder = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as fh:
                h.update(name.encode() + b"\0" + fh.read())
    return h.hexdigest()


def cache_key(definition: Mapping[str, Any]) -> str:
    """The entry's key: ``definition`` (JSON-able), the format and the data code."""
    text = json.dumps(
        {"definition": dict(definition), "format": FORMAT, "code": code_digest()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def load_or_build(definition: Mapping[str, Any], build: Callable[[], ClientData]) -> ClientData:
    """The cached partition defined by ``definition``, else ``build()`` (then cached)."""
    folder = cache_folder()
    if folder is None:
        return build()
    key = cache_key(definition)
    path = os.path.join(folder, f"{key[:40]}.pt")
    if os.path.isfile(path):
        try:
            return _read(path, key)
        except Exception as err:  # damaged, foreign or stale: rebuild it
            logger.warning("partition cache: %s unusable (%s); rebuilding", path, err)
    data = build()
    try:
        _write(folder, path, key, data)
    except OSError as err:  # a read-only home, a full disk: run without the cache
        logger.warning("partition cache: cannot write %s (%s)", path, err)
    return data


def _write(folder: str, path: str, key: str, data: ClientData) -> None:
    os.makedirs(folder, exist_ok=True)
    payload: dict[str, Any] = {"key": key, "format": FORMAT}
    for f in fields(ClientData):
        value = getattr(data, f.name)
        payload[f.name] = value.contiguous() if isinstance(value, torch.Tensor) else value
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read(path: str, key: str) -> ClientData:
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(payload, dict) or payload.get("key") != key:
        raise ValueError("key differs")
    return ClientData(**{f.name: payload[f.name] for f in fields(ClientData)})


__all__ = ["DEFAULT", "ENV", "FORMAT", "cache_folder", "cache_key", "code_digest", "load_or_build"]
