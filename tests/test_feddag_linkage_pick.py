"""FedDAG's sweep options: UPGMA vs WPGMA (``feddag-linkage``), the pick rule
(``feddag-alpha-pick``), newcomers under each linkage, and the run-config validation."""

from __future__ import annotations

import numpy as np
import pytest

from flux_app.common.agglomerative import (
    agglomerative_labels,
    alpha_sweep,
    assign_newcomer,
    cluster_distances,
    dendrogram,
    federated_loss,
    linkage_weights,
)
from flux_app.engine.config import ConfigError, RunConfig
from flux_app.methods.feddag.config import FeddagConfig
from flux_app.methods.feddag.similarity import place_newcomers

#: Clients A, B, C, D. Merges: A+B at 0.12, then C at (0.22 + 0.22) / 2 = 0.22 (both
#: linkages: two equal parts), then D: UPGMA (0.62 + 0.62 + 0.32) / 3 = 0.52, WPGMA
#: ((0.62 + 0.62) / 2 + 0.32) / 2 = 0.47.
ABCD = np.array(
    [
        [0.00, 0.12, 0.22, 0.62],
        [0.12, 0.00, 0.22, 0.62],
        [0.22, 0.22, 0.00, 0.32],
        [0.62, 0.62, 0.32, 0.00],
    ]
)


def test_upgma_and_wpgma_merge_heights_and_cut() -> None:
    np.testing.assert_allclose(dendrogram(ABCD, "average")[:, 2], [0.12, 0.22, 0.52])
    np.testing.assert_allclose(dendrogram(ABCD, "weighted")[:, 2], [0.12, 0.22, 0.47])
    # At 0.5: UPGMA keeps D apart, WPGMA has already merged it.
    assert agglomerative_labels(ABCD, 0.5, "average").tolist() == [0, 0, 0, 1]
    assert agglomerative_labels(ABCD, 0.5, "weighted").tolist() == [0, 0, 0, 0]
    # The sweep's dendrogram follows the linkage: the one-cluster partition starts at 0.55
    # (UPGMA) or 0.5 (WPGMA), so the gap above {ABC}, {D} ends at 0.52 or 0.47.
    up, wp = alpha_sweep(ABCD, linkage="average"), alpha_sweep(ABCD, linkage="weighted")
    assert up.alpha_range == (0.55, 1.0) and wp.alpha_range == (0.5, 1.0)
    at_045, at_05 = np.flatnonzero(up.alphas == 0.45)[0], np.flatnonzero(up.alphas == 0.5)[0]
    assert up.partitions[at_045].tolist() == wp.partitions[at_045].tolist() == [0, 0, 0, 1]
    assert up.num_clusters[at_05] == 2 and wp.num_clusters[at_05] == 1
    with pytest.raises(ValueError, match="linkage"):
        alpha_sweep(ABCD, linkage="ward")
    with pytest.raises(ValueError, match="linkage"):
        alpha_sweep(np.zeros((1, 1)), linkage="ward")  # checked even without a dendrogram


def test_wpgma_weights_by_hand_and_newcomer() -> None:
    # Cluster {A, B, C}: A and B at depth 2 (1/4 each), C at depth 1 (1/2); D alone.
    w = linkage_weights(ABCD, np.array([0, 0, 0, 1]), "weighted")
    np.testing.assert_allclose(w, [0.25, 0.25, 0.5, 1.0])
    uniform = linkage_weights(ABCD, np.array([0, 0, 0, 1]), "average")
    np.testing.assert_allclose(uniform, [1 / 3, 1 / 3, 1 / 3, 1.0])
    # D as a newcomer to {A, B, C} at threshold 0.5: its WPGMA distance is 0.47 (joins), its
    # UPGMA distance 0.52 (a new cluster), the heights the full dendrograms merge it at.
    row, labels = ABCD[3, :3], np.array([0, 0, 0])
    w3 = linkage_weights(ABCD[:3, :3], labels, "weighted")
    np.testing.assert_allclose(cluster_distances(row, labels, "weighted", w3)[1], [0.47])
    assert assign_newcomer(row, labels, 0.5, "weighted", w3) == 0
    assert assign_newcomer(row, labels, 0.5, "average") == 1
    assert place_newcomers(row[None], labels, 0.5, [0], "weighted", w3) == [0]
    # A newcomer that would open a cluster goes to the nearest one by the same linkage.
    assert place_newcomers(row[None], labels, 0.5, [0], "average") == [0]
    with pytest.raises(ValueError, match="weights"):
        assign_newcomer(row, labels, 0.5, "weighted")  # WPGMA needs the merge tree
    with pytest.raises(ValueError, match="weights"):
        assign_newcomer(row, labels, 0.5, "average", w3)


