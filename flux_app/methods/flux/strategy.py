"""FLUX (Fenoglio et al., NeurIPS 2025): descriptor-driven clustered FL, no K given.

Schedule
    Warm-up FedAvg on one global model. In the clustering round (``flux-cluster-round`` when
    > 0, otherwise the first round >= ``flux-cluster-min-round`` whose validation-accuracy gain
    over the previous round is below ``flux-cluster-gain-threshold``, and at the latest the round
    ``ceil(flux-cluster-max-fraction * num-server-rounds)``), the global model just received is frozen
    as the extractor E; every training node computes its descriptor with E BEFORE local training
    (``query.descriptor``), the server clusters them (:func:`cluster_descriptors`: HDBSCAN by
    default, knee-DBSCAN as an option, the no-structure guard, the noise policy), and from this
    very round each cluster trains its own model, starting from the global model, so after the
    round each cluster model is that round's within-cluster average.

Descriptors that fail validation exclude their node from clustering with a logged reason; such
a node is then routed like a newcomer (label-free descriptor), or put in the largest cluster if
that fails too.

Routing (test-time adaptation)
    Held-out nodes and nodes that join after clustering compute the label-free descriptor (mu,
    sigma) of their TEST inputs with E and go to the nearest centroid. ``accuracy_routed`` does the
    same for the training nodes' test data (the paper's "test phase"); ``accuracy_known`` uses the
    cluster assigned in training. A pure P(Y|X) shift is invisible without labels: routing cannot
    separate label-swapped groups whose inputs look alike. With ``routing-labels=k`` a routed
    node also sends the class moments of up to k labelled test samples per class and goes to
    the cluster of highest likelihood (:mod:`flux_app.methods.flux.fewshot`), which does
    separate them; ``flux-routing-labels-sweep`` reports extra values of k from the same run.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from flux_app.common.params import State, clone_state
from flux_app.common.records import get_array_record, record_to_arrays, to_record
from flux_app.common.statecodec import NodeKeyed
from flux_app.engine.config import ConfigError
from flux_app.engine.metrics import mean
from flux_app.engine.registry import register_strategy
from flux_app.engine.strategy import ClusteredStrategy
from flux_app.methods.flux.clustering import (
    FluxClustering,
    cluster_descriptors,
    preload_libraries,
)
from flux_app.methods.flux.config import FluxConfig
from flux_app.methods.flux.descriptors import FluxDescriptor
from flux_app.methods.flux.drift import check_drift
from flux_app.methods.flux.fitting import collect_with_checks, fit_nodes
from flux_app.methods.flux.privacy import count_releases, privacy_report
from flux_app.methods.flux.router import save_router_of
from flux_app.methods.flux.routing import EndRouting, route_nodes, routed_metrics

logger = logging.getLogger("flwr")

DESCRIPTOR = "query.descriptor"


def _check_routing_labels(dp_noise: float, routing_labels: int) -> None:
    if dp_noise > 0 and routing_labels > 0:
        raise ConfigError(
            "routing-labels > 0 with flux-dp-noise > 0: the few-shot class moments a routed "
            "node sends are not noised; use one or the other"
        )


@register_strategy("flux")
class Flux(ClusteredStrategy):
    """FLUX on the strategy base: hooks ``before_round`` (trigger + clustering), ``route``
    (label-free descriptors) and ``final_metrics`` (accuracy_routed)."""

    descriptor_types = (DESCRIPTOR,)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opts = self.cfg.section(FluxConfig)
        self.extractor: State | None = None
        self.result: FluxClustering | None = None
        self.cluster_round: int | None = None
        self.val_history: list[tuple[int, float]] = []
        #: node name -> descriptors it was asked for, by kind ("full", "label_free"), for
        #: final.privacy (plain dicts of str and int: a checkpoint can carry them)
        self.descriptor_releases: dict[str, dict[str, int]] = {}
        #: the clustering round's validation descriptors, aligned with fit_clusters' input
        self.noise_checks: list[FluxDescriptor | None] | None = None
        #: each training node's descriptor at the last clustering (drift checks compare with it)
        self.reference: dict[int, FluxDescriptor] = {}
        #: rounds whose drift check re-clustered
        self.drift_rounds: list[int] = []
        #: the closing test phase's routing replies, asked once (routing.EndRouting)
        self.end_routing: EndRouting | None = None
        _check_routing_labels(self.opts.dp_noise, self.cfg.routing_labels)
        preload_libraries(self.opts.clusterer)  # overlaps the warm-up rounds

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            **super().state_dict(),
            "flux": {
                "extractor": self.extractor,
                "clustering": self.result,
                "cluster_round": self.cluster_round,
                "val_history": self.val_history,
                "descriptor_releases": self.descriptor_releases,
                "reference": NodeKeyed(self.reference),
                "drift_rounds": self.drift_rounds,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state)
        own = state["flux"]
        self.extractor, self.result = own["extractor"], own["clustering"]
        self.cluster_round = own["cluster_round"]
        self.val_history = [(int(r), float(a)) for r, a in own["val_history"]]
        self.descriptor_releases = {
            str(name): {str(k): int(c) for k, c in counts.items()}
            for name, counts in own.get("descriptor_releases", {}).items()
        }
        self.reference = dict(own.get("reference", {}))
        self.drift_rounds = [int(r) for r in own.get("drift_rounds", [])]

    # ------------------------------------------------------------------ schedule
    def should_cluster(self, server_round: int) -> bool:
        """The trigger: explicit round, accuracy plateau, or the latest allowed round."""
        cfg = self.opts
        if cfg.cluster_round > 0:
            return server_round == cfg.cluster_round
        latest = max(1, math.ceil(cfg.cluster_max_fraction * self.cfg.num_server_rounds))
        if server_round >= latest:
            return True
        if server_round < cfg.cluster_min_round or len(self.val_history) < 2:
            return False
        (r1, a1), (r2, a2) = self.val_history[-2:]
        return r2 == server_round - 1 and r1 == r2 - 1 and (a2 - a1) < cfg.cluster_gain_threshold

    def before_round(self, server_round: int) -> None:  # noqa: D102
        if self.result is None and self.should_cluster(server_round):
            self.cluster_now(server_round)
        else:
            check_drift(self, server_round)

    def after_round(self, server_round: int, row: dict[str, Any]) -> None:  # noqa: D102
        if row.get("val_accuracy") is not None:
            self.val_history.append((server_round, float(row["val_accuracy"])))

    # ------------------------------------------------------------------ clustering
    def descriptor_content(
        self, server_round: int, *, label_free: bool, split: str, labels: int = 0
    ) -> RecordDict:
        """The ``query.descriptor`` payload: extractor + settings (``labels``: routing-labels)."""
        cfg = self.opts
        conf = {
            "server-round": server_round,
            "label-free": label_free,
            "split": split,
            "proj-dim": cfg.proj_dim,
            "proj-seed": cfg.proj_seed,
            "dp-clip": cfg.dp_clip,
            "dp-noise": cfg.dp_noise,
            "dp-mechanism": cfg.dp_mechanism,
        }
        if cfg.dp_seeded_noise:  # sent only when on: other runs' messages stay byte-identical
            conf["dp-seeded-noise"] = True
        if labels > 0:  # likewise
            conf["routing-labels"] = int(labels)
        if cfg.descriptor_layer != "head-input":  # likewise
            conf["layer"] = cfg.descriptor_layer
        return RecordDict({"arrays": to_record(self.extractor), "config": ConfigRecord(conf)})

    def collect_descriptors(
        self,
        node_ids: list[int],
        server_round: int,
        *,
        label_free: bool,
        split: str,
        exclude: bool = True,
    ) -> dict[int, FluxDescriptor]:
        """Ask nodes for descriptors; keep the valid ones, log a reason for the others.

        Every request counts as a release of the node's data (an upper bound: a reply that was
        lost or rejected may still have reached the server)."""
        names = [self.nodes[n].name for n in node_ids]
        count_releases(self.descriptor_releases, names, "label_free" if label_free else "full")
        contents = {
            n: self.descriptor_content(server_round, label_free=label_free, split=split)
            for n in node_ids
        }
        dim = self.descriptor_dim(node_ids)

        def parse(node_id: int, content: RecordDict) -> FluxDescriptor:
            arrays = record_to_arrays(get_array_record(content, "descriptor"))
            return FluxDescriptor.from_arrays(
                arrays, self.nodes[node_id].num_classes, dim, label_free
            )

        return self.collect(
            DESCRIPTOR, contents, server_round, parse, what="descriptor", exclude=exclude
        )

    def descriptor_dim(self, node_ids: list[int]) -> int:
        """K of the descriptors ``node_ids`` send (``flux-proj-dim``, else classes capped)."""
        info = self.nodes[node_ids[0]] if node_ids else None
        return self.opts.proj_dim or (min(info.num_classes, self.feature_dim()) if info else 0)

    def feature_dim(self) -> int:
        """Width of the features descriptors read (``flux-descriptor-layer``)."""
        if self.extractor is None:
            return 0
        if self.opts.descriptor_layer == "conv":  # the input of the FC layer after the convs
            return int(self.extractor["encoder.1.weight"].shape[1])
        return int(self.extractor["head.weight"].shape[1])

    def cluster_now(self, server_round: int) -> None:
        """The clustering round: descriptors with the frozen global model, clusters, models."""
        cfg = self.opts
        self.extractor = clone_state(self.models[0])
        trainers = self.training_nodes()
        descs, checks = collect_with_checks(self, trainers, server_round)
        if not descs:
            logger.warning("no valid descriptor: staying with one global model")
            return
        ids = self.ordered(descs)
        self.result = fit_nodes(self, ids, descs, server_round, checks)
        self.reference = {n: descs[n] for n in ids}
        self.cluster_round = server_round
        global_model = self.models[0]
        self.models = {z: clone_state(global_model) for z in range(self.result.num_clusters)}
        self.aggregation.reset()  # new clusters: no aggregator state carries over
        self.assignment = {n: int(z) for n, z in zip(ids, self.result.labels, strict=True)}
        leftovers = [n for n in trainers if n not in self.assignment]
        if leftovers:  # invalid full descriptor: try the label-free route, else the largest cluster
            for n, z in self.route(leftovers, server_round).items():
                self.assignment[n] = z if z is not None else self.largest_cluster()
        self.phase = "cluster"
        for note in self.result.notes:
            logger.info("flux clustering: %s", note)
        logger.info(
            "flux: round %d clustered %d node(s) into %d cluster(s), sizes %s",
            server_round,
            len(ids),
            self.result.num_clusters,
            sorted(Counter(self.assignment.values()).values(), reverse=True),
        )
        self.record_clustering(
            server_round,
            method=cfg.clusterer,
            notes=list(self.result.notes),
            scales=self.result.normaliser.scales,
            bytes_descriptor_up=self.traffic[DESCRIPTOR]["up"],
        )

    def fit_clusters(self, descriptors: list[FluxDescriptor]) -> FluxClustering:
        """Hook: turn the training nodes' descriptors into clusters (FLUX: no K given).

        ``self.noise_checks`` holds, in the same order, each node's descriptor of its
        validation split (None where it sent none; ``None`` when ``val-fraction`` is 0): what
        measures the descriptors' own noise. A subclass may cluster differently; routing only
        needs the returned :class:`FluxClustering` (labels, normaliser, label-free centroids).
        """
        cfg = self.opts
        return cluster_descriptors(
            descriptors,
            method=cfg.clusterer,
            min_cluster_size=cfg.min_cluster_size,
            noise_policy=cfg.noise_policy,
            attach_tolerance=cfg.attach_tolerance,
            iid_guard=cfg.iid_guard,
            missing_penalty=cfg.missing_penalty,
            seed=self.cfg.seed,
            noise_check=self.noise_checks,
        )

    # ------------------------------------------------------------------ routing
    def route(
        self, node_ids: list[int], server_round: int, labels: int | None = None
    ) -> dict[int, int | None]:
        """Nearest centroid by the label-free descriptor of each node's test inputs; with
        ``labels`` (default: ``routing-labels``) > 0, the most likely cluster given that
        descriptor and the node's few labelled samples (:func:`route_nodes`)."""
        labels = self.cfg.routing_labels if labels is None else labels
        return route_nodes(self, node_ids, server_round, labels)

    def final_metrics(self) -> dict[str, Any]:
        """accuracy_routed: the training nodes' test data routed as newcomers (test phase),
        the routing-labels sweep, and ``privacy``: the (epsilon, delta) of the noisy
        descriptors (null without noise)."""
        if self.result is None:
            return {
                "accuracy_routed": self.results_known(),
                "cluster_round": None,
                "privacy": self.privacy(),
            }
        out = {
            **routed_metrics(self),
            "cluster_round": self.cluster_round,
            "reclustered_rounds": list(self.drift_rounds),
        }
        out["privacy"] = self.privacy()  # after the routing above: it releases descriptors too
        return out

    def privacy(self) -> dict[str, Any] | None:
        """results.json's ``final.privacy`` (:func:`~flux_app.methods.flux.privacy.privacy_report`)
        for the releases so far; ``None`` when descriptor noise is off."""
        cfg = self.opts
        return privacy_report(
            mechanism=cfg.dp_mechanism,
            noise_multiplier=cfg.dp_noise,
            clip_norm=cfg.dp_clip,
            delta=cfg.dp_delta,
            releases=self.descriptor_releases,
            seeded_noise=cfg.dp_seeded_noise,
        )

    def save_artifacts(self, run_dir: str) -> None:
        """``<run>/router/``: everything routing a newcomer offline needs (``flux_app.route``)."""
        if self.result is not None and self.extractor is not None:
            save_router_of(self, os.path.join(run_dir, "router"))

    def results_known(self) -> float | None:
        """accuracy_known of the final evaluation (the same model when nothing was clustered)."""
        return mean(m["accuracy"] for m in self.last_eval.values())
