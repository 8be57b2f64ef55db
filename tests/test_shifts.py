"""Each partition protocol's defining property, on the tiny synthetic and digits sources."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flux_app.data import (
    SHIFTS,
    ClientData,
    ShiftSpec,
    Source,
    group_of,
    input_shape,
    load_source,
    make_client_data,
    num_groups,
    partition_groups,
    partition_plan,
    px_patterns,
)
from flux_app.data import shifts as shifts_mod

C = 10


@pytest.fixture(scope="module")
def src() -> Source:
    return load_source("synthetic", seed=0)


def clients(src: Source, spec: ShiftSpec, n: int) -> list[ClientData]:
    return [make_client_data(src, spec, n, pid) for pid in range(n)]


def source_x(src: Source, idx: np.ndarray, test: bool = False) -> torch.Tensor:
    x = src.x_test if test else src.x_train
    return x[torch.from_numpy(idx.copy())].float() / 255.0


def source_y(src: Source, idx: np.ndarray, test: bool = False) -> np.ndarray:
    return (src.y_test if test else src.y_train).numpy()[idx]


# ------------------------------------------------------------------------------ validation ----


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "rotate"}, "label-skew"),  # message lists the valid shifts
        ({"kind": "px", "level": 0}, "level"),
        ({"kind": "px", "level": 9}, "level"),
        ({"kind": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"kind": "label-skew", "rho": 0.0}, "rho"),
        ({"kind": "label-skew", "rho": 1.5}, "rho"),
        ({"kind": "none", "val_fraction": 1.0}, "val_fraction"),
        ({"kind": "none", "val_fraction": -0.1}, "val_fraction"),
    ],
)
def test_spec_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ShiftSpec(**kwargs)


def test_partition_arguments_checked(src: Source) -> None:
    spec = ShiftSpec("none")
    for pid in (-1, 4):
        with pytest.raises(ValueError, match="partition_id"):
            make_client_data(src, spec, 4, pid)
    with pytest.raises(ValueError, match="num_partitions"):
        make_client_data(src, spec, 0, 0)
    with pytest.raises(ValueError, match="num_partitions"):
        partition_plan(src, spec, len(src.y_train) + 1)


# ----------------------------------------------------------------------------- base split -----


def test_none_iid_sizes_disjoint_uniform(src: Source) -> None:
    n = 4
    spec = ShiftSpec("none", val_fraction=0.2)
    plans = partition_plan(src, spec, n)
    data = clients(src, spec, n)
    seen_train = np.concatenate([np.concatenate([p.train_idx, p.val_idx]) for p in plans])
    seen_test = np.concatenate([p.test_idx for p in plans])
    assert sorted(seen_train.tolist()) == list(range(len(src.y_train)))  # a partition of train
    assert sorted(seen_test.tolist()) == list(range(len(src.y_test)))
    for p, d in zip(plans, data, strict=True):
        assert not set(p.train_idx.tolist()) & set(p.val_idx.tolist())
        assert len(d.y_train) + len(d.y_val) == len(src.y_train) // n
        assert len(d.y_val) == round(0.2 * (len(src.y_train) // n))
        assert d.group == 0 and d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
        assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
        hist = torch.bincount(torch.cat([d.y_train, d.y_val]), minlength=C).numpy()
        expected = len(src.y_train) / n / C
        assert hist.min() > 0.5 * expected and hist.max() < 1.5 * expected
        assert torch.equal(d.x_train, source_x(src, p.train_idx))  # untouched images
    assert "group 0" in data[0].describe()


def test_val_fraction_zero(src: Source) -> None:
    d = make_client_data(src, ShiftSpec("none", val_fraction=0.0), 5, 1)
    assert len(d.y_val) == 0 and d.x_val.shape == (0, 1, 28, 28)
    assert len(d.y_train) == len(src.y_train) // 5


# ------------------------------------------------------------------------------------ P(X) ----


@pytest.mark.parametrize("level", range(1, 9))
def test_px_groups_and_colour(src: Source, level: int) -> None:
    n = 10
    patterns = px_patterns(level)
    r, ncol = shifts_mod._PX_LEVELS[level]
    assert len(patterns) == r * ncol
    groups = partition_groups(src, ShiftSpec("px", level=level), n)
    assert (
        len(set(groups.tolist()))
        == min(len(patterns), n)
        == num_groups(C, ShiftSpec("px", level=level), n)
    )
    counts = np.bincount(groups, minlength=len(patterns))
    assert counts.max() - counts[counts > 0].min() <= 1  # balanced
    assert input_shape(src, "px") == (3, 28, 28)
    if level not in (1, 5, 8):
        return  # pixel checks on a few levels keep the test fast
    for d in clients(src, ShiftSpec("px", level=level), n):
        angle, colour = patterns[d.group]
        for x in (d.x_train, d.x_val, d.x_test):
            assert x.shape[1:] == (3, 28, 28)
            grey = [ch for ch in range(3) if ch != colour]
            if colour >= 0:
                assert bool((x[:, colour] == 1.0).all())  # the coloured channel is all ones
            assert torch.equal(x[:, grey[0]], x[:, grey[1]])  # the others stay the grey image


def test_px_rotation_matches_pattern(src: Source) -> None:
    spec = ShiftSpec("px", level=3)  # angles 0, 90, 180, 270, grey
    plans = partition_plan(src, spec, 4)
    for p in plans:
        d = make_client_data(src, spec, 4, p.partition_id)
        k = int(px_patterns(3)[p.group][0] // 90)
        expected = torch.rot90(source_x(src, p.test_idx, test=True), k, dims=(-2, -1))
        assert float((d.x_test[:, :1] - expected).abs().max()) < 1e-4  # bilinear at 90-degree steps


def test_px_fewer_clients_than_patterns(src: Source) -> None:
    groups = partition_groups(src, ShiftSpec("px", level=8), 3)
    assert len(set(groups.tolist())) == 3 and all(0 <= g < 15 for g in groups)


# ------------------------------------------------------------------------------------ P(Y) ----


@pytest.mark.parametrize("level", [1, 3, 8])
def test_py_class_subsets_and_resampling(src: Source, level: int) -> None:
    n = 10
    spec = ShiftSpec("py", level=level)
    base = partition_plan(src, ShiftSpec("none"), n)
    classes_of_group: dict[int, set[int]] = {}
    for p, b in zip(partition_plan(src, spec, n), base, strict=True):
        d = make_client_data(src, spec, n, p.partition_id)
        train_classes = set(d.y_train.tolist())
        assert len(train_classes) == 11 - level
        assert train_classes >= set(d.y_test.tolist()) | set(d.y_val.tolist())
        assert classes_of_group.setdefault(d.group, train_classes) == train_classes
        assert len(d.y_train) == len(b.train_idx)  # resampled back to the unfiltered size
        assert len(d.y_train) + len(d.y_val) == len(b.train_idx) + len(b.val_idx)
        assert not set(p.train_idx.tolist()) & set(p.val_idx.tolist())
        assert set(p.train_idx.tolist()) <= set(b.train_idx.tolist())  # drawn from its own share
        assert set(p.test_idx.tolist()) == {
            i for i in b.test_idx.tolist() if src.y_test[i].item() in train_classes
        }
    expected_groups = 1 if level == 1 else 5  # L1 keeps all classes: one distinct subset
    assert len(classes_of_group) == expected_groups == num_groups(C, spec, n)


# ---------------------------------------------------------------------------------- P(Y|X) ----


@pytest.mark.parametrize("level", [1, 2, 4])
def test_pyx_same_permutation_in_train_and_test(src: Source, level: int) -> None:
    n = 10
    spec = ShiftSpec("pyx", level=level)
    maps: dict[int, dict[int, int]] = {}
    for p in partition_plan(src, spec, n):
        d = make_client_data(src, spec, n, p.partition_id)
        mapping: dict[int, int] = {}
        for y_new, idx, test in (
            (d.y_train, p.train_idx, False),
            (d.y_val, p.val_idx, False),
            (d.y_test, p.test_idx, True),
        ):
            for old, new in zip(source_y(src, idx, test).tolist(), y_new.tolist(), strict=True):
                assert mapping.setdefault(old, new) == new  # one consistent map over all splits
        assert sorted(mapping) == sorted(mapping.values()) == list(range(C))  # a permutation
        moved = {k for k, v in mapping.items() if k != v}
        assert len(moved) <= level
        assert maps.setdefault(d.group, mapping) == mapping
        assert torch.equal(d.x_train, source_x(src, p.train_idx))  # images untouched
    assert len(maps) == min(5, math.factorial(level)) == num_groups(C, spec, n)
    assert len({tuple(sorted(m.items())) for m in maps.values()}) == len(maps)  # distinct
    touched = {k for m in maps.values() for k, v in m.items() if k != v}
    assert len(touched) <= level


# ---------------------------------------------------------------------------------- P(X|Y) ----


@pytest.mark.parametrize("level", [1, 3])
def test_pxy_rotates_exactly_the_chosen_classes(src: Source, level: int) -> None:
    n = 10
    spec = ShiftSpec("pxy", level=level)
    rotations: dict[int, tuple[int, ...]] = {}
    for p in partition_plan(src, spec, n):
        d = make_client_data(src, spec, n, p.partition_id)
        turns = {}
        for x_new, idx, test in ((d.x_train, p.train_idx, False), (d.x_test, p.test_idx, True)):
            orig = source_x(src, idx, test)
            for j, y in enumerate(source_y(src, idx, test).tolist()):
                k = next(
                    k
                    for k in range(4)
                    if torch.equal(x_new[j], torch.rot90(orig[j], k, dims=(-2, -1)))
                )
                assert turns.setdefault(y, k) == k  # one angle per class, same in train and test
        assert torch.equal(d.y_train, torch.from_numpy(source_y(src, p.train_idx)))
        key = tuple(turns[c] for c in range(C))
        assert rotations.setdefault(d.group, key) == key
    rotated = {c for key in rotations.values() for c in range(C) if key[c]}
    assert len(rotated) <= level  # only the L chosen classes ever turn
    assert len(rotations) == min(5, 4**level) == num_groups(C, spec, n)
    assert len(set(rotations.values())) == len(rotations)


# ----------------------------------------------------------------------------- FedDAG I/II/III -


@pytest.mark.parametrize(("rho", "sizes"), [(0.2, [2, 2, 2, 2, 2]), (0.3, [3, 3, 4])])
def test_label_skew_groups(src: Source, rho: float, sizes: list[int]) -> None:
    n = 10
    spec = ShiftSpec("label-skew", rho=rho, alpha=0.5)
    labels_of_group: dict[int, set[int]] = {}
    owner: dict[int, int] = {}
    for p in partition_plan(src, spec, n):
        d = make_client_data(src, spec, n, p.partition_id)
        labels = set(torch.cat([d.y_train, d.y_val]).tolist())
        assert labels_of_group.setdefault(d.group, labels) == labels  # one label set per group
        test_labels = src.y_test.numpy()
        assert (
            sorted(p.test_idx.tolist())
            == np.flatnonzero(np.isin(test_labels, sorted(labels))).tolist()
        )
        assert set(d.y_test.tolist()) == labels
        for i in np.concatenate([p.train_idx, p.val_idx]).tolist():
            assert owner.setdefault(i, p.partition_id) == p.partition_id  # samples not shared
    assert sorted(len(s) for s in labels_of_group.values()) == sizes
    assert sum(len(s) for s in labels_of_group.values()) == C  # disjoint and covering
    assert len(owner) == len(src.y_train)  # every label's samples go to its holders
    assert len(labels_of_group) == num_groups(C, spec, n)


def test_concept_relabelings(src: Source) -> None:
    n = 6
    spec = ShiftSpec("concept")
    maps = [lambda y: y, lambda y: C - 1 - y, lambda y: (y + 1) % C]
    groups = partition_groups(src, spec, n)
    assert sorted(groups.tolist()) == [0, 0, 1, 1, 2, 2]
    for p in partition_plan(src, spec, n):
        d = make_client_data(src, spec, n, p.partition_id)
        f = maps[d.group]
        assert d.y_train.tolist() == f(source_y(src, p.train_idx)).tolist()
        assert d.y_test.tolist() == f(source_y(src, p.test_idx, test=True)).tolist()
        assert torch.equal(d.x_test, source_x(src, p.test_idx, test=True))


def _skew(src: Source, alpha: float, n: int = 10) -> float:
    spec = ShiftSpec("dirichlet", alpha=alpha, seed=3)
    shares = []
    for p in partition_plan(src, spec, n):
        hist = np.bincount(source_y(src, np.concatenate([p.train_idx, p.val_idx])), minlength=C)
        assert p.group == int(np.argmax(hist))  # ground truth = dominant class
        shares.append(hist.max() / hist.sum())
    return float(np.mean(shares))


def test_dirichlet_skew_sizes_and_test(src: Source) -> None:
    assert _skew(src, 0.1) > _skew(src, 100.0) + 0.3
    n = 10
    spec = ShiftSpec("dirichlet", alpha=0.3, seed=1)
    plans = partition_plan(src, spec, n)
    all_train = np.concatenate([np.concatenate([p.train_idx, p.val_idx]) for p in plans])
    assert sorted(all_train.tolist()) == list(range(len(src.y_train)))  # disjoint, covering
    for p in plans:
        assert len(p.train_idx) + len(p.val_idx) == len(src.y_train) // n
        assert len(p.test_idx) == len(src.y_test) // n
        train_hist = np.bincount(
            source_y(src, np.concatenate([p.train_idx, p.val_idx])), minlength=C
        )
        test_hist = np.bincount(source_y(src, p.test_idx, test=True), minlength=C)
        assert set(np.flatnonzero(test_hist)) <= set(np.flatnonzero(train_hist))  # its own classes
        assert int(np.argmax(test_hist)) == p.group


def test_dirichlet_groups_are_planted_mixtures_that_share_classes(src: Source) -> None:
    n, groups = 12, 3
    spec = ShiftSpec("dirichlet-groups", level=groups, alpha=0.5, seed=2)
    plans = partition_plan(src, spec, n)
    assert sorted(p.group for p in plans) == sorted(list(range(groups)) * (n // groups))
    assert num_groups(C, spec, n) == groups
    sizes = {len(p.train_idx) + len(p.val_idx) for p in plans}
    assert len(sizes) == 1 and 0 < sizes.pop() <= len(src.y_train) // n  # equal, shrunk to fit
    owner: dict[int, int] = {}
    mix: dict[int, np.ndarray] = {}
    for p in plans:
        own = np.concatenate([p.train_idx, p.val_idx])
        for i in own.tolist():
            assert owner.setdefault(i, p.partition_id) == p.partition_id  # samples not shared
        hist = np.bincount(source_y(src, own), minlength=C)
        # every client of a group holds the group's class counts (its proportions, exactly)
        assert np.array_equal(mix.setdefault(p.group, hist), hist)
        test_hist = np.bincount(source_y(src, p.test_idx, test=True), minlength=C)
        assert set(np.flatnonzero(test_hist)) <= set(np.flatnonzero(hist))
    props = [mix[g] / mix[g].sum() for g in range(groups)]
    assert len({tuple(h.tolist()) for h in mix.values()}) == groups  # distinct distributions
    # the point of the setting: groups overlap in classes (clusters share features)
    assert all(np.minimum(props[a], props[b]).sum() > 0.05 for a in range(groups) for b in range(a))
    with pytest.raises(ValueError, match="planted groups"):
        partition_plan(src, spec, n, regroup=((0, 1),))


# ----------------------------------------------------------------------- determinism, misc ----


@pytest.mark.parametrize("kind", SHIFTS)
def test_determinism(src: Source, kind: str) -> None:
    spec = ShiftSpec(kind, level=4, seed=5)
    a = make_client_data(src, spec, 5, 2)
    shifts_mod._plan_cached.cache_clear()  # recompute from scratch, as a fresh process would
    b = make_client_data(src, spec, 5, 2)
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.group == b.group == group_of(src, spec, 5, 2)
    c = make_client_data(src, ShiftSpec(kind, level=4, seed=6), 5, 2)
    assert not (torch.equal(a.y_train, c.y_train) and torch.equal(a.x_train, c.x_train))


def test_input_shape_and_digits(src: Source) -> None:
    digits = load_source("digits")
    for kind in SHIFTS:
        assert input_shape(digits, kind) == ((3, 28, 28) if kind == "px" else (1, 28, 28))
    d = make_client_data(digits, ShiftSpec("pxy", level=2, seed=1), 10, 9)
    assert d.input_shape == (1, 28, 28) and len(d.y_train) > 100
    assert d.num_classes == 10 and "train" in d.describe()
