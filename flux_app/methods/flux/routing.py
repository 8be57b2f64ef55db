"""FLUX's routing on the server: label-free and few-label routing, the test phase, the k sweep.

Functions of the :class:`~flux_app.methods.flux.strategy.Flux` strategy, kept apart from its
schedule and clustering: what a routed node is asked for when it may use ``k`` labelled samples
per class (:mod:`flux_app.methods.flux.fewshot`), and ``flux-routing-labels-sweep``'s extra
columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import RecordDict

from flux_app.common.records import get_array_record, record_to_arrays
from flux_app.engine.metrics import mean
from flux_app.methods.flux.clustering import route_many
from flux_app.methods.flux.descriptors import FluxDescriptor
from flux_app.methods.flux.fewshot import ClassSample, route_with_labels
from flux_app.methods.flux.privacy import count_releases

if TYPE_CHECKING:
    from flux_app.methods.flux.strategy import Flux

logger = logging.getLogger("flwr")

DESCRIPTOR = "query.descriptor"

Routed = tuple[FluxDescriptor, "ClassSample | None"]


@dataclass
class EndRouting:
    """The routing replies of the closing test phase, asked once for every node it routes.

    After the last round the held-out nodes, the training nodes' test data and each k of
    ``flux-routing-labels-sweep`` are routed; the label-free descriptor of a node's test data
    is the same in each of those requests, so one message per node with the first k > 0 needed
    serves the label-free routes and that k's (a further k asks again)."""

    labels: int
    asked: set[int] = field(default_factory=set)
    replies: dict[int, Routed] = field(default_factory=dict)


def collect_routing(
    strategy: Flux, node_ids: list[int], server_round: int, labels: int
) -> dict[int, tuple[FluxDescriptor, ClassSample | None]]:
    """Routing descriptors with ``labels`` labelled samples per class: each valid reply's
    label-free descriptor and its few-shot class moments (None when the node had none)."""
    names = [strategy.nodes[n].name for n in node_ids]
    count_releases(strategy.descriptor_releases, names, "label_free", "few_labels")
    contents = {
        n: strategy.descriptor_content(server_round, label_free=True, split="test", labels=labels)
        for n in node_ids
    }
    dim = strategy.result.normaliser.dim

    def parse(node_id: int, content: RecordDict) -> tuple[FluxDescriptor, ClassSample | None]:
        arrays = record_to_arrays(get_array_record(content, "descriptor"))
        classes = strategy.nodes[node_id].num_classes
        desc = FluxDescriptor.from_arrays(arrays, classes, dim, True)
        if "labelled" not in content.array_records:
            return desc, None
        got = record_to_arrays(get_array_record(content, "labelled"))
        return desc, ClassSample.from_arrays(got, classes, dim, labels)

    return strategy.collect(DESCRIPTOR, contents, server_round, parse, what="descriptor")


def end_replies(
    strategy: Flux, node_ids: list[int], server_round: int, labels: int
) -> dict[int, Routed] | None:
    """The closing test phase's replies for ``node_ids`` (:class:`EndRouting`), asked on the
    first call for every node the test phase routes; None where they cannot serve this call
    (another round, a k not asked, a node not asked: the caller asks itself)."""
    end = strategy.cfg.num_server_rounds + 1
    if server_round != end or strategy.result.normaliser.label_free:
        return None
    if strategy.end_routing is None:
        wanted = [strategy.cfg.routing_labels, *strategy.opts.sweep()]
        first = labels or next((k for k in wanted if k > 0), 0)
        trainers = [n for n in strategy.training_nodes() if n in strategy.last_eval]
        nodes = strategy.ordered(set(node_ids) | set(trainers) | set(strategy.holdout_nodes()))
        if first > 0:
            got = collect_routing(strategy, nodes, server_round, first)
        else:
            descs = strategy.collect_descriptors(nodes, server_round, label_free=True, split="test")
            got = {n: (d, None) for n, d in descs.items()}
        strategy.end_routing = EndRouting(first, set(nodes), got)
    cached = strategy.end_routing
    if labels not in (0, cached.labels) or not set(node_ids) <= cached.asked:
        return None
    return {n: cached.replies[n] for n in node_ids if n in cached.replies}


