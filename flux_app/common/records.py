"""Moving models and arrays through Flower records, and checking what clients send back.

Everything a client sends is untrusted: arrays are read by Flower without pickle, and every
model update is checked against the model that was sent (same keys, shapes, dtypes, finite)
before it is averaged. State dicts on the server are plain CPU tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict


class ReplyError(ValueError):
    """A client's reply is malformed; the node is skipped for this step with this reason."""


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """State dict -> ArrayRecord (copies to CPU numpy)."""
    return ArrayRecord.from_torch_state_dict(dict(state))


def from_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """ArrayRecord -> state dict of CPU tensors (writable copies)."""
    return OrderedDict(
        (k, torch.from_numpy(np.array(a.numpy(), copy=True))) for k, a in record.items()
    )


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays -> ArrayRecord (descriptors, sketches, subspaces)."""
    return ArrayRecord.from_array_dict({k: _array(v) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> named numpy arrays."""
    return {k: a.numpy() for k, a in record.items()}


def _array(value: np.ndarray):  # noqa: ANN202 - flwr.app.Array
    from flwr.app import Array

    return Array.from_numpy_ndarray(np.ascontiguousarray(value))


def get_array_record(content: RecordDict, key: str) -> ArrayRecord:
    """The ArrayRecord ``key`` of a reply, or :class:`ReplyError`."""
    if key not in content.array_records:
        raise ReplyError(f"reply has no ArrayRecord {key!r} (has {sorted(content.keys())})")
    return content.array_records[key]


def get_metric(content: RecordDict, record: str, key: str) -> float | int | list:
    """One value from a MetricRecord of a reply, or :class:`ReplyError`."""
    if record not in content.metric_records or key not in content.metric_records[record]:
        raise ReplyError(f"reply has no metric {record}/{key}")
    return content.metric_records[record][key]


def check_state(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`ReplyError` unless ``state`` matches ``reference`` key by key and is finite."""
    if list(state.keys()) != list(reference.keys()):
        missing = set(reference) - set(state)
        extra = set(state) - set(reference)
        raise ReplyError(
            f"model keys differ (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
        )
    for key, ref in reference.items():
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise ReplyError(f"{key}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise ReplyError(f"{key}: dtype {got.dtype} != {ref.dtype}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise ReplyError(f"{key}: non-finite values")
