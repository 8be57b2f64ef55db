"""The clustered-strategy base: one round loop for every method of this app.

:class:`ClusteredStrategy` owns what all clustered methods share: one model per cluster
(``self.models``), the node -> cluster map (``self.assignment``), the round loop, evaluation, the
end of the run (routing of held-out nodes, final metrics, checkpoints). It delegates the rest:
nodes and admission to :class:`~flux_app.engine.nodes.NodeBook`, messages to
:class:`~flux_app.engine.transport.Transport`, byte counts to
:class:`~flux_app.engine.traffic.Traffic`, combining a cluster's updates to the run's
``cluster-aggregator`` (:mod:`flux_app.engine.aggregation`), numbers to
:mod:`flux_app.engine.metrics`.

A method is a registered subclass that overrides hooks. The hooks are the whole contract:

===================================  ================================================================
``setup()``                          initial models and assignment (default: one global model)
``before_round(rnd)``                start of every round (FLUX clusters here)
``select_nodes(rnd)``                which nodes train (default: a ``fraction-train`` sample)
``train_content(node, rnd)``         what a sampled node receives (default: its cluster's model)
``train_round(rnd)``                 the round's training (override for multi-phase rounds)
``read_trained(reply)``              validate one train reply -> ``(state, num_examples)``
``aggregate(rnd, replies)``          new cluster models (default: ``combine`` per cluster)
``after_round(rnd, row)``            before the round's row is recorded (add fields)
``counts_for_best(rnd)``             whether the round enters ``accuracy_best_over_rounds``
``route(nodes, rnd)``                cluster of nodes that never trained (held-out, late)
``new_cluster_for(node)``            cluster for a late node ``route`` could not place
``model_for(node)``                  the model a training node is evaluated with
``final_metrics()``                  extra entries of results.json's ``final``
``save_artifacts(run_dir)``          files the method leaves in the run folder (FLUX's router)
``state_dict()`` / ``load_state_dict``  the server state of a checkpoint (a method adds its own;
                                     :class:`~flux_app.engine.checkpoint.ResumableState`)
``checkpoint_ready(rnd)``            whether the state after ``rnd`` can be resumed without the
                                     nodes' own state (FedDAG: not between sketch and clustering)
===================================  ================================================================

Helpers for methods: ``send``, ``collect`` (send + validate + record exclusions),
``evaluate_nodes``, ``sample``, ``model_content``, ``initial_model``, ``seeded_model``,
``combine``, ``training_nodes``, ``holdout_nodes``, ``ordered``,
``largest_cluster``, ``record_clustering``. docs/EXTENDING.md shows a method in about 30 lines.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from flux_app.common.models import build_model
from flux_app.common.params import State, clone_state
from flux_app.common.records import (
    check_state,
    from_record,
    get_array_record,
    metric_number,
    to_record,
)
from flux_app.common.seeding import derive_seed
from flux_app.engine import metrics
from flux_app.engine.aggregation import ClusterAggregation
from flux_app.engine.checkpoint import ResumableState
from flux_app.engine.config import RunConfig
from flux_app.engine.loop import discover, run_rounds
from flux_app.engine.nodes import NodeBook, NodeInfo, sample_nodes
from flux_app.engine.results import RunRecorder
from flux_app.engine.screening import num_examples, screen_replies
from flux_app.engine.traffic import Traffic
from flux_app.engine.transport import Transport

logger = logging.getLogger("flwr")

T = TypeVar("T")


@dataclass
class Reply:
    """A valid reply of one node: its content and the cluster it trained for."""

    node_id: int
    content: RecordDict
    cluster: int | None = None
    #: the trained model and its sample count, filled once the reply has been validated
    state: State | None = None
    num_examples: int = 0


class ClusteredStrategy(ResumableState):
    """Base class of every strategy; see the module docstring for the hooks.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration.
    recorder : RunRecorder, optional
        Where results go; ``None`` keeps them in memory only (``self.results``).
    """

    #: run-config name of the method (set by ``@register_strategy``)
    name: ClassVar[str] = "base"
    #: message types whose uploads count as descriptor bytes in results.json
    descriptor_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: RunConfig, recorder: RunRecorder | None = None) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.book = NodeBook(cfg.holdout_clients, cfg.model_input, cfg.max_train_size_ratio)
        self.nodes: dict[int, NodeInfo] = self.book.info
        self.excluded: dict[int, str] = self.book.excluded
        self.transport: Transport | None = None
        self.traffic_counter = Traffic()
        self.traffic = self.traffic_counter.by_type
        self.aggregation = ClusterAggregation(cfg)
        self.models: dict[int, State] = {}
        self.assignment: dict[int, int] = {}
        self.phase = "train"
        self.last_eval: dict[int, dict[str, float]] = {}
        #: each training node's best test accuracy over the evaluated rounds that count
        self.best_accuracy: dict[int, float] = {}
        self.train_losses: list[float] = []
        #: accepted train replies over the run (a run in which nobody trained has failed)
        self.trained = 0
        self.clustering: dict[str, Any] | None = None
        self.results: dict[str, Any] = {"rounds": [], "clustering": None, "final": None}

    # ================================================================== hooks
    def setup(self) -> None:
        """Initial cluster models and assignment. Default: one global model, every node in it."""
        self.models = {0: self.initial_model()}
        self.assignment = {n: 0 for n in self.training_nodes()}

    def before_round(self, server_round: int) -> None:
        """Called at the start of every round, before sampling. Default: nothing."""

    def select_nodes(self, server_round: int) -> list[int]:
        """Nodes that train this round. Default: ``fraction-train`` of the assigned nodes."""
        return self.sample(list(self.assignment), server_round)

    def train_content(self, node_id: int, server_round: int) -> RecordDict:
        """What a sampled node receives for training. Default: its cluster's model + config."""
        return self.model_content(self.models[self.assignment[node_id]], server_round)

    def train_round(self, server_round: int) -> None:
        """Sample, send every sampled node its instruction, aggregate the valid replies."""
        sampled = self.select_nodes(server_round)
        contents = {n: self.train_content(n, server_round) for n in sampled}
        replies = self.collect_trained(contents, server_round)
        if replies:
            self.aggregate(server_round, replies)

    def read_trained(self, reply: Reply) -> tuple[State, int]:
        """``(state, num-examples)`` of a train reply, checked against the cluster model."""
        state = from_record(get_array_record(reply.content, "arrays"))
        check_state(self.models[reply.cluster], state)
        announced = self.nodes[reply.node_id].num_train if reply.node_id in self.nodes else None
        metric_number(reply.content, "metrics", "train-loss", low=0.0, required=False)
        return state, num_examples(reply.content, announced)

    def aggregate(self, server_round: int, replies: list[Reply]) -> None:
        """Default: each cluster combines its members' trained models (``cluster-aggregator``)."""
        by_cluster: dict[int, list[Reply]] = {}
        for reply in replies:
            by_cluster.setdefault(reply.cluster, []).append(reply)
        for cid, rs in sorted(by_cluster.items()):
            states = [r.state for r in rs]
            self.models[cid] = self.combine(cid, states, [r.num_examples for r in rs], server_round)

    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        """Called with the round's row before it is recorded (methods may add fields)."""

    def counts_for_best(self, server_round: int) -> bool:
        """Whether this round's evaluation enters ``accuracy_best_over_rounds``. Default: yes."""
        return True

    def route(self, node_ids: list[int], server_round: int) -> dict[int, int | None]:
        """Cluster of each node that never trained (held-out, or joined late); ``None`` = not
        routable. ``server_round`` tags the messages (``num-server-rounds + 1`` at the end).
        Default: the only cluster when there is one."""
        only = next(iter(self.models)) if len(self.models) == 1 else None
        return {n: only for n in node_ids}

    def new_cluster_for(self, node_id: int) -> int:
        """Cluster for a late node that ``route`` could not place. Default: the largest."""
        return self.largest_cluster()

    def model_for(self, node_id: int) -> State:
        """The model a training node is evaluated with: its cluster's."""
        return self.models[self.assignment[node_id]]

    def final_metrics(self) -> dict[str, Any]:
        """Extra entries for results.json's ``final``."""
        return {}

    def save_artifacts(self, run_dir: str) -> None:
        """Write what the method leaves in the run folder beside the checkpoints (FLUX: its
        router). Default: nothing."""

    # ================================================================== helpers for methods
    def initial_model(self, **options: Any) -> State:
        """The common initial model (seeded: the same on every run with the same seed).
        ``options`` go to :func:`~flux_app.common.models.build_model` (e.g. ``dual=True``)."""
        return self._built(derive_seed(self.cfg.seed, "init"), **options)

    def seeded_model(self, index: int, **options: Any) -> State:
        """Initial model ``index``: 0 is :meth:`initial_model`, others distinct seeded inits."""
        if index == 0:
            return self.initial_model(**options)
        return self._built(derive_seed(self.cfg.seed, "peer-init", index), **options)

    def _built(self, seed: int, **options: Any) -> State:
        shape, classes = self.cfg.model_input  # the run's shape, never a node's word
        model = build_model(self.cfg.model_name, shape, classes, seed=seed, **options)
        return clone_state(model.state_dict())

    def model_content(self, state: State, server_round: int, **config: Any) -> RecordDict:
        """A ``train``/``evaluate`` payload: the model and a ConfigRecord (with the
        aggregator's client-side settings, e.g. FedProx's ``proximal-mu``)."""
        conf = {"server-round": server_round, **self.aggregation.client_config(), **config}
        return RecordDict({"arrays": to_record(state), "config": ConfigRecord(conf)})

    def combine(
        self,
        cluster: int,
        states: list[State],
        weights: list[float],
        server_round: int,
        current: State | None = None,
    ) -> State:
        """One cluster's new model from its members' trained ``states`` (``cluster-aggregator``;
        ``current``, default the cluster's model, is what was sent)."""
        current = self.models.get(cluster) if current is None else current
        return self.aggregation.combine(cluster, current, states, weights, server_round)

    def send(
        self, message_type: str, contents: Mapping[int, RecordDict], server_round: int
    ) -> dict[int, RecordDict]:
        """One Message per node; the content of every reply that arrived without error."""
        return self._transport().send(message_type, contents, server_round)

    def collect(
        self,
        message_type: str,
        contents: Mapping[int, RecordDict],
        server_round: int,
        parse: Callable[[int, RecordDict], T],
        *,
        what: str,
        exclude: bool = True,
    ) -> dict[int, T]:
        """Send, validate each reply with ``parse(node, content)``; rejected (and, with
        ``exclude``, missing) replies are logged and recorded in ``self.excluded``."""
        book = self.excluded if exclude else None
        return self._transport().collect(
            message_type, contents, server_round, parse, what=what, excluded=book
        )

    def collect_trained(
        self, contents: Mapping[int, RecordDict], server_round: int, sent: Mapping | None = None
    ) -> list[Reply]:
        """Send ``train`` messages; the valid replies (``read_trained``, then the length screen
        :func:`~flux_app.engine.screening.screen_replies`; ``sent``: each node's model where it
        is not its cluster's), losses noted."""
        got = self.collect(
            "train", contents, server_round, self._trained, what="train reply", exclude=False
        )
        replies = screen_replies(self, list(got.values()), sent or {})
        self.trained += len(replies)
        losses = (r.content.metric_records.get("metrics", {}).get("train-loss") for r in replies)
        self.train_losses += [float(v) for v in losses if v is not None]
        return replies

    def evaluate_nodes(
        self, states: Mapping[int, State], server_round: int
    ) -> dict[int, dict[str, float]]:
        """Evaluate each node on its own data with the model given for it."""

        contents = {n: self.model_content(s, server_round) for n, s in states.items()}
        return self.collect(
            "evaluate", contents, server_round, _eval_metrics, what="evaluate reply", exclude=False
        )

    def screen_group(self, reply: Reply) -> Any:
        """Replies trained alike, compared by the length screen. Default: the cluster's."""
        return reply.cluster

    def _trained(self, node_id: int, content: RecordDict) -> Reply:
        reply = Reply(node_id, content, self.assignment.get(node_id))
        reply.state, reply.num_examples = self.read_trained(reply)
        return reply

    def sample(
        self, pool: list[int], server_round: int, fraction: float | None = None
    ) -> list[int]:
        """Seeded sample of ``fraction`` (default ``fraction-train``) of ``pool``, at least one."""
        fraction = self.cfg.fraction_train if fraction is None else fraction
        return sample_nodes(
            self.ordered(pool), fraction, derive_seed(self.cfg.seed, "sample", server_round)
        )

    def ordered(self, node_ids: Iterable[int]) -> list[int]:
        """Nodes by partition id (stable order for sampling and averaging)."""
        return self.book.ordered(node_ids)

    def training_nodes(self) -> list[int]:
        """Known, non-held-out nodes ordered by partition id."""
        return self.book.training()

    def holdout_nodes(self) -> list[int]:
        """Held-out nodes (never train) ordered by partition id."""
        return self.book.holdout()

    def largest_cluster(self) -> int:
        """The cluster with the most training nodes (ties: the first assigned)."""
        return Counter(self.assignment.values()).most_common(1)[0][0] if self.assignment else 0

    def record_clustering(self, server_round: int, **extra: Any) -> None:
        """Store the current assignment (by partition id) with ARI/NMI in results.json."""
        ari, nmi = self.assignment_scores()
        self.clustering = metrics.clustering_record(
            self.nodes, self.assignment, server_round, ari, nmi, **extra
        )
        self.results["clustering"] = self.clustering
        if self.recorder is not None:
            self.recorder.set("clustering", self.clustering)

    def assignment_scores(self) -> tuple[float | None, float | None]:
        """ARI and NMI of the training nodes' clusters against their ground-truth groups."""
        return metrics.assignment_scores(self.nodes, self.assignment, self.ordered(self.assignment))

    # ================================================================== the run
    def connect(self, grid: Grid, wait_seconds: float = 120.0) -> None:
        """Attach to ``grid`` and admit the nodes that answer ``query.info`` (``start`` does
        this first; tests and tools may call it alone)."""
        self.transport = Transport.for_run(grid, self.cfg, self.ordered, self.traffic_counter)
        discover(self, wait_seconds)

    def start(self, grid: Grid) -> dict[str, Any]:
        """Run ``num-server-rounds`` rounds and write the results; returns results.json's content."""
        t_start = time.time()
        self.connect(grid)
        return run_rounds(self, t_start)

    def _transport(self) -> Transport:
        if self.transport is None:
            raise RuntimeError("strategy has no grid; call start(grid)")
        return self.transport


def _eval_metrics(node_id: int, content: RecordDict) -> dict[str, float]:
    """An evaluate reply's metrics: a number ``accuracy`` in [0, 1]; ``val-accuracy`` (when
    sent) in [0, 1] and ``loss`` / ``val-loss`` (when sent) finite and >= 0, since the round
    rows, best-over-rounds and FLUX's plateau trigger read them."""
    metric_number(content, "metrics", "accuracy", low=0.0, high=1.0)
    metric_number(content, "metrics", "val-accuracy", low=0.0, high=1.0, required=False)
    for key in ("loss", "val-loss"):
        metric_number(content, "metrics", key, low=0.0, required=False)
    return dict(content.metric_records["metrics"])


__all__ = ["ClusteredStrategy", "NodeInfo", "Reply"]