@pytest.mark.parametrize("seed", range(4))
def test_wpgma_weights_reproduce_scipy_merge_height(seed) -> None:
    """A far newcomer joins the whole population last: scipy's last merge height is the
    newcomer's linkage distance, ``sum_i w_i d(x, i)`` (WPGMA) or the mean (UPGMA)."""
    rng = np.random.default_rng(seed)
    n = 9
    m = rng.uniform(0.0, 1.0, (n, n))
    m = 0.5 * (m + m.T)
    np.fill_diagonal(m, 0.0)
    row = 10.0 + rng.uniform(0.0, 1.0, n)
    full = np.zeros((n + 1, n + 1))
    full[:n, :n], full[n, :n], full[:n, n] = m, row, row
    labels = np.zeros(n, dtype=np.int64)
    w = linkage_weights(m, labels, "weighted")
    assert w.sum() == pytest.approx(1.0) and len(set(np.round(w, 12))) > 1  # not uniform
    assert dendrogram(full, "weighted")[-1, 2] == pytest.approx(float(w @ row))
    assert dendrogram(full, "average")[-1, 2] == pytest.approx(float(row.mean()))


def test_alpha_pick_rules_differ_on_degenerate_loss() -> None:
    # UPGMA partitions of ABCD on the grid: alone (0.05, 0.10), {AB} (0.15, 0.20), {ABC}
    # (0.25..0.50), one cluster (0.55..1.0). Losses L = L1 + 0.01 L2, with L2 = 1 each time
    # (sizes 2, 1, 1: N/Z - std - 1 = 4/3 - 0.47 - 1 < 0; sizes 3, 1: 2 - 1 - 1 = 0):
    #   alone: 0 + 0.01; {AB},C,D: 2 * 0.12 / 4 + 0.01; {ABC},D: 2 * 0.56 / 9 + 0.01;
    #   one: 2 * 2.12 / 16 + 0.01.
    want = {
        0.10: 0.01,
        0.20: 0.06 + 0.01,
        0.50: 1.12 / 9 + 0.01,
        1.00: 4.24 / 16 + 0.01,
    }
    res = alpha_sweep(ABCD, pick="lowest-loss")
    for alpha, loss in want.items():
        assert res.losses[np.flatnonzero(np.isclose(res.alphas, alpha))[0]] == pytest.approx(loss)
    # Lowest loss (then largest alpha): everyone alone, alpha 0.10.
    assert res.pick == "lowest-loss"
    assert res.alpha == pytest.approx(0.10) and res.labels.tolist() == [0, 1, 2, 3]
    assert alpha_sweep(ABCD, pick="paper").alpha == res.alpha  # the old name, same rule
    # Longest run (10 alphas): one cluster, alpha 1.0.
    stable = alpha_sweep(ABCD)
    assert stable.pick == "stable"
    assert stable.alpha == 1.0 and stable.labels.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="pick"):
        alpha_sweep(ABCD, pick="smallest")


def test_alpha_pick_rules_differ_on_a_narrow_gap() -> None:
    # Two tight blocks (within 0.02) whose UPGMA distance is only 0.19 (eight pairs at 0.1, one
    # at 0.9): {012}, {345} for alpha 0.05..0.15 (3 alphas), one cluster for 0.2..1.0 (17).
    # The stable rule takes the long run (one cluster); the lowest loss is the two blocks.
    a = np.full((6, 6), 0.1)
    a[:3, :3] = a[3:, 3:] = 0.02
    a[0, 3] = a[3, 0] = 0.9
    np.fill_diagonal(a, 0.0)
    low = alpha_sweep(a, pick="lowest-loss")
    assert low.labels.tolist() == [0, 0, 0, 1, 1, 1] and low.alpha == pytest.approx(0.15)
    assert low.losses[low.index] == pytest.approx(2 * (6 * 0.02 / 9) + 0.01)
    assert federated_loss(a, low.labels)[0] == pytest.approx(low.losses[low.index])
    stable = alpha_sweep(a, pick="stable")
    assert stable.num_chosen == 1 and stable.alpha == 1.0


