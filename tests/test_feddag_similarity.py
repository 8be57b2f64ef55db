"""FedDAG distances: min-max, quantity weights, data/gradient distances, fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flux_app.common.agglomerative import alpha_sweep, assign_newcomer
from flux_app.common.subspaces import ClassSubspaces, pairwise_class_angles
from flux_app.methods.feddag.similarity import (
    data_distance,
    feddag_distances,
    fuse,
    fusion_weights,
    gradient_distance,
    minmax_offdiag,
    newcomer_distances,
    quantity_weights,
    row_entropy,
)


def _sym(m: np.ndarray) -> np.ndarray:
    m = 0.5 * (m + m.T)
    np.fill_diagonal(m, 0.0)
    return m


def _planted(n: int, k: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    lab = np.arange(n) % k
    return minmax_offdiag(_sym((lab[:, None] != lab[None, :]) + noise * rng.random((n, n))))


def _noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return minmax_offdiag(_sym(rng.random((n, n))))


def _population(rng: np.random.Generator, groups: int = 3, per: int = 6, d: int = 30, c: int = 6):
    """Clients in ``groups`` groups: each group holds its own classes and a gradient direction."""
    class_bases = [np.linalg.qr(rng.standard_normal((d, 3)))[0] for _ in range(c)]
    directions = rng.standard_normal((groups, 200))
    subs, sketches, labels = [], [], []
    for g in range(groups):
        classes = [(2 * g + j) % c for j in range(3)]
        for _ in range(per):
            bases = np.zeros((c, d, 3), dtype=np.float32)
            ranks = np.zeros(c, dtype=np.int64)
            counts = np.zeros(c, dtype=np.int64)
            for k in classes:
                u = class_bases[k] + 0.05 * rng.standard_normal((d, 3))
                bases[k] = np.linalg.qr(u)[0]
                ranks[k] = 3
                counts[k] = rng.integers(20, 200)
            subs.append(ClassSubspaces(bases=bases, ranks=ranks, counts=counts))
            sketches.append(directions[g] + 0.3 * rng.standard_normal(200))
            labels.append(g)
    return subs, np.stack(sketches), np.array(labels)


def test_minmax_offdiag() -> None:
    m = np.array([[5.0, 2.0, 4.0], [2.0, 9.0, 3.0], [4.0, 3.0, 7.0]])
    out = minmax_offdiag(m)
    np.testing.assert_allclose(out, [[0, 0, 1], [0, 0, 0.5], [1, 0.5, 0]])
    assert not minmax_offdiag(np.full((4, 4), 3.0)).any()  # constant -> zeros
    assert minmax_offdiag(np.array([[7.0]])).tolist() == [[0.0]]
    with pytest.raises(ValueError):
        minmax_offdiag(np.ones((2, 3)))


def test_quantity_weights() -> None:
    counts = np.array([[np.e**2 - 1, 0, 5], [np.e - 1, 0, 0], [np.e**2 - 1, 3, 5]])
    w = quantity_weights(counts, delta=0.5)
    assert w.shape == (3, 3, 3)
    # Class 0: ln(n+1) = 2, 1, 2 -> ratios 2 (0 vs 1) and 1 (0 vs 2). Max finite ratio is 2.
    assert w[0, 1, 0] == pytest.approx(1.5)  # the largest ratio -> 1 + delta
    assert w[0, 2, 0] == pytest.approx(0.5)  # equal counts -> 1 - delta
    assert w[0, 1, 1] == pytest.approx(0.5)  # both absent: ratio 1
    assert w[0, 2, 1] == pytest.approx(1.5)  # one-sided: largest finite ratio
    assert w[1, 2, 2] == pytest.approx(1.5)
    np.testing.assert_allclose(w, w.transpose(1, 0, 2))
    assert np.all((w >= 0.5) & (w <= 1.5))
    np.testing.assert_allclose(quantity_weights(np.full((3, 2), 4)), 1.0)  # all equal -> 1
    with pytest.raises(ValueError):
        quantity_weights(np.array([[-1, 2]]))


def test_data_distance_formula() -> None:
    rng = np.random.default_rng(0)
    subs, _, _ = _population(rng, groups=2, per=3)
    angles = pairwise_class_angles(subs)
    counts = np.stack([s.counts for s in subs])
    raw = (angles * quantity_weights(counts, 0.5)).mean(axis=2)  # mean over ALL classes
    v = data_distance(subs, 0.5)
    np.testing.assert_allclose(v, minmax_offdiag(raw))
    np.testing.assert_allclose(v, v.T)
    assert v.min() == 0.0 and v.max() == pytest.approx(1.0)
    np.testing.assert_allclose(data_distance(subs, 0.5, class_angles=angles), v)


def test_gradient_distance() -> None:
    s = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(gradient_distance(s), [[0, 0, 1], [0, 0, 0], [1, 0, 0]])


@pytest.mark.parametrize("method", ["pgd", "grid"])
def test_fusion_follows_the_informative_distance(method: str) -> None:
    rng = np.random.default_rng(1)
    n = 30
    for k in (2, 3, 5):
        informative, noise = _planted(n, k, 0.3, rng), _noise(n, rng)
        w_g = fusion_weights(informative, noise, method=method)  # G informative -> w -> 1
        w_v = fusion_weights(noise, informative, method=method)  # V informative -> w -> 0
        assert np.all((w_g >= 0) & (w_g <= 1)) and np.all((w_v >= 0) & (w_v <= 1))
        assert w_g.mean() > 0.9 and w_v.mean() < 0.1
        half = np.full(n, 0.5)
        assert (
            row_entropy(informative, noise, w_g).mean()
            < row_entropy(informative, noise, half).mean()
        )
        assert (
            row_entropy(noise, informative, w_v).mean()
            < row_entropy(noise, informative, half).mean()
        )


def test_softmax_sign_choice() -> None:
    """With softmax(+A) many-cluster structure can look MORE uncertain than noise; -A does not."""
    rng = np.random.default_rng(0)
    n = 40
    structured, noise = _planted(n, 10, 0.3, rng), _noise(n, rng)
    mask = torch.eye(n, dtype=torch.bool)

    def entropy_plus(a: np.ndarray) -> float:
        logp = torch.log_softmax(torch.from_numpy(a).masked_fill(mask, float("-inf")), dim=1)
        return float(-(logp.exp() * logp.masked_fill(mask, 0.0)).sum(1).mean())

    assert entropy_plus(structured) > entropy_plus(noise)  # +A would prefer the noise
    ones = np.ones(n)
    assert row_entropy(structured, noise, ones).mean() < row_entropy(noise, structured, ones).mean()


def test_fuse_symmetric() -> None:
    rng = np.random.default_rng(2)
    g, v = _noise(6, rng), _noise(6, rng)
    w = rng.random(6)
    a = fuse(g, v, w)
    np.testing.assert_allclose(a, a.T)
    assert np.all(np.diag(a) == 0)
    i, j = 1, 4  # upper triangle uses row i's weight
    assert a[i, j] == pytest.approx(w[i] * g[i, j] + (1 - w[i]) * v[i, j])
    assert a[j, i] == a[i, j]
    assert np.all((a >= 0) & (a <= 1))
    assert fusion_weights(g[:2, :2], v[:2, :2]).tolist() == [0.5, 0.5]  # one candidate per row


def test_feddag_distances_and_newcomer() -> None:
    rng = np.random.default_rng(3)
    subs, sketches, labels = _population(rng)
    fused = feddag_distances(subs, sketches, "fused")
    data = feddag_distances(subs, None, "data")
    grad = feddag_distances(None, sketches, "gradient")
    np.testing.assert_allclose(data.a, data.v)
    np.testing.assert_allclose(grad.a, grad.g)
    assert np.all(data.w == 0) and np.all(grad.w == 1)
    for dist in (fused, data, grad):
        np.testing.assert_allclose(dist.a, dist.a.T)
        sweep = alpha_sweep(dist.a)
        assert sweep.num_chosen == 3
        assert len(set(zip(sweep.labels, labels, strict=True))) == 3  # recovers the groups

    # A newcomer that duplicates client 7 sits where client 7 sits and joins its cluster.
    sweep = alpha_sweep(fused.a)
    rows, w = newcomer_distances(
        fused.scales,
        new_subspaces=[subs[7]],
        new_sketches=sketches[7:8],
        subspaces=subs,
        sketches=sketches,
    )
    assert rows.shape == (1, len(subs)) and 0.0 <= w[0] <= 1.0
    g_row = fused.g[7]
    v_row = fused.v[7]
    np.testing.assert_allclose(rows[0], w[0] * g_row + (1 - w[0]) * v_row, atol=1e-6)
    assert assign_newcomer(rows[0], sweep.labels, sweep.newcomer_alpha) == sweep.labels[7]
    # A newcomer with unseen classes and an unseen gradient direction gets a new cluster.
    alien = ClassSubspaces(
        bases=np.zeros_like(subs[0].bases),
        ranks=np.zeros(6, np.int64),
        counts=np.zeros(6, np.int64),
    )
    rows, _ = newcomer_distances(
        fused.scales,
        new_subspaces=[alien],
        new_sketches=-sketches.mean(0, keepdims=True),
        subspaces=subs,
        sketches=sketches,
    )
    assert assign_newcomer(rows[0], sweep.labels, sweep.newcomer_alpha) == 3
