"""Hostile nodes (issue #13): malformed, absurd or crafted replies never crash a run or reach the
honest nodes' results; FLUX's clustering cannot be merged by one crafted descriptor.

The full matrix (every kind against every strategy) is ``scripts/hostile_matrix.py``; this file
runs its machinery on a cheap, representative subset, plus unit checks of the defences.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from sklearn.metrics import adjusted_rand_score

from flux_app.common.records import (
    MAX_WEIGHT_GROWTH,
    ReplyError,
    array_header,
    arrays_to_record,
    check_state,
    from_record,
    metric_number,
    record_to_arrays,
    to_record,
)
from flux_app.engine.routing import read_losses
from flux_app.methods.flux import clustering
from flux_app.methods.flux.descriptors import FluxDescriptor, MomentAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location(
        "flux_hostile_matrix", os.path.join(ROOT, "scripts", "hostile_matrix.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


hm = _script()


# ------------------------------------------------------------------------------ arrays
def _array(dtype: str, shape: tuple[int, ...], data: bytes, stype: str = "numpy.ndarray") -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def _rec(**arrays: Array) -> ArrayRecord:
    return ArrayRecord.from_array_dict(arrays)


def _header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def test_honest_arrays_load_bit_for_bit():
    state = {
        "w": torch.randn(3, 4),
        "n": torch.tensor(7),
        "empty": torch.zeros(0, 2),
        "mask": torch.tensor([True, False]),
        "t": torch.randn(2, 3).t(),  # non-contiguous
    }
    back = from_record(to_record(state))
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    arrays = {"f": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "i": np.arange(4)}
    got = record_to_arrays(arrays_to_record(arrays))
    assert all(np.array_equal(got[k], v) and got[k].dtype == v.dtype for k, v in arrays.items())


def test_a_lying_header_is_refused_before_anything_is_allocated():
    # metadata and header agree on 1 GiB (under the size cap): only the length check stops it
    shape = (2**27,)
    lie = _array("float64", shape, _header(shape) + b"\0" * 16)
    tracemalloc.start()
    try:
        with pytest.raises(ReplyError, match="header announces"):
            record_to_arrays(_rec(x=lie))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # nothing near the announced size was allocated
    huge = (hm.HUGE_HEADER_BYTES // 8,)  # 128 GiB, metadata agreeing
    big = _array("float64", huge, _header(huge))
    with pytest.raises(ReplyError, match="exceeds"):
        array_header(big)
    honest_meta = _array("float32", (3,), _header(huge))
    with pytest.raises(ReplyError, match="disagrees"):
        array_header(honest_meta)


@pytest.mark.parametrize(
    "array, why",
    [
        (_array("float32", (2,), b"x", stype="torch"), "serialised"),
        (_array("float32", (2,), b"garbage!" * 8), "header"),
        (_array("object", (2,), _header((2,), "|O")), "numeric"),
        (_array("<U3", (2,), _header((2,), "<U3") + b"\0" * 24), "numeric"),
        (_array("float64", (2,), _header((2,)) + b"\0" * 8), "announces"),  # 8 of 16 bytes
    ],
)
def test_malformed_arrays_are_reply_errors(array, why):
    with pytest.raises(ReplyError, match=why):
        record_to_arrays(_rec(x=array))


def test_finite_but_absurd_weights_are_rejected_and_honest_growth_is_not():
    ref = {"w": torch.full((4,), 0.5), "b": torch.zeros(2), "n": torch.tensor(3)}
    grown = {"w": torch.full((4,), 900.0), "b": torch.full((2,), 100.0), "n": torch.tensor(4)}
    check_state(ref, grown)  # 1800x in one round: implausible but not absurd; accepted
    absurd = dict(grown, w=torch.full((4,), 0.5 * 1e30))
    with pytest.raises(ReplyError, match="|value|"):
        check_state(ref, absurd)
    at_bound = dict(grown, b=torch.full((2,), MAX_WEIGHT_GROWTH))  # max(1, 0) * bound
    check_state(ref, at_bound)
    with pytest.raises(ReplyError):
        check_state(ref, dict(grown, b=torch.full((2,), MAX_WEIGHT_GROWTH * 1.01)))


def test_scores_with_a_negative_or_malformed_loss_are_rejected():
    def reply(losses) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({"losses": losses})})

    assert read_losses(reply([0.0, 2.5, 1.0]), 3).tolist() == [0.0, 2.5, 1.0]
    for bad in ([-1e30, 1.0, 1.0], [1.0, float("nan"), 1.0], [1.0], 0.5):
        with pytest.raises(ReplyError):
            read_losses(reply(bad), 3)


def test_metric_number_accepts_only_finite_numbers_in_range():
    reply = RecordDict(
        {
            "metrics": MetricRecord(
                {"acc": 0.25, "n": 3, "big": 1e6, "nan": float("nan"), "l": [1.0]}
            )
        }
    )
    assert metric_number(reply, "metrics", "acc", low=0.0, high=1.0) == 0.25
    assert metric_number(reply, "metrics", "n") == 3.0
    assert metric_number(reply, "metrics", "gone", required=False) is None
    for key, high in (("big", 1.0), ("nan", 1.0), ("l", 1.0), ("gone", 1.0)):
        with pytest.raises(ReplyError):
            metric_number(reply, "metrics", key, low=0.0, high=high)
    with pytest.raises(ReplyError):
        metric_number(RecordDict(), "metrics", "acc")


# ------------------------------------------------------------------------------ FLUX crafted
K = C = 10


def _client(rng, world, n, shift) -> FluxDescriptor:
    cm, cs = world
    y = rng.integers(0, C, size=n)
    z = cm[y] + cs[y] * rng.normal(size=(n, K)) + shift
    acc = MomentAccumulator(C, K)
    acc.update(torch.from_numpy(z), torch.from_numpy(y))
    return acc.finalize()


def _two_groups(seed: int, per_group: int = 5):
    rng = np.random.default_rng(seed)
    world = rng.normal(size=(C, K)), rng.uniform(0.5, 1.5, size=(C, K))
    shifts = rng.normal(size=(2, K)) * 0.5
    ds = [
        _client(rng, world, int(rng.integers(100, 2001)), shifts[g])
        for g in (0, 1)
        for _ in range(per_group)
    ]
    return ds, np.repeat([0, 1], per_group)


def _mean_of(ds: list[FluxDescriptor], n: int) -> FluxDescriptor:
    """The average of ``ds``' moments, claiming ``n`` samples (all in class 0)."""
    counts = np.zeros(C, dtype=np.int64)
    counts[0] = n
    avg = lambda attr: np.mean([getattr(d, attr) for d in ds], axis=0)  # noqa: E731
    return FluxDescriptor(avg("mu"), avg("sigma"), n, avg("class_mu"), avg("class_sigma"), counts)


