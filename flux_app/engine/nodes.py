"""The nodes of a run: who they are (their ``query.info``), which are held out, which excluded.

A node is admitted once its info reply passes :func:`parse_info`; held-out nodes (the last
``holdout-clients`` partitions) never train and are routed at the end. Exclusions are kept with
their reason and reported in results.json.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from flux_app.engine.transport import Transport

logger = logging.getLogger("flwr")

INFO = "query.info"


@dataclass
class NodeInfo:
    """What the server knows about a node, from its ``query.info`` reply.

    ``group`` is the ground-truth shift group of the node's simulated data (or of a site's
    ``group.txt``; -1 = unknown). It exists for metrics (ARI, routing accuracy) and for the
    Oracle baseline only; no other method reads it. ``partition_id`` is -1 for a site that
    brings its own data; ``name`` is what results.json calls the node.
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
    name: str = ""
    num_unlabeled: int = 0
    num_skipped: int = 0
    has_folder: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            self.name = str(self.partition_id)

    @property
    def sort_key(self) -> tuple[int, str, int]:
        """Stable order: partitions by id, then sites by name."""
        return (self.partition_id if self.partition_id >= 0 else 1 << 29, self.name, self.node_id)


def parse_info(
    node_id: int,
    content: RecordDict,
    model_input: tuple[tuple[int, int, int], int] | None = None,
) -> NodeInfo:
    """A node's ``query.info`` reply, checked; raises ``ValueError``/``KeyError``/``TypeError``.

    With ``model_input`` (the run's ``(input shape, classes)``), a node whose data has another
    shape or number of classes is rejected: the model's shape comes from the run, not a node.
    """
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
        num_unlabeled=int(info.get("num-unlabeled", 0)),
        num_skipped=int(info.get("num-skipped", 0)),
        has_folder=bool(info.get("has-folder", 0)),
    )
    named = content.config_records.get("node")
    node.name = (
        str(named["name"]) if named is not None and "name" in named else str(node.partition_id)
    )
    counts = (node.num_train, node.num_val, node.num_test, node.num_unlabeled, node.num_skipped)
    if len(shape) != 3 or node.num_classes < 2 or min(counts) < 0:
        raise ValueError("implausible shape/classes/sizes")
    if node.partition_id >= 0 and not 0 <= node.partition_id < node.num_partitions:
        raise ValueError(f"partition-id {node.partition_id} outside 0..{node.num_partitions - 1}")
    if model_input is not None and (tuple(shape), node.num_classes) != (
        tuple(model_input[0]),
        model_input[1],
    ):
        raise ValueError(
            f"data of shape {tuple(shape)} with {node.num_classes} classes disagrees with the run's "
            f"model input {tuple(model_input[0])} and {model_input[1]} classes (run-config "
            "channels / image-size / num-classes)"
        )
    return node


def sample_nodes(pool: list[int], fraction: float, seed: int) -> list[int]:
    """Seeded sample of ``fraction`` of ``pool`` (at least one), in ``pool``'s order."""
    if fraction >= 1.0 or not pool:
        return list(pool)
    k = max(1, round(fraction * len(pool)))
    picked = set(np.random.default_rng(seed).choice(len(pool), size=k, replace=False).tolist())
    return [n for i, n in enumerate(pool) if i in picked]


