"""Hostile nodes against every strategy: does a bad reply crash the run, or reach the honest nodes?

Every case is one short in-process run (``flux_app.testing.run``: the real ClientApp and the real
strategy code) of 8 synthetic nodes, 2 of which (partitions 4 and 7) tamper with their replies of
one or more message types (``hooks={partition: hook}``). Each case is compared with two baselines
of the same strategy: the bad nodes **silent** for the tampered message types (their replies
dropped), and the bad nodes **honest**. Per case the script records

* whether the run crashed (an exception left ``strategy.start``);
* whether the honest nodes' results equal the silent baseline's bit for bit: final
  ``accuracy_by_client`` of the honest partitions and, per honest node, its cluster and the
  SHA-256 of the model it is evaluated with (``partition`` criterion: the honest nodes are
  admitted and keep the clustering of one of the baselines, for replies that are valid but
  crafted, where the bad node legitimately takes part; ``admitted`` criterion, for a node
  claiming another's identity: every honest node is still admitted, clustered and evaluated);
* whether every bad node that tampered is named in a warning of the run's log (node and reason);
* whether the results stay sane (accuracies finite and in [0, 1], train losses finite, >= 0).

Outcome: ``CRASHED``; ``POISONED`` (honest results differ from both baselines, or insane
numbers); ``rejected`` (equal to the silent baseline and the bad nodes logged); ``survived``
(equal to the silent baseline without a log line naming the node, or equal to the honest
baseline: the tampering changed nothing); ``n/a`` (the strategy never sends that message).

    python scripts/hostile_matrix.py                     # every case (resumes from --out)
    python scripts/hostile_matrix.py --strategies fedavg --kinds train/nan,info/classes
    python scripts/hostile_matrix.py --fresh             # forget earlier results
    python scripts/hostile_matrix.py --doc               # only rewrite docs/RELIABILITY.md

Results go to ``docs/benchmarks/hostile-matrix.json`` (rewritten after every case, so an
interrupted run resumes) and the matrix to the section "Bad input" of ``docs/RELIABILITY.md``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy: one BLAS thread (2 shared cores)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator, Mapping  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

OUT = os.path.join(ROOT, "docs", "benchmarks", "hostile-matrix.json")
DOC = os.path.join(ROOT, "docs", "RELIABILITY.md")
STRATEGIES = ("fedavg", "local", "oracle", "flux", "feddag", "ifca", "cfl", "pacfl", "fesem")
NODES = 8
#: partitions of the bad nodes; the honest ground-truth groups are then {0, 6}, {1, 2}, {3, 5}
BAD = (4, 7)
HONEST = tuple(p for p in range(NODES) if p not in BAD)
#: every run: 3 rounds of the synthetic px federation, discovery done once 6 nodes are known
BASE: dict[str, Any] = {
    "dataset": "synthetic",
    "shift": "px",
    "level": 2,
    "num-server-rounds": 3,
    "local-epochs": 1,
    "lr": 0.05,
    "seed": 0,
    "device": "cpu",
    "min-nodes": len(HONEST),
    "num-clusters": 3,
    "flux-cluster-round": 1,
    "feddag-warmup-rounds": 1,
    "feddag-warmup-epochs": 1,
    "cfl-min-round": 1,
}
HUGE_HEADER_BYTES = 128 * 2**30  # what the lying numpy header announces (128 GiB)
OUTCOMES = ("rejected", "survived", "POISONED", "CRASHED")


def node_id(partition: int) -> int:
    """The node id InProcessGrid gives partition ``partition``."""
    return 1000 + 7 * partition


# ============================================================================ reply changes
Change = Callable[[RecordDict, int], "RecordDict | None"]


def _copy(content: RecordDict) -> RecordDict:
    return RecordDict(dict(content.items()))


def _raw(content: RecordDict, record: str) -> dict[str, Array]:
    return dict(content.array_records[record].items())


def _with_raw(content: RecordDict, record: str, arrays: Mapping[str, Array]) -> RecordDict:
    out = _copy(content)
    out[record] = ArrayRecord.from_array_dict(dict(arrays))
    return out


def _np(a: Array) -> np.ndarray:
    return a.numpy()  # the honest reply of our own node: safe to load


def _arr(x: np.ndarray) -> Array:
    return Array.from_numpy_ndarray(np.ascontiguousarray(x))


def arrays(record: str, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Change:
    """Rewrite the numpy arrays of ArrayRecord ``record``."""

    def change(content: RecordDict, _: int) -> RecordDict:
        got = {k: _np(v) for k, v in _raw(content, record).items()}
        return _with_raw(content, record, {k: _arr(v) for k, v in fn(got).items()})

    return change


def raw(record: str, fn: Callable[[dict[str, Array]], dict[str, Array]]) -> Change:
    """Rewrite the Flower ``Array`` objects (bytes and metadata) of ArrayRecord ``record``."""
    return lambda content, _: _with_raw(content, record, fn(_raw(content, record)))


def metrics(record: str, **values: Any) -> Change:
    """Set (``None``: remove) entries of MetricRecord ``record``."""

    def change(content: RecordDict, _: int) -> RecordDict:
        got = dict(content.metric_records[record])
        for key, value in values.items():
            key = key.replace("_", "-")
            if value is None:
                got.pop(key, None)
            else:
                got[key] = value
        out = _copy(content)
        out[record] = MetricRecord(got)
        return out

    return change


def drop(record: str) -> Change:
    """Remove record ``record`` from the reply."""

    def change(content: RecordDict, _: int) -> RecordDict:
        out = _copy(content)
        del out[record]
        return out

    return change


def floats(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], dict]:
    """``fn`` on every floating array, the others unchanged."""
    return lambda d: {k: fn(v) if v.dtype.kind == "f" else v for k, v in d.items()}


def first_float(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], dict]:
    """``fn`` on the first floating array only."""

    def apply(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = next(k for k, v in d.items() if v.dtype.kind == "f")
        return {k: fn(v) if k == key else v for k, v in d.items()}

    return apply


def lying_header(a: Array) -> Array:
    """A few bytes whose numpy header announces 128 GiB; Flower's metadata left as it was."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f8", "fortran_order": False, "shape": (HUGE_HEADER_BYTES // 8,)}
    )
    return Array(
        dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=buf.getvalue() + b"\0" * 16
    )


