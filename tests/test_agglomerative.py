"""Agglomerative clustering: cuts, FedDAG's loss and alpha sweep, newcomers, PACFL threshold."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score

from flux_app.common.agglomerative import (
    agglomerative_labels,
    alpha_sweep,
    assign_newcomer,
    canonical_labels,
    federated_loss,
    pacfl_auto_threshold,
    threshold_clusters,
)


def _minmax(m: np.ndarray) -> np.ndarray:
    off = m[~np.eye(len(m), dtype=bool)]
    out = (m - off.min()) / (off.max() - off.min())
    np.fill_diagonal(out, 0.0)
    return out


def planted(sizes, within, between_lo, seed, tightness=None):
    """Block distance matrix: within-block U(0, within_k), between-block U(between_lo, 1)."""
    rng = np.random.default_rng(seed)
    lab = np.repeat(np.arange(len(sizes)), sizes)
    n = lab.size
    tight = np.full(len(sizes), within) if tightness is None else np.asarray(tightness)
    m = np.where(
        lab[:, None] == lab[None, :],
        rng.uniform(0, 1, (n, n)) * tight[lab][:, None],
        rng.uniform(between_lo, 1.0, (n, n)),
    )
    m = 0.5 * (m + m.T)
    np.fill_diagonal(m, 0.0)
    return _minmax(m), lab


def test_cut_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    for linkage in ("average", "complete", "single"):
        for t in (0.3, 0.5, 0.7):
            m = rng.random((25, 25))
            m = 0.5 * (m + m.T)
            np.fill_diagonal(m, 0.0)
            ours = agglomerative_labels(m, t, linkage)
            ref = AgglomerativeClustering(
                n_clusters=None, metric="precomputed", linkage=linkage, distance_threshold=t
            ).fit_predict(m)
            assert adjusted_rand_score(ours, ref) == 1.0
            np.testing.assert_array_equal(ours, canonical_labels(ours))


def test_small_and_invalid_inputs() -> None:
    assert agglomerative_labels(np.zeros((1, 1)), 0.5).tolist() == [0]
    two = np.array([[0.0, 0.4], [0.4, 0.0]])
    assert agglomerative_labels(two, 0.5).tolist() == [0, 0]
    assert agglomerative_labels(two, 0.3).tolist() == [0, 1]
    assert alpha_sweep(np.zeros((1, 1))).labels.tolist() == [0]
    assert canonical_labels(np.array([7, 7, 3, 9, 3])).tolist() == [0, 0, 1, 2, 1]
    with pytest.raises(ValueError):
        agglomerative_labels(np.array([[0.0, 0.1], [0.5, 0.0]]), 0.5)  # asymmetric
    with pytest.raises(ValueError):
        agglomerative_labels(np.array([[0.0, np.nan], [np.nan, 0.0]]), 0.5)
    with pytest.raises(ValueError):
        agglomerative_labels(two, 0.5, linkage="ward")


def test_federated_loss_by_hand() -> None:
    a = np.array(
        [[0.0, 0.2, 0.9, 0.8], [0.2, 0.0, 0.7, 0.6], [0.9, 0.7, 0.0, 0.4], [0.8, 0.6, 0.4, 0.0]]
    )
    loss, l1, l2 = federated_loss(a, np.array([0, 0, 1, 1]))
    assert l1 == pytest.approx(2 * 0.2 / 4 + 2 * 0.4 / 4)
    assert l2 == pytest.approx(1.0)  # balanced: N/Z - std - |C| = 2 - 0 - 2 = 0
    assert loss == pytest.approx(l1 + 0.01 * l2)
    # Sizes 3 and 1: N/Z = 2, std = 1 -> excess max(0, 2 - 1 - 3) = 0 and max(0, 2 - 1 - 1) = 0.
    _, _, l2 = federated_loss(a, np.array([0, 0, 0, 1]))
    assert l2 == pytest.approx(1.0)
    # Sizes 4, 1, 1 out of 6 (gamma = 0): N/Z = 2 -> small clusters pay exp(1) each.
    b = np.zeros((6, 6))
    _, _, l2 = federated_loss(b, np.array([0, 0, 0, 0, 1, 2]), gamma=0.0)
    assert l2 == pytest.approx((1 + 2 * np.e) / 3)
    # The degeneracy: everyone alone has L1 = 0 and L2 = 1, i.e. the global minimum L = lambda.
    loss, l1, l2 = federated_loss(a, np.arange(4))
    assert (l1, l2, loss) == (0.0, 1.0, pytest.approx(0.01))


SETTINGS = [
    ("K4 tight", [15] * 4, 0.05, 0.6, None),
    ("K4 noisy", [15] * 4, 0.3, 0.5, None),
    ("K4 very noisy", [15] * 4, 0.5, 0.4, None),
    ("K3 unequal sizes", [30, 15, 5], 0.3, 0.5, None),
    ("K5", [20] * 5, 0.4, 0.5, None),
    ("K4 unequal tightness", [15] * 4, 0.3, 0.6, [0.05, 0.4, 0.4, 0.2]),
    ("K2", [25, 25], 0.3, 0.5, None),
    ("K10", [10] * 10, 0.3, 0.5, None),
    ("K3 tiny", [4, 3, 3], 0.3, 0.5, None),
]


@pytest.mark.parametrize(("name", "sizes", "within", "between", "tight"), SETTINGS)
def test_stable_pick_recovers_planted_k(name, sizes, within, between, tight) -> None:
    for seed in range(5):
        a, lab = planted(sizes, within, between, seed, tight)
        res = alpha_sweep(a)
        assert res.num_chosen == len(sizes), (name, seed)
        assert adjusted_rand_score(lab, res.labels) == 1.0, (name, seed)
        lo, hi = res.alpha_range
        assert lo <= res.alpha == hi
        assert res.merge_gap[0] <= res.newcomer_alpha <= res.merge_gap[1]
        np.testing.assert_array_equal(agglomerative_labels(a, res.newcomer_alpha), res.labels)


def test_paper_pick_is_degenerate_on_noisy_blocks() -> None:
    """Evidence for the module doc: min-loss + largest alpha fragments noisy clusters."""
    for seed in range(5):
        a, lab = planted([15] * 4, 0.3, 0.5, seed)
        res = alpha_sweep(a, pick="paper")
        assert res.num_chosen > 30  # near-singletons, not 4
        assert adjusted_rand_score(lab, res.labels) < 0.2
        # Tight blocks (every within linkage below the first alpha) are fine with it.
        a, lab = planted([15] * 4, 0.05, 0.6, seed)
        assert adjusted_rand_score(lab, alpha_sweep(a, pick="paper").labels) == 1.0


def test_sweep_grid_and_noise() -> None:
    a, _ = planted([10, 10], 0.2, 0.6, 0)
    res = alpha_sweep(a, step=0.3)
    np.testing.assert_allclose(res.alphas, [0.3, 0.6, 0.9, 1.0])
    res = alpha_sweep(a)
    assert res.alphas[0] == pytest.approx(0.05) and res.alphas[-1] == 1.0 and len(res.alphas) == 20
    assert res.partitions.shape == (20, 20) and res.losses.shape == (20,)
    np.testing.assert_allclose(res.losses, res.l1 + 0.01 * res.l2)
    # No structure: one cluster (plain FedAvg), for moderately many clients.
    rng = np.random.default_rng(0)
    for n in (30, 60):
        m = rng.random((n, n))
        m = 0.5 * (m + m.T)
        np.fill_diagonal(m, 0.0)
        assert alpha_sweep(_minmax(m)).num_chosen == 1
    # Deterministic.
    a, _ = planted([15] * 4, 0.3, 0.5, 3)
    r1, r2 = alpha_sweep(a), alpha_sweep(a.copy())
    np.testing.assert_array_equal(r1.labels, r2.labels)
    assert r1.alpha == r2.alpha


def test_assign_newcomer() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    row = np.array([0.1, 0.3, 0.15, 0.16, 0.9])
    assert assign_newcomer(row, labels, 0.5) == 1  # mean 0.155 < 0.2
    assert assign_newcomer(row, labels, 0.5, linkage="single") == 0  # min 0.1
    assert assign_newcomer(row, labels, 0.5, linkage="complete") == 1  # max 0.16 < 0.3
    assert assign_newcomer(row, labels, 0.1) == 3  # nothing close enough: new cluster
    assert assign_newcomer(np.array([0.2, 0.2]), np.array([4, 1]), 0.5) == 1  # tie -> smaller
    assert assign_newcomer(np.zeros(0), np.zeros(0, dtype=int), 0.5) == 0
    with pytest.raises(ValueError):
        assign_newcomer(row[:3], labels, 0.5)


def test_pacfl_threshold() -> None:
    for seed in range(3):
        a, lab = planted([8, 6, 6], 0.2, 0.6, seed)
        degrees = 40.0 * a  # PACFL works in degrees
        labels, t = threshold_clusters(degrees, 0.0)
        assert adjusted_rand_score(lab, labels) == 1.0
        assert t == pytest.approx(pacfl_auto_threshold(degrees))
        heights_ok = agglomerative_labels(degrees, t)
        np.testing.assert_array_equal(heights_ok, labels)
    labels, t = threshold_clusters(degrees, 45.0)  # an explicit threshold is used as given
    assert t == 45.0 and labels.max() == 0
    assert pacfl_auto_threshold(np.zeros((1, 1))) == 0.0