class NodeBook:
    """Known nodes (``info``), excluded nodes with reasons (``excluded``), stable ordering.

    Parameters
    ----------
    holdout_clients : int
        The last this many partitions are held out (never train).
    """

    def __init__(
        self,
        holdout_clients: int = 0,
        model_input: tuple[tuple[int, int, int], int] | None = None,
        max_train_size_ratio: float = 0.0,
    ) -> None:
        self.holdout_clients = holdout_clients
        self.model_input = model_input
        self.max_train_size_ratio = max_train_size_ratio
        self.info: dict[int, NodeInfo] = {}
        self.excluded: dict[int, str] = {}
        #: name -> cluster of nodes that left the run (or were not back when it resumed)
        self.departed: dict[str, int] = {}

    def same_name(self, node_id: int) -> int | None:
        """Another known node with ``node_id``'s name (a node that came back with a new id,
        or an impostor), or ``None``."""
        name = self.info[node_id].name
        return next((n for n, i in self.info.items() if i.name == name and n != node_id), None)

    def ordered(self, node_ids: Iterable[int]) -> list[int]:
        """Nodes by partition id: keeps sampling and averaging order identical across runs."""
        return sorted(
            node_ids,
            key=lambda n: self.info[n].sort_key if n in self.info else (1 << 30, "", n),
        )

    def training(self) -> list[int]:
        """Known, non-held-out nodes in partition order."""
        return [n for n in self.ordered(self.info) if not self.info[n].holdout]

    def holdout(self) -> list[int]:
        """Held-out nodes in partition order."""
        return [n for n in self.ordered(self.info) if self.info[n].holdout]

    def unknown(self, node_ids: Iterable[int]) -> list[int]:
        """Of ``node_ids``, those neither known nor excluded."""
        return sorted(n for n in node_ids if n not in self.info and n not in self.excluded)

    def query(
        self,
        transport: Transport,
        node_ids: Iterable[int],
        server_round: int,
        online: Iterable[int] | None = None,
    ) -> list[int]:
        """Ask ``node_ids`` for their info; admit the valid ones; returns the admitted ids.

        A node whose name a connected known node (``online``; default: every known node)
        already holds is excluded as a duplicate; one whose namesake is offline is admitted
        (a node that came back: the caller moves its state, :meth:`same_name`)."""
        ids = sorted(node_ids)
        connected = set(self.info) if online is None else set(online)
        if not ids:
            return []
        got = transport.collect(
            INFO,
            {n: RecordDict() for n in ids},
            server_round,
            lambda n, content: parse_info(n, content, self.model_input),
            what="info reply",
            excluded=self.excluded,
            exclude_missing=False,  # a node that has not answered yet is asked again later
        )
        admitted = []
        claims = Counter(node.name for node in got.values())
        for node_id, node in got.items():
            if claims[node.name] > 1:
                # Which claimant is the real one cannot be told from an info reply, so the name
                # proves nothing: each is admitted under its node id, and none can later take
                # over the name's state (re-admission and resume go by name).
                logger.warning(
                    "node %s: %d nodes answered as %r at once; admitted as %r",
                    node_id,
                    claims[node.name],
                    node.name,
                    f"{node.name}@{node_id}",
                )
                node.name = f"{node.name}@{node_id}"
            twin = next((n for n, i in self.info.items() if i.name == node.name), None)
            if twin is not None and twin in connected:
                self.excluded[node_id] = f"duplicate: connected node {twin} is {node.name!r}"
                logger.warning("node %s rejected: %s", node_id, self.excluded[node_id])
                continue
            admitted.append(node_id)
            # held out: the last holdout-clients partitions, and every site without labelled
            # training data (it only gets served)
            last = (
                node.num_partitions > 0
                and node.partition_id >= node.num_partitions - self.holdout_clients
            )
            node.holdout = last or node.num_train == 0
            if node.num_skipped:
                logger.warning(
                    "node %s (%s): %d unreadable file(s) skipped",
                    node_id,
                    node.name,
                    node.num_skipped,
                )
            self.info[node_id] = node
        refused = self.refuse_outsized(admitted)
        return [n for n in admitted if n not in refused]

    def refuse_outsized(self, node_ids: Iterable[int]) -> list[int]:
        """Exclude those of ``node_ids`` that announce more than ``max_train_size_ratio`` times
        the lower median train size of the other training nodes; returns them.

        A node's weight in every average is the train size it announces, which nobody can
        check; a claim orders of magnitude beyond the federation's is refused rather than
        believed. The lower median keeps two nodes, one of them lying, apart."""
        if not self.max_train_size_ratio:
            return []
        sizes = {n: i.num_train for n, i in self.info.items() if not i.holdout and i.num_train}
        refused = {}
        for node_id in node_ids:
            if node_id not in sizes:
                continue
            others = sorted(v for n, v in sizes.items() if n != node_id)
            if not others:
                continue
            reference = others[(len(others) - 1) // 2]
            if sizes[node_id] > self.max_train_size_ratio * reference:
                refused[node_id] = (
                    f"announced train size {sizes[node_id]} > max-train-size-ratio "
                    f"{self.max_train_size_ratio:g} x {reference} (the others' lower median)"
                )
        for node_id, reason in refused.items():
            del self.info[node_id]
            self.excluded[node_id] = reason
            logger.warning("node %s rejected: %s", node_id, reason)
        return list(refused)

    def discover(
        self, transport: Transport, min_nodes: int = 0, wait_seconds: float = 120.0
    ) -> None:
        """Wait for nodes and ask each for its info.

        Waits until every partition announced by the nodes (``num-partitions``) is connected,
        or ``min_nodes`` when set, for at most ``wait_seconds``; goes on with what it has then.
        """
        deadline = time.time() + wait_seconds
        while True:
            present = list(transport.grid.get_node_ids())
            self.query(transport, self.unknown(present), 0, present)
            expected = min_nodes or max((i.num_partitions for i in self.info.values()), default=1)
            if len(self.info) + len(self.excluded) >= expected:
                break
            failed = {n: transport.errors[n] for n in present if n in transport.errors}
            if present and not self.info and len(failed) == len(present):
                # every node answered, with an error: that is the cause, say it now
                reasons = sorted(set(failed.values()))
                raise RuntimeError(
                    f"every node ({len(present)}) failed to join; their error(s): "
                    + " | ".join(r[:300] for r in reasons[:3])
                )
            if time.time() > deadline:
                if not self.info:
                    raise RuntimeError(f"no node answered within {wait_seconds:.0f} s")
                logger.warning("only %d of %d nodes connected; going on", len(self.info), expected)
                break
            time.sleep(1.0)
        # nodes admitted one by one were each compared with those before them only
        self.refuse_outsized(list(self.info))
        if not self.info:
            raise RuntimeError("no node left to train: " + "; ".join(self.excluded.values()))


__all__ = ["INFO", "NodeBook", "NodeInfo", "parse_info", "sample_nodes"]
