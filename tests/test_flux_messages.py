"""FLUX asks each node once where one message carries what two did: the clustering round's
training and validation descriptors (``with-val``) and the closing test phase's routes (label-free,
``routing-labels`` and the first k of the sweep). Same results as the separate messages."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from flux_app.common.records import record_to_arrays
from flux_app.engine.strategy import ClusteredStrategy
from flux_app.methods.flux import fitting, routing
from flux_app.methods.flux import strategy as flux_strategy

DESCRIPTOR = "query.descriptor"
#: what the merge may change: the bytes sent, the time taken, the releases counted
VOLATILE = ("bytes_descriptor_up", "bytes_model_up", "bytes_model_down", "wall_seconds")


@pytest.fixture
def flux_sweep(small_run):
    return small_run | {
        "strategy": "flux",
        "flux-cluster-round": 1,
        "num-server-rounds": 2,
        "holdout-clients": 2,
        "flux-routing-labels-sweep": "2,5",
    }


def _spy(monkeypatch) -> list[tuple[str, int, list[int]]]:
    calls: list[tuple[str, int, list[int]]] = []
    collect = ClusteredStrategy.collect

    def spy(self, message_type, contents, server_round, parse, **kw):
        calls.append((message_type, server_round, sorted(contents)))
        return collect(self, message_type, contents, server_round, parse, **kw)

    monkeypatch.setattr(ClusteredStrategy, "collect", spy)
    return calls


def _separate_messages(monkeypatch) -> None:
    """The behaviour before the merge: validation descriptors and each route asked apart."""

    def train_only(s, node_ids, server_round):
        descs = s.collect_descriptors(node_ids, server_round, label_free=False, split="train")
        return descs, None  # fit_nodes then asks for the validation split itself

    monkeypatch.setattr(flux_strategy, "collect_with_checks", train_only)
    monkeypatch.setattr(routing, "end_replies", lambda *a: None)


def _comparable(results: dict) -> dict:
    final = {k: v for k, v in results["final"].items() if k not in VOLATILE}
    return {"final": final, "clustering": results["clustering"]}


def test_one_message_per_node_and_the_same_results(flux_sweep, monkeypatch):
    from flux_app.testing import run

    calls = _spy(monkeypatch)
    merged, strategy = run(flux_sweep, 8)
    merged_traffic = strategy.traffic[DESCRIPTOR]
    trainers = sorted(strategy.training_nodes())
    holdouts = sorted(strategy.holdout_nodes())
    clustering = [c for c in calls if c[0] == DESCRIPTOR and c[1] == 1]
    assert [c[2] for c in clustering] == [trainers]  # train + val in one message
    assert any("validation descriptors" in note for note in merged["clustering"]["notes"])
    end = [c for c in calls if c[0] == DESCRIPTOR and c[1] == 3]
    # holdouts k=0, trainers k=0 and the sweep's k=2 from one message; k=5 asks again
    assert [c[2] for c in end] == [sorted(trainers + holdouts)] * 2
    assert set(merged["final"]) >= {"accuracy_routed_k2", "accuracy_holdout_k5"}

    calls.clear()
    _separate_messages(monkeypatch)
    separate, apart = run(flux_sweep, 8)
    assert len([c for c in calls if c[0] == DESCRIPTOR and c[1] == 1]) == 2
    assert len([c for c in calls if c[0] == DESCRIPTOR and c[1] == 3]) == 4
    assert _comparable(merged) == _comparable(separate)
    # the same descriptors up (less per-message framing), the extractor sent down half as often
    assert merged_traffic["up"] < apart.traffic[DESCRIPTOR]["up"]
    # extractors sent: 6 + 8 + 8 merged against 6 + 6 (val) + 2 + 6 + 8 + 8 apart
    ratio = merged_traffic["down"] / apart.traffic[DESCRIPTOR]["down"]
    assert ratio == pytest.approx(22 / 36, rel=0.01)
    assert merged["final"]["bytes_descriptor_up"] == merged_traffic["up"]


def test_routing_labels_take_the_first_message(flux_sweep, monkeypatch):
    from flux_app.testing import run

    cfg = flux_sweep | {"routing-labels": 5, "flux-routing-labels-sweep": "0,5,2"}
    calls = _spy(monkeypatch)
    merged, strategy = run(cfg, 8)
    end = [c for c in calls if c[0] == DESCRIPTOR and c[1] == 3]
    assert len(end) == 2  # k = 5 (routing-labels, and 0 and 5 of the sweep), then k = 2
    assert strategy.end_routing is not None and strategy.end_routing.labels == 5
    _separate_messages(monkeypatch)
    separate, _ = run(cfg, 8)
    assert _comparable(merged) == _comparable(separate)


def _bad_validation_part(reply: Message) -> Message:
    if reply.metadata.message_type != DESCRIPTOR or reply.has_error():
        return reply
    if "descriptor-val" not in reply.content.array_records:
        return reply
    from flwr.app import Array

    arrays = record_to_arrays(reply.content.array_records["descriptor-val"])
    arrays["mu"] = np.full_like(arrays["mu"], np.nan)
    content = RecordDict(
        {
            "descriptor": reply.content.array_records["descriptor"],
            "descriptor-val": ArrayRecord.from_array_dict(
                {k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in arrays.items()}
            ),
        }
    )
    return Message(content, reply_to=reply)


def test_an_invalid_validation_part_loses_the_noise_check_not_the_node(flux_sweep, monkeypatch):
    from client_app import app
    from flux_app.engine.config import RunConfig
    from flux_app.engine.inprocess import InProcessGrid
    from flux_app.engine.server import build_strategy

    checks: list = []
    fit = fitting.fit_nodes

    def spy_fit(s, ids, descs, server_round, checks_in=None):
        checks.append(dict(checks_in or {}))
        return fit(s, ids, descs, server_round, checks_in)

    monkeypatch.setattr(flux_strategy, "fit_nodes", spy_fit)
    rc = RunConfig.from_mapping(flux_sweep)
    s = build_strategy(rc)
    s.start(InProcessGrid(app, rc.to_dict(), 6, hooks={1: _bad_validation_part}))
    bad = next(n for n in s.nodes if s.nodes[n].partition_id == 1)
    assert bad not in s.excluded
    assert bad in s.assignment and len(s.result.labels) == len(s.training_nodes())
    assert bad not in checks[0] and len(checks[0]) == len(s.training_nodes()) - 1


def test_with_val_only_on_a_full_training_descriptor():
    from flux_app.methods.flux.client import handle_descriptor

    for conf in ({"split": "test", "with-val": True}, {"label-free": True, "with-val": True}):
        content = RecordDict({"config": ConfigRecord(conf)})
        with pytest.raises(ValueError, match="with-val"):
            handle_descriptor(content, rt=None)  # refused before the runtime is touched


def test_the_clustering_libraries_load_while_the_warm_up_runs(monkeypatch):
    """A fresh ServerApp imports hdbscan / scikit-learn / scipy in the background from the
    moment the strategy is built, not inside its clustering round."""
    import sys

    from flux_app.engine.config import RunConfig
    from flux_app.methods.flux.clustering import preload_libraries

    started: list[str] = []
    monkeypatch.setattr(flux_strategy, "preload_libraries", lambda c: started.append(c))
    flux_strategy.Flux(RunConfig(strategy="flux"))
    flux_strategy.Flux(
        RunConfig.from_mapping({"strategy": "flux", "flux-clusterer": "knee-dbscan"})
    )
    assert started == ["hdbscan", "knee-dbscan"]
    thread = preload_libraries("hdbscan")
    assert not thread.daemon  # an exit waits for it instead of killing an import half-way
    thread.join(timeout=60)
    assert not thread.is_alive() and "hdbscan" in sys.modules and "sklearn.neighbors" in sys.modules
