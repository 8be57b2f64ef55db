"""The strategy base through the in-process grid: round loop, per-cluster models, faults."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from flux_app.common.records import from_record
from flux_app.engine.config import ConfigError, RunConfig
from flux_app.engine.inprocess import InProcessGrid, run_inprocess
from flux_app.engine.server import build_strategy
from flux_app.testing import grid


def _grid(cfg: dict, n: int, **kw) -> InProcessGrid:
    return grid(RunConfig.from_mapping(cfg), n, **kw)


def test_fedavg_run_writes_contract(small_run):
    results, run_dir = run_inprocess(small_run | {"holdout-clients": 1}, 4)
    with open(os.path.join(run_dir, "results.json")) as fh:
        on_disk = json.load(fh)
    assert on_disk["run_config"]["strategy"] == "fedavg"
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2]
    for row in on_disk["rounds"]:
        assert {
            "round",
            "phase",
            "num_clusters",
            "train_loss",
            "accuracy",
            "bytes_up",
            "bytes_down",
            "seconds",
        } <= set(row)
        assert row["bytes_up"] > 0 and row["num_clusters"] == 1
    final = on_disk["final"]
    for key in (
        "accuracy_known",
        "accuracy_routed",
        "accuracy_holdout",
        "num_clusters",
        "ari",
        "routing_accuracy",
        "wall_seconds",
        "bytes_descriptor_up",
        "bytes_model_up",
    ):
        assert key in final
    assert 0 <= final["accuracy_known"] <= 1
    assert final["accuracy_holdout"] is not None  # one global model: the holdout is evaluated
    assert os.path.exists(os.path.join(run_dir, "run_config.json"))
    assert os.path.exists(os.path.join(run_dir, "accuracy.png"))
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "cluster_0.pt"), weights_only=True)
    assert "head.weight" in ckpt


def test_holdout_nodes_never_train(small_run):
    cfg = RunConfig.from_mapping(small_run | {"holdout-clients": 2})
    grid = _grid(cfg.to_dict(), 5)
    seen: list[int] = []
    for pid in range(5):

        def hook(reply: Message, pid=pid) -> Message:
            if reply.metadata.message_type == "train":
                seen.append(pid)
            return reply

        grid.hooks[pid] = hook
    strategy = build_strategy(cfg)
    strategy.start(grid)
    assert sorted(set(seen)) == [0, 1, 2]
    assert [strategy.nodes[n].partition_id for n in strategy.holdout_nodes()] == [3, 4]


def test_fraction_train_samples_and_is_seeded(small_run):
    cfg = RunConfig.from_mapping(small_run | {"fraction-train": 0.5})
    grid = _grid(cfg.to_dict(), 6)
    strategy = build_strategy(cfg)
    strategy.connect(grid)
    a = strategy.sample(strategy.training_nodes(), 1)
    b = strategy.sample(strategy.training_nodes(), 1)
    c = [strategy.sample(strategy.training_nodes(), r) for r in range(2, 8)]
    assert len(a) == 3 and a == b
    assert any(s != a for s in c)


def test_bad_and_missing_replies_are_skipped(small_run):
    """A NaN model, an error reply, a silent node: the run goes on with the others."""
    cfg = RunConfig.from_mapping(small_run)

    def nan_model(reply: Message) -> Message:
        if reply.metadata.message_type != "train":
            return reply
        state = from_record(reply.content.array_records["arrays"])
        state = {
            k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
            for k, v in state.items()
        }
        content = RecordDict(
            {
                "arrays": ArrayRecord.from_torch_state_dict(state),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content, reply_to=reply)

    def crash(reply: Message) -> Message:
        if reply.metadata.message_type == "train":
            raise RuntimeError("disk full")
        return reply

    def silent(reply: Message):
        return None if reply.metadata.message_type == "train" else reply

    grid = _grid(cfg.to_dict(), 4, hooks={0: nan_model, 1: crash, 2: silent})
    strategy = build_strategy(cfg)
    results = strategy.start(grid)
    model = strategy.models[0]
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
    assert results["final"]["accuracy_known"] is not None


def test_node_with_bad_info_is_excluded(small_run):
    def bad_info(reply: Message) -> Message:
        if reply.metadata.message_type == "query.info":
            return Message(RecordDict({"info": MetricRecord({"partition-id": 1})}), reply_to=reply)
        return reply

    cfg = RunConfig.from_mapping(small_run | {"num-server-rounds": 1})
    strategy = build_strategy(cfg)
    strategy.start(_grid(cfg.to_dict(), 3, hooks={1: bad_info}))
    assert len(strategy.training_nodes()) == 2
    assert any("invalid info reply" in why for why in strategy.excluded.values())


def test_late_node_joins_training(small_run):
    cfg = RunConfig.from_mapping(small_run | {"num-server-rounds": 3})
    grid = _grid(cfg.to_dict(), 4, late={3: 2})  # appears from the 3rd get_node_ids call on
    strategy = build_strategy(cfg)
    strategy.start(grid)
    pids = sorted(strategy.nodes[n].partition_id for n in strategy.assignment)
    assert pids == [0, 1, 2, 3]


def test_oracle_clusters_are_true_groups_and_local_is_per_node(small_run):
    cfg = RunConfig.from_mapping(
        small_run | {"strategy": "oracle", "num-server-rounds": 1, "holdout-clients": 1}
    )
    oracle = build_strategy(cfg)
    res = oracle.start(_grid(cfg.to_dict(), 7))
    groups = {oracle.nodes[n].group for n in oracle.training_nodes()}
    assert len(oracle.models) == len(groups) > 1
    assert res["final"]["ari"] == pytest.approx(1.0)
    assert res["final"]["routing_accuracy"] == 1.0

    cfg = cfg.replace(strategy="local")
    local = build_strategy(cfg)
    res = local.start(_grid(cfg.to_dict(), 4))
    assert len(local.models) == 3
    assert res["final"]["accuracy_holdout"] is None  # no model of its own to use


def test_local_models_do_not_mix(small_run):
    cfg = RunConfig.from_mapping(small_run | {"strategy": "local", "num-server-rounds": 1})
    local = build_strategy(cfg)
    local.start(_grid(cfg.to_dict(), 3))
    heads = [local.models[c]["head.bias"] for c in sorted(local.models)]
    assert not np.allclose(heads[0].numpy(), heads[1].numpy())


def test_best_over_rounds_is_the_mean_of_each_clients_best(small_run):
    run = small_run | {"num-server-rounds": 3, "eval-every": 1}
    strategy = build_strategy(RunConfig.from_mapping(run))
    scripted = {1: [0.9, 0.1, 0.2], 2: [0.5, 0.6, 0.3], 3: [0.4, 0.5, 0.1]}

    def fake_eval(models, server_round):
        ids = sorted(models)
        return {n: {"accuracy": scripted[server_round][i]} for i, n in enumerate(ids)}

    strategy.evaluate_nodes = fake_eval
    final = strategy.start(_grid(run, 3))["final"]
    assert final["accuracy_known"] == pytest.approx((0.4 + 0.5 + 0.1) / 3)  # final round
    # per client: 0.9, 0.6, 0.3 -- not the best round's mean (round 2: 0.467)
    assert final["accuracy_best_over_rounds"] == pytest.approx((0.9 + 0.6 + 0.3) / 3)


def test_a_data_error_on_every_node_fails_at_once_with_the_cause(small_run):
    """A missing dataset on every node is reported as the nodes' own error, not as a time-out."""
    import time

    cfg = RunConfig.from_mapping(small_run | {"dataset": "fmnist", "data-root": "/nonexistent"})
    strategy = build_strategy(cfg)
    t0 = time.time()
    with pytest.raises(RuntimeError, match="failed to join.*(fmnist|nonexistent|not found)"):
        strategy.start(_grid(cfg.to_dict(), 3))
    assert time.time() - t0 < 30  # the discovery wait is 120 s


