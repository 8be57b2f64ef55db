"""CFL split criterion and bipartition."""

from __future__ import annotations

import numpy as np
import pytest

from flux_app.methods.cfl.split import (
    bipartition,
    cosine_similarity_matrix,
    cross_similarity,
    should_split,
    update_norms,
)


def _two_groups(rng: np.random.Generator, n_a: int, n_b: int, m: int = 100, noise: float = 0.3):
    direction = rng.standard_normal(m)
    direction /= np.linalg.norm(direction)
    a = 2.0 * direction + noise * rng.standard_normal((n_a, m)) / np.sqrt(m)
    b = -2.0 * direction + noise * rng.standard_normal((n_b, m)) / np.sqrt(m)
    return a, b


def test_cosine_similarity() -> None:
    u = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, 0.0]])
    sim = cosine_similarity_matrix(u)
    assert sim[0, 1] == pytest.approx(1.0)
    assert sim[0, 2] == pytest.approx(0.0)
    assert sim[0, 3] == pytest.approx(-1.0)
    assert np.all(sim[4, :4] == 0.0) and np.all(np.diag(sim) == 1.0)
    np.testing.assert_allclose(sim, sim.T)


def test_bipartition_recovers_planted_groups() -> None:
    for seed in range(5):
        rng = np.random.default_rng(seed)
        a, b = _two_groups(rng, 4 + seed, 7)
        order = rng.permutation(len(a) + len(b))
        updates = np.concatenate([a, b])[order]
        truth = (order < len(a)).astype(int)  # 1 = from group a
        idx_a, idx_b = bipartition(updates)
        assert 0 in idx_a and sorted(np.concatenate([idx_a, idx_b]).tolist()) == list(
            range(len(order))
        )
        got = np.zeros(len(order), dtype=int)
        got[idx_b] = 1
        assert np.array_equal(got, truth) or np.array_equal(1 - got, truth)
        assert cross_similarity(updates, idx_a, idx_b) < -0.5
    with pytest.raises(ValueError):
        bipartition(np.ones((1, 3)))


def test_split_criterion() -> None:
    rng = np.random.default_rng(0)
    a, b = _two_groups(rng, 5, 5)
    disagree = np.concatenate([a, b])  # mean ~ 0, individual norms ~ 2
    mean_norm, max_norm = update_norms(disagree)
    assert mean_norm < 0.4 and max_norm > 1.6
    assert should_split(disagree, eps1=0.4, eps2=1.6)
    agree = np.concatenate([a, a + 0.01])  # clients still agree: mean norm large
    assert not should_split(agree, eps1=0.4, eps2=1.6)
    quiet = 0.01 * disagree  # converged and quiet: no client moves much
    assert not should_split(quiet, eps1=0.4, eps2=1.6)
    assert not should_split(disagree[:1], eps1=10.0, eps2=0.0)  # a single client never splits
    # Weighted mean: group a dominates by data size, so the mean is no longer small.
    weights = np.array([100.0] * 5 + [1.0] * 5)
    assert update_norms(disagree, weights)[0] > 1.5
    assert not should_split(disagree, eps1=0.4, eps2=1.6, weights=weights)