def _crafted(ds, groups, how: str) -> FluxDescriptor:
    a = [d for d, g in zip(ds, groups, strict=True) if g == 0]
    if how == "midpoint":  # the mean of both groups, an honest-looking sample size
        return _mean_of(ds, int(np.median([d.n for d in ds])))
    if how == "midpoint-n2":  # ... claiming 2 samples: a huge sampling noise
        return _mean_of(ds, 2)
    # on group A's centroid, 2 samples and sigma x 1000: inflates A's null variance
    d = _mean_of(a, 2)
    return FluxDescriptor(d.mu, d.sigma * 1e3, 2, d.class_mu, d.class_sigma * 1e3, d.class_counts)


@pytest.mark.parametrize("how", ["midpoint", "midpoint-n2", "noisy-in-A"])
def test_one_crafted_descriptor_cannot_merge_two_groups(how):
    for seed in range(6):
        ds, groups = _two_groups(seed)
        assert adjusted_rand_score(groups, clustering.cluster_descriptors(ds).labels) == 1.0
        got = clustering.cluster_descriptors([*ds, _crafted(ds, groups, how)])
        assert got.num_clusters >= 2
        assert adjusted_rand_score(groups, got.labels[: len(ds)]) == 1.0, (how, seed)


def test_without_the_noise_weights_a_crafted_descriptor_merges_the_groups(monkeypatch):
    """The defence is what holds: with the cap off, claiming 2 samples merges the groups."""
    monkeypatch.setattr(clustering, "NOISE_WEIGHT_CAP", float("inf"))
    merged = 0
    for seed in range(6):
        ds, groups = _two_groups(seed)
        got = clustering.cluster_descriptors([*ds, _crafted(ds, groups, "midpoint-n2")])
        merged += adjusted_rand_score(groups, got.labels[: len(ds)]) < 1.0
    assert merged >= 3