def test_run_config_keys() -> None:
    cfg = RunConfig()
    opts = cfg.section(FeddagConfig)
    assert (opts.linkage, opts.alpha_pick) == ("average", "stable")
    cfg = RunConfig.from_mapping({"feddag-linkage": "weighted", "feddag-alpha-pick": "lowest-loss"})
    opts = cfg.section(FeddagConfig)
    assert (opts.linkage, opts.alpha_pick) == ("weighted", "lowest-loss")
    for key, bad in (
        ("feddag-linkage", "ward"),
        ("feddag-linkage", "single"),
        ("feddag-linkage", "WPGMA"),
        ("feddag-alpha-pick", "paper"),
        ("feddag-alpha-pick", "lowest"),
    ):
        with pytest.raises(ConfigError, match=f"'{key}' is '{bad}'; choose one of") as err:
            RunConfig.from_mapping({key: bad})
        assert ("average, weighted" if key == "feddag-linkage" else "stable, lowest-loss") in str(
            err.value
        )


def test_fit_uses_the_configured_linkage_and_pick(monkeypatch) -> None:
    import flux_app.methods.feddag.fit as fit_module

    seen = {}

    def fake_sweep(a, **kwargs):
        seen.update(kwargs)
        return alpha_sweep(a, **kwargs)

    class Distances:
        a = ABCD

    monkeypatch.setattr(fit_module, "alpha_sweep", fake_sweep)
    monkeypatch.setattr(fit_module, "pairwise_class_angles", lambda subs: None)
    monkeypatch.setattr(fit_module, "feddag_distances", lambda *args, **kwargs: Distances())
    opts = FeddagConfig(linkage="weighted", alpha_pick="lowest-loss", variant="single")
    fit = fit_module.fit_feddag([0, 1, 2, 3], [], np.zeros((4, 1)), opts)
    assert seen["linkage"] == "weighted" and seen["pick"] == "lowest-loss"
    assert fit.sweep.pick == "lowest-loss" and fit.labels == [0, 1, 2, 3]


def test_end_to_end_with_the_authors_linkage(feddag_run, monkeypatch) -> None:
    """A FedDAG run with ``feddag-linkage = "weighted"``: the sweep and the held-out nodes'
    placement use WPGMA (the merge-tree weights reach the newcomer pass)."""
    import flux_app.methods.feddag.strategy as strategy_module
    from client_app import app
    from flux_app.engine.inprocess import InProcessGrid
    from flux_app.engine.server import build_strategy

    seen = []
    place = strategy_module.place_newcomers

    def spy(rows, labels, alpha, clusters, linkage="average", weights=None):
        seen.append((linkage, weights))
        return place(rows, labels, alpha, clusters, linkage, weights)

    monkeypatch.setattr(strategy_module, "place_newcomers", spy)
    cfg = feddag_run | {"feddag-linkage": "weighted", "holdout-clients": 2}
    rc = RunConfig.from_mapping(cfg)
    strategy = build_strategy(rc)
    results = strategy.start(InProcessGrid(app, rc.to_dict(), 17))
    assert results["clustering"]["ari"] >= 0.9, results["clustering"]
    assert results["final"]["routing_accuracy"] == 1.0
    assert seen and all(link == "weighted" for link, _ in seen)
    labels = np.asarray([strategy.assignment[n] for n in strategy.population[0]])
    want = linkage_weights(strategy.distances.a, labels, "weighted")
    np.testing.assert_allclose(seen[-1][1], want)
    mean = 1.0 / np.bincount(labels)[labels]
    assert not np.allclose(want, mean)  # real tree weights, not the member mean