def test_a_run_in_which_no_node_trained_fails_with_the_reason(small_run):
    def broken(reply: Message) -> Message | None:
        if reply.metadata.message_type == "train":
            raise RuntimeError("disk full")
        return reply

    cfg = RunConfig.from_mapping(small_run | {"num-server-rounds": 1})
    hooks = dict.fromkeys(range(3), broken)
    with pytest.raises(RuntimeError, match="no node trained.*disk full"):
        build_strategy(cfg).start(_grid(cfg.to_dict(), 3, hooks=hooks))


@pytest.mark.parametrize("bad", [float("inf"), 1e15, 0.5, -3, float("nan")])
def test_absurd_num_examples_are_rejected_not_averaged(small_run, bad):
    def lie(reply: Message) -> Message:
        if reply.metadata.message_type != "train":
            return reply
        content = RecordDict(dict(reply.content.items()))
        content["metrics"] = MetricRecord({"num-examples": bad, "train-loss": 1.0})
        return Message(content, reply_to=reply)

    cfg = RunConfig.from_mapping(small_run)
    honest, _ = run_inprocess(cfg.to_dict() | {"run-name": "honest"}, 4, hooks={0: _silent})
    lying, _ = run_inprocess(cfg.to_dict() | {"run-name": "lying"}, 4, hooks={0: lie})
    # the liar's update never reaches the model: the others' results equal those without it
    assert lying["final"]["accuracy_by_client"]["1"] == honest["final"]["accuracy_by_client"]["1"]


def test_evaluate_metrics_out_of_range_are_rejected(small_run):
    def inflate(reply: Message) -> Message:
        if reply.metadata.message_type != "evaluate":
            return reply
        content = RecordDict(dict(reply.content.items()))
        content["metrics"] = MetricRecord({"accuracy": 1e6, "loss": 0.0, "num-examples": 5})
        return Message(content, reply_to=reply)

    results, _ = run_inprocess(RunConfig.from_mapping(small_run).to_dict(), 3, hooks={0: inflate})
    assert 0.0 <= results["final"]["accuracy_known"] <= 1.0
    assert "0" not in results["final"]["accuracy_by_client"]


def _silent(reply: Message) -> Message | None:
    return None if reply.metadata.message_type == "train" else reply


def test_fraction_evaluate_samples_nodes_and_the_last_round_evaluates_all():
    from flux_app.engine.server import build_strategy
    from flux_app.testing import FAST, config, grid

    cfg = config(
        FAST | {"num-server-rounds": 3, "fraction-evaluate": 0.25, "min-evaluate-nodes": 3}
    )
    strategy = build_strategy(cfg)
    asked: list[list[int]] = []
    evaluate = strategy.evaluate_nodes

    def counting(states, server_round):
        asked.append(sorted(states))
        return evaluate(states, server_round)

    strategy.evaluate_nodes = counting
    results = strategy.start(grid(cfg, 8))
    sizes = [len(a) for a in asked[:3]]
    assert sizes == [3, 3, 8]  # 0.25 * 8 = 2 < min-evaluate-nodes 3; all 8 in the last round
    assert asked[0] != asked[1]  # a fresh seeded sample per round
    assert len(results["final"]["accuracy_by_client"]) == 8
    with pytest.raises(ConfigError, match="fraction-evaluate"):
        config(FAST | {"fraction-evaluate": 0.0})
