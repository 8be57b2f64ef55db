"""FedDAG end to end: clustering after warm-up, the two training phases, variants, newcomers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from flux_app.common.params import clone_state
from flux_app.common.records import record_to_arrays
from flux_app.engine.config import RunConfig
from flux_app.engine.inprocess import InProcessGrid
from flux_app.engine.server import build_strategy


def _start(cfg: dict, n: int, **grid_kw):
    from client_app import app

    rc = RunConfig.from_mapping(cfg)
    strategy = build_strategy(rc)
    results = strategy.start(InProcessGrid(app, rc.to_dict(), n, **grid_kw))
    return strategy, results


def test_clusters_label_skew_groups_and_routes_newcomers(feddag_run):
    strategy, results = _start(feddag_run | {"holdout-clients": 2}, 17)
    clustering = results["clustering"]
    assert clustering["round"] == 2 and clustering["ari"] >= 0.9, clustering
    assert clustering["graph_edges"]  # dual variant: learners have sources
    final = results["final"]
    assert final["routing_accuracy"] == 1.0
    assert final["accuracy_best_over_rounds"] >= final["accuracy_known"] - 1e-12
    assert final["bytes_descriptor_up"] > 0
    assert all(any(k.startswith("secondary.") for k in m) for m in strategy.models.values())


def _two_clusters(feddag_run):
    strategy, _ = _start(feddag_run | {"shift": "concept", "num-server-rounds": 2}, 6)
    if len(strategy.models) < 2:
        pytest.skip("needs two clusters")
    return strategy


def test_primary_phase_keeps_secondary_bit_identical(feddag_run):
    s = _two_clusters(feddag_run)
    before = {z: clone_state(m) for z, m in s.models.items()}
    nodes = s.select_nodes(3)
    replies = s.collect_trained({n: s.train_content(n, 3) for n in nodes}, 3)
    s.aggregate_primary(replies, 3)
    for z, model in s.models.items():
        for k, v in model.items():
            if k.startswith("secondary."):
                assert torch.equal(v, before[z][k]), k
        assert any(
            not torch.equal(model[k], before[z][k]) for k in model if k.startswith("primary.")
        )


def test_secondary_phase_moves_only_learners_secondary_by_source_delta(feddag_run):
    s = _two_clusters(feddag_run)
    s.sources = {0: [1]}  # cluster 0 learns from cluster 1's data; cluster 1 learns from nobody
    before = {z: clone_state(m) for z, m in s.models.items()}
    captured = []
    original = s.collect_trained

    def spy(contents, server_round, sent=None):
        replies = original(contents, server_round, sent)
        captured.extend(replies)
        return replies

    s.collect_trained = spy
    nodes = s.select_nodes(3)
    s.secondary_phase(3, nodes)
    assert captured and all(r.cluster == 1 for r in captured)  # only the source's nodes train
    # Expected delta: weighted mean over source nodes of (trained secondary - cluster 0's secondary).
    keys = [k for k in before[0] if k.startswith("secondary.")]
    total = sum(r.num_examples for r in captured)
    for k in keys:
        expected = sum(
            (r.state[k].double() - before[0][k].double()) * (r.num_examples / total)
            for r in captured
        )
        got = s.models[0][k].double() - before[0][k].double()
        assert torch.allclose(got, expected, atol=1e-6), k
    for z in (0, 1):
        for k, v in s.models[z].items():
            if not k.startswith("secondary.") or z == 1:
                assert torch.equal(v, before[z][k]), (z, k)  # primary, head, non-learner: untouched


def test_variants(feddag_run):
    single, _ = _start(feddag_run | {"feddag-variant": "single"}, 6)
    assert all(not any(k.startswith("secondary.") for k in m) for m in single.models.values())
    dagger, _ = _start(feddag_run | {"feddag-variant": "dagger"}, 6)
    assert dagger.sources == {z: [z] for z in dagger.models}


def test_sketch_is_kept_on_the_node_and_malformed_reply_excludes(feddag_run):
    def bad(reply: Message):
        if reply.metadata.message_type != "query.feddag" or reply.has_error():
            return reply
        sk = record_to_arrays(reply.content.array_records["sketch"])
        sk["sketch"] = np.full_like(sk["sketch"], np.inf)
        content = RecordDict(
            {
                "sketch": ArrayRecord.from_numpy_ndarrays([sk["sketch"]]),
                "subspaces": reply.content.array_records["subspaces"],
            }
        )
        return Message(content, reply_to=reply)

    strategy, results = _start(feddag_run, 6, hooks={1: bad})
    bad_node = [n for n in strategy.nodes if strategy.nodes[n].partition_id == 1][0]
    assert "feddag" in strategy.excluded[bad_node]
    assert bad_node in strategy.assignment
    assert results["final"]["accuracy_known"] is not None


def test_needs_rounds_after_warmup(small_run):
    with pytest.raises(ValueError, match="warmup"):
        build_strategy(
            RunConfig.from_mapping(small_run | {"strategy": "feddag", "num-server-rounds": 2})
        )