def test_noise_weights_leave_honest_federations_unweighted():
    ds, _ = _two_groups(0)
    st = clustering._stack(ds)
    nz = clustering.BlockNormaliser._fit_stack(st, scale=True, noise_floor=3.0)
    assert clustering._guard_weights(clustering._noise_var_stack(st, nz)) is None
    crafted = [*ds, _mean_of(ds, 2)]
    st = clustering._stack(crafted)
    w = clustering._guard_weights(clustering._noise_var_stack(st, nz))
    assert w is not None and np.all(w[:-1] == 1.0) and 0 < w[-1] < 0.2


# ------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def matrix():
    """Cases through the real ClientApp; baselines computed once per module."""
    before = torch.get_num_threads()
    saved = dict(hm.BASE)
    hm.BASE["num-server-rounds"] = 2  # the smallest schedule every method accepts
    cache: dict = {"cases": {}, "baselines": {}}

    def case(strategy: str, name: str) -> dict:
        kind = hm.KINDS[name]
        key = f"{strategy}|{','.join(kind.types)}"
        if f"{strategy}|honest" not in cache["baselines"]:
            cache["baselines"][f"{strategy}|honest"] = hm.run_case(strategy, None)
        if key not in cache["baselines"]:
            cache["baselines"][key] = hm.run_case(strategy, None, kind.types)
        got = hm.run_case(strategy, kind)
        got["outcome"] = hm.classify(
            got, cache["baselines"][key], cache["baselines"][f"{strategy}|honest"], kind.criterion
        )
        return got

    yield case
    hm.BASE.clear()
    hm.BASE.update(saved)
    torch.set_num_threads(before)


CASES = [
    ("fedavg", "train/shape", "rejected"),
    ("fedavg", "train/float16", "rejected"),
    ("fedavg", "train/nan", "rejected"),
    ("fedavg", "train/x1e30", "rejected"),
    ("fedavg", "train/header-128GiB", "rejected"),
    ("fedavg", "train/garbage", "rejected"),
    ("fedavg", "train/n-inf", "rejected"),
    ("fedavg", "train/n-list", "rejected"),
    ("fedavg", "train/no-metrics", "rejected"),
    ("fedavg", "train/error", "rejected"),
    ("fedavg", "train/loss-list", "rejected"),
    ("fedavg", "train/scaled-x-10", "rejected"),
    ("flux", "train/scaled-x-10", "rejected"),
    ("fedavg", "evaluate/acc-nan", "rejected"),
    ("fedavg", "evaluate/val-acc-1e6", "rejected"),
    ("fedavg", "info/classes", "rejected"),
    ("fedavg", "info/partition-range", "rejected"),
    ("fedavg", "info/inflated-weight", "rejected"),
    ("fedavg", "info/duplicate-partition", "survived"),
    ("ifca", "scores/negative", "rejected"),
    ("flux", "descriptor/nan", "rejected"),
    ("flux", "descriptor/header-128GiB", "rejected"),
    ("flux", "descriptor/crafted-n2", "survived"),
    ("feddag", "feddag/sketch-nan", "rejected"),
    ("feddag", "feddag/subspace-shape", "rejected"),
]


@pytest.mark.parametrize("strategy, kind, want", CASES)
def test_hostile_nodes(matrix, strategy, kind, want):
    got = matrix(strategy, kind)
    assert got["seen"] == list(hm.BAD)  # both bad nodes did tamper
    assert got["outcome"] == want, got
    if want == "rejected":  # each bad node named in a warning with the reason
        assert all(got["logged"].values()), got["logged"]


