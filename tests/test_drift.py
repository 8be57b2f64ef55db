"""Simulated drift (drift-round / drift-fraction) and FLUX noticing it (flux-drift-check-every)."""

from __future__ import annotations

import numpy as np
import pytest

from flux_app.data import ShiftSpec, load_source, partition_groups
from flux_app.data.drift import drift_regroup
from flux_app.engine.client import ClientRuntime
from flux_app.testing import run


def test_drift_regroup_is_seeded_and_moves_to_another_training_group():
    source = load_source("synthetic", "", 0)
    spec = ShiftSpec("px", level=2, seed=0)
    groups = partition_groups(source, spec, 12)
    moves = drift_regroup(source, spec, 12, holdout=2, fraction=0.3)
    assert moves == drift_regroup(source, spec, 12, holdout=2, fraction=0.3)
    assert len(moves) == 3  # round(0.3 * 10)
    training = set(groups[:10].tolist())
    for pid, g in moves:
        assert pid < 10 and g != groups[pid] and g in training
    assert drift_regroup(source, ShiftSpec("px", level=2, seed=1), 12, 2, 0.3) != moves
    assert drift_regroup(source, ShiftSpec("none", seed=0), 12, 2, 0.3) == ()  # one group
    with pytest.raises(ValueError, match="fraction"):
        drift_regroup(source, spec, 12, 2, 0.0)


def test_a_drifting_node_gets_its_new_group_from_the_drift_round_on(small_run):
    from flux_app.engine.config import RunConfig

    cfg = RunConfig.from_mapping(small_run | {"drift-round": 3, "drift-fraction": 0.5})
    source = load_source("synthetic", "", 0)
    moves = dict(drift_regroup(source, ShiftSpec("px", level=2, seed=0), 8, 0, 0.5))
    for pid in range(8):
        before = ClientRuntime(cfg, pid, 8, server_round=2).data
        after = ClientRuntime(cfg, pid, 8, server_round=3).data
        if pid in moves:
            assert after.group == moves[pid] != before.group
            assert len(after.y_train) == len(before.y_train)  # its own share, another shift
            assert not np.array_equal(after.x_train.numpy(), before.x_train.numpy())
        else:
            assert after.group == before.group
            assert np.array_equal(after.x_train.numpy(), before.x_train.numpy())


def test_flux_notices_drift_reclusters_and_the_oracle_follows(small_run):
    base = small_run | {
        "strategy": "flux",
        "flux-cluster-round": 1,
        "flux-drift-check-every": 1,
        "num-server-rounds": 4,
    }
    steady, _ = run(base, 8)
    assert steady["final"]["reclustered_rounds"] == []  # checks ran; nothing changed
    drifted, strategy = run(base | {"drift-round": 3, "drift-fraction": 0.5}, 8)
    assert drifted["final"]["reclustered_rounds"] == [3]  # found at the first check after it
    assert drifted["clustering"]["round"] == 3 and drifted["clustering"]["reclustered"] == [3]
    assert set(strategy.models) == set(range(strategy.result.num_clusters))
    blind, _ = run(base | {"drift-round": 3, "flux-drift-check-every": 0}, 8)
    assert blind["final"]["reclustered_rounds"] == []
    oracle, o = run(small_run | {"strategy": "oracle", "num-server-rounds": 4, "drift-round": 3}, 8)
    source = load_source("synthetic", "", 0)
    moves = dict(drift_regroup(source, ShiftSpec("px", level=2, seed=0), 8, 0, 0.3))
    for node, info in o.nodes.items():
        if info.partition_id in moves:
            assert info.group == moves[info.partition_id]
            assert o.assignment[node] == o.cluster_of_group[info.group]


def test_changed_nodes_flags_a_new_distribution_not_sampling_noise():
    import torch

    from flux_app.methods.flux.clustering import BlockNormaliser
    from flux_app.methods.flux.descriptors import MomentAccumulator
    from flux_app.methods.flux.drift import changed_nodes

    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 6))

    def desc(shift=0.0, n=800):
        y = rng.integers(0, 4, size=n)
        z = means[y] + rng.normal(size=(n, 6)) + shift
        acc = MomentAccumulator(4, 6)
        acc.update(torch.from_numpy(z), torch.from_numpy(y))
        return acc.finalize()

    before = [desc() for _ in range(8)]
    after = list(before)  # unchanged data: identical descriptors
    after[2] = desc()  # a fresh sample of the same distribution: noise only
    after[5] = desc(shift=1.0)  # another distribution
    nz = BlockNormaliser.fit(before)
    flags = changed_nodes(before, after, nz, inflation=1.0)
    assert flags.tolist() == [i == 5 for i in range(8)]
