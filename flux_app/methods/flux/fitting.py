"""FLUX's clustering fit on the server: the nodes' descriptors with their noise checks.

Used by the clustering round and by a re-clustering after drift: when ``val-fraction > 0``,
each node is also asked for the descriptor of its validation split, a second disjoint sample of
its own distribution, on which :func:`~flux_app.methods.flux.clustering.measured_inflation`
measures the descriptors' sampling noise; the strategy's ``fit_clusters`` hook sees them as
``noise_checks`` for the duration of the fit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flux_app.methods.flux.clustering import FluxClustering
from flux_app.methods.flux.descriptors import FluxDescriptor

if TYPE_CHECKING:
    from flux_app.methods.flux.strategy import Flux


def fit_nodes(
    s: Flux, ids: list[int], descs: dict[int, FluxDescriptor], server_round: int
) -> FluxClustering:
    """``s.fit_clusters`` on ``descs`` (in ``ids`` order), with each node's validation-split
    descriptor as its noise check when ``val-fraction > 0`` (None where none came back)."""
    if s.cfg.val_fraction > 0:
        got = s.collect_descriptors(ids, server_round, label_free=False, split="val", exclude=False)
        s.noise_checks = [got.get(n) for n in ids]
    try:
        return s.fit_clusters([descs[n] for n in ids])
    finally:
        s.noise_checks = None  # only this fit uses them


__all__ = ["fit_nodes"]
