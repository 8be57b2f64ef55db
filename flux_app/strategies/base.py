"""The clustered-strategy base: one round loop for every method of this app.

:class:`ClusteredStrategy` owns what all clustered methods share: discovering nodes and asking
them for their info, one model per cluster (``self.models``), the node -> cluster map
(``self.assignment``), one Message per node carrying that node's cluster model, sampling
``fraction-train`` of the nodes per round, validating every reply (a bad or missing reply is
logged and skipped; the round goes on), per-round evaluation, routing of held-out and late nodes,
byte accounting, results.json, checkpoints and the plot.

A method is a subclass that overrides a few hooks (all documented below):

``setup()``                 initial models and assignment (default: one global model)
``before_round(rnd)``       e.g. decide to cluster now
``select_nodes(rnd)``       which nodes train this round (default: ``fraction-train`` sample)
``train_content(node, rnd)`` what a sampled node is sent for training
``aggregate(rnd, replies)`` turn replies into new cluster models (default: FedAvg per cluster)
``route(nodes)``            cluster of nodes that never trained (held-out or late)
``final_metrics()``         extra numbers for results.json's ``final``

FedAvg, Local and Oracle are a few lines each on top of this (see their modules);
docs/EXTENDING.md shows a new method in about 30 lines.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from flux_app.client import derive_seed
from flux_app.config import RunConfig
from flux_app.models import build_model
from flux_app.records import (
    ReplyError,
    check_state,
    from_record,
    get_array_record,
    get_metric,
    to_record,
    weighted_average,
)
from flux_app.results import RunRecorder

logger = logging.getLogger("flwr")

State = OrderedDict  # str -> torch.Tensor (CPU)


@dataclass
class NodeInfo:
    """What the server knows about a node, from its ``query.info`` reply.

    ``group`` is the ground-truth shift group of the node's simulated data. It exists for
    metrics (ARI, routing accuracy) and for the Oracle baseline only; no other method reads it.
    """

    node_id: int
    partition_id: int
    num_partitions: int
    num_train: int
    num_val: int
    num_test: int
    num_classes: int
    input_shape: tuple[int, int, int]
    group: int
    holdout: bool = False


@dataclass
class Reply:
    """A valid reply of one node: its content and the cluster it trained for."""

    node_id: int
    content: RecordDict
    cluster: int | None = None
    #: the trained model and its sample count, filled once the reply has been validated
    state: State | None = None
    num_examples: int = 0


class ClusteredStrategy:
    """Base class of every strategy; see the module docstring for the hooks.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration.
    recorder : RunRecorder, optional
        Where results go; ``None`` keeps them in memory only (``self.results``).
    """

    #: run-config name of the method
    name = "base"
    #: message types whose uploads count as descriptor bytes in results.json
    descriptor_types: tuple[str, ...] = ()
    #: cluster models are FedDAG dual-encoder models
    dual_model = False

    def __init__(self, cfg: RunConfig, recorder: RunRecorder | None = None) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.grid: Grid | None = None
        self.nodes: dict[int, NodeInfo] = {}
        self.models: dict[int, State] = {}
        self.assignment: dict[int, int] = {}
        self.phase = "train"
        self.traffic: dict[str, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
        self._round_bytes = {"up": 0, "down": 0}
        self.last_eval: dict[int, dict[str, float]] = {}
        #: each training node's best test accuracy over the evaluated rounds that count
        self.best_accuracy: dict[int, float] = {}
        self.train_losses: list[float] = []
        self.clustering: dict[str, Any] | None = None
        self.results: dict[str, Any] = {"rounds": [], "clustering": None, "final": None}
        self.excluded: dict[int, str] = {}

    # ================================================================== hooks
    def setup(self) -> None:
        """Initial cluster models and assignment. Default: one global model, every node in it."""
        self.models = {0: self.initial_model()}
        self.assignment = {n: 0 for n in self.training_nodes()}

    def before_round(self, server_round: int) -> None:
        """Called at the start of every round, before sampling. Default: nothing."""

    def train_content(self, node_id: int, server_round: int) -> RecordDict:
        """What a sampled node receives for training. Default: its cluster's model + config."""
        return self.model_content(self.models[self.assignment[node_id]], server_round)

    def aggregate(self, server_round: int, replies: list[Reply]) -> None:
        """Default: sample-weighted FedAvg inside each cluster of the replies' trained models."""
        by_cluster: dict[int, list[tuple[State, int]]] = defaultdict(list)
        for reply in replies:
            state, n = (
                (reply.state, reply.num_examples)
                if reply.state is not None
                else self.read_trained(reply)
            )
            by_cluster[reply.cluster].append((state, n))
        for cid, items in sorted(by_cluster.items()):
            self.models[cid] = weighted_average([s for s, _ in items], [n for _, n in items])

    def counts_for_best(self, server_round: int) -> bool:
        """Whether this round's evaluation enters ``accuracy_best_over_rounds``. Default: every
        evaluated round (FedDAG skips its local warm-up rounds)."""
        return True

    def route(self, node_ids: list[int]) -> dict[int, int | None]:
        """Cluster of each node that never trained (held-out, or joined late).

        Default: the only cluster when there is one; otherwise ``None`` (not routable), which
        methods with more than one cluster override.
        """
        only = next(iter(self.models)) if len(self.models) == 1 else None
        return {n: only for n in node_ids}

    def final_metrics(self) -> dict[str, Any]:
        """Extra entries for results.json's ``final`` (e.g. FLUX's accuracy_routed)."""
        return {}

    # ================================================================== helpers for methods
    def initial_model(self, *, dual: bool | None = None) -> State:
        """The common initial model (seeded: the same on every run with the same seed)."""
        info = next(iter(self.nodes.values()))
        model = build_model(
            self.cfg.model_name,
            info.input_shape,
            info.num_classes,
            dual=self.dual_model if dual is None else dual,
            seed=derive_seed(self.cfg.seed, "init"),
        )
        return OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())

    def model_content(self, state: State, server_round: int, **config: Any) -> RecordDict:
        """A ``train``/``evaluate`` payload: the model and a ConfigRecord."""
        conf = {"server-round": server_round, "dual": is_dual(state), **config}
        return RecordDict({"arrays": to_record(state), "config": ConfigRecord(conf)})

    def read_trained(self, reply: Reply) -> tuple[State, int]:
        """``(state, num-examples)`` of a train reply, checked against the cluster model."""
        state = from_record(get_array_record(reply.content, "arrays"))
        check_state(self.models[reply.cluster], state)
        n = int(get_metric(reply.content, "metrics", "num-examples"))
        if n <= 0:
            raise ReplyError(f"num-examples is {n}")
        return state, n

    def training_nodes(self) -> list[int]:
        """Known, non-held-out nodes ordered by partition id."""
        return [n for n in self._ordered(self.nodes) if not self.nodes[n].holdout]

    def holdout_nodes(self) -> list[int]:
        """Held-out nodes (never train) ordered by partition id."""
        return [n for n in self._ordered(self.nodes) if self.nodes[n].holdout]

    def sample(
        self, pool: list[int], server_round: int, fraction: float | None = None
    ) -> list[int]:
        """Seeded sample of ``fraction`` (default ``fraction-train``) of ``pool``, at least one."""
        fraction = self.cfg.fraction_train if fraction is None else fraction
        pool = self._ordered(pool)
        if fraction >= 1.0 or not pool:
            return pool
        k = max(1, round(fraction * len(pool)))
        rng = np.random.default_rng(derive_seed(self.cfg.seed, "sample", server_round))
        picked = set(rng.choice(len(pool), size=k, replace=False).tolist())
        return [n for i, n in enumerate(pool) if i in picked]

    def send(
        self, message_type: str, contents: Mapping[int, RecordDict], server_round: int
    ) -> dict[int, RecordDict]:
        """One Message per node; returns the content of every reply that arrived without error.

        Error replies and nodes that did not answer within ``round-timeout`` are logged and
        left out; the caller goes on with what it has.
        """
        if not contents:
            return {}
        grid = self._grid()
        messages = []
        for node_id in self._ordered(contents):
            content = contents[node_id]
            self._count(message_type, "down", content)
            messages.append(
                Message(
                    content,
                    dst_node_id=node_id,
                    message_type=message_type,
                    group_id=str(server_round),
                )
            )
        replies = grid.send_and_receive(messages, timeout=self.cfg.round_timeout)
        out: dict[int, RecordDict] = {}
        for reply in replies:
            src = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning(
                    "node %s (%s): error reply: %s", src, message_type, reply.error.reason
                )
                continue
            self._count(message_type, "up", reply.content)
            out[src] = reply.content
        missing = set(contents) - set(out)
        if missing:
            logger.warning(
                "%s: no valid reply from %d node(s): %s",
                message_type,
                len(missing),
                sorted(missing),
            )
        return out

    def evaluate_nodes(
        self, states: Mapping[int, State], server_round: int
    ) -> dict[int, dict[str, float]]:
        """Evaluate each node on its own data with the model given for it."""
        contents = {n: self.model_content(s, server_round) for n, s in states.items()}
        out: dict[int, dict[str, float]] = {}
        for node_id, content in self.send("evaluate", contents, server_round).items():
            try:
                out[node_id] = dict(content.metric_records["metrics"])
                float(out[node_id]["accuracy"])
            except (KeyError, TypeError, ValueError):
                logger.warning("node %s: evaluate reply without metrics/accuracy; skipped", node_id)
                out.pop(node_id, None)
        return out

    def cluster_sizes(self) -> dict[int, int]:
        """Training nodes per cluster."""
        return dict(Counter(self.assignment.values()))

    # ================================================================== the loop
    def start(self, grid: Grid) -> dict[str, Any]:
        """Run ``num-server-rounds`` rounds and write the results; returns results.json's content."""
        t_start = time.time()
        self.grid = grid
        self.discover_nodes()
        self.setup()
        rounds = self.cfg.num_server_rounds
        for rnd in range(1, rounds + 1):
            t0 = time.time()
            self._round_bytes = {"up": 0, "down": 0}
            self.admit_new_nodes(rnd)
            self.phase = "train"
            self.before_round(rnd)
            self.train_losses = []
            self.train_round(rnd)
            accuracy = val_accuracy = None
            if rnd % self.cfg.eval_every == 0 or rnd == rounds:
                self.last_eval = self.evaluate_nodes(
                    {n: self.model_for(n) for n in self.assignment}, rnd
                )
                accuracy = _mean(m["accuracy"] for m in self.last_eval.values())
                val_accuracy = _mean(m.get("val-accuracy") for m in self.last_eval.values())
                if self.counts_for_best(rnd):
                    for n, m in self.last_eval.items():
                        if m.get("accuracy") is not None:
                            best = max(self.best_accuracy.get(n, 0.0), float(m["accuracy"]))
                            self.best_accuracy[n] = best
            row = {
                "round": rnd,
                "phase": self.phase,
                "num_clusters": len(set(self.assignment.values())),
                "train_loss": _mean(self.train_losses),
                "accuracy": accuracy,
                "val_accuracy": val_accuracy,
                "bytes_up": self._round_bytes["up"],
                "bytes_down": self._round_bytes["down"],
                "seconds": round(time.time() - t0, 3),
            }
            self.after_round(rnd, row)
            self._add_round(row)
            logger.info(
                "[round %d/%d] phase=%s clusters=%d accuracy=%s seconds=%.1f",
                rnd,
                rounds,
                row["phase"],
                row["num_clusters"],
                "-" if accuracy is None else f"{accuracy:.4f}",
                row["seconds"],
            )
        return self.finish(time.time() - t_start)

    def train_round(self, server_round: int) -> None:
        """Sample, send every sampled node its instruction, aggregate the valid replies."""
        sampled = self.select_nodes(server_round)
        contents = {n: self.train_content(n, server_round) for n in sampled}
        replies = self.collect_trained(self.send("train", contents, server_round))
        if replies:
            self.aggregate(server_round, replies)

    def select_nodes(self, server_round: int) -> list[int]:
        """Nodes that train this round. Default: ``fraction-train`` of the training nodes."""
        return self.sample(list(self.assignment), server_round)

    def collect_trained(self, received: Mapping[int, RecordDict]) -> list[Reply]:
        """Valid train replies (checked against the node's cluster model), losses noted."""
        replies = []
        for node_id in self._ordered(received):
            reply = Reply(node_id, received[node_id], self.assignment.get(node_id))
            try:  # validate before anything is averaged
                reply.state, reply.num_examples = self.read_trained(reply)
            except (ReplyError, KeyError, ValueError, TypeError) as err:
                logger.warning("node %s: train reply rejected: %s", node_id, err)
                continue
            loss = reply.content.metric_records.get("metrics", {}).get("train-loss")
            if loss is not None:
                self.train_losses.append(float(loss))
            replies.append(reply)
        return replies

    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        """Called with the round's row before it is recorded (methods may add fields)."""

    def model_for(self, node_id: int) -> State:
        """The model a training node is evaluated with: its cluster's."""
        return self.models[self.assignment[node_id]]

    # ================================================================== nodes
    def discover_nodes(self, wait_seconds: float = 120.0) -> None:
        """Wait for nodes, ask each for its info, and mark the held-out ones.

        Waits until every partition announced by the nodes (``num-partitions``) is connected,
        or ``min-nodes`` when set, for at most ``wait_seconds``; goes on with what it has then.
        """
        grid = self._grid()
        deadline = time.time() + wait_seconds
        while True:
            known = self.nodes.keys() | self.excluded.keys()
            self._query_info([n for n in grid.get_node_ids() if n not in known], 0)
            expected = self.cfg.min_nodes or max(
                (i.num_partitions for i in self.nodes.values()), default=1
            )
            if len(self.nodes) + len(self.excluded) >= expected:
                break
            if time.time() > deadline:
                if not self.nodes:
                    raise RuntimeError(f"no node answered within {wait_seconds:.0f} s")
                logger.warning("only %d of %d nodes connected; going on", len(self.nodes), expected)
                break
            time.sleep(1.0)
        if not self.training_nodes():
            raise ValueError(
                f"holdout-clients={self.cfg.holdout_clients} leaves no node to train "
                f"({len(self.nodes)} nodes)"
            )
        logger.info(
            "%s: %d training node(s), %d held out",
            self.name,
            len(self.training_nodes()),
            len(self.holdout_nodes()),
        )

    def admit_new_nodes(self, server_round: int) -> None:
        """Nodes that connect after the start: held-out ones wait for the end; others are
        routed to a cluster (hook ``route``) and join training from this round on."""
        grid = self._grid()
        new = [n for n in grid.get_node_ids() if n not in self.nodes and n not in self.excluded]
        if not new:
            return
        joined = self._query_info(new, server_round)
        trainers = [n for n in joined if not self.nodes[n].holdout]
        for node_id, cluster in self.route(trainers).items():
            if cluster is None:
                cluster = self.new_cluster_for(node_id)
            self.assignment[node_id] = cluster
            logger.info("node %s joined in round %d -> cluster %s", node_id, server_round, cluster)

    def new_cluster_for(self, node_id: int) -> int:
        """Cluster for a late node that ``route`` could not place: a fresh copy of the
        largest cluster's model (overridden by methods that can do better)."""
        largest = Counter(self.assignment.values()).most_common(1)[0][0]
        return largest

    def _query_info(self, node_ids: Iterable[int], server_round: int) -> list[int]:
        ids = sorted(node_ids)
        if not ids:
            return []
        replies = self.send("query.info", {n: RecordDict() for n in ids}, server_round)
        added = []
        for node_id, content in replies.items():
            try:
                info = content.metric_records["info"]
                shape = tuple(int(v) for v in info["input-shape"])
                node = NodeInfo(
                    node_id=node_id,
                    partition_id=int(info["partition-id"]),
                    num_partitions=int(info["num-partitions"]),
                    num_train=int(info["num-train"]),
                    num_val=int(info["num-val"]),
                    num_test=int(info["num-test"]),
                    num_classes=int(info["num-classes"]),
                    input_shape=shape,  # type: ignore[arg-type]
                    group=int(info["group"]),
                )
                if len(shape) != 3 or node.num_classes < 2 or node.num_partitions < 1:
                    raise ValueError("implausible shape/classes/partitions")
            except (KeyError, TypeError, ValueError) as err:
                self.excluded[node_id] = f"bad info reply: {err}"
                logger.warning("node %s: bad info reply (%s); excluded", node_id, err)
                continue
            node.holdout = node.partition_id >= node.num_partitions - self.cfg.holdout_clients
            self.nodes[node_id] = node
            added.append(node_id)
        return added

    # ================================================================== the end
    def finish(self, wall_seconds: float) -> dict[str, Any]:
        """Evaluate held-out nodes, compute final metrics, write checkpoints and the plot."""
        final_round = self.cfg.num_server_rounds
        known = _mean(m["accuracy"] for m in self.last_eval.values())
        holdouts = self.holdout_nodes()
        routed = self.route(holdouts) if holdouts else {}
        usable = {n: c for n, c in routed.items() if c is not None and c in self.models}
        holdout_eval = self.evaluate_nodes(
            {n: self.models[c] for n, c in usable.items()}, final_round + 1
        )
        ari, nmi = self.assignment_scores()
        final: dict[str, Any] = {
            "accuracy_known": known,
            # each client's best over the evaluated rounds, averaged: the optimistic metric of
            # FedDAG's public code, reported beside the final-round figure and labelled
            "accuracy_best_over_rounds": _mean(self.best_accuracy.values()),
            "accuracy_routed": None,
            "accuracy_holdout": _mean(m["accuracy"] for m in holdout_eval.values())
            if holdouts
            else None,
            "num_clusters": len(set(self.assignment.values())),
            "ari": ari,
            "nmi": nmi,
            "routing_accuracy": self.routing_accuracy(usable) if holdouts else None,
            "holdout_assignment": {str(self.nodes[n].partition_id): c for n, c in routed.items()},
            "wall_seconds": round(wall_seconds, 3),
            "bytes_descriptor_up": sum(self.traffic[t]["up"] for t in self.descriptor_types),
            "bytes_model_up": self.traffic["train"]["up"],
            "bytes_model_down": self.traffic["train"]["down"],
            "excluded_nodes": {str(k): v for k, v in self.excluded.items()},
            # per partition id: what the unweighted means above are means of
            "accuracy_by_client": {
                str(self.nodes[n].partition_id): float(self.last_eval[n]["accuracy"])
                for n in self._ordered(self.last_eval)
                if n in self.nodes
            },
            "accuracy_holdout_by_client": {
                str(self.nodes[n].partition_id): float(holdout_eval[n]["accuracy"])
                for n in self._ordered(holdout_eval)
                if n in self.nodes
            },
        }
        final.update(self.final_metrics())
        self.results["final"] = final
        if self.recorder is not None:
            self.recorder.set("final", final)
            self.recorder.save_checkpoints(self.models)
            self.recorder.plot()
            logger.info("results: %s", self.recorder.results_path)
        return self.results

    def assignment_scores(self) -> tuple[float | None, float | None]:
        """ARI and NMI of the training nodes' clusters against their ground-truth groups."""
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

        nodes = self._ordered(self.assignment)
        if len(nodes) < 2:
            return None, None
        truth = [self.nodes[n].group for n in nodes]
        pred = [self.assignment[n] for n in nodes]
        return float(adjusted_rand_score(truth, pred)), float(
            normalized_mutual_info_score(truth, pred)
        )

    def routing_accuracy(self, routed: Mapping[int, int]) -> float | None:
        """Share of routed nodes sent to the cluster holding most training nodes of their group."""
        home: dict[int, Counter] = defaultdict(Counter)
        for n, c in self.assignment.items():
            home[self.nodes[n].group][c] += 1
        hits = [
            bool(home[self.nodes[n].group]) and home[self.nodes[n].group].most_common(1)[0][0] == c
            for n, c in routed.items()
        ]
        return float(np.mean(hits)) if hits else None

    # ================================================================== internals
    def _grid(self) -> Grid:
        if self.grid is None:
            raise RuntimeError("strategy has no grid; call start(grid)")
        return self.grid

    def _ordered(self, node_ids: Iterable[int]) -> list[int]:
        """Nodes by partition id: keeps sampling and averaging order identical across runs."""
        return sorted(
            node_ids, key=lambda n: (self.nodes[n].partition_id if n in self.nodes else 1 << 30, n)
        )

    def _count(self, message_type: str, direction: str, content: RecordDict) -> None:
        size = sum(r.count_bytes() for r in content.array_records.values())
        self.traffic[message_type][direction] += size
        self._round_bytes[direction] += size

    def _add_round(self, row: dict[str, Any]) -> None:
        self.results["rounds"].append(row)
        if self.recorder is not None:
            self.recorder.add_round(row)

    def record_clustering(self, server_round: int, **extra: Any) -> None:
        """Store the current assignment (by partition id) with ARI/NMI in results.json."""
        ari, nmi = self.assignment_scores()
        self.clustering = {
            "round": server_round,
            "num_clusters": len(set(self.assignment.values())),
            "ari": ari,
            "nmi": nmi,
            "assignment": {
                str(self.nodes[n].partition_id): c
                for n, c in sorted(
                    self.assignment.items(), key=lambda kv: self.nodes[kv[0]].partition_id
                )
            },
            **extra,
        }
        self.results["clustering"] = self.clustering
        if self.recorder is not None:
            self.recorder.set("clustering", self.clustering)


def is_dual(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is FedDAG's dual-encoder model (it has ``primary.*`` weights)."""
    return any(k.startswith("primary.") for k in state)


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


__all__ = ["ClusteredStrategy", "NodeInfo", "Reply"]
