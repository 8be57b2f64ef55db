"""Moving models and arrays through Flower records, and checking what clients send back.

Everything a client sends is untrusted: arrays are read without pickle, and only after their
numpy header has been checked against the bytes that arrived (:func:`array_to_numpy`: a few bytes
whose header announces 128 GiB are refused before anything is allocated); every model update is
checked against the model that was sent (same keys, shapes, dtypes, finite, of a plausible
magnitude) before it is averaged. State dicts on the server are plain CPU tensors.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

#: the largest array a record may carry (bytes): far above any model or descriptor of this app
#: (ResNet-9's largest tensor is ~9 MiB), and above Flower's former 512 MiB message limit
MAX_ARRAY_BYTES = 2**31
#: a trained float tensor may not exceed this many times ``max(1, max |sent tensor|)``: one round
#: of SGD does not multiply a model's scale by a million (and such values overflow float32 once
#: squared or summed)
MAX_WEIGHT_GROWTH = 1e6
#: numpy dtype kinds an array may have: bool, signed / unsigned integers, floats, complex
_NUMERIC_KINDS = "biufc"
#: the serialisation every Array of this app uses (``flwr.common.constant.SType.NUMPY``)
_NUMPY_STYPE = "numpy.ndarray"


class ReplyError(ValueError):
    """A client's reply is malformed; the node is skipped for this step with this reason."""


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """State dict -> ArrayRecord (copies to CPU numpy)."""
    return ArrayRecord.from_torch_state_dict(dict(state))


def array_header(array: Array) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of an untrusted Array, read from its numpy header without loading it.

    Raises
    ------
    ReplyError
        Not numpy-serialised, an unreadable or non-1.0/2.0 header, a non-numeric dtype (objects,
        strings, structured), Flower's metadata (``shape``, ``dtype``) disagreeing with the
        header, more than :data:`MAX_ARRAY_BYTES`, or data bytes that are not exactly what the
        header announces.
    """
    if array.stype != _NUMPY_STYPE:
        raise ReplyError(f"array serialised as {array.stype!r}, not {_NUMPY_STYPE!r}")
    data = array.data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ReplyError(f"array data is a {type(data).__name__}, not bytes")
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ReplyError(f"numpy format version {version} not accepted")
    except ReplyError:
        raise
    except Exception as err:  # numpy raises ValueError, SyntaxError, ... for a bad header
        raise ReplyError(f"unreadable array header: {type(err).__name__}: {err}") from None
    del fortran
    if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
        raise ReplyError(f"array dtype {dtype} is not numeric")
    shape = tuple(int(d) for d in shape)
    if tuple(array.shape) != shape or str(array.dtype) != str(dtype):
        raise ReplyError(
            f"array metadata {tuple(array.shape)} {array.dtype} disagrees with its header "
            f"{shape} {dtype}"
        )
    nbytes = dtype.itemsize
    for d in shape:  # Python integers: no overflow, whatever the header says
        nbytes *= d
    if nbytes > MAX_ARRAY_BYTES:
        raise ReplyError(f"array of {nbytes} bytes exceeds {MAX_ARRAY_BYTES}")
    if len(data) - fp.tell() != nbytes:
        raise ReplyError(
            f"array data is {len(data) - fp.tell()} bytes, its header announces {nbytes}"
        )
    return shape, dtype


def array_to_numpy(array: Array) -> np.ndarray:
    """An untrusted Array as a numpy array, its header checked first (:func:`array_header`)."""
    array_header(array)
    try:
        return array.numpy()
    except Exception as err:  # the header was fine, the payload still could not be read
        raise ReplyError(f"unreadable array: {type(err).__name__}: {err}") from None


def from_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """ArrayRecord -> state dict of CPU tensors (writable copies); every array's header is
    checked before it is loaded (:func:`array_to_numpy`)."""
    for a in record.values():  # every header first: nothing is loaded from a bad record
        array_header(a)
    return OrderedDict(
        (k, torch.from_numpy(np.array(array_to_numpy(a), copy=True))) for k, a in record.items()
    )


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays -> ArrayRecord (descriptors, sketches, subspaces)."""
    return ArrayRecord.from_array_dict({k: _array(v) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> named numpy arrays; every header is checked before anything is loaded
    (:func:`array_to_numpy`)."""
    for a in record.values():
        array_header(a)
    return {k: array_to_numpy(a) for k, a in record.items()}


def _array(value: np.ndarray) -> Array:
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


def metric_number(
    content: RecordDict,
    record: str,
    key: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    required: bool = True,
) -> float | None:
    """A finite number in ``[low, high]`` from a MetricRecord of a reply, or :class:`ReplyError`.

    Parameters
    ----------
    content : RecordDict
        The reply.
    record, key : str
        Which MetricRecord and which entry.
    low, high : float
        The accepted range (inclusive).
    required : bool
        Whether a missing entry is an error; when not, a missing entry gives ``None``.

    Returns
    -------
    float or None
        The value, or ``None`` when it is absent and not ``required``.
    """
    metrics = content.metric_records.get(record)
    if metrics is None or key not in metrics:
        if required:
            raise ReplyError(f"reply has no metric {record}/{key}")
        return None
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyError(f"{record}/{key} is a {type(value).__name__}, not a number")
    if not math.isfinite(value) or not low <= value <= high:
        raise ReplyError(f"{record}/{key} = {value!r} outside [{low:g}, {high:g}]")
    return float(value)


def check_state(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`ReplyError` unless ``state`` matches ``reference`` key by key, is finite and
    no float tensor exceeds :data:`MAX_WEIGHT_GROWTH` times ``max(1, max |reference tensor|)``."""
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
        if got.is_floating_point() and got.numel():
            if not bool(torch.isfinite(got).all()):
                raise ReplyError(f"{key}: non-finite values")
            bound = MAX_WEIGHT_GROWTH * max(1.0, float(ref.abs().max()))
            if float(got.abs().max()) > bound:
                raise ReplyError(f"{key}: |value| up to {float(got.abs().max()):.3g} > {bound:.3g}")
