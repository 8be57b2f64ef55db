"""FLUX end to end through the in-process grid: clustering, routing, bad descriptors, trigger."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, RecordDict

from flux_app.common.records import record_to_arrays
from flux_app.engine.config import RunConfig
from flux_app.engine.inprocess import InProcessGrid, run_inprocess
from flux_app.engine.server import build_strategy
from flux_app.methods.flux.strategy import Flux


def _run(cfg: dict, n: int, **grid_kw):
    from client_app import app

    rc = RunConfig.from_mapping(cfg)
    strategy = build_strategy(rc)
    results = strategy.start(InProcessGrid(app, rc.to_dict(), n, **grid_kw))
    return strategy, results


@pytest.fixture
def flux_run(small_run):
    return small_run | {"strategy": "flux", "flux-cluster-round": 1, "num-server-rounds": 2}


def test_planted_px_groups_recovered_and_holdouts_routed(flux_run):
    strategy, results = _run(flux_run | {"holdout-clients": 3}, 12)
    clustering = results["clustering"]
    assert clustering["round"] == 1
    assert clustering["ari"] >= 0.9, clustering
    final = results["final"]
    assert final["routing_accuracy"] == 1.0
    assert final["accuracy_holdout"] is not None and final["accuracy_routed"] is not None
    assert 0 < final["bytes_descriptor_up"] < final["bytes_model_up"] / 100
    assert set(final["holdout_assignment"]) == {"9", "10", "11"}


def test_iid_clients_stay_one_cluster(flux_run):
    for seed in (0, 1):
        _, results = _run(flux_run | {"shift": "none", "seed": seed}, 8)
        assert results["clustering"]["num_clusters"] == 1, results["clustering"]


def _tamper(kind: str):
    def hook(reply: Message):
        if reply.metadata.message_type != "query.descriptor" or reply.has_error():
            return reply
        arrays = record_to_arrays(reply.content.array_records["descriptor"])
        if kind == "nan":
            arrays["mu"] = np.full_like(arrays["mu"], np.nan)
        elif kind == "shape":
            arrays["mu"] = np.zeros(3, dtype=np.float32)
        elif kind == "huge":
            arrays["class_mu"] = np.zeros((10_000, 10), dtype=np.float32)
        elif kind == "dtype":
            arrays["sigma"] = arrays["sigma"].astype(np.int64)
        elif kind == "missing":
            return Message(RecordDict({}), reply_to=reply)
        content = RecordDict({"descriptor": ArrayRecord.from_array_dict(_as_arrays(arrays))})
        return Message(content, reply_to=reply)

    return hook


def _as_arrays(arrays):
    from flwr.app import Array

    return {k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in arrays.items()}


@pytest.mark.parametrize("kind", ["nan", "shape", "huge", "dtype", "missing"])
def test_bad_descriptor_excludes_node_with_reason(flux_run, kind):
    strategy, results = _run(flux_run, 6, hooks={2: _tamper(kind)})
    bad = [n for n in strategy.nodes if strategy.nodes[n].partition_id == 2][0]
    assert bad in strategy.excluded
    assert "descriptor" in strategy.excluded[bad]
    assert bad not in strategy.result.labels.tolist() or len(strategy.result.labels) == 5
    assert len(strategy.result.labels) == 5  # clustered without it
    assert bad in strategy.assignment  # ...but it still trains, in some cluster
    assert results["final"]["accuracy_known"] is not None


def test_trigger_plateau_and_latest_round():
    cfg = RunConfig(strategy="flux", num_server_rounds=10).replace(flux_cluster_min_round=3)
    s = Flux(cfg)
    s.val_history = [(1, 0.2), (2, 0.5)]
    assert not s.should_cluster(3)  # gain 0.3 >= 0.06
    s.val_history.append((3, 0.52))
    assert s.should_cluster(4)  # gain 0.02 < 0.06
    s.val_history = [(1, 0.2), (2, 0.21)]
    assert not s.should_cluster(2)  # before flux-cluster-min-round
    s.val_history = [(r, 0.1 * r) for r in range(1, 8)]
    assert not s.should_cluster(7) and s.should_cluster(8)  # ceil(0.8 * 10)
    s = Flux(cfg.replace(flux_cluster_round=5))
    s.val_history = [(1, 0.2), (2, 0.2), (3, 0.2)]
    assert not s.should_cluster(4) and s.should_cluster(5)


def test_late_node_is_routed_by_descriptor(flux_run):
    strategy, _ = _run(flux_run | {"num-server-rounds": 3}, 7, late={6: 3})
    late = [n for n in strategy.nodes if strategy.nodes[n].partition_id == 6][0]
    assert late in strategy.assignment
    group = strategy.nodes[late].group
    peers = [
        strategy.assignment[n]
        for n in strategy.assignment
        if n != late and strategy.nodes[n].group == group
    ]
    assert peers and strategy.assignment[late] == max(set(peers), key=peers.count)


def test_flux_runs_through_inprocess_runner(flux_run):
    results, _ = run_inprocess(flux_run, 4)
    assert results["final"]["cluster_round"] == 1


def test_kmeans_example_subclass(flux_run):
    """The docs/EXTENDING.md example: k-means with a given K on FLUX descriptors."""
    strategy, results = _run(
        flux_run | {"strategy": "kmeans-flux", "num-clusters": 3, "holdout-clients": 2}, 11
    )
    assert results["clustering"]["num_clusters"] == 3
    assert results["clustering"]["ari"] >= 0.9
    assert results["final"]["routing_accuracy"] == 1.0