def on_first(fn: Callable[[Array], Array]) -> Callable[[dict[str, Array]], dict[str, Array]]:
    """``fn`` on the first Array of a record."""

    def apply(d: dict[str, Array]) -> dict[str, Array]:
        first = next(iter(d))
        return {k: fn(v) if k == first else v for k, v in d.items()}

    return apply


def truncated(a: Array) -> Array:
    """The array's bytes without their last 8."""
    return Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data[:-8])


def garbage(a: Array) -> Array:
    """Random bytes of the array's length (no numpy header)."""
    data = np.random.default_rng(0).integers(0, 256, len(a.data), dtype=np.uint8).tobytes()
    return Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=data)


def foreign_stype(a: Array) -> Array:
    """The array announced as another serialisation."""
    return Array(dtype=a.dtype, shape=tuple(a.shape), stype="torch.save", data=a.data)


def impostor(content: RecordDict, pid: int) -> RecordDict:
    """Claim an honest node's partition (4 -> 5: it answers first; 7 -> 0: the honest one does)."""
    claim = {4: 5, 7: 0}.get(pid, 0)
    out = metrics("info", partition_id=claim)(content, pid)
    out["node"] = ConfigRecord({"name": str(claim)})
    return out


def silence(content: RecordDict, _: int) -> None:
    """No reply at all."""
    return None


@dataclass(frozen=True)
class Kind:
    """One way of being hostile: the message types it tampers and how (``change=None``: the
    node fails, i.e. answers with an error reply)."""

    name: str
    types: tuple[str, ...]
    #: one change for every type in ``types``, or one per message type
    change: Change | Mapping[str, Change] | None
    doc: str
    strategies: tuple[str, ...] | None = None
    #: ``exact``: honest results bit-identical; ``partition``: the honest clustering only
    criterion: str = "exact"


TRAIN, EVAL, INFO = ("train",), ("evaluate",), ("query.info",)
DESC, DAG, SUBS, SCORES = (
    ("query.descriptor",),
    ("query.feddag",),
    ("query.subspaces",),
    ("query.scores",),
)


