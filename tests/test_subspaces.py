"""Class subspaces and principal angles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import subspace_angles

from flux_app.common import subspaces
from flux_app.common.subspaces import (
    ClassSubspaces,
    SubspaceError,
    class_angle_matrix,
    class_subspaces,
    client_span,
    cross_class_angles,
    pacfl_proximity,
    pairwise_class_angles,
    principal_angle_deg,
)


def _orth(rng: np.random.Generator, d: int, p: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, p)))[0]


def _subs(bases: dict[int, np.ndarray], counts: dict[int, int], d: int, c: int, p: int = 3):
    b = np.zeros((c, d, p), dtype=np.float32)
    r = np.zeros(c, dtype=np.int64)
    n = np.zeros(c, dtype=np.int64)
    for k, u in bases.items():
        b[k, :, : u.shape[1]] = u
        r[k] = u.shape[1]
    for k, v in counts.items():
        n[k] = v
    return ClassSubspaces(bases=b, ranks=r, counts=n)


@pytest.mark.parametrize(("d", "p1", "p2"), [(20, 3, 3), (50, 1, 4), (784, 3, 2), (10, 5, 5)])
def test_principal_angle_matches_scipy(d: int, p1: int, p2: int) -> None:
    rng = np.random.default_rng(d + p1 + p2)
    for _ in range(5):
        u1, u2 = _orth(rng, d, p1), _orth(rng, d, p2)
        expected = np.degrees(subspace_angles(u1, u2).min())
        assert principal_angle_deg(u1, u2) == pytest.approx(expected, abs=1e-6)


def test_small_angles_are_accurate() -> None:
    rng = np.random.default_rng(0)
    u = _orth(rng, 30, 3)
    v = np.linalg.qr(u + 1e-7 * rng.standard_normal(u.shape))[0]
    expected = np.degrees(subspace_angles(u, v).min())
    assert principal_angle_deg(u, v) == pytest.approx(expected, abs=1e-7)
    assert 0 < principal_angle_deg(u, v) < 1e-4


def test_identical_and_invariance() -> None:
    rng = np.random.default_rng(1)
    u = _orth(rng, 40, 3)
    q = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    assert principal_angle_deg(u, u) == pytest.approx(0.0, abs=1e-6)
    assert principal_angle_deg(u, -u) == pytest.approx(0.0, abs=1e-6)
    assert principal_angle_deg(u, u @ q) == pytest.approx(0.0, abs=1e-6)
    w = _orth(rng, 40, 2)
    base = principal_angle_deg(u, w)
    assert principal_angle_deg(-u @ q, w[:, ::-1] * np.array([-1, 1])) == pytest.approx(base)
    # Orthogonal coordinate blocks are 90 degrees apart.
    e = np.eye(6)
    assert principal_angle_deg(e[:, :2], e[:, 2:5]) == pytest.approx(90.0)
    assert principal_angle_deg(e[:, :2], np.zeros((6, 0))) == 90.0


def test_class_angle_conventions() -> None:
    rng = np.random.default_rng(2)
    d, c = 12, 4
    u = _orth(rng, d, 3)
    a = _subs({0: u, 1: _orth(rng, d, 3)}, {0: 5, 1: 7}, d, c)
    b = _subs(
        {0: u @ np.linalg.qr(rng.standard_normal((3, 3)))[0], 2: _orth(rng, d, 2)},
        {0: 9, 2: 4},
        d,
        c,
    )
    ang = class_angle_matrix(a, b)
    assert ang[0] == pytest.approx(0.0, abs=1e-3)  # same subspace, other basis (float32)
    assert ang[1] == 90.0  # only a has class 1
    assert ang[2] == 90.0  # only b has class 2
    assert ang[3] == 0.0  # neither
    pair = pairwise_class_angles([a, b])
    np.testing.assert_allclose(pair[0, 1], ang, atol=1e-3)
    np.testing.assert_allclose(pair[1, 0], ang, atol=1e-3)
    assert np.all(pair[[0, 1], [0, 1]] == 0)


def test_pairwise_matches_loop() -> None:
    rng = np.random.default_rng(3)
    d, c = 30, 5
    subs = []
    for i in range(7):
        present = rng.random(c) < 0.6
        bases = {k: _orth(rng, d, 1 + (i + k) % 3) for k in range(c) if present[k]}
        subs.append(_subs(bases, {k: 10 for k in bases}, d, c))
    pair = pairwise_class_angles(subs, block=3)
    for i in range(7):
        for j in range(7):
            if i != j:
                np.testing.assert_allclose(
                    pair[i, j], class_angle_matrix(subs[i], subs[j]), atol=1e-4
                )
    np.testing.assert_allclose(pair, pair.transpose(1, 0, 2))
    cross = cross_class_angles(subs[:2], subs[2:])
    np.testing.assert_allclose(cross, pair[:2, 2:], atol=1e-6)


@pytest.mark.parametrize("exact_max", [256, 8])  # 8: force the randomised SVD path
def test_class_subspaces_exact_and_randomised(exact_max: int, monkeypatch) -> None:
    monkeypatch.setattr(subspaces, "_EXACT_SVD_MAX", exact_max)
    rng = np.random.default_rng(4)
    for d, n_c in [(20, 50), (60, 90)]:
        # Low-rank-ish class data: 3 strong directions + noise.
        dirs = _orth(rng, d, 3)
        x = (rng.standard_normal((n_c, 3)) * [10, 6, 3]) @ dirs.T + 0.05 * rng.standard_normal(
            (n_c, d)
        )
        y = np.zeros(n_c, dtype=np.int64)
        s = class_subspaces(x, y, num_classes=2, p=3)
        assert s.ranks.tolist() == [3, 0] and s.counts.tolist() == [n_c, 0]
        cols = x / np.linalg.norm(x, axis=1, keepdims=True)
        ref = np.linalg.svd(cols.T, full_matrices=False)[0][:, :3]
        assert np.degrees(subspace_angles(s.bases[0].astype(np.float64), ref).max()) < 0.1
        np.testing.assert_allclose(s.bases[0].T @ s.bases[0], np.eye(3), atol=1e-5)
        assert not s.bases[1].any()


def test_class_subspaces_rank_cap_and_scale_invariance() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 8))
    y = np.array([0, 0, 1, 2, 2, 2])
    x[3:] = x[3]  # class 2: three copies of one sample -> one direction
    s = class_subspaces(x, y, num_classes=4, p=3)
    assert s.ranks.tolist() == [2, 1, 1, 0]
    assert s.present.tolist() == [True, True, True, False]
    scaled = class_subspaces(x * rng.uniform(0.1, 10, (6, 1)), y, num_classes=4, p=3)
    for c in range(3):
        assert (
            principal_angle_deg(s.bases[c, :, : s.ranks[c]], scaled.bases[c, :, : s.ranks[c]])
            < 1e-3
        )
    # Images are flattened.
    img = class_subspaces(rng.standard_normal((5, 1, 4, 4)), np.zeros(5, dtype=int), 1, p=2)
    assert img.bases.shape == (1, 16, 2)
    # A class whose samples are all zero is present but has no direction: 90 to anything.
    z = class_subspaces(np.zeros((2, 8)), np.array([0, 0]), num_classes=1, p=3)
    assert z.ranks.tolist() == [0] and z.present.tolist() == [True]
    assert class_angle_matrix(z, class_subspaces(x[:2], np.array([0, 0]), 1))[0] == 90.0


def test_roundtrip_and_validation() -> None:
    rng = np.random.default_rng(6)
    s = class_subspaces(rng.standard_normal((40, 10)), rng.integers(0, 3, 40), num_classes=4, p=3)
    arrays = s.to_arrays()
    back = ClassSubspaces.from_arrays(arrays, dim=10, num_classes=4, p=3)
    np.testing.assert_array_equal(back.bases, s.bases)
    np.testing.assert_array_equal(back.counts, s.counts)

    def bad(**changes):
        payload = {k: v.copy() for k, v in arrays.items()}
        payload.update(changes)
        return payload

    nan = arrays["bases"].copy()
    nan[0, 0, 0] = np.nan
    skew = arrays["bases"].copy()
    skew[0, :, 0] *= 2.0
    pad = arrays["bases"].copy()
    pad[3, 0, 0] = 1.0  # class 3 is absent: rank 0, must be all zeros
    cases = [
        bad(bases=nan),
        bad(bases=skew),
        bad(bases=pad),
        bad(bases=arrays["bases"][:, :9]),
        bad(bases=arrays["bases"].astype(np.int32)),
        bad(counts=np.array([-1, 5, 5, 0])),
        bad(ranks=np.array([4, 3, 3, 0])),
        bad(ranks=arrays["ranks"].astype(np.float64)),
        bad(counts=arrays["counts"][:3]),
        {k: v for k, v in arrays.items() if k != "ranks"},
    ]
    for payload in cases:
        with pytest.raises(SubspaceError):
            ClassSubspaces.from_arrays(payload, dim=10, num_classes=4, p=3)
    with pytest.raises(SubspaceError):
        ClassSubspaces.from_arrays(arrays, dim=10, num_classes=5, p=3)


def test_pacfl_proximity_span() -> None:
    rng = np.random.default_rng(7)
    d, c = 40, 4
    e = np.eye(d)
    blocks = {k: e[:, 3 * k : 3 * k + 3] for k in range(c)}  # mutually orthogonal classes
    a = _subs({0: blocks[0], 1: blocks[1]}, {0: 5, 1: 5}, d, c)
    b = _subs(
        {1: blocks[1] @ np.linalg.qr(rng.standard_normal((3, 3)))[0], 2: blocks[2]},
        {1: 5, 2: 5},
        d,
        c,
    )
    cc = _subs({3: blocks[3]}, {3: 5}, d, c)
    empty = _subs({}, {}, d, c)
    prox = pacfl_proximity([a, b, cc, empty])
    assert prox[0, 1] == pytest.approx(0.0, abs=1e-3)  # share class 1
    assert prox[0, 2] == pytest.approx(90.0)  # nothing in common
    assert prox[1, 2] == pytest.approx(90.0)
    assert prox[3, 0] == 90.0 and prox[3, 3] == 0.0
    np.testing.assert_allclose(prox, prox.T)
    # The span proximity is the true principal angle of the concatenated bases.
    u, v = _orth(rng, d, 2), _orth(rng, d, 2)
    x = _subs({0: u[:, :1], 1: u[:, 1:]}, {0: 3, 1: 3}, d, 2)
    y = _subs({0: v}, {0: 3}, d, 2)
    assert pacfl_proximity([x, y])[0, 1] == pytest.approx(principal_angle_deg(u, v), abs=1e-6)
    assert client_span(x).shape == (d, 2)
    np.testing.assert_allclose(
        pacfl_proximity([a, b, cc], mode="class_mean"),
        pairwise_class_angles([a, b, cc]).mean(axis=2),
    )
    with pytest.raises(ValueError):
        pacfl_proximity([a, b], mode="nope")
