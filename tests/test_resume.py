"""Checkpoints and resume: a run killed mid-way and resumed computes what an uninterrupted run
computes; checkpoints are JSON + tensors only; bad resume requests fail at once and clearly."""

from __future__ import annotations

import json
import os

import pytest
import torch

from flux_app.common.statecodec import NodeKeyed, NodeList, StateError, decode, encode
from flux_app.engine import checkpoint
from flux_app.engine.config import ConfigError
from flux_app.engine.inprocess import run_inprocess
from flux_app.testing import FAST, comparable, run_and_resume

BASE = FAST | {"num-server-rounds": 6, "level": 2, "lr": 0.1, "local-epochs": 1}

CASES = {
    # FLUX clusters in round 2: extractor, normaliser, centroids must come back
    "flux": ({"strategy": "flux", "flux-cluster-round": 2}, 4),
    # killed at round 3 after warm-up 2: the round-2 state needs the nodes' sketches, so the
    # checkpoint it resumes from is round 1's (FedDAG's checkpoint_ready)
    "feddag": ({"strategy": "feddag", "feddag-warmup-rounds": 2}, 3),
    "ifca": ({"strategy": "ifca", "num-clusters": 2}, 4),
    # a split in every round from round 2: the split tree must come back
    "cfl": ({"strategy": "cfl", "cfl-eps1": 1e9, "cfl-eps2": 0.0, "cfl-min-round": 2}, 4),
    # FedAdam's moments per cluster must come back
    "fedavg+fedadam": ({"strategy": "fedavg", "cluster-aggregator": "fedadam"}, 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_killed_and_resumed_run_equals_the_uninterrupted_one(case, tmp_path):
    overrides, kill_round = CASES[case]
    full, resumed = run_and_resume(
        BASE | overrides, 6, kill_round=kill_round, output_dir=str(tmp_path)
    )
    assert comparable(resumed) == comparable(full)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4, 5, 6]
    after = resumed["resumed"][0]["after_round"]
    assert after == kill_round - (2 if case == "feddag" else 1)
    if case == "cfl":
        assert full["final"]["cfl_splits"], "the case must exercise a split"
    if case == "flux":
        assert full["final"]["num_clusters"] > 1 and full["final"]["cluster_round"] == 2


def test_checkpoint_holds_only_json_and_tensors(tmp_path):
    run_inprocess(
        BASE
        | {
            "strategy": "flux",
            "flux-cluster-round": 2,
            "output-dir": str(tmp_path),
            "run-name": "r",
            "num-server-rounds": 3,
        },
        4,
    )
    path = tmp_path / "r" / checkpoint.FILE
    payload = torch.load(path, weights_only=True)  # no pickle of objects: this would fail
    assert payload["round"] == 3 and payload["strategy"] == "flux"
    tree = json.loads(payload["state"])
    assert "flux" in tree and all(isinstance(t, torch.Tensor) for t in payload["arrays"].values())
    assert not [p for p in os.listdir(tmp_path / "r") if p.startswith(".tmp-")]


def test_checkpoint_every_zero_writes_none_and_resume_says_why(tmp_path):
    cfg = BASE | {"output-dir": str(tmp_path), "run-name": "r", "num-server-rounds": 2}
    run_inprocess(cfg | {"checkpoint-every": 0}, 3)
    assert not (tmp_path / "r" / checkpoint.FILE).exists()
    with pytest.raises(ConfigError, match="no checkpoint.pt"):
        run_inprocess(cfg | {"resume-from": "r"}, 3)


def test_resume_refuses_another_config_and_paths_outside_output_dir(tmp_path):
    cfg = BASE | {"output-dir": str(tmp_path / "out"), "run-name": "r", "num-server-rounds": 2}
    run_inprocess(cfg, 3)
    with pytest.raises(ConfigError, match="lr"):
        run_inprocess(cfg | {"resume-from": "r", "lr": 0.2}, 3)
    with pytest.raises(ConfigError, match="outside output-dir"):
        run_inprocess(cfg | {"resume-from": "../elsewhere"}, 3)
    with pytest.raises(ConfigError, match="strategy"):
        run_inprocess(cfg | {"resume-from": "r", "strategy": "local"}, 3)


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    cfg = BASE | {"output-dir": str(tmp_path), "run-name": "r", "num-server-rounds": 2}
    run_inprocess(cfg, 3)
    (tmp_path / "r" / checkpoint.FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(StateError, match="cannot read checkpoint"):
        run_inprocess(cfg | {"resume-from": "r"}, 3)


def test_codec_round_trips_and_renames_nodes():
    import numpy as np

    state = {
        "by_node": NodeKeyed({7: 1, 9: 0}),
        "ids": NodeList([9, 7]),
        "int_keys": {3: (1.5, float("nan"))},
        "array": np.arange(6, dtype=np.int64).reshape(2, 3),
        "tensor": torch.ones(2, dtype=torch.float16),
    }
    names = {7: "a", 9: "b"}
    tree, arrays = encode(state, names.__getitem__)
    json.dumps(tree)  # plain JSON
    back, missing = decode(tree, arrays, {"a": 70, "b": 90}.get)
    assert back["by_node"] == {70: 1, 90: 0} and back["ids"] == [90, 70] and not missing
    assert back["int_keys"][3][0] == 1.5 and np.isnan(back["int_keys"][3][1])
    assert back["array"].dtype == np.int64 and back["array"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert back["tensor"].dtype == torch.float16
    partial, missing = decode(tree, arrays, {"a": 70}.get)
    assert partial["by_node"] == {70: 1} and missing == ["b"]


def test_codec_constructs_only_registered_types():
    tree = {"x": {"__dataclass__": "os.system", "fields": {"command": "true"}}}
    with pytest.raises(StateError, match="unknown type"):
        decode(tree, {}, lambda name: None)
    with pytest.raises(StateError, match="cannot checkpoint"):
        encode({"f": lambda: 0}, str)


class _FlakyGrid:
    """Builds an in-process grid where partition 1 crashes before round 3 and its restarted
    SuperNode (new node id, fresh state, same data) connects during round 4."""

    @staticmethod
    def make(cfg, nodes):
        from client_app import app
        from flux_app.engine.inprocess import InProcessGrid, set_task_identity

        class Flaky(InProcessGrid):
            events: list = []

            def push_messages(self, messages):
                messages = list(messages)
                rnd = {m.metadata.group_id for m in messages}
                if "3" in rnd and 1 in self.partition_of.values() and not self.events:
                    self.events.append(("left", self.leave(1)))
                if "4" in rnd and len(self.events) == 1:  # connected before round 5 starts
                    self.events.append(("back", self.rejoin(1, nodes)))
                return super().push_messages(messages)

        set_task_identity()
        return Flaky(app, cfg.to_dict(), nodes)


def test_a_lost_node_is_recorded_not_messaged_and_rejoins_its_cluster():
    from flux_app.engine.server import build_strategy
    from flux_app.testing import config

    cfg = config(BASE | {"strategy": "flux", "flux-cluster-round": 2, "num-server-rounds": 6})
    strategy = build_strategy(cfg)
    grid = _FlakyGrid.make(cfg, 6)
    results = strategy.start(grid)
    rows = {r["round"]: r["nodes"] for r in results["rounds"]}
    (_, old), (_, new) = grid.events
    assert old != new and new in strategy.nodes and old not in strategy.nodes
    # round 3 was due before the loss was seen; from round 4 the node is offline, not asked
    assert "1" not in rows[3]["answered"]
    assert "1" in rows[4]["offline"] and "1" not in rows[4]["asked"]
    # back in round 5 under its new id, in its old cluster, training and evaluated again
    assert all("1" in rows[r]["answered"] for r in (5, 6))
    assert strategy.assignment[new] == results["clustering"]["assignment"]["1"]  # of round 2
    assert "1" in results["final"]["accuracy_by_client"]
    assert strategy.trained > 0 and not results["final"]["excluded_nodes"]


def test_nodes_claiming_one_name_at_once_are_admitted_under_their_node_ids():
    from client_app import app
    from flux_app.engine.inprocess import InProcessGrid, set_task_identity
    from flux_app.engine.server import build_strategy
    from flux_app.testing import config

    cfg = config(BASE | {"num-server-rounds": 1})
    set_task_identity()
    configs = [{"partition-id": i, "num-partitions": 4} for i in range(4)]
    grid = InProcessGrid(app, cfg.to_dict(), node_configs=configs + [configs[2]])
    strategy = build_strategy(cfg)
    results = strategy.start(grid)
    # which of the two is partition 2 cannot be told from what they say: the name proves
    # nothing, so neither holds it and neither is lost
    twins = sorted(n for n, i in strategy.nodes.items() if i.partition_id == 2)
    assert len(twins) == 2 and not results["final"]["excluded_nodes"]
    names = sorted(i.name for i in strategy.nodes.values())
    assert names == sorted(["0", "1", "3", *(f"2@{n}" for n in twins)])
    by_client = results["final"]["accuracy_by_client"]
    assert "2" not in by_client and all(f"2@{n}" in by_client for n in twins)
    assert strategy.trained == 5  # every node trained in the round


def test_a_node_that_times_out_is_not_waited_for_again_in_that_round():
    from client_app import app
    from flux_app.engine.inprocess import InProcessGrid, set_task_identity
    from flux_app.engine.server import build_strategy
    from flux_app.testing import config

    class Polled(InProcessGrid):
        answers_at_once = False  # replies are polled, as from a SuperLink

    seen: list[str] = []

    def silent_train(reply):
        seen.append(reply.metadata.message_type)
        return None if reply.metadata.message_type == "train" else reply

    cfg = config(BASE | {"num-server-rounds": 2, "round-timeout": 0.5})
    set_task_identity()
    grid = Polled(app, cfg.to_dict(), 4, hooks={2: silent_train})
    results = build_strategy(cfg).start(grid)
    for row in results["rounds"]:
        assert row["nodes"]["timed_out"] == ["2"] and "2" not in row["nodes"]["answered"]
        assert row["seconds"] < 0.5 + 5  # one timeout per round, not one per message
    assert seen.count("evaluate") == 0 and seen.count("train") == 2  # skipped after the timeout
