"""Partition protocols: which samples each client holds and how its data is shifted.

Every client recomputes the whole partition plan from ``(source, spec, num_partitions)`` and
keeps its own slice: no shared files, no server. The plan is index-level work only (seeded
permutations of label arrays, milliseconds even for CIFAR) and is memoised per process; only the
client's own images are then converted to ``float32`` in ``[0, 1]`` and transformed.

Each random decision draws from its own stream, ``SeedSequence([seed, crc32(tag), ...])``, so the
IID split of a seed is the same under every shift and adding a client-specific draw never moves
another one.

Shifts (``C`` classes, ``L`` = level 1..8, ``N`` = num_partitions)
-----------------------------------------------------------------
Base split (``none``, ``px``, ``py``, ``pyx``, ``pxy``, ``concept``): train and test sets are each
shuffled and cut into ``N`` near-equal IID shares; ``val_fraction`` of each train share becomes
the client's validation set. Train, validation and test get the same client transformation.

``none``        IID; group 0 for everybody.
``px``          P(X): pattern = (rotation angle, colour); ``r`` angles ``360 k / r``, colours
                {grey} (L1-4) or {red, green, blue} (L5-8); ``(r, colours)`` = L1 (2,1) L2 (3,1)
                L3 (4,1) L4 (5,1) L5 (2,3) L6 (3,3) L7 (4,3) L8 (5,3). Pattern ``p`` is angle
                ``p % r``, colour ``p // r``. Images become 3 channels; a colour sets its RGB
                channel to 1 after rotating (bilinear, zero fill). Group = pattern index.
``py``          P(Y): a bank of up to 5 distinct class subsets of size
                ``max(1, round(C (11 - L) / 10))``; a client keeps only its subset's classes
                (train, val and test) and its train and val parts are resampled back to their
                unfiltered sizes. Group = subset index.
``pyx``         P(Y|X): ``L`` random classes; a bank of up to 5 distinct permutations of them
                (fewer if ``L! < 5``); a client relabels train, val and test with its permutation.
                Group = permutation index.
``pxy``         P(X|Y): ``L`` random classes; a bank of up to 5 distinct maps class -> angle in
                {0, 90, 180, 270} (fewer if ``4^L < 5``); a client rotates those classes' images
                (``torch.rot90``, exact). Group = map index.
``label-skew``  FedDAG Dist I: groups own disjoint label sets of ``max(1, round(rho C))`` labels
                (from a seeded class permutation; leftover classes join the last group). Each
                label's train samples are split among the clients holding it with Dirichlet
                (``alpha``) proportions, at least one each where possible. Test set = ALL test
                samples of the client's labels. Group = label-set index.
``concept``     FedDAG Dist II: IID split; groups relabel y -> y, y -> C-1-y, y -> (y+1) mod C.
``dirichlet``   FedDAG Dist III: client ``i`` draws class proportions ``q_i ~ Dir(alpha)`` and
                fills an equal share of the train set from the class pools in those proportions
                (clients in a seeded order; when a class runs out the rest of the client's share
                follows its remaining proportions). The test set has the client's IID test-share
                size, drawn in the class proportions of its train share (without replacement
                where the class has enough samples). Group = the client's dominant train class
                (ties: lowest class) - a label for metrics only, there is no designed grouping.
``dirichlet-groups``  A Dirichlet mixture of ``L`` planted groups (clusters that share
                features): group ``g`` draws class proportions ``p_g ~ Dir(alpha)`` and every
                client of the group fills its train share in exactly those proportions, so
                groups overlap in classes wherever their proportions do. Client sizes are
                equal, scaled down (never the proportions) until every class pool covers what
                the groups ask of it; the test set follows the client's train proportions as in
                ``dirichlet``. Group = group index.

Decisions
---------
* Balanced group assignment: a seeded permutation of the clients; the client at position ``k``
  gets pattern / subset / permutation / map / group ``k mod P``, so every one of the ``P``
  options is used when ``N >= P``. With fewer clients than options, a seeded subset of distinct
  options is used. Group ids are always bank indices (they may skip values when ``N < P``).
* Banks instead of per-client draws for ``pyx`` and ``pxy`` (the paper says "each client draws a
  random permutation"): a bank keeps ground-truth groups well defined and comparable to ``py``.
  Banks hold DISTINCT entries; where fewer distinct entries exist than 5 (``py`` at L1 keeps all
  classes, ``pyx`` at L1 only has the identity) the bank is smaller, because identical
  distributions are one ground-truth group.
* ``py`` resampling keeps every filtered sample once and draws only the remainder with
  replacement (less variance than a plain bootstrap). Train and validation are resampled from
  disjoint pools, so no underlying sample is in both and ``len(train) + len(val)`` equals the
  unfiltered share.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import combinations, permutations

import numpy as np
import torch

from flux_app.data.sources import Source

__all__ = [
    "SHIFTS",
    "BANK_SIZE",
    "ClientData",
    "ClientPlan",
    "ShiftSpec",
    "group_of",
    "input_shape",
    "make_client_data",
    "num_groups",
    "partition_groups",
    "partition_plan",
    "px_patterns",
]

SHIFTS = (
    "none",
    "px",
    "py",
    "pyx",
    "pxy",
    "label-skew",
    "concept",
    "dirichlet",
    "dirichlet-groups",
)
BANK_SIZE = 5  # subsets / permutations / rotation maps per bank (FLUX protocol)
_PX_LEVELS = {
    1: (2, 1),
    2: (3, 1),
    3: (4, 1),
    4: (5, 1),
    5: (2, 3),
    6: (3, 3),
    7: (4, 3),
    8: (5, 3),
}


@dataclass(frozen=True)
class ShiftSpec:
    """How to partition and shift a dataset.

    Attributes
    ----------
    kind : str
        One of :data:`SHIFTS`.
    level : int
        Heterogeneity level 1..8 (``px``, ``py``, ``pyx``, ``pxy``); the number of groups
        (``dirichlet-groups``).
    alpha : float
        Dirichlet concentration (``label-skew``, ``dirichlet``, ``dirichlet-groups``); smaller
        is more skewed.
    rho : float
        Share of the labels per group (``label-skew``), in ``(0, 1]``.
    seed : int
        Seed of every random choice of the partition.
    val_fraction : float
        Share of each client's training samples held out for validation, in ``[0, 1)``.
    """

    kind: str
    level: int = 1
    alpha: float = 0.5
    rho: float = 0.2
    seed: int = 0
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in SHIFTS:
            raise ValueError(f"unknown shift {self.kind!r}; valid: {', '.join(SHIFTS)}")
        if (
            isinstance(self.level, bool)
            or not isinstance(self.level, (int, np.integer))
            or not 1 <= self.level <= 8
        ):
            raise ValueError(f"level must be an integer in 1..8, got {self.level!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {self.rho!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class ClientData:
    """One client's data, ready for training.

    Images are ``float32`` ``[n, C, H, W]`` in ``[0, 1]``, labels ``int64`` ``[n]``; train,
    validation and test carry the same client transformation.

    Attributes
    ----------
    group : int
        Ground-truth shift group (metrics and the Oracle only; never used for training).
    num_classes : int
        Output classes of the model (the source's, also under label subsets and relabelling).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    group: int
    num_classes: int
    partition_id: int = -1
    shift: str = "none"
    source_name: str = field(default="", repr=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def describe(self) -> str:
        """One-line summary: sizes, group and the classes present in the train set."""
        classes = torch.unique(self.y_train).tolist()
        shown = ",".join(map(str, classes)) if len(classes) <= 12 else f"{len(classes)} classes"
        c, h, w = self.input_shape
        return (
            f"client {self.partition_id} [{self.source_name or '?'}/{self.shift}] group {self.group}: "
            f"train {len(self.y_train)} val {len(self.y_val)} test {len(self.y_test)}, "
            f"{c}x{h}x{w}, train classes {shown}"
        )


# --------------------------------------------------------------------------------------------
# Plans (index level)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ClientPlan:
    """Index-level description of one client's data (read-only arrays into the source).

    ``label_map`` relabels (``y -> label_map[y]``); ``rot_k`` gives per ORIGINAL class the number
    of exact 90-degree turns; ``angle`` / ``colour`` are the ``px`` pattern (``colour`` -1 for grey,
    0/1/2 for red/green/blue); ``to_rgb`` makes 1-channel images 3-channel.
    """

    partition_id: int
    group: int
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    label_map: np.ndarray | None = None
    rot_k: np.ndarray | None = None
    angle: float = 0.0
    colour: int = -1
    to_rgb: bool = False


def _rng(seed: int, *tags: str | int) -> np.random.Generator:
    """An independent, stable stream per (seed, purpose)."""
    words = [int(seed) & ((1 << 64) - 1)]
    words += [t if isinstance(t, int) else zlib.crc32(t.encode()) for t in tags]
    return np.random.default_rng(np.random.SeedSequence(words))


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int64)
    a.flags.writeable = False
    return a


def _n_val(n: int, val_fraction: float) -> int:
    if val_fraction <= 0 or n < 2:
        return 0
    return min(max(1, int(math.floor(val_fraction * n + 0.5))), n - 1)


def _split_val(
    idx: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)``: a seeded shuffle of ``idx`` cut at ``val_fraction``."""
    idx = rng.permutation(idx)
    n_val = _n_val(len(idx), val_fraction)
    return idx[n_val:], idx[:n_val]


def _assign_balanced(num_partitions: int, num_options: int, rng: np.random.Generator) -> np.ndarray:
    """Option index per client: balanced over all options, or distinct ones if too few clients."""
    order = rng.permutation(num_partitions)
    if num_partitions >= num_options:
        chosen = np.arange(num_partitions) % num_options
    else:
        chosen = rng.choice(num_options, size=num_partitions, replace=False)
    groups = np.empty(num_partitions, dtype=np.int64)
    groups[order] = chosen
    return groups


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``weights``; zero weight gets zero."""
    weights = np.asarray(weights, dtype=np.float64)
    counts = np.zeros(len(weights), dtype=np.int64)
    positive = weights > 0
    if total <= 0 or not positive.any():
        return counts
    raw = total * weights / weights.sum()
    counts = np.floor(raw).astype(np.int64)
    frac = np.where(positive, raw - counts, -1.0)
    short = total - int(counts.sum())
    if short > 0:
        top = np.argsort(-frac, kind="stable")[:short]
        counts[top[positive[top]]] += 1
        short = total - int(counts.sum())
        if short > 0:  # float corner case: give the rest to the largest weight
            counts[int(np.argmax(weights))] += short
    return counts


def _resample(pool: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices from ``pool``: every pool item once, the rest with replacement."""
    if size <= 0 or len(pool) == 0:
        return pool[:0]
    if len(pool) >= size:
        return rng.choice(pool, size=size, replace=False)
    extra = rng.choice(pool, size=size - len(pool), replace=True)
    return rng.permutation(np.concatenate([pool, extra]))


def _distinct_bank(
    num_possible: int,
    enumerate_all: Callable[[], Iterable[tuple[int, ...]]],
    draw: Callable[[], tuple[int, ...]],
) -> list[tuple[int, ...]]:
    """Up to :data:`BANK_SIZE` distinct entries: all of them if few exist, else seeded draws."""
    if num_possible <= BANK_SIZE:
        return list(enumerate_all())
    bank: list[tuple[int, ...]] = []
    while len(bank) < BANK_SIZE:  # terminates: more than BANK_SIZE distinct entries exist
        entry = draw()
        if entry not in bank:
            bank.append(entry)
    return bank


def px_patterns(level: int) -> list[tuple[float, int]]:
    """``(angle in degrees, colour)`` per ``px`` pattern index; colour -1 = grey, 0/1/2 = R/G/B."""
    r, ncol = _PX_LEVELS[level]
    colours = [-1] if ncol == 1 else [0, 1, 2]
    return [(360.0 * (p % r) / r, colours[p // r]) for p in range(r * ncol)]


def _py_subset_size(num_classes: int, level: int) -> int:
    return min(num_classes, max(1, int(math.floor(num_classes * (11 - level) / 10 + 0.5))))


def _py_bank(num_classes: int, level: int, seed: int) -> list[tuple[int, ...]]:
    k = _py_subset_size(num_classes, level)
    rng = _rng(seed, "py-bank")
    return _distinct_bank(
        math.comb(num_classes, k),
        lambda: combinations(range(num_classes), k),
        lambda: tuple(sorted(int(c) for c in rng.choice(num_classes, size=k, replace=False))),
    )


def _shifted_classes(num_classes: int, level: int, seed: int, tag: str) -> np.ndarray:
    return _rng(seed, tag, "classes").choice(
        num_classes, size=min(level, num_classes), replace=False
    )


def _pyx_bank(num_classes: int, level: int, seed: int) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    classes = _shifted_classes(num_classes, level, seed, "pyx")
    n = len(classes)
    rng = _rng(seed, "pyx-bank")
    bank = _distinct_bank(
        math.factorial(n),
        lambda: permutations(range(n)),
        lambda: tuple(int(i) for i in rng.permutation(n)),
    )
    return classes, bank


def _pxy_bank(num_classes: int, level: int, seed: int) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    classes = _shifted_classes(num_classes, level, seed, "pxy")
    n = len(classes)
    rng = _rng(seed, "pxy-bank")
    bank = _distinct_bank(
        4**n,
        lambda: ((k,) for k in range(4)),  # only reached for n == 1 (4 maps)
        lambda: tuple(int(k) for k in rng.integers(0, 4, size=n)),
    )
    return classes, bank


def _label_groups(num_classes: int, rho: float, seed: int) -> list[np.ndarray]:
    m = max(1, int(math.floor(rho * num_classes + 0.5)))
    perm = _rng(seed, "label-skew", "classes").permutation(num_classes)
    n_groups = max(1, num_classes // m)
    groups = [perm[g * m : (g + 1) * m] for g in range(n_groups)]
    groups[-1] = np.concatenate([groups[-1], perm[n_groups * m :]])  # leftovers join the last group
    return [np.sort(g) for g in groups]


def num_groups(source_num_classes: int, spec: ShiftSpec, num_partitions: int) -> int:
    """Number of ground-truth groups the protocol can produce with ``num_partitions`` clients.

    Exact for every shift except ``dirichlet``, where it is an upper bound (``min(C, N)``:
    groups are dominant classes).
    """
    c, n, level = source_num_classes, num_partitions, spec.level
    if spec.kind == "none":
        options = 1
    elif spec.kind == "px":
        options = len(px_patterns(level))
    elif spec.kind == "py":
        options = min(BANK_SIZE, math.comb(c, _py_subset_size(c, level)))
    elif spec.kind == "pyx":
        options = min(BANK_SIZE, math.factorial(min(level, c)))
    elif spec.kind == "pxy":
        options = min(BANK_SIZE, 4 ** min(level, c))
    elif spec.kind == "concept":
        options = 3
    elif spec.kind == "label-skew":
        options = len(_label_groups(c, spec.rho, 0))
    elif spec.kind == "dirichlet-groups":
        options = level
    else:  # dirichlet
        options = c
    return min(options, n)


def _iid(n: int, num_partitions: int, seed: int, tag: str) -> list[np.ndarray]:
    perm = _rng(seed, "iid", tag).permutation(n)
    return np.array_split(perm, num_partitions)


def _check_partitions(source: Source, num_partitions: int, partition_id: int | None = None) -> None:
    if (
        isinstance(num_partitions, bool)
        or not isinstance(num_partitions, (int, np.integer))
        or num_partitions < 1
    ):
        raise ValueError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if num_partitions > len(source.y_train):
        raise ValueError(
            f"num_partitions ({num_partitions}) exceeds the {len(source.y_train)} training samples of {source.name}"
        )
    if partition_id is not None and (
        isinstance(partition_id, bool)
        or not isinstance(partition_id, (int, np.integer))
        or not 0 <= partition_id < num_partitions
    ):
        raise ValueError(
            f"partition_id must be an integer in 0..{num_partitions - 1}, got {partition_id!r}"
        )


def partition_plan(
    source: Source,
    spec: ShiftSpec,
    num_partitions: int,
    regroup: tuple[tuple[int, int], ...] = (),
) -> tuple[ClientPlan, ...]:
    """Every client's plan (memoised per process; index arrays are read-only).

    Parameters
    ----------
    source : Source
        The dataset.
    spec : ShiftSpec
        The shift and its parameters.
    num_partitions : int
        Number of clients ``N``.
    regroup : tuple of (partition id, group)
        Clients whose data is drawn from another group's distribution (drift,
        :mod:`flux_app.data.drift`): the same samples of their own share, that group's shift.
        Shifts with planted groups only (not ``label-skew`` / ``dirichlet``).

    Returns
    -------
    tuple of ClientPlan
        Indexed by partition id.
    """
    _check_partitions(source, num_partitions)
    return _plan_cached(source, spec, int(num_partitions), tuple(regroup))


@functools.lru_cache(maxsize=8)
def _plan_cached(
    source: Source, spec: ShiftSpec, n: int, regroup: tuple[tuple[int, int], ...] = ()
) -> tuple[ClientPlan, ...]:
    y_train = source.y_train.numpy()
    y_test = source.y_test.numpy()
    c = source.num_classes
    if regroup and spec.kind in ("label-skew", "dirichlet", "dirichlet-groups"):
        raise ValueError(f"drift needs a shift with planted groups, not {spec.kind!r}")
    if spec.kind == "label-skew":
        plans = _plan_label_skew(y_train, y_test, c, spec, n)
    elif spec.kind == "dirichlet":
        plans = _plan_dirichlet(y_train, y_test, c, spec, n)
    elif spec.kind == "dirichlet-groups":
        plans = _plan_dirichlet_groups(y_train, y_test, c, spec, n)
    else:
        plans = _plan_base(y_train, y_test, c, spec, n, dict(regroup))
    return tuple(plans)


def _plan_base(
    y_train: np.ndarray,
    y_test: np.ndarray,
    c: int,
    spec: ShiftSpec,
    n: int,
    regroup: dict[int, int] | None = None,
) -> list[ClientPlan]:
    seed, level, kind = spec.seed, spec.level, spec.kind
    train_shares = _iid(len(y_train), n, seed, "train")
    test_shares = _iid(len(y_test), n, seed, "test")
    num_options = {"none": 1, "concept": 3}.get(kind, 0)
    py_bank: list[tuple[int, ...]] = []
    label_maps: list[np.ndarray] = []
    rot_maps: list[np.ndarray] = []
    patterns: list[tuple[float, int]] = []
    if kind == "px":
        patterns = px_patterns(level)
        num_options = len(patterns)
    elif kind == "py":
        py_bank = _py_bank(c, level, seed)
        num_options = len(py_bank)
    elif kind == "pyx":
        classes, perms = _pyx_bank(c, level, seed)
        for perm in perms:
            lut = np.arange(c)
            lut[classes] = classes[list(perm)]
            label_maps.append(lut)
        num_options = len(perms)
    elif kind == "pxy":
        classes, maps = _pxy_bank(c, level, seed)
        for turns in maps:
            rot = np.zeros(c, dtype=np.int64)
            rot[classes] = turns
            rot_maps.append(rot)
        num_options = len(maps)
    elif kind == "concept":
        label_maps = [np.arange(c), c - 1 - np.arange(c), (np.arange(c) + 1) % c]
    groups = _assign_balanced(n, num_options, _rng(seed, "assign", kind))
    for pid, g in (regroup or {}).items():  # drift: another group's distribution
        if not 0 <= g < num_options:
            raise ValueError(f"group {g} does not exist ({num_options} options)")
        groups[int(pid)] = int(g)

    plans = []
    for pid in range(n):
        g = int(groups[pid])
        train, val = _split_val(train_shares[pid], spec.val_fraction, _rng(seed, "val", pid))
        test = test_shares[pid]
        extra: dict[str, object] = {}
        if kind == "py":
            keep = np.asarray(py_bank[g])
            rng = _rng(seed, "py-resample", pid)
            train = _resample(train[np.isin(y_train[train], keep)], len(train), rng)
            val = _resample(val[np.isin(y_train[val], keep)], len(val), rng)
            test = test[np.isin(y_test[test], keep)]
        elif kind in ("pyx", "concept"):
            extra["label_map"] = label_maps[g]
        elif kind == "pxy":
            extra["rot_k"] = rot_maps[g]
        elif kind == "px":
            extra.update(angle=patterns[g][0], colour=patterns[g][1], to_rgb=True)
        plans.append(
            ClientPlan(pid, g, _readonly(train), _readonly(val), _readonly(test), **extra)  # type: ignore[arg-type]
        )
    return plans


def _plan_label_skew(
    y_train: np.ndarray, y_test: np.ndarray, c: int, spec: ShiftSpec, n: int
) -> list[ClientPlan]:
    seed = spec.seed
    label_groups = _label_groups(c, spec.rho, seed)
    groups = _assign_balanced(n, len(label_groups), _rng(seed, "assign", "label-skew"))
    rng = _rng(seed, "label-skew", "split")
    shares: list[list[np.ndarray]] = [[] for _ in range(n)]
    for g, labels in enumerate(label_groups):
        holders = np.flatnonzero(groups == g)
        if len(holders) == 0:
            continue  # group unused (fewer clients than groups): its samples stay out
        for label in labels:
            pool = rng.permutation(np.flatnonzero(y_train == label))
            props = rng.dirichlet(np.full(len(holders), spec.alpha))
            if not np.all(np.isfinite(props)) or props.sum() <= 0:  # tiny alpha underflow
                props = np.eye(len(holders))[rng.integers(len(holders))]
            if len(pool) >= len(holders):  # at least one sample of the label for every holder
                counts = 1 + _largest_remainder(len(pool) - len(holders), props)
            else:
                counts = _largest_remainder(len(pool), props)
            for holder, part in zip(holders, np.split(pool, np.cumsum(counts)[:-1]), strict=True):
                shares[holder].append(part)
    plans = []
    for pid in range(n):
        g = int(groups[pid])
        own = np.concatenate(shares[pid]) if shares[pid] else np.empty(0, dtype=np.int64)
        train, val = _split_val(own, spec.val_fraction, _rng(seed, "val", pid))
        test = np.flatnonzero(np.isin(y_test, label_groups[g]))  # ALL test samples of its labels
        plans.append(ClientPlan(pid, g, _readonly(train), _readonly(val), _readonly(test)))
    return plans


def _plan_dirichlet(
    y_train: np.ndarray, y_test: np.ndarray, c: int, spec: ShiftSpec, n: int
) -> list[ClientPlan]:
    rng = _rng(spec.seed, "dirichlet", "train")
    q = rng.dirichlet(np.full(c, spec.alpha), size=n)
    for i in range(n):  # tiny alpha can underflow to all zeros: fall back to one random class
        if not np.all(np.isfinite(q[i])) or q[i].sum() <= 0:
            q[i] = np.eye(c)[rng.integers(c)]
    sizes = [len(s) for s in np.array_split(np.arange(len(y_train)), n)]
    return _plans_from_proportions(y_train, y_test, c, spec, q, sizes, None, rng, "dirichlet")


def _plan_dirichlet_groups(
    y_train: np.ndarray, y_test: np.ndarray, c: int, spec: ShiftSpec, n: int
) -> list[ClientPlan]:
    rng = _rng(spec.seed, "dirichlet-groups", "train")
    p = rng.dirichlet(np.full(c, spec.alpha), size=spec.level)
    for g in range(spec.level):  # tiny alpha underflow, as in ``dirichlet``
        if not np.all(np.isfinite(p[g])) or p[g].sum() <= 0:
            p[g] = np.eye(c)[rng.integers(c)]
    groups = _assign_balanced(n, spec.level, _rng(spec.seed, "assign", "dirichlet-groups"))
    q = p[groups]
    # Equal client sizes, shrunk until no class pool is over-asked: a client's proportions are
    # its group's definition, so the size gives way, not the mix (a sample of slack per client
    # and class, at most half the pool, absorbs the largest-remainder rounding).
    pool_sizes = np.bincount(y_train, minlength=c).astype(np.float64)
    usable = np.maximum(pool_sizes - n, pool_sizes / 2)
    demand = q.sum(axis=0)  # samples of each class asked per unit of client size
    fit = np.min(np.where(demand > 0, usable / np.maximum(demand, 1e-12), np.inf))
    size = int(max(1, min(len(y_train) // n, math.floor(fit))))
    sizes = [size] * n
    return _plans_from_proportions(
        y_train, y_test, c, spec, q, sizes, groups, rng, "dirichlet-groups"
    )


def _plans_from_proportions(
    y_train: np.ndarray,
    y_test: np.ndarray,
    c: int,
    spec: ShiftSpec,
    q: np.ndarray,
    sizes: list[int],
    groups: np.ndarray | None,
    rng: np.random.Generator,
    tag: str,
) -> list[ClientPlan]:
    """Fill each client's train share from the class pools in proportions ``q[i]``.

    Clients are filled in a seeded order; when one of a client's classes runs out, the rest of
    its share follows its remaining proportions. The test set has the client's IID test-share
    size, drawn in the class proportions of its train share. ``groups=None`` labels a client
    with its dominant train class (ties: lowest), for metrics only.
    """
    seed, n = spec.seed, len(q)
    pools = [rng.permutation(np.flatnonzero(y_train == k)) for k in range(c)]
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    taken = np.zeros(c, dtype=np.int64)
    own_counts = np.zeros((n, c), dtype=np.int64)
    for i in rng.permutation(n):
        need = sizes[i]
        while need > 0 and remaining.sum() > 0:
            weights = q[i] * (remaining > 0)
            if weights.sum() <= 0:  # all of the client's classes are used up: take what is left
                weights = (remaining > 0).astype(np.float64)
            take = np.minimum(_largest_remainder(need, weights), remaining)
            own_counts[i] += take
            remaining -= take
            need -= int(take.sum())
    shares: list[list[np.ndarray]] = [[] for _ in range(n)]
    for i in range(n):  # cut the class pools in client order (any fixed order would do)
        for k in np.flatnonzero(own_counts[i]):
            shares[i].append(pools[k][taken[k] : taken[k] + own_counts[i, k]])
            taken[k] += own_counts[i, k]
    test_sizes = [len(s) for s in np.array_split(np.arange(len(y_test)), n)]
    test_pools = [np.flatnonzero(y_test == k) for k in range(c)]
    plans = []
    for pid in range(n):
        own = np.concatenate(shares[pid]) if shares[pid] else np.empty(0, dtype=np.int64)
        train, val = _split_val(own, spec.val_fraction, _rng(seed, "val", pid))
        hist = own_counts[pid]
        group = int(np.argmax(hist)) if groups is None else int(groups[pid])
        trng = _rng(seed, tag, "test", pid)
        parts = []
        for k, count in enumerate(_largest_remainder(test_sizes[pid], hist)):
            pool = test_pools[k]
            if count == 0 or len(pool) == 0:
                continue
            if count <= len(pool):
                parts.append(trng.choice(pool, size=count, replace=False))
            else:
                parts.append(
                    np.concatenate([pool, trng.choice(pool, size=count - len(pool), replace=True)])
                )
        test = trng.permutation(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
        plans.append(ClientPlan(pid, group, _readonly(train), _readonly(val), _readonly(test)))
    return plans


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def input_shape(source: Source, shift: str) -> tuple[int, int, int]:
    """``(C, H, W)`` the model sees: ``px`` always gives 3 channels, other shifts keep the source's."""
    c, h, w = source.image_shape
    return (3 if shift == "px" else c), h, w


def partition_groups(source: Source, spec: ShiftSpec, num_partitions: int) -> np.ndarray:
    """Ground-truth group of every client, ``int64 [num_partitions]`` (metrics, Oracle)."""
    return np.array([p.group for p in partition_plan(source, spec, num_partitions)], dtype=np.int64)


def group_of(source: Source, spec: ShiftSpec, num_partitions: int, partition_id: int) -> int:
    """Ground-truth group of one client."""
    _check_partitions(source, num_partitions, partition_id)
    return partition_plan(source, spec, num_partitions)[int(partition_id)].group


def _apply(
    plan: ClientPlan, x_u8: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images in [0, 1] with the client's transformation, and its (relabelled) labels."""
    x = x_u8.float().div_(255.0)
    if plan.rot_k is not None and len(y):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError("pxy needs square images for exact 90-degree rotations")
        turns = torch.from_numpy(plan.rot_k)[y]
        for k in (1, 2, 3):
            mask = turns == k
            if mask.any():
                x[mask] = torch.rot90(x[mask], k, dims=(-2, -1))
    if plan.angle and len(y):
        # Imported here: torchvision takes seconds to import and only px needs it.
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import rotate

        x = rotate(x, plan.angle, interpolation=InterpolationMode.BILINEAR, fill=[0.0])
    if plan.to_rgb and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if plan.colour >= 0:
        x = x.clone()  # expand() shares memory between channels
        x[:, plan.colour] = 1.0
    x = x.contiguous()
    if plan.label_map is not None:
        y = torch.from_numpy(plan.label_map)[y]
    return x, y


def make_client_data(
    source: Source,
    spec: ShiftSpec,
    num_partitions: int,
    partition_id: int,
    regroup: tuple[tuple[int, int], ...] = (),
) -> ClientData:
    """Build one client's train / validation / test data.

    Parameters
    ----------
    source : Source
        The dataset (see :func:`flux_app.data.load_source`).
    spec : ShiftSpec
        Shift protocol and parameters.
    num_partitions : int
        Number of clients ``N >= 1``.
    partition_id : int
        This client, ``0 <= partition_id < N``.
    regroup : tuple of (partition id, group)
        Drifted clients (see :func:`partition_plan`).

    Returns
    -------
    ClientData
        Float images in ``[0, 1]``, ``int64`` labels, ground-truth group.

    Raises
    ------
    ValueError
        ``num_partitions`` < 1 or larger than the training set, ``partition_id`` out of range.
    """
    _check_partitions(source, num_partitions, partition_id)
    plan = partition_plan(source, spec, num_partitions, regroup)[int(partition_id)]
    parts = []
    for x_all, y_all, idx in (
        (source.x_train, source.y_train, plan.train_idx),
        (source.x_train, source.y_train, plan.val_idx),
        (source.x_test, source.y_test, plan.test_idx),
    ):
        index = torch.from_numpy(idx.copy())
        parts.extend(_apply(plan, x_all[index], y_all[index]))
    return ClientData(
        *parts,
        group=plan.group,
        num_classes=source.num_classes,
        partition_id=int(partition_id),
        shift=spec.kind,
        source_name=source.name,
    )
