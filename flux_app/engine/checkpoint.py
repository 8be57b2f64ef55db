"""Checkpoints of the whole server state, and resuming a run from one.

With ``checkpoint-every=N`` (default 1; 0 = never) the server writes ``<run>/checkpoint.pt``
after every N-th complete round (and the last): the strategy's ``state_dict()`` (base state, the
method's own, the cluster aggregators'), the round and the run-config it ran with. The file is
written to a temporary name and renamed over the old one, so a crash while writing leaves the
previous checkpoint whole. It holds JSON text and tensors only
(:mod:`flux_app.common.statecodec`); it is read with ``torch.load(..., weights_only=True)``.

``resume-from="<run folder>"`` (a folder of ``output-dir``) continues that run after its last
checkpointed round, in the same folder: results.json keeps the rounds up to that round and goes
on. Node ids of a resumed run are new (a new Flower run); the state names nodes by their name
(partition id or site name), so each node finds its cluster again. Every randomness of a round
is derived from ``seed`` and the round (:func:`~flux_app.common.seeding.derive_seed`), so a
resumed run computes the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any

import torch

from flux_app.common.statecodec import NodeKeyed, StateError, decode, encode
from flux_app.engine.config import ConfigError, RunConfig

if TYPE_CHECKING:  # pragma: no cover
    from flux_app.engine.strategy import ClusteredStrategy

logger = logging.getLogger("flwr")

FORMAT = 1
FILE = "checkpoint.pt"
#: run-config keys a resumed run may change (where and how it runs, not what it computes)
MAY_DIFFER = frozenset(
    {
        "resume-from",
        "checkpoint-every",
        "round-timeout",
        "max-messages-in-flight",
        "device",
        "output-dir",
        "run-name",
        "min-nodes",
        "data-root",
        "num-server-rounds",
    }
)


class ResumableState:
    """The checkpoint hooks of :class:`~flux_app.engine.strategy.ClusteredStrategy`.

    A method with state of its own extends both (``super()`` first)::

        def state_dict(self):
            return {**super().state_dict(), "centres": self.centres}

        def load_state_dict(self, state):
            super().load_state_dict(state)
            self.centres = state["centres"]

    Wrap what is keyed by node id in :class:`~flux_app.common.statecodec.NodeKeyed` (lists of
    node ids in ``NodeList``); dataclasses must be registered with ``@state_type``.
    """

    def state_dict(self: ClusteredStrategy) -> dict[str, Any]:
        """The server state a resumed run needs: models, assignment, evaluation history,
        results so far, byte counts, aggregator state (methods add theirs)."""
        return {
            "models": self.models,
            "assignment": NodeKeyed(self.assignment),
            "clusters_by_name": {
                self.nodes[n].name: c for n, c in self.assignment.items() if n in self.nodes
            },
            "departed": dict(self.book.departed),
            "phase": self.phase,
            "last_eval": NodeKeyed(self.last_eval),
            "best_accuracy": NodeKeyed(self.best_accuracy),
            "trained": self.trained,
            "clustering": self.clustering,
            "rounds": self.results["rounds"],
            "traffic": {k: dict(v) for k, v in self.traffic_counter.by_type.items()},
            "excluded": NodeKeyed({n: r for n, r in self.excluded.items() if n in self.nodes}),
            "aggregation": self.aggregation.state_dict(),
        }

    def load_state_dict(self: ClusteredStrategy, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (instead of ``setup()``)."""
        self.models = dict(state["models"])
        self.assignment = dict(state["assignment"])
        self.phase = state["phase"]
        self.last_eval = dict(state["last_eval"])
        self.best_accuracy = dict(state["best_accuracy"])
        self.trained = int(state["trained"])
        self.clustering = state["clustering"]
        self.results["clustering"] = self.clustering
        self.results["rounds"] = list(state["rounds"])
        for message_type, counts in state["traffic"].items():
            self.traffic_counter.by_type[message_type] = dict(counts)
        self.excluded.update(state["excluded"])
        self.aggregation.load_state_dict(state["aggregation"])

    def checkpoint_ready(self, server_round: int) -> bool:
        """Whether the state after ``server_round`` is complete without the nodes' own state
        (a resumed run is a new Flower run: nodes start afresh). Default: always."""
        return True


def resume_folder(cfg: RunConfig) -> str:
    """The run folder ``resume-from`` names; it must lie inside ``output-dir``."""
    root = cfg.resolved_output_dir
    path = os.path.realpath(os.path.join(root, os.path.expanduser(cfg.resume_from)))
    if os.path.commonpath([path, os.path.realpath(root)]) != os.path.realpath(root):
        raise ConfigError(
            f"resume-from={cfg.resume_from!r} is outside output-dir {root!r}: name a run folder "
            "of output-dir"
        )
    if not os.path.isfile(os.path.join(path, FILE)):
        raise ConfigError(
            f"resume-from={cfg.resume_from!r}: no {FILE} in {path!r} (was the run started "
            "with checkpoint-every=0, or did it end before its first checkpoint?)"
        )
    return path