def routing_sweep(
    strategy: Flux, trainers: list[int], end: int, evaluated: dict[tuple[int, int], float]
) -> dict[str, float | None]:
    """``accuracy_routed_k<k>`` / ``accuracy_holdout_k<k>`` for each k of
    ``flux-routing-labels-sweep``: the training nodes' test data and the held-out nodes
    routed with k labelled samples per class, each (node, cluster) evaluated once
    (``evaluated``: (node, cluster) -> accuracy the test phase measured already)."""
    ks = strategy.opts.sweep()
    if not ks:
        return {}
    known = {(n, strategy.assignment.get(n)): strategy.last_eval[n]["accuracy"] for n in trainers}
    known.update(evaluated)
    holdouts = [n for n in strategy.holdout_nodes() if strategy.nodes[n].num_test > 0]
    out: dict[str, float | None] = {}
    for k in ks:
        routed = strategy.route(trainers + holdouts, end, labels=k)
        todo = {
            n: strategy.models[z]
            for n, z in routed.items()
            if z is not None and z in strategy.models and (n, z) not in known
        }
        for n, m in strategy.evaluate_nodes(todo, end).items():
            known[(n, routed[n])] = m["accuracy"]

        def acc(nodes: list[int], routed: dict[int, int | None] = routed) -> float | None:
            return mean(known[(n, routed[n])] for n in nodes if (n, routed[n]) in known)

        out[f"accuracy_routed_k{k}"] = acc(trainers)
        out[f"accuracy_holdout_k{k}"] = acc(holdouts) if holdouts else None
        logger.info(
            "flux: routing-labels=%d: routed %s, held-out %s",
            k,
            out[f"accuracy_routed_k{k}"],
            out[f"accuracy_holdout_k{k}"],
        )
    return out


def route_nodes(
    strategy: Flux, node_ids: list[int], server_round: int, labels: int
) -> dict[int, int | None]:
    """Each node's cluster: nearest label-free centroid, or with ``labels`` > 0 the most likely
    cluster given its label-free descriptor and labelled samples (:func:`route_with_labels`;
    a node without labelled test data is routed label-free). None where no valid reply came."""
    if not node_ids:
        return {}
    if strategy.result is None or strategy.extractor is None:
        return {n: 0 for n in node_ids}  # before clustering there is one global model
    out: dict[int, int | None] = {n: None for n in node_ids}
    cached = end_replies(strategy, node_ids, server_round, labels)
    if cached is not None and labels == 0:
        descs = {n: desc for n, (desc, _) in cached.items()}
    elif labels > 0 and not strategy.result.normaliser.label_free:
        if cached is None:
            cached = collect_routing(strategy, node_ids, server_round, labels)
        got = cached
        with_labels = [n for n in strategy.ordered(got) if got[n][1] is not None]
        if with_labels:
            clusters, _ = route_with_labels(
                [got[n][0] for n in with_labels], [got[n][1] for n in with_labels], strategy.result
            )
            out.update({n: int(z) for n, z in zip(with_labels, clusters, strict=True)})
        descs = {n: got[n][0] for n in got if got[n][1] is None}
    else:
        descs = strategy.collect_descriptors(node_ids, server_round, label_free=True, split="test")
    ids = strategy.ordered(descs)
    if ids:
        clusters, _ = route_many([descs[n] for n in ids], strategy.result)
        out.update({n: int(z) for n, z in zip(ids, clusters, strict=True)})
    return out


def routed_metrics(strategy: Flux) -> dict[str, float | None]:
    """``accuracy_routed`` (the training nodes' test data routed as newcomers, with
    ``routing-labels``), ``routing_agreement`` (share routed to their training cluster) and the
    sweep's columns. The final evaluation is reused where the route agrees with training."""
    trainers = [n for n in strategy.training_nodes() if n in strategy.last_eval]
    end = strategy.cfg.num_server_rounds + 1
    routed = strategy.route(trainers, end)
    agree = [routed[n] == strategy.assignment.get(n) for n in trainers]
    to_eval = {
        n: strategy.models[z]
        for n, z in routed.items()
        if z is not None and z != strategy.assignment.get(n)
    }
    extra = strategy.evaluate_nodes(to_eval, end)
    accs = []
    for n in trainers:
        z = routed[n]
        if z is None:
            continue
        if z == strategy.assignment.get(n):
            accs.append(strategy.last_eval[n]["accuracy"])
        elif n in extra:
            accs.append(extra[n]["accuracy"])
    return {
        "accuracy_routed": mean(accs),
        "routing_agreement": float(np.mean(agree)) if agree else None,
        **routing_sweep(
            strategy, trainers, end, {(n, routed[n]): m["accuracy"] for n, m in extra.items()}
        ),
    }


__all__ = [
    "EndRouting",
    "collect_routing",
    "end_replies",
    "route_nodes",
    "routing_sweep",
    "routed_metrics",
]