# ------------------------------------------------------------------------------ outlier screens
def _screened(lengths_by_cluster, ratio=10.0, model_ratio=0.0, start=(1.0, 1.0)):
    """Node ids kept by ``screen_replies`` for updates of the given lengths, per cluster (every
    cluster model ``start``, each update ``(length, 0)``)."""
    from flux_app.engine.screening import screen_replies
    from flux_app.engine.server import build_strategy
    from flux_app.engine.strategy import Reply
    from flux_app.testing import config, tiny_state

    strategy = build_strategy(
        config(
            {
                "strategy": "fedavg",
                "max-update-norm-ratio": ratio,
                "max-model-norm-ratio": model_ratio,
            }
        )
    )
    replies, node = [], 0
    for cluster, lengths in lengths_by_cluster.items():
        strategy.models[cluster] = tiny_state(*start)
        for length in lengths:
            trained = tiny_state(start[0] + length, start[1])
            replies.append(Reply(node, RecordDict(), cluster, trained, 10))
            node += 1
    return [r.node_id for r in screen_replies(strategy, replies, {})]


def test_a_model_far_longer_than_its_clusters_others_is_rejected(caplog):
    # updates alike in length (update bound off), one model scaled: (10, 1) against ~(1, 1)
    start = (0.0, 1.0)
    with caplog.at_level("WARNING", logger="flwr"):
        kept = _screened({0: [1.0, 1.1, 0.9, -10.0]}, ratio=0.0, model_ratio=2.0, start=start)
    assert kept == [0, 1, 2]
    assert "node 3: invalid train reply rejected: model length 10" in caplog.text
    assert _screened({0: [1.0, 1.1, 0.9, -10.0]}, ratio=0.0, model_ratio=8.0, start=start) == [
        0,
        1,
        2,
        3,
    ]


def test_an_update_far_longer_than_its_clusters_others_is_rejected(caplog):
    with caplog.at_level("WARNING", logger="flwr"):
        kept = _screened({0: [1.0, 1.2, 0.9, -11.0], 1: [0.01, 0.012]})
    assert kept == [0, 1, 2, 4, 5]  # -11 is 11 x the others' lower median (0.9 < 1.0)
    assert "node 3: invalid train reply rejected: update length 11" in caplog.text
    # at 12 x the bound it passes; a lone reply has nothing to be compared with: kept
    assert _screened({0: [1.0, 1.2, 0.9, -11.0]}, ratio=12.0) == [0, 1, 2, 3]
    assert _screened({0: [1.0], 1: [500.0]}) == [0, 1]
    assert _screened({0: [1.0, 1.2, 0.9, -11.0]}, ratio=0.0) == [0, 1, 2, 3]  # 0 = off


def test_of_two_replies_the_outlier_is_the_one_rejected():
    # the lower median of the others is the other one itself: the short one stays
    assert _screened({0: [0.5, 20.0]}) == [0]
    assert _screened({0: [20.0, 0.5]}) == [1]
    # clusters are compared only within: a long update in another cluster is no outlier
    assert _screened({0: [0.5, 0.6], 1: [40.0, 41.0]}) == [0, 1, 2, 3]


def test_a_node_announcing_an_absurd_train_size_is_refused():
    from flux_app.engine.nodes import NodeBook, NodeInfo

    def book(sizes, ratio=1000.0):
        b = NodeBook(max_train_size_ratio=ratio)
        for i, n in enumerate(sizes):
            b.info[i] = NodeInfo(i, i, len(sizes), n, 0, 0, 10, (1, 8, 8), 0)
        return b

    b = book([50, 60, 10**12, 70])
    assert b.refuse_outsized(list(b.info)) == [2]
    assert sorted(b.info) == [0, 1, 3] and "announced train size 1000000000000" in b.excluded[2]
    # honest size differences well within the bound, and the bound off, refuse nobody
    for sizes, ratio in (([50, 60, 40000, 70], 1000.0), ([50, 10**12], 0.0)):
        b = book(sizes, ratio)
        assert b.refuse_outsized(list(b.info)) == []
    # two nodes, one lying: the lower median keeps the honest one
    b = book([50, 10**12])
    assert b.refuse_outsized(list(b.info)) == [1]