def save(strategy: ClusteredStrategy, run_dir: str, server_round: int) -> str:
    """Write ``<run_dir>/checkpoint.pt`` atomically after ``server_round``; returns its path."""
    names = {n: info.name for n, info in strategy.nodes.items()}

    def node_name(node_id: int) -> str:
        if node_id not in names:
            raise StateError(f"state mentions node {node_id}, which has no name")
        return names[node_id]

    tree, arrays = encode(strategy.state_dict(), node_name)
    payload = {
        "format": FORMAT,
        "round": server_round,
        "strategy": strategy.name,
        "run_config": json.dumps(strategy.cfg.to_dict(), sort_keys=True),
        "state": json.dumps(tree),
        "arrays": arrays,
    }
    path = os.path.join(run_dir, FILE)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read(run_dir: str) -> dict[str, Any]:
    """The raw checkpoint of ``run_dir`` (tensors and JSON text only), checked for its format."""
    path = os.path.join(run_dir, FILE)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise StateError(f"cannot read checkpoint {path!r}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise StateError(f"{path!r} is not a flux-app checkpoint of format {FORMAT}")
    return payload


def check_compatible(saved: dict[str, Any], cfg: RunConfig, strategy: str) -> None:
    """Raise :class:`ConfigError` when the resumed run would compute something else."""
    if saved["strategy"] != strategy:
        raise ConfigError(
            f"resume-from: the checkpoint is of strategy {saved['strategy']!r}, this run is "
            f"{strategy!r}"
        )
    before = json.loads(saved["run_config"])
    now = cfg.to_dict()
    changed = sorted(
        k for k in set(before) | set(now) if k not in MAY_DIFFER and before.get(k) != now.get(k)
    )
    if changed:
        diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise ConfigError(
            f"resume-from: the run-config differs from the checkpointed run's ({diffs}); a "
            f"resumed run may change only {', '.join(sorted(MAY_DIFFER))}"
        )


def restore(strategy: ClusteredStrategy, run_dir: str) -> int:
    """Load ``run_dir``'s checkpoint into ``strategy`` (nodes already discovered); returns the
    last complete round."""
    saved = read(run_dir)
    check_compatible(saved, strategy.cfg, strategy.name)
    by_name = {info.name: n for n, info in strategy.nodes.items()}
    state, missing = decode(json.loads(saved["state"]), saved["arrays"], by_name.get)
    if missing:
        logger.warning(
            "resume: %d node(s) of the checkpoint are not connected (%s); they rejoin their "
            "cluster if they come back",
            len(missing),
            ", ".join(missing[:10]),
        )
    strategy.load_state_dict(state)
    # nodes of the checkpoint that are not here yet: they find their cluster when they join
    clusters = state["clusters_by_name"]
    strategy.book.departed.update(state["departed"])
    strategy.book.departed.update({n: clusters[n] for n in missing if n in clusters})
    recorder = strategy.recorder
    if recorder is not None:
        recorder.data["rounds"] = list(strategy.results["rounds"])
        recorder.data["clustering"] = strategy.clustering
        recorder.data.setdefault("resumed", []).append(
            {"after_round": int(saved["round"]), "missing_nodes": missing}
        )
        recorder.flush()
    logger.info("resume: %s continues after round %d", strategy.name, saved["round"])
    return int(saved["round"])


def rename_node(strategy: ClusteredStrategy, old: int, new: int) -> None:
    """Node ``old`` came back as ``new`` (a restarted SuperNode gets a new id; ``new`` is
    admitted, not yet placed): move everything the strategy keeps for ``old`` to ``new``,
    methods' node-keyed state included, and forget ``old``."""
    names = {n: info.name for n, info in strategy.nodes.items() if n != new}
    tree, arrays = encode(strategy.state_dict(), names.__getitem__)
    del strategy.nodes[old]
    strategy.excluded.pop(old, None)
    by_name = {info.name: n for n, info in strategy.nodes.items()}
    state, _ = decode(tree, arrays, by_name.get)
    strategy.load_state_dict(state)


__all__ = [
    "FILE",
    "FORMAT",
    "MAY_DIFFER",
    "ResumableState",
    "check_compatible",
    "read",
    "rename_node",
    "restore",
    "resume_folder",
    "save",
]