def _train_kinds() -> list[Kind]:
    a = "arrays"
    return [
        Kind(
            "train/shape",
            TRAIN,
            arrays(a, first_float(lambda v: v.reshape(-1)[:-1])),
            "one tensor of the wrong shape",
        ),
        Kind(
            "train/missing-key",
            TRAIN,
            arrays(a, lambda d: dict(list(d.items())[:-1])),
            "a model key missing",
        ),
        Kind(
            "train/extra-key",
            TRAIN,
            arrays(a, lambda d: {**d, "evil.weight": np.zeros(3, np.float32)}),
            "an extra key",
        ),
        Kind(
            "train/int32",
            TRAIN,
            arrays(a, floats(lambda v: v.astype(np.int32))),
            "float tensors sent as int32",
        ),
        Kind(
            "train/float16",
            TRAIN,
            arrays(a, floats(lambda v: v.astype(np.float16))),
            "float tensors sent as float16",
        ),
        Kind(
            "train/complex",
            TRAIN,
            arrays(a, floats(lambda v: v.astype(np.complex64))),
            "float tensors sent as complex64",
        ),
        Kind(
            "train/nan", TRAIN, arrays(a, floats(lambda v: np.full_like(v, np.nan))), "NaN weights"
        ),
        Kind(
            "train/inf", TRAIN, arrays(a, floats(lambda v: np.full_like(v, np.inf))), "+Inf weights"
        ),
        Kind(
            "train/x1e30",
            TRAIN,
            arrays(a, floats(lambda v: (v * 1e30).astype(v.dtype))),
            "weights x1e30 (finite in float32)",
        ),
        Kind("train/truncated", TRAIN, raw(a, on_first(truncated)), "array bytes cut short"),
        Kind("train/garbage", TRAIN, raw(a, on_first(garbage)), "array bytes random"),
        Kind(
            "train/stype",
            TRAIN,
            raw(a, on_first(foreign_stype)),
            "an array in a foreign serialisation",
        ),
        Kind(
            "train/header-128GiB",
            TRAIN,
            raw(a, on_first(lying_header)),
            "144 bytes whose numpy header announces 128 GiB",
        ),
        Kind(
            "train/oversized",
            TRAIN,
            arrays(a, first_float(lambda v: np.zeros(2**24, np.float32))),
            "a 64 MiB tensor in place of a small one",
        ),
        Kind("train/n-inf", TRAIN, metrics("metrics", num_examples=math.inf), "num-examples inf"),
        Kind("train/n-1e15", TRAIN, metrics("metrics", num_examples=10**15), "num-examples 1e15"),
        Kind("train/n-0.5", TRAIN, metrics("metrics", num_examples=0.5), "num-examples 0.5"),
        Kind("train/n-neg", TRAIN, metrics("metrics", num_examples=-3), "num-examples -3"),
        Kind("train/n-zero", TRAIN, metrics("metrics", num_examples=0), "num-examples 0"),
        Kind("train/n-nan", TRAIN, metrics("metrics", num_examples=math.nan), "num-examples NaN"),
        Kind("train/n-list", TRAIN, metrics("metrics", num_examples=[10]), "num-examples a list"),
        Kind(
            "train/n-string",
            TRAIN,
            lambda c, p: _set(c, "metrics", ConfigRecord({"num-examples": "10"})),
            "num-examples a string (a ConfigRecord 'metrics')",
        ),
        Kind(
            "train/n-missing", TRAIN, metrics("metrics", num_examples=None), "num-examples missing"
        ),
        Kind("train/no-metrics", TRAIN, drop("metrics"), "MetricRecord 'metrics' missing"),
        Kind("train/no-arrays", TRAIN, drop("arrays"), "ArrayRecord 'arrays' missing"),
        Kind("train/loss-nan", TRAIN, metrics("metrics", train_loss=math.nan), "train-loss NaN"),
        Kind(
            "train/loss-list", TRAIN, metrics("metrics", train_loss=[1.0, 2.0]), "train-loss a list"
        ),
        Kind(
            "train/scaled-x-10",
            TRAIN,
            arrays(a, floats(lambda v: (v * -10).astype(v.dtype))),
            "valid but bad: weights x-10",
        ),
        Kind("train/error", TRAIN, None, "an error reply"),
        Kind("train/silent", TRAIN, silence, "no reply"),
    ]


def _set(content: RecordDict, key: str, value: Any) -> RecordDict:
    out = _copy(content)
    out[key] = value
    return out


def _eval_kinds() -> list[Kind]:
    m = "metrics"
    return [
        Kind("evaluate/acc-1e6", EVAL, metrics(m, accuracy=1e6), "accuracy 1e6"),
        Kind("evaluate/acc-neg", EVAL, metrics(m, accuracy=-1.0), "accuracy -1"),
        Kind("evaluate/acc-nan", EVAL, metrics(m, accuracy=math.nan), "accuracy NaN"),
        Kind("evaluate/acc-list", EVAL, metrics(m, accuracy=[0.5]), "accuracy a list"),
        Kind("evaluate/val-acc-1e6", EVAL, metrics(m, val_accuracy=1e6), "val-accuracy 1e6"),
        Kind("evaluate/val-acc-list", EVAL, metrics(m, val_accuracy=[0.5]), "val-accuracy a list"),
        Kind("evaluate/no-metrics", EVAL, drop(m), "MetricRecord 'metrics' missing"),
        Kind("evaluate/error", EVAL, None, "an error reply"),
        Kind("evaluate/silent", EVAL, silence, "no reply"),
    ]


