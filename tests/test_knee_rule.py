"""knee-DBSCAN's knee: Kneedle's first confirmed knee (the reference's kneed call) vs the
largest gap below the chord, and the eps boundary (a neighbour at exactly eps is inside).

Curves are given in normalised units: ``gap_k = k / (m - 1) - y_k`` with ``y`` from 0 to 1, and
the walk reads the gaps from the last (largest) point down; hand-computed knees are in comments.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import DBSCAN
from sklearn.neighbors import NearestNeighbors

from flux_app.methods.flux.clustering import _run_knee_dbscan, knee_point


def _curve(gap: list[float]) -> np.ndarray:
    """The increasing curve (y in [0, 1]) whose gaps below the chord are ``gap``."""
    g = np.asarray(gap, dtype=np.float64)
    y = np.linspace(0.0, 1.0, g.size) - g
    assert g[0] == 0.0 and g[-1] == 0.0 and np.all(np.diff(y) >= -1e-12), "not a valid curve"
    return y


def test_first_confirmed_knee_differs_from_largest_gap() -> None:
    # m = 11, S / (m - 1) = 0.1. Global maximum 0.37 at k = 4; a smaller local maximum 0.35 at
    # k = 8. Walk from the top: k = 8 sets the threshold 0.25; k = 7 (0.27) is above it, k = 6
    # (0.19) below -> knee at 8, before the walk ever reaches the larger maximum.
    gap = [0, 0.10, 0.19, 0.28, 0.37, 0.10, 0.19, 0.27, 0.35, 0.20, 0]
    y = _curve(gap)
    assert knee_point(y, rule="first") == 8
    assert knee_point(y, rule="max") == 4
    assert knee_point(5.0 + 3.0 * y[::-1], rule="first") == 8  # shifted, scaled, unsorted
    # S = 2.6 asks for a drop of more than 0.26: 0.35 -> 0.10 (the next minimum) is not enough,
    # 0.37 -> 0.10 is.
    assert knee_point(y, rule="first", sensitivity=2.6) == 4


def test_unconfirmed_maximum_is_skipped_and_its_threshold_replaced() -> None:
    # m = 21, step 0.05. Maxima of the walk: k = 15 (0.20; falls only to 0.16 before rising:
    # not confirmed), k = 12 (0.25; threshold 0.20, k = 10 at 0.16 is below: the knee) and
    # k = 8 (0.40, the largest gap).
    gap = [0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.12, 0.16]
    gap += [0.21, 0.25, 0.16, 0.17, 0.20, 0.12, 0.08, 0.05, 0.02, 0]
    y = _curve(gap)
    assert knee_point(y, rule="first") == 12
    assert knee_point(y, rule="first", after_minimum="reset") == 12
    assert knee_point(y, rule="max") == 8


def test_after_a_minimum_wait_or_reset() -> None:
    # m = 11, step 0.1. Near the top the curve lies ABOVE its chord (negative gaps). The walk
    # starts at the top end (k = 10, gap 0: a maximum, threshold -0.1), reaches a local minimum
    # at k = 9 (-0.05) and then -0.03 at k = 8.
    # "reset" (kneed <= 0.8.5): the threshold is 0 after the minimum and -0.03 < 0 confirms the
    # top end itself: knee = 10 (eps = the largest distance).
    # "wait" (kneed >= 0.8.6, default): nothing until the next maximum, k = 5 (0.15, threshold
    # 0.05) which is not confirmed (0.12 then a minimum), then k = 3 (0.28, threshold 0.18):
    # k = 1 at 0.10 confirms it.
    gap = [0, 0.10, 0.20, 0.28, 0.12, 0.15, 0.05, -0.02, -0.03, -0.05, 0]
    y = _curve(gap)
    assert knee_point(y, rule="first") == 3
    assert knee_point(y, rule="first", after_minimum="wait") == 3
    assert knee_point(y, rule="first", after_minimum="reset") == 10


def test_curves_without_a_knee() -> None:
    # Three points, one elbow: the maximum (0.5) would need a drop below 0.5 - 1/2 = 0, and the
    # gap only returns to 0. Kneedle finds no knee; the largest-gap rule does (index 1).
    assert knee_point(np.array([0.0, 0.0, 1.0]), rule="first") is None
    assert knee_point(np.array([0.0, 0.0, 1.0]), rule="max") == 1
    for rule in ("first", "max"):
        assert knee_point(np.linspace(0.0, 1.0, 50), rule=rule) is None  # straight: ties only
        assert knee_point(np.linspace(0.3, 0.9, 7) * 1e-3 + 2.0, rule=rule) is None
        assert knee_point(np.ones(20), rule=rule) is None  # flat
        assert knee_point(np.array([1.0, 5.0]), rule=rule) is None  # too short
    # A concave curve: the largest-gap rule has no knee (gap < 0.05); Kneedle confirms the top
    # end (the walk falls below the chord at once), i.e. eps = the largest distance, which is
    # also what knee-DBSCAN uses when there is no knee.
    concave = np.sqrt(np.linspace(0.0, 1.0, 50))
    assert knee_point(concave, rule="max") is None
    assert knee_point(concave, rule="first") == 49
    assert knee_point(concave, rule="first", after_minimum="reset") == 49


def test_bad_rule() -> None:
    with pytest.raises(ValueError, match="rule"):
        knee_point(np.arange(5.0), rule="last")
    with pytest.raises(ValueError, match="after_minimum"):
        knee_point(np.arange(5.0), rule="first", after_minimum="never")


def test_knee_dbscan_uses_the_first_confirmed_knee() -> None:
    # 1-D clients at 0, 1, 5: 1-NN distances [1, 1, 4], no Kneedle knee -> eps = 4, one group
    # (with a note). The largest-gap rule takes eps = 1 and leaves the client at 5 as noise.
    x = np.array([[0.0], [1.0], [5.0]])
    notes: list[str] = []
    assert _run_knee_dbscan(x, notes).tolist() == [0, 0, 0]
    assert any("no knee" in n for n in notes)
    assert _run_knee_dbscan(x, [], rule="max").tolist() == [0, 0, -1]


def test_knee_dbscan_eps_from_the_first_knee() -> None:
    # Pairs of clients with the first curve above as distances (1.0 .. 11.0); each pair gives
    # two equal 1-NN distances, so the sorted curve holds every value twice and the knees move
    # to the second copy: index 17 = pair 8 (first), index 9 = pair 4 (max).
    gap = [0, 0.10, 0.19, 0.28, 0.37, 0.10, 0.19, 0.27, 0.35, 0.20, 0]
    d1 = np.round(10 * _curve(gap), 9) + 1.0  # 1.0, 1.0, 1.1, 1.2, 1.3, 5.0, ... 11.0
    x = np.zeros((2 * d1.size, 2))
    x[0::2, 0] = 1000.0 * np.arange(d1.size)
    x[1::2, 0] = x[0::2, 0] + d1
    nn = NearestNeighbors(n_neighbors=2).fit(x).kneighbors(x)[0][:, 1]
    assert knee_point(nn, rule="first") == 17 and knee_point(nn, rule="max") == 9
    first = _run_knee_dbscan(x, [])
    largest = _run_knee_dbscan(x, [], rule="max")
    # eps = d1[8] = 5.5 (first) joins the pairs k <= 8; eps = d1[4] = 1.3 (max) only k <= 4.
    assert np.all(first[: 2 * 9] >= 0) and np.all(first[2 * 9 :] == -1)
    assert np.all(largest[: 2 * 5] >= 0) and np.all(largest[2 * 5 :] == -1)


def test_sklearn_dbscan_counts_a_neighbour_at_exactly_eps() -> None:
    # The reference runs DBSCAN(eps=knee value): a neighbour at distance == eps is inside.
    x = np.array([[0.0], [1.0], [5.0]])
    assert DBSCAN(eps=1.0, min_samples=2).fit_predict(x).tolist() == [0, 0, -1]
    assert DBSCAN(eps=np.nextafter(1.0, 0.0), min_samples=2).fit_predict(x).tolist() == [-1] * 3


def test_the_knee_client_keeps_its_neighbour(monkeypatch) -> None:
    """Every client whose 1-NN distance is <= the knee value is a DBSCAN core point, the knee
    client included. DBSCAN recomputes the distances another way than ``kneighbors``; with
    eps == the knee value exactly, that client lost its neighbour in 100 of 400 such
    federations (the reference's behaviour), so 40 federations catch a missing tolerance."""
    import sklearn.cluster

    fitted = []

    class Spy(DBSCAN):
        def fit(self, *args, **kwargs):  # noqa: D102
            fitted.append(self)
            return super().fit(*args, **kwargs)

    monkeypatch.setattr(sklearn.cluster, "DBSCAN", Spy)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        groups = rng.normal(0.0, 5.0, (3, 40))
        x = groups[rng.integers(0, 3, 45)] + rng.normal(0.0, rng.uniform(0.2, 2.0), (45, 40))
        fitted.clear()
        labels = _run_knee_dbscan(x, [])
        d1 = NearestNeighbors(n_neighbors=2).fit(x).kneighbors(x)[0][:, 1]
        i = knee_point(d1, rule="first")
        assert i is not None
        inside = np.flatnonzero(d1 <= np.sort(d1)[i])
        assert set(inside.tolist()) <= set(fitted[0].core_sample_indices_.tolist()), seed
        assert np.all(labels[inside] >= 0), seed


def test_matches_kneed_when_installed() -> None:
    """Cross-check against the kneed package itself (not a dependency: skipped without it)."""
    kneed = pytest.importorskip("kneed")
    import warnings

    version = tuple(int(p) for p in kneed.__version__.split(".")[:3])
    mode = "wait" if version >= (0, 8, 6) else "reset"
    rng = np.random.default_rng(0)
    for trial in range(300):
        m = int(rng.integers(3, 200))
        v = np.round(rng.exponential(1.0, m) ** (1 + trial % 3), 6)
        y = np.sort(v)
        if y[-1] == y[0]:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = kneed.KneeLocator(np.arange(m), y, curve="convex", direction="increasing")
        want = None if ref.knee is None else int(ref.knee)
        assert knee_point(v, rule="first", after_minimum=mode) == want, trial
