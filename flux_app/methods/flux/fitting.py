"""FLUX's clustering fit on the server: the nodes' descriptors with their noise checks.

Used by the clustering round and by a re-clustering after drift: when ``val-fraction > 0``,
each node also gives the descriptor of its validation split, a second disjoint sample of its
own distribution, on which :func:`~flux_app.methods.flux.clustering.measured_inflation`
measures the descriptors' sampling noise; the strategy's ``fit_clusters`` hook sees them as
``noise_checks`` for the duration of the fit. In the clustering round both descriptors come in
one message (``with-val``: one round trip per node, not two); a re-clustering after drift asks
for the validation descriptors apart (the drift checks themselves need only the training ones).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flwr.app import RecordDict

from flux_app.common.records import get_array_record, record_to_arrays
from flux_app.engine.transport import REPLY_ERRORS
from flux_app.methods.flux.clustering import FluxClustering
from flux_app.methods.flux.descriptors import FluxDescriptor
from flux_app.methods.flux.privacy import count_releases

if TYPE_CHECKING:
    from flux_app.methods.flux.strategy import Flux

logger = logging.getLogger("flwr")

DESCRIPTOR = "query.descriptor"


def collect_with_checks(
    s: Flux, node_ids: list[int], server_round: int
) -> tuple[dict[int, FluxDescriptor], dict[int, FluxDescriptor]]:
    """The clustering round's full training-split descriptors and, when ``val-fraction > 0``,
    each node's validation-split descriptor from the same reply (its noise check).

    A node whose training descriptor is missing or invalid is excluded (as
    :meth:`Flux.collect_descriptors`); a missing or invalid validation part only leaves the
    node without a noise check (logged). Both count as releases of the node's data."""
    with_val = s.cfg.val_fraction > 0
    if not with_val:
        return s.collect_descriptors(node_ids, server_round, label_free=False, split="train"), {}
    names = [s.nodes[n].name for n in node_ids]
    count_releases(s.descriptor_releases, names, "full", "full")
    contents = {}
    for n in node_ids:
        content = s.descriptor_content(server_round, label_free=False, split="train")
        content.config_records["config"]["with-val"] = True
        contents[n] = content
    dim = s.descriptor_dim(node_ids)

    def parse(node_id: int, content: RecordDict) -> tuple[FluxDescriptor, FluxDescriptor | None]:
        classes = s.nodes[node_id].num_classes
        arrays = record_to_arrays(get_array_record(content, "descriptor"))
        desc = FluxDescriptor.from_arrays(arrays, classes, dim, False)
        if "descriptor-val" not in content.array_records:
            return desc, None  # an empty validation split: no noise check from this node
        try:
            got = record_to_arrays(get_array_record(content, "descriptor-val"))
            return desc, FluxDescriptor.from_arrays(got, classes, dim, False)
        except REPLY_ERRORS as err:
            logger.warning("node %s: invalid validation descriptor ignored: %s", node_id, err)
            return desc, None

    got = s.collect(DESCRIPTOR, contents, server_round, parse, what="descriptor")
    descs = {n: d for n, (d, _) in got.items()}
    checks = {n: c for n, (_, c) in got.items() if c is not None}
    return descs, checks


def fit_nodes(
    s: Flux,
    ids: list[int],
    descs: dict[int, FluxDescriptor],
    server_round: int,
    checks: dict[int, FluxDescriptor] | None = None,
) -> FluxClustering:
    """``s.fit_clusters`` on ``descs`` (in ``ids`` order), with each node's validation-split
    descriptor as its noise check when ``val-fraction > 0`` (None where none came back).
    ``checks``: those descriptors when already collected (:func:`collect_with_checks`);
    otherwise they are asked for here."""
    if s.cfg.val_fraction > 0:
        if checks is None:
            checks = s.collect_descriptors(
                ids, server_round, label_free=False, split="val", exclude=False
            )
        s.noise_checks = [checks.get(n) for n in ids]
    try:
        return s.fit_clusters([descs[n] for n in ids])
    finally:
        s.noise_checks = None  # only this fit uses them


__all__ = ["collect_with_checks", "fit_nodes"]