def _info_kinds() -> list[Kind]:
    i = "info"
    return [
        Kind("info/classes", INFO, metrics(i, num_classes=3), "num-classes 3 (the run has 10)"),
        Kind("info/shape", INFO, metrics(i, input_shape=[3, 32, 32]), "another input shape"),
        Kind(
            "info/partition-range",
            INFO,
            metrics(i, partition_id=99),
            "partition-id outside 0..num-partitions-1",
        ),
        Kind(
            "info/duplicate-partition",
            INFO,
            impostor,
            "claims an honest node's partition id and name",
            criterion="admitted",
        ),
        Kind("info/negative-train", INFO, metrics(i, num_train=-5), "num-train -5"),
        Kind("info/no-info", INFO, drop(i), "MetricRecord 'info' missing"),
        Kind(
            "info/inflated-weight",
            (*INFO, *TRAIN),
            {
                "query.info": metrics(i, num_train=10**12),
                "train": metrics("metrics", num_examples=10**12),
            },
            "announces 1e12 train samples and claims them in every train reply",
        ),
        Kind("info/error", INFO, None, "an error reply"),
        Kind("info/silent", INFO, silence, "no reply"),
    ]


def _descriptor_kinds() -> list[Kind]:
    d, f = "descriptor", ("flux",)

    def crafted_n(arr: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(arr)
        out["n"] = np.array([2], np.int64)
        if "class_counts" in out:
            cc = np.zeros_like(out["class_counts"])
            cc[int(np.argmax(out["class_counts"]))] = 2
            out["class_counts"] = cc
        return out

    return [
        Kind(
            "descriptor/short",
            DESC,
            arrays(d, lambda a: {**a, "mu": a["mu"][:-1]}),
            "mu one entry short",
            f,
        ),
        Kind(
            "descriptor/nan",
            DESC,
            arrays(d, floats(lambda v: np.full_like(v, np.nan))),
            "NaN moments",
            f,
        ),
        Kind(
            "descriptor/inf",
            DESC,
            arrays(d, floats(lambda v: np.full_like(v, np.inf))),
            "Inf moments",
            f,
        ),
        Kind(
            "descriptor/x1e30",
            DESC,
            arrays(d, floats(lambda v: v * np.float32(1e30))),
            "moments x1e30",
            f,
        ),
        Kind(
            "descriptor/missing-key",
            DESC,
            arrays(d, lambda a: {k: v for k, v in a.items() if k != "sigma"}),
            "sigma missing",
            f,
        ),
        Kind(
            "descriptor/extra-key",
            DESC,
            arrays(d, lambda a: {**a, "evil": np.zeros(2, np.float32)}),
            "an extra key",
            f,
        ),
        Kind(
            "descriptor/float16",
            DESC,
            arrays(d, floats(lambda v: v.astype(np.float16))),
            "moments as float16",
            f,
        ),
        Kind(
            "descriptor/int",
            DESC,
            arrays(d, floats(lambda v: v.astype(np.int64))),
            "moments as int64",
            f,
        ),
        Kind(
            "descriptor/neg-sigma",
            DESC,
            arrays(d, lambda a: {**a, "sigma": -a["sigma"]}),
            "negative sigma",
            f,
        ),
        Kind(
            "descriptor/counts-mismatch",
            DESC,
            arrays(d, lambda a: {**a, "n": a["n"] + 7}),
            "n != sum(class_counts)",
            f,
        ),
        Kind(
            "descriptor/header-128GiB",
            DESC,
            raw(d, on_first(lying_header)),
            "a numpy header announcing 128 GiB",
            f,
        ),
        Kind(
            "descriptor/crafted-n2",
            DESC,
            arrays(d, crafted_n),
            "valid but crafted: claims n = 2 (huge sampling noise: the IID guard's lever)",
            f,
            criterion="partition",
        ),
        Kind("descriptor/error", DESC, None, "an error reply", f),
        Kind("descriptor/silent", DESC, silence, "no reply", f),
    ]


def _subspace_kinds(prefix: str, types: tuple[str, ...], strategy: str, record: str) -> list:
    s = (strategy,)
    return [
        Kind(
            f"{prefix}/subspace-shape",
            types,
            arrays(record, lambda a: {**a, "bases": a["bases"][:, :-1]}),
            "subspace bases of the wrong shape",
            s,
        ),
        Kind(
            f"{prefix}/subspace-nan",
            types,
            arrays(record, lambda a: {**a, "bases": np.full_like(a["bases"], np.nan)}),
            "NaN subspace bases",
            s,
        ),
        Kind(
            f"{prefix}/subspace-x1e30",
            types,
            arrays(record, lambda a: {**a, "bases": a["bases"] * np.float32(1e30)}),
            "subspace bases x1e30 (not orthonormal)",
            s,
        ),
        Kind(
            f"{prefix}/subspace-float16",
            types,
            arrays(record, lambda a: {**a, "bases": a["bases"].astype(np.float16)}),
            "subspace bases as float16",
            s,
        ),
        Kind(
            f"{prefix}/subspace-counts",
            types,
            arrays(record, lambda a: {**a, "counts": a["counts"] * 10**15}),
            "class counts x1e15",
            s,
        ),
        Kind(
            f"{prefix}/subspace-ranks",
            types,
            arrays(record, lambda a: {**a, "ranks": a["ranks"] + 100}),
            "ranks above p",
            s,
        ),
        Kind(
            f"{prefix}/subspace-header-128GiB",
            types,
            raw(record, on_first(lying_header)),
            "a numpy header announcing 128 GiB",
            s,
        ),
        Kind(f"{prefix}/no-subspaces", types, drop(record), "ArrayRecord 'subspaces' missing", s),
    ]


def _feddag_kinds() -> list[Kind]:
    f, k = ("feddag",), "sketch"
    return [
        Kind(
            "feddag/sketch-short",
            DAG,
            arrays(k, lambda a: {"sketch": a["sketch"][:-1]}),
            "sketch one entry short",
            f,
        ),
        Kind(
            "feddag/sketch-nan",
            DAG,
            arrays(k, floats(lambda v: np.full_like(v, np.nan))),
            "NaN sketch",
            f,
        ),
        Kind(
            "feddag/sketch-x1e30",
            DAG,
            arrays(k, floats(lambda v: v * np.float32(1e30))),
            "sketch x1e30",
            f,
        ),
        Kind(
            "feddag/sketch-float16",
            DAG,
            arrays(k, floats(lambda v: v.astype(np.float16))),
            "sketch as float16",
            f,
        ),
        Kind(
            "feddag/sketch-header-128GiB",
            DAG,
            raw(k, on_first(lying_header)),
            "a numpy header announcing 128 GiB",
            f,
        ),
        Kind("feddag/no-sketch", DAG, drop(k), "ArrayRecord 'sketch' missing", f),
        *_subspace_kinds("feddag", DAG, "feddag", "subspaces"),
        Kind("feddag/error", DAG, None, "an error reply", f),
        Kind("feddag/silent", DAG, silence, "no reply", f),
    ]


def _pacfl_kinds() -> list[Kind]:
    p = ("pacfl",)
    return [
        *_subspace_kinds("subspaces", SUBS, "pacfl", "subspaces"),
        Kind("subspaces/error", SUBS, None, "an error reply", p),
        Kind("subspaces/silent", SUBS, silence, "no reply", p),
    ]


def _scores_kinds() -> list[Kind]:
    s, m = ("ifca", "cfl", "fesem"), "metrics"
    return [
        Kind("scores/short", SCORES, metrics(m, losses=[0.1]), "one loss for K models", s),
        Kind("scores/nan", SCORES, metrics(m, losses=[math.nan] * 3), "NaN losses", s),
        Kind(
            "scores/negative",
            SCORES,
            metrics(m, losses=[-1e30, 1.0, 1.0]),
            "a negative loss (cross-entropy is >= 0)",
            s,
        ),
        Kind("scores/scalar", SCORES, metrics(m, losses=0.5), "losses a number", s),
        Kind("scores/no-metrics", SCORES, drop(m), "MetricRecord 'metrics' missing", s),
        Kind("scores/error", SCORES, None, "an error reply", s),
        Kind("scores/silent", SCORES, silence, "no reply", s),
    ]


KINDS: dict[str, Kind] = {
    k.name: k
    for k in [
        *_train_kinds(),
        *_eval_kinds(),
        *_info_kinds(),
        *_descriptor_kinds(),
        *_feddag_kinds(),
        *_pacfl_kinds(),
        *_scores_kinds(),
    ]
}


# ============================================================================ running a case
def hook_for(kind: Kind, partition: int, seen: set[int]) -> Callable[[Message], Message | None]:
    """InProcessGrid reply hook of one bad node; notes in ``seen`` that it tampered."""

    def hook(reply: Message) -> Message | None:
        if reply.metadata.message_type not in kind.types or reply.has_error():
            return reply
        seen.add(partition)
        if kind.change is None:
            raise RuntimeError("hostile node: simulated failure")
        change = kind.change
        if isinstance(change, Mapping):
            change = change[reply.metadata.message_type]
        content = change(reply.content, partition)
        return None if content is None else Message(content, reply_to=reply)

    return hook


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a log line that cannot be formatted is no finding
            self.lines.append(str(record.msg))


@contextmanager
def captured_warnings() -> Iterator[_Capture]:
    """The ``flwr`` logger's warnings of one run, kept instead of printed."""
    logger = logging.getLogger("flwr")
    handler = _Capture()
    saved = logger.handlers[:], logger.propagate, logger.level
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


def _digest(state: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def honest_view(results: dict[str, Any], strategy: Any) -> dict[str, Any]:
    """What must not change for the honest nodes: their final accuracy (by name, as
    results.json reports it) and, per honest node id, its cluster and its model's digest."""
    names = {str(p) for p in HONEST}
    by_client = results["final"]["accuracy_by_client"]
    nodes = {}
    for p in HONEST:
        n = node_id(p)
        cluster = strategy.assignment.get(n)
        nodes[str(p)] = {
            "known": n in strategy.nodes,
            "cluster": cluster,
            "model": _digest(strategy.model_for(n)) if cluster is not None else None,
        }
    return {
        "accuracy_by_client": {k: by_client[k] for k in sorted(by_client) if k in names},
        "nodes": nodes,
    }


def same_partition(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether the honest nodes are grouped alike in two views (cluster ids may differ)."""
    pa = [a["nodes"][str(p)]["cluster"] for p in HONEST]
    pb = [b["nodes"][str(p)]["cluster"] for p in HONEST]
    fwd: dict[Any, Any] = {}
    back: dict[Any, Any] = {}
    for x, y in zip(pa, pb, strict=True):
        if fwd.setdefault(x, y) != y or back.setdefault(y, x) != x:
            return False
    return True


def insane(results: dict[str, Any]) -> str | None:
    """The first reported number that no honest run can produce, or ``None``."""

    def bad(value: Any, low: float = 0.0, high: float | None = 1.0) -> bool:
        if value is None:
            return False
        if not isinstance(value, int | float) or not math.isfinite(value):
            return True
        return value < low or (high is not None and value > high)

    final = results["final"]
    for key in (
        "accuracy_known",
        "accuracy_best_over_rounds",
        "accuracy_routed",
        "accuracy_holdout",
    ):
        if bad(final.get(key)):
            return f"final {key} = {final.get(key)!r}"
    for name, value in final["accuracy_by_client"].items():
        if bad(value):
            return f"accuracy_by_client[{name}] = {value!r}"
    for row in results["rounds"]:
        for key in ("accuracy", "val_accuracy"):
            if bad(row.get(key)):
                return f"round {row['round']} {key} = {row.get(key)!r}"
        if bad(row.get("train_loss"), 0.0, None):
            return f"round {row['round']} train_loss = {row.get('train_loss')!r}"
    return None


def config_for(strategy: str) -> dict[str, Any]:
    """The run-config of every case of ``strategy``."""
    return BASE | {"strategy": strategy}


def run_case(strategy: str, kind: Kind | None, silent_types: tuple[str, ...] = ()) -> dict:
    """One run: ``kind`` on the bad nodes (``None`` with ``silent_types``: a silent baseline;
    neither: the honest baseline)."""
    import torch

    from flux_app.engine.inprocess import set_task_identity
    from flux_app.testing import run

    torch.set_num_threads(1)
    set_task_identity()
    if kind is None and silent_types:
        kind = Kind("baseline/silent", silent_types, silence, "baseline")
    seen: set[int] = set()
    hooks = {p: hook_for(kind, p, seen) for p in BAD} if kind is not None else {}
    out: dict[str, Any] = {"strategy": strategy, "kind": kind.name if kind else "baseline/honest"}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, captured_warnings() as logs:
        try:
            results, strat = run(config_for(strategy) | {"output-dir": tmp}, NODES, hooks=hooks)
        except Exception as err:  # noqa: BLE001 - a crash is what this case looks for
            tb = traceback.extract_tb(err.__traceback__)
            where = next(
                (
                    f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}"
                    for f in reversed(tb)
                    if f.filename.startswith(os.path.join(ROOT, "flux_app"))
                ),
                "",
            )
            out["crashed"] = f"{type(err).__name__}: {str(err)[:300]} ({where})"
            results = strat = None
    out["seconds"] = round(time.time() - t0, 2)
    out["seen"] = sorted(seen)
    if results is not None:
        out["view"] = honest_view(results, strat)
        out["insane"] = insane(results)
        out["excluded_bad"] = {
            str(p): strat.excluded[node_id(p)] for p in BAD if node_id(p) in strat.excluded
        }
    named = {}
    for p in sorted(seen):
        pattern = re.compile(rf"\b{node_id(p)}\b")
        hit = next((line for line in logs.lines if pattern.search(line)), None)
        named[str(p)] = hit[:240] if hit else None
    out["logged"] = named
    return out


def classify(case: dict, silent: dict, honest: dict, criterion: str) -> str:
    """The outcome of ``case`` against its two baselines (see the module docstring)."""
    if case.get("crashed"):
        return "CRASHED"
    if not case["seen"]:
        return "n/a"
    if case.get("insane"):
        return "POISONED"
    logged = all(case["logged"].values())
    if criterion == "admitted":  # no honest node lost: each admitted, in a cluster, evaluated
        nodes = case["view"]["nodes"].values()
        return (
            "survived"
            if all(n["known"] and n["cluster"] is not None for n in nodes)
            else ("POISONED")
        )
    if criterion == "partition":
        kept = [b["view"] for b in (silent, honest) if b.get("view") is not None]
        return "survived" if any(same_partition(case["view"], v) for v in kept) else "POISONED"
    if case["view"] == silent.get("view"):
        return "rejected" if logged else "survived"
    if case["view"] == honest.get("view"):
        return "survived"
    return "POISONED"


# ============================================================================ the matrix
def compact_view(view: Any, silent: dict, honest: dict) -> Any:
    """A case's honest view, or the name of the baseline it equals (keeps the file small)."""
    if view is not None and view == silent.get("view"):
        return "= silent baseline"
    if view is not None and view == honest.get("view"):
        return "= honest baseline"
    return view


def load(path: str) -> dict[str, Any]:
    """Earlier results (``{"cases": {...}, "baselines": {...}}``)."""
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    return {"cases": {}, "baselines": {}}


def save(path: str, data: dict[str, Any]) -> None:
    """Atomic rewrite of the results file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def applies(kind: Kind, strategy: str) -> bool:
    """Whether ``kind`` is run against ``strategy`` (its message type is the method's)."""
    return kind.strategies is None or strategy in kind.strategies


def baseline(data: dict, strategy: str, types: tuple[str, ...], path: str) -> dict:
    """The silent (``types``) or honest (``()``) baseline of ``strategy``, run once."""
    key = f"{strategy}|{','.join(types) or 'honest'}"
    if key not in data["baselines"]:
        data["baselines"][key] = run_case(strategy, None, types)
        save(path, data)
    return data["baselines"][key]


def run_matrix(strategies: list[str], kinds: list[Kind], path: str) -> dict[str, Any]:
    """Run every applicable (strategy, kind) case not yet in ``path``; returns all results."""
    data = load(path)
    data["machine"] = machine_line()
    todo = [(s, k) for k in kinds for s in strategies if applies(k, s)]
    t_start = time.time()
    for i, (s, k) in enumerate(todo):
        key = f"{s}|{k.name}"
        if key in data["cases"]:
            continue
        honest = baseline(data, s, (), path)
        silent = baseline(data, s, k.types, path)
        case = run_case(s, k)
        case["outcome"] = classify(case, silent, honest, k.criterion)
        case["criterion"] = k.criterion
        case["view"] = compact_view(case.get("view"), silent, honest)
        data["cases"][key] = case
        save(path, data)
        print(
            f"[hostile {i + 1}/{len(todo)} {time.time() - t_start:.0f}s] {s:7s} {k.name:32s} "
            f"{case['outcome']:9s} {case.get('crashed') or case.get('insane') or ''}",
            flush=True,
        )
    return data


def machine_line() -> str:
    """nproc, python, torch and flwr versions."""
    import flwr
    import torch

    return (
        f"nproc {os.cpu_count()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"flwr {flwr.__version__}, numpy {np.__version__}, {platform.machine()}"
    )


# ============================================================================ the document
BEGIN, END = "<!-- hostile-matrix:begin -->", "<!-- hostile-matrix:end -->"
SHORT = {
    "fedavg": "fedavg",
    "local": "local",
    "oracle": "oracle",
    "flux": "flux",
    "feddag": "feddag",
    "ifca": "ifca",
    "cfl": "cfl",
    "pacfl": "pacfl",
    "fesem": "fesem",
}


def markdown(data: dict[str, Any], command: str) -> str:
    """The "Bad input" matrix: kinds x strategies."""
    cases = data["cases"]
    kinds = [k for k in KINDS.values() if any(f"{s}|{k.name}" in cases for s in STRATEGIES)]
    counts = {o: 0 for o in (*OUTCOMES, "n/a")}
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {data.get('machine', '?')}  ",
        f"Setting: synthetic px level 2, {NODES} nodes, partitions {', '.join(map(str, BAD))} "
        "hostile, 3 rounds (every method's smallest schedule: FLUX clusters in round 1, FedDAG "
        "warms up 1 round, CFL may split from round 1).",
        "",
        "| kind | what the bad nodes send | " + " | ".join(SHORT[s] for s in STRATEGIES) + " |",
        "|---|---|" + "---|" * len(STRATEGIES),
    ]
    for k in kinds:
        cells = []
        for s in STRATEGIES:
            case = cases.get(f"{s}|{k.name}")
            if case is None:
                cells.append("-")  # the method never sends this message type: not run
                continue
            counts[case["outcome"]] += 1
            cells.append(case["outcome"])
        doc = k.doc + {
            "partition": " (criterion: honest clustering)",
            "admitted": " (criterion: no honest node lost)",
        }.get(k.criterion, "")
        lines.append(f"| `{k.name}` | {doc} | " + " | ".join(cells) + " |")
    total = ", ".join(f"{n} {o}" for o, n in counts.items() if n)
    runs = [*cases.values(), *data.get("baselines", {}).values()]
    seconds = sum(c.get("seconds", 0.0) for c in runs)
    lines += ["", f"Totals: {total} ({len(runs)} runs, {seconds / 60:.1f} min of runs).", ""]
    findings: dict[tuple[str, str, str], list[str]] = {}
    for key, c in sorted(cases.items()):
        if c["outcome"] in ("POISONED", "CRASHED"):
            strategy, kind = key.split("|")
            why = c.get("crashed") or c.get("insane") or "honest results differ from both baselines"
            findings.setdefault((kind, c["outcome"], why), []).append(strategy)
    if findings:
        lines.append("Cases that are not rejected or survived:")
        lines.append("")
        for (kind, outcome, why), strategies in findings.items():
            lines.append(f"* `{kind}` {outcome} ({', '.join(strategies)}): {why}")
        lines.append("")
    return "\n".join(lines)


def write_doc(data: dict[str, Any], command: str, path: str = DOC) -> None:
    """Put the matrix between the markers of the section "Bad input" (created if absent)."""
    block = f"{BEGIN}\n{markdown(data, command)}\n{END}"
    text = ""
    if os.path.exists(path):
        with open(path) as fh:
            text = fh.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        if not text:
            text = "# Reliability\n"
        text = text.rstrip("\n") + "\n\n## Bad input\n\n" + block + "\n"
    with open(path, "w") as fh:
        fh.write(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--kinds", default="", help="comma-separated kind names or prefixes")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--fresh", action="store_true", help="forget the results in --out")
    ap.add_argument("--doc", action="store_true", help="only rewrite the document")
    ap.add_argument("--no-doc", action="store_true", help="do not touch the document")
    args = ap.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]
    wanted = [w for w in args.kinds.split(",") if w]
    kinds = [
        k
        for k in KINDS.values()
        if not wanted or any(k.name == w or k.name.startswith(w.rstrip("/") + "/") for w in wanted)
    ]
    if args.fresh and os.path.exists(args.out):
        os.remove(args.out)
    if args.doc:
        data = load(args.out)
    else:
        data = run_matrix(strategies, kinds, args.out)
        python = os.path.relpath(sys.executable, ROOT) if sys.executable else "python"
        data["command"] = " ".join([python, "scripts/hostile_matrix.py", *sys.argv[1:]])
        save(args.out, data)
    if not args.no_doc:
        write_doc(data, data.get("command", "python scripts/hostile_matrix.py"))
    outcomes = [c["outcome"] for c in data["cases"].values()]
    print("[hostile] " + ", ".join(f"{o}: {outcomes.count(o)}" for o in (*OUTCOMES, "n/a")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
