"""FLUX noticing drift: re-checking descriptors, re-clustering, mapping clusters to models.

Unlike the official code's ``flux_dynamic`` (told the drift round), the server is never told
that or when data changed. With ``flux-drift-check-every = r > 0``, every r rounds after the
clustering round it asks the training nodes for their descriptor again, with the same frozen
extractor (a forward pass over their train split: cheap), and compares each with the one the
node gave at the last clustering, under the descriptors' own noise model
(:func:`~flux_app.methods.flux.clustering.pair_ratios`): a node changed when
``ratio / lambda`` exceeds the IID guard's threshold ``max(GUARD_RATIO, chi2_{1-alpha/m}(nu)/nu)``
(``lambda``: the noise inflation measured at clustering, 1 when none was measured; ``m``: the
nodes checked). Unchanged data gives an identical descriptor (ratio 0). When any node changed,
all training nodes are re-clustered on the new descriptors; each new cluster is mapped to the
old cluster whose centroid is nearest (the old members' clustering-time descriptors, embedded
with the new normaliser) and starts from that cluster's model.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from flux_app.common.params import clone_state
from flux_app.methods.flux.clustering import GUARD_ALPHA, GUARD_RATIO, embed, pair_ratios
from flux_app.methods.flux.descriptors import FluxDescriptor
from flux_app.methods.flux.fitting import fit_nodes

if TYPE_CHECKING:
    from flux_app.methods.flux.strategy import Flux

logger = logging.getLogger("flwr")


def changed_nodes(
    before: list[FluxDescriptor],
    after: list[FluxDescriptor],
    normaliser: object,
    inflation: float | None,
    alpha: float = GUARD_ALPHA,
) -> np.ndarray:
    """``[m]`` bool: whose descriptor moved significantly (module docstring)."""
    from scipy.stats import chi2

    if not before:
        return np.zeros(0, dtype=bool)
    ratio, nu = pair_ratios(before, after, normaliser)
    lam = 1.0 if inflation is None else float(inflation)
    q = np.ones_like(nu)
    fin = np.isfinite(nu)
    q[fin] = chi2.isf(alpha / len(before), nu[fin]) / nu[fin]
    return ratio / lam > np.maximum(GUARD_RATIO, q)


def check_drift(s: Flux, server_round: int) -> None:
    """Every ``flux-drift-check-every`` rounds after clustering: re-describe, and re-cluster
    when a node's data changed (module docstring)."""
    every = s.opts.drift_check_every
    if every <= 0 or s.result is None or s.cluster_round is None:
        return
    since = server_round - s.cluster_round
    if since <= 0 or since % every:
        return
    nodes = [n for n in s.ordered(s.reference) if n in s.nodes and n in s.assignment]
    new = s.collect_descriptors(nodes, server_round, label_free=False, split="train", exclude=False)
    nodes = [n for n in nodes if n in new]
    changed = changed_nodes(
        [s.reference[n] for n in nodes],
        [new[n] for n in nodes],
        s.result.normaliser,
        s.result.inflation,
    )
    if not changed.any():
        logger.info("flux: round %d, drift check: no node changed", server_round)
        return
    moved = [s.nodes[n].name for n, c in zip(nodes, changed, strict=True) if c]
    logger.info("flux: round %d, drift check: %s changed; re-clustering", server_round, moved)
    s.drift_rounds.append(server_round)
    recluster(s, server_round, {n: new[n] for n in nodes})


def recluster(s: Flux, server_round: int, descs: dict[int, FluxDescriptor]) -> None:
    """Cluster ``descs`` anew; each new cluster starts from the model of the nearest old one."""
    ids = s.ordered(descs)
    old_result, old_models, old_assignment = s.result, s.models, dict(s.assignment)
    old_refs = {n: s.reference[n] for n in ids if n in s.reference}
    result = fit_nodes(s, ids, descs, server_round)
    # the old clusters' centroids, from their members' earlier descriptors, in the new space
    members = [n for n in ids if n in old_refs and n in old_assignment]
    old_x = embed([old_refs[n] for n in members], result.normaliser, result.missing_penalty)
    old_labels = np.array([old_assignment[n] for n in members])
    old_ids = sorted(set(old_labels.tolist()))
    old_cent = np.stack([old_x[old_labels == z].mean(axis=0) for z in old_ids])
    mapping = {}
    for z in range(result.num_clusters):
        d = np.linalg.norm(old_cent - result.centroids[z][None, :], axis=1)
        mapping[z] = old_ids[int(np.argmin(d))]
    s.result = result
    s.models = {z: clone_state(old_models[mapping[z]]) for z in range(result.num_clusters)}
    s.aggregation.reset()
    s.assignment = {n: int(z) for n, z in zip(ids, result.labels, strict=True)}
    s.reference = dict(descs)
    logger.info(
        "flux: round %d re-clustered %d node(s) into %d cluster(s) (was %d), sizes %s; "
        "models from old clusters %s",
        server_round,
        len(ids),
        result.num_clusters,
        old_result.num_clusters if old_result is not None else 0,
        sorted(Counter(s.assignment.values()).values(), reverse=True),
        mapping,
    )
    s.record_clustering(
        server_round,
        method=s.opts.clusterer,
        notes=list(result.notes),
        scales=result.normaliser.scales,
        reclustered=list(s.drift_rounds),
    )


__all__ = ["changed_nodes", "check_drift", "recluster"]
