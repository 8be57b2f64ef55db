"""The peer baselines (IFCA, CFL, PACFL, FeSEM): their defining mechanisms and short runs.

Each mechanism test is built so that a wrong implementation fails it: IFCA must train the model
with the LOWER loss, CFL must not split before its criterion and must split a planted federation
along its groups, PACFL's threshold must separate planted subspaces and survive malformed
replies, FeSEM's E-step must pick the NEAREST centre and its M-step must average per centre.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from flux_app.common.params import clone_state
from flux_app.common.records import arrays_to_record, record_to_arrays
from flux_app.common.subspaces import ClassSubspaces
from flux_app.engine.client import ClientRuntime
from flux_app.engine.config import RunConfig
from flux_app.engine.inprocess import InProcessGrid, run_inprocess
from flux_app.engine.registry import QUERIES as QUERY_ACTIONS
from flux_app.engine.registry import STRATEGIES
from flux_app.engine.server import build_strategy
from flux_app.engine.strategy import Reply
from flux_app.methods.cfl.strategy import Cfl
from flux_app.methods.fesem.strategy import Fesem, kmeanspp, nearest_centres
from flux_app.methods.ifca.strategy import Ifca
from flux_app.methods.pacfl.client import handle_subspaces
from flux_app.methods.pacfl.strategy import Pacfl
from flux_app.testing import fake_nodes, tiny_state


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small in-process nodes on 2 shared cores: intra-op threads only contend. On a
    loaded 2-core machine a LeNet-5 step is ~30x and a 784 x 30 SVD ~100x slower with 2
    threads than with 1."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture
def digits_skew(tmp_path):
    """digits, label-skew with two groups of five labels, balanced client sizes."""
    return {
        "dataset": "digits",
        "shift": "label-skew",
        "rho": 0.5,
        "alpha": 100.0,
        "num-server-rounds": 1,
        "local-epochs": 1,
        "lr": 0.05,
        "momentum": 0.9,  # the thresholds below were read from runs at 0.9
        "batch-size": 32,
        "num-clusters": 2,
        "output-dir": str(tmp_path / "out"),
        "run-name": "peers",
        "device": "cpu",
    }


def _grid(cfg: RunConfig, n: int, **kw) -> InProcessGrid:
    from client_app import app

    return InProcessGrid(app, cfg.to_dict(), n, **kw)


def _ari(strategy, nodes) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(
        adjusted_rand_score(
            [strategy.nodes[n].group for n in nodes], [strategy.assignment[n] for n in nodes]
        )
    )


def _offline(cls, cfg: RunConfig, groups: list[int]):
    """A strategy with fake nodes (node id 100 + i, group ``groups[i]``) and no grid."""
    return fake_nodes(cls(cfg), groups)


_state = tiny_state


# ============================================================================ registry / client
def test_peers_are_registered_and_subspaces_action_is_served():
    assert {"ifca", "cfl", "pacfl", "fesem"} <= set(STRATEGIES)
    assert QUERY_ACTIONS["subspaces"] is handle_subspaces


def test_subspaces_reply_is_valid_and_p_is_bounded():
    cfg = RunConfig.from_mapping({"dataset": "synthetic", "shift": "label-skew", "rho": 0.5})
    rt = ClientRuntime(cfg, 0, 4)
    content = RecordDict({"config": ConfigRecord({"p": 2})})
    reply = handle_subspaces(content, rt)
    d = rt.data
    subs = ClassSubspaces.from_arrays(
        record_to_arrays(reply.array_records["subspaces"]),
        dim=int(np.prod(d.input_shape)),
        num_classes=d.num_classes,
        p=2,
    )
    held = sorted(set(d.y_train.tolist()))
    assert np.flatnonzero(subs.counts).tolist() == held  # only the node's own classes
    content["config"]["p"] = 10_000
    with pytest.raises(ValueError, match="subspace dimension"):
        handle_subspaces(content, rt)


# ============================================================================ IFCA
class _PlantedIfca(Ifca):
    """Model j predicts label ``self.planted[j]`` with a huge bias; the rest is the common init.
    A node holding that label has a much lower loss under model j than under the other."""

    planted: tuple[int, int] = (0, 0)

    def setup(self) -> None:
        super().setup()
        init = self.initial_model()
        for j, label in enumerate(self.planted):
            self.models[j] = clone_state(init)
            self.models[j]["head.bias"][label] = 30.0
        self.sent: dict[int, int] = {}

    def train_content(self, node_id: int, server_round: int) -> RecordDict:
        self.sent[node_id] = self.assignment[node_id]
        return super().train_content(node_id, server_round)


def test_ifca_every_node_trains_the_lower_loss_model(small_run):
    cfg = RunConfig.from_mapping(
        small_run
        | {"strategy": "ifca", "shift": "label-skew", "rho": 0.5, "alpha": 100.0}
        | {"num-clusters": 2}
        | {"num-server-rounds": 1}
    )
    n = 4
    labels = {pid: set(ClientRuntime(cfg, pid, n).data.y_train.tolist()) for pid in range(n)}
    groups = {pid: ClientRuntime(cfg, pid, n).data.group for pid in range(n)}
    by_group = {
        g: set.union(*(labels[p] for p in labels if groups[p] == g)) for g in set(groups.values())
    }
    g0, g1 = sorted(by_group)
    # model 0 favours a label only group g1 holds, model 1 one only group g0 holds: the right
    # choice is the OTHER index than a naive "model = group" guess would give
    planted = (min(by_group[g1] - by_group[g0]), min(by_group[g0] - by_group[g1]))
    expected = {g1: 0, g0: 1}

    strategy = type("Planted", (_PlantedIfca,), {"planted": planted})(cfg)
    grid = _grid(cfg, n)
    results = strategy.start(grid)
    bias = {j: s["head.bias"][planted[j]].item() for j, s in strategy.models.items()}
    for node in strategy.training_nodes():
        want = expected[strategy.nodes[node].group]
        assert strategy.sent[node] == want  # it trained the better model ...
        assert strategy.assignment[node] == want  # ... and that is its cluster
    assert results["clustering"]["ari"] == pytest.approx(1.0)
    # both models were trained by their choosers (the huge bias was pulled down)
    assert all(b < 30.0 for b in bias.values())
    # honest bytes: every node downloaded both models for the choice, then its chosen one
    down = strategy.traffic
    # (config records travel too: a few bytes beside the models)
    assert down["query.scores"]["down"] == pytest.approx(2 * down["train"]["down"], rel=1e-3)
    scores, train = down["query.scores"]["down"], down["train"]["down"]
    assert results["final"]["bytes_model_down"] == scores + train
    assert results["final"]["bytes_model_down"] == pytest.approx(3 * train, rel=1e-3)


# ============================================================================ CFL
def test_cfl_split_step_waits_for_its_criterion_and_splits_by_direction():
    cfg = RunConfig.from_mapping({"strategy": "cfl", "cfl-eps1": 0.4, "cfl-eps2": 1.6})
    groups = [0, 1, 0, 1, 0, 1]
    cfl = _offline(Cfl, cfg.replace(cfl_min_round=3), groups)
    cfl.models = {0: _state(0.0, 0.0, 0.0)}
    cfl.assignment = dict.fromkeys(cfl.nodes, 0)
    nodes = list(cfl.nodes)
    rng = np.random.default_rng(0)
    direction = np.array([1.0, -1.0, 0.5])
    # two groups pulling in opposite directions: mean ~0, every update has norm ~2
    planted = np.stack(
        [(1 if g == 0 else -1) * 2 * direction / np.linalg.norm(direction) for g in groups]
    )
    planted += rng.normal(0, 0.05, planted.shape)
    # 1) before cfl-min-round: no split even though the norms qualify
    assert not cfl.maybe_split(2, 0, nodes, planted)
    # 2) at min-round but mean norm too large (everyone agrees): no split
    agree = np.abs(planted)
    assert not cfl.maybe_split(3, 0, nodes, agree)
    # 3) max norm too small: no split
    assert not cfl.maybe_split(3, 0, nodes, planted * 0.1)
    # 4) two clients only: no split (|c| > 2)
    assert not cfl.maybe_split(3, 0, nodes[:2], planted[:2])
    assert set(cfl.assignment.values()) == {0} and len(cfl.models) == 1
    # 5) criterion holds: bipartition along the planted directions, both halves same model
    assert cfl.maybe_split(3, 0, nodes, planted)
    assert len(cfl.models) == 2
    assert torch.equal(cfl.models[0]["w"], cfl.models[1]["w"])
    assert _ari(cfl, nodes) == pytest.approx(1.0)
    assert cfl.clustering["round"] == 3 and cfl.splits[0]["sizes"] == [3, 3]
    # 6) with the members' trained models: each half's model is the FedAvg of its own members
    cfl = _offline(Cfl, cfg.replace(cfl_min_round=3), groups)
    cfl.models = {0: _state(0.0, 0.0, 0.0)}
    cfl.assignment = dict.fromkeys(cfl.nodes, 0)
    states = [_state(*u) for u in planted]
    weights = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert cfl.maybe_split(3, 0, nodes, planted, weights, states)
    for cid, members in ((0, [0, 2, 4]), (1, [1, 3, 5])):
        assert {cfl.assignment[nodes[i]] for i in members} == {cid}
        want = (planted[members] * weights[members, None]).sum(0) / weights[members].sum()
        np.testing.assert_allclose(cfl.models[cid]["w"].numpy(), want, rtol=1e-5)


def test_cfl_run_splits_a_planted_two_group_federation(digits_skew):
    # eps that always hold: the split happens at cfl-min-round and must follow the groups
    cfg = RunConfig.from_mapping(
        digits_skew | {"strategy": "cfl", "cfl-min-round": 1, "cfl-eps1": 1e9, "cfl-eps2": 0.0}
    )
    cfl = build_strategy(cfg)
    results = cfl.start(_grid(cfg, 6))
    assert results["clustering"]["num_clusters"] == 2
    assert results["clustering"]["ari"] == pytest.approx(1.0)
    assert set(results["rounds"][0]["cfl_norms"]) == {"0"}
    # half the nodes train per round: the absent members of the split cluster pick their half
    # by loss, so the split still follows the groups
    part = build_strategy(cfg.replace(fraction_train=0.5))
    results = part.start(_grid(cfg, 6))
    split = results["final"]["cfl_splits"][0]
    assert sum(split["sizes"]) == 3 and sum(split["absent_placed"]) == 3
    assert results["clustering"]["ari"] == pytest.approx(1.0)
    # the same federation with the paper's min-round (20) never splits in one round
    cfg = cfg.replace(cfl_min_round=20)
    cfl = build_strategy(cfg)
    results = cfl.start(_grid(cfg, 6))
    assert results["final"]["num_clusters"] == 1 and results["final"]["cfl_splits"] == []


# ============================================================================ PACFL
def test_pacfl_separates_label_skew_and_excludes_malformed_replies(digits_skew):
    def nan_bases(reply: Message) -> Message:
        if reply.metadata.message_type != "query.subspaces":
            return reply
        arrays = record_to_arrays(reply.content.array_records["subspaces"])
        arrays["bases"] = np.full_like(arrays["bases"], np.nan)
        return Message(RecordDict({"subspaces": arrays_to_record(arrays)}), reply_to=reply)

    def wrong_shape(reply: Message) -> Message:
        if reply.metadata.message_type != "query.subspaces":
            return reply
        arrays = record_to_arrays(reply.content.array_records["subspaces"])
        arrays = {k: v[:-1] for k, v in arrays.items()}  # one class short
        return Message(RecordDict({"subspaces": arrays_to_record(arrays)}), reply_to=reply)

    cfg = RunConfig.from_mapping(digits_skew | {"strategy": "pacfl", "holdout-clients": 1})
    pacfl = build_strategy(cfg)
    results = pacfl.start(_grid(cfg, 8, hooks={1: nan_bases, 2: wrong_shape}))
    reasons = {pacfl.nodes[n].partition_id: why for n, why in pacfl.excluded.items()}
    assert set(reasons) == {1, 2}
    assert "non-finite" in reasons[1] and "shape" in reasons[2]
    assert results["final"]["excluded_nodes"]  # reported in results.json
    clustered = pacfl.clustered
    assert len(clustered) == 5 and len(pacfl.models) == 2
    assert _ari(pacfl, clustered) == pytest.approx(1.0)  # the planted label sets, exactly
    assert pacfl.threshold > 0
    assert results["clustering"]["threshold"] == pytest.approx(pacfl.threshold)
    # the excluded nodes train with the largest cluster; the held-out node is routed home
    largest = pacfl._largest()
    assert all(pacfl.assignment[n] == largest for n in pacfl.excluded)
    assert results["final"]["routing_accuracy"] == 1.0
    assert results["final"]["bytes_descriptor_up"] > 0


def test_pacfl_newcomer_beyond_threshold_goes_to_nearest_cluster():
    cfg = RunConfig.from_mapping({"strategy": "pacfl"})
    pacfl = _offline(Pacfl, cfg, [0, 0, 1, 1, 0])  # d = 4, C = 2; node 104 is the newcomer
    e = np.eye(4)
    # clustered nodes: two along e0 (cluster 0), two along e2 (cluster 1)
    pacfl.spans = [e[:, [0]], e[:, [0]], e[:, [2]], e[:, [2]]]
    pacfl.clustered = [100, 101, 102, 103]
    pacfl.labels = np.array([0, 0, 1, 1])
    pacfl.threshold = 5.0
    pacfl.models = {0: _state(0.0), 1: _state(1.0)}
    pacfl.assignment = dict(zip(pacfl.clustered, [0, 0, 1, 1], strict=True))

    def newcomer(angle_deg: float) -> ClassSubspaces:
        t = np.radians(angle_deg)  # in the e0-e1 plane: angle_deg from cluster 0, 90 from 1
        bases = np.zeros((2, 4, 1), dtype=np.float32)
        bases[0, :, 0] = np.cos(t) * e[0] + np.sin(t) * e[1]
        return ClassSubspaces(bases, np.array([1, 0]), np.array([5, 0]))

    for angle, want in ((2.0, 0), (30.0, 0)):  # 30 deg > threshold: would open cluster 2
        pacfl.collect_subspaces = lambda ids, rnd, a=angle: {ids[0]: newcomer(a)}
        assert pacfl.route([104], 1) == {104: want}


# ============================================================================ FeSEM
def test_fesem_e_step_picks_the_nearest_centre_and_m_step_averages():
    centres = {0: _state(0, 0, 0), 1: _state(10, 0, 0), 2: _state(0, 10, 0)}
    states = [_state(9, 1, 0), _state(1, 8, 0), _state(1, 1, 1), _state(5, 0, 0)]
    # 5,0,0 is equidistant from centres 0 and 1: the lower id wins
    assert nearest_centres(states, centres) == [1, 2, 0, 0]

    cfg = RunConfig.from_mapping({"strategy": "fesem", "num-clusters": 3})
    fesem = _offline(Fesem, cfg, [1, 2, 0, 0])
    nodes = list(fesem.nodes)
    fesem.models = {k: clone_state(v) for k, v in centres.items()}
    fesem.centres_ready = True
    fesem.assignment = dict.fromkeys(nodes, 0)
    replies = [
        Reply(nodes[0], RecordDict(), 0, _state(9, 1, 0), 10),
        Reply(nodes[1], RecordDict(), 0, _state(1, 8, 0), 10),
        Reply(nodes[2], RecordDict(), 0, _state(1, 1, 1), 10),
        Reply(nodes[3], RecordDict(), 0, _state(0, 1, 0), 30),
    ]
    fesem.aggregate(1, replies)
    assert [fesem.assignment[n] for n in nodes] == [1, 2, 0, 0]
    # M-step: sample-weighted mean of the members (10 x (1,1,1) + 30 x (0,1,0)) / 40
    assert torch.allclose(fesem.models[0]["w"], torch.tensor([0.25, 1.0, 0.25]))
    assert torch.equal(fesem.models[1]["w"], torch.tensor([9.0, 1.0, 0.0]))
    assert fesem.clustering["ari"] == pytest.approx(1.0)


def test_fesem_seeds_distinct_centres_with_kmeanspp():
    pts = np.array([[0.0, 0], [0.1, 0], [10, 0], [10.1, 0], [0, 10]])
    picked = kmeanspp(pts, 3, seed=0)
    assert len(picked) == 3
    # one point from each far-apart blob: k-means++ never picks two from the same blob here
    blobs = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2}
    assert sorted(blobs[i] for i in picked) == [0, 1, 2]
    assert len(kmeanspp(np.zeros((4, 2)), 3, seed=0)) == 1  # all equal: one distinct centre


# ============================================================================ short runs
# digits, 6 training nodes + 1 held out, 3 rounds of 4 local epochs. label-skew: 2 groups x 5
# labels, chance 0.2 and FedAvg stays at ~0.21. CFL trains one FedAvg model first, which stays at
# chance on that label-skew for these 3 rounds, so CFL runs on px level 2 (3 rotation groups,
# chance 0.1, FedAvg ~0.42) with eps scaled to the model from its logged norms: round 1 has
# mean-update norm ~0.36 (max ~0.81), later rounds >= 2, so eps1 = 1, eps2 = 0.5 split once.
PEER_RUNS = {
    "ifca": ({"shift": "label-skew"}, 0.4),
    "pacfl": ({"shift": "label-skew"}, 0.4),
    "fesem": ({"shift": "label-skew"}, 0.4),
    "cfl": ({"shift": "px", "level": 2, "cfl-eps1": 1.0, "cfl-eps2": 0.5}, 0.3),
}


@pytest.mark.parametrize("strategy", sorted(PEER_RUNS))
def test_peer_short_run_beats_chance(strategy, digits_skew):
    """Each peer learns well above chance, clusters, and routes + evaluates a held-out node."""
    overrides, min_accuracy = PEER_RUNS[strategy]
    run = (
        digits_skew
        | overrides
        | {
            "strategy": strategy,
            "num-server-rounds": 3,
            "local-epochs": 4,
            "holdout-clients": 1,
            "cfl-min-round": 1,
        }
    )
    results, _ = run_inprocess(run, 7)
    final = results["final"]
    assert final["accuracy_known"] > min_accuracy
    assert final["accuracy_holdout"] is not None  # the held-out node was routed and evaluated
    assert results["clustering"] is not None and final["num_clusters"] >= 2
    assert final["ari"] is not None and final["ari"] > 0.3
