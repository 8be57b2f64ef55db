"""A kit for testing clustered methods: fake nodes, tampered replies, tiny states, fast runs.

The app's own tests use it, and a researcher can test a new method the same way::

    from flux_app.testing import fake_nodes, grid, run, tamper

    results, strategy = run({"strategy": "my-method", "dataset": "synthetic"}, nodes=6)
    assert results["final"]["ari"] == 1.0

    # node of partition 2 sends NaN weights in every train reply: the run must go on
    results, strategy = run(cfg, nodes=6, hooks={2: tamper("train", nan_arrays)})
    assert 2 not in strategy.results["final"]["accuracy_by_client"] or ...

Everything goes through the real ClientApp (``client_app.app``) and the real strategy code, in
one process, without Ray or a SuperLink (:class:`~flux_app.engine.inprocess.InProcessGrid`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from flux_app.common.params import State
from flux_app.common.records import arrays_to_record, record_to_arrays
from flux_app.engine.config import RunConfig
from flux_app.engine.inprocess import InProcessGrid, set_task_identity
from flux_app.engine.nodes import NodeInfo
from flux_app.engine.server import build_strategy
from flux_app.engine.strategy import ClusteredStrategy

S = TypeVar("S", bound=ClusteredStrategy)

#: run-config overrides for runs of a second or two (the synthetic dataset, 2 rounds, CPU)
FAST: dict[str, Any] = {
    "dataset": "synthetic",
    "shift": "px",
    "level": 2,
    "num-server-rounds": 2,
    "local-epochs": 1,
    "lr": 0.05,
    "device": "cpu",
}


def config(overrides: Mapping[str, Any] | RunConfig | None = None, **keys: Any) -> RunConfig:
    """A validated RunConfig from kebab-case ``overrides`` (plus ``keys`` with ``_`` for ``-``)."""
    base = overrides.to_dict() if isinstance(overrides, RunConfig) else dict(overrides or {})
    base.update({k.replace("_", "-"): v for k, v in keys.items()})
    return RunConfig.from_mapping(base)


def grid(cfg: RunConfig | Mapping[str, Any], nodes: int, **kwargs: Any) -> InProcessGrid:
    """An in-process Grid of ``nodes`` nodes (partition ids 0..nodes-1) serving the real
    ClientApp. ``kwargs`` go to :class:`InProcessGrid` (``hooks=``, ``late=``, ...)."""
    from client_app import app

    set_task_identity()
    values = cfg.to_dict() if isinstance(cfg, RunConfig) else dict(cfg)
    return InProcessGrid(app, values, nodes, **kwargs)


def run(
    cfg: RunConfig | Mapping[str, Any], nodes: int, **grid_kwargs: Any
) -> tuple[dict[str, Any], ClusteredStrategy]:
    """Run the configured strategy to the end in this process; returns (results, strategy).

    Nothing is written to disk (no recorder); ``results`` is what results.json would hold.
    """
    cfg = cfg if isinstance(cfg, RunConfig) else config(cfg)
    strategy = build_strategy(cfg)
    results = strategy.start(grid(cfg, nodes, **grid_kwargs))
    return results, strategy


class ServerKilled(Exception):
    """The ServerApp stopped mid-run (what :func:`run_and_resume` does to it)."""


class _KillingGrid(InProcessGrid):
    """An in-process grid that stops the server at the first message of ``kill_round``."""

    kill_round = 0

    def push_messages(self, messages: Any) -> Any:  # noqa: D102
        messages = list(messages)
        if any(m.metadata.group_id == str(self.kill_round) for m in messages):
            raise ServerKilled(f"server killed at the start of round {self.kill_round}")
        return super().push_messages(messages)


def comparable(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results`` without what differs between equal runs: timings and the resume record."""
    final = {k: v for k, v in (results.get("final") or {}).items() if not k.endswith("_seconds")}
    rounds = [{k: v for k, v in r.items() if k != "seconds"} for r in results.get("rounds", [])]
    return {"final": final, "rounds": rounds, "clustering": results.get("clustering")}


def run_and_resume(
    cfg: Mapping[str, Any], nodes: int, *, kill_round: int, output_dir: str, **grid_kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``cfg`` to the end; run it again, kill the server at the start of ``kill_round``
    and resume it with ``resume-from``. Returns (uninterrupted, resumed) results.json
    contents: equal (:func:`comparable`) for a method whose ``state_dict`` is complete::

        full, resumed = run_and_resume(cfg, 6, kill_round=4, output_dir=str(tmp_path))
        assert comparable(full) == comparable(resumed)
    """
    from client_app import app
    from flux_app.engine.server import run_server

    base = dict(cfg) | {"output-dir": output_dir}
    set_task_identity()
    full, _ = run_server(
        InProcessGrid(app, base | {"run-name": "full"}, nodes, **grid_kwargs),
        RunConfig.from_mapping(base | {"run-name": "full"}),
    )
    killed = _KillingGrid(app, base | {"run-name": "killed"}, nodes, **grid_kwargs)
    killed.kill_round = kill_round
    try:
        run_server(killed, RunConfig.from_mapping(base | {"run-name": "killed"}))
    except ServerKilled:
        pass
    else:
        raise AssertionError(f"the run ended before round {kill_round}")
    again = base | {"run-name": "killed", "resume-from": "killed"}
    resumed, _ = run_server(
        InProcessGrid(app, again, nodes, **grid_kwargs), RunConfig.from_mapping(again)
    )
    return full, resumed


def fake_nodes(
    strategy: S,
    groups: Sequence[int],
    *,
    input_shape: tuple[int, int, int] = (1, 2, 2),
    num_classes: int = 2,
    num_train: int = 10,
    first_id: int = 100,
) -> S:
    """Give ``strategy`` nodes without a grid: node ``first_id + i`` holds partition ``i`` of
    group ``groups[i]``. For unit tests of one hook (clustering, routing) with no messages."""
    for i, g in enumerate(groups):
        strategy.nodes[first_id + i] = NodeInfo(
            first_id + i, i, len(groups), num_train, 0, 0, num_classes, input_shape, int(g)
        )
    return strategy


def tiny_state(*values: float) -> State:
    """A two-tensor state dict (float ``w`` = values, integer counter ``n`` = 1)."""
    return OrderedDict([("w", torch.tensor(values, dtype=torch.float32)), ("n", torch.tensor(1))])


def tamper(
    message_type: str, change: Callable[[RecordDict], RecordDict | None]
) -> Callable[[Message], Message | None]:
    """A reply hook for :class:`InProcessGrid` ``hooks=``: replies of ``message_type`` get
    their content replaced by ``change(content)`` (``None`` drops the reply: silence); other
    replies pass unchanged."""

    def hook(reply: Message) -> Message | None:
        if reply.metadata.message_type != message_type or reply.has_error():
            return reply
        content = change(reply.content)
        return None if content is None else Message(content, reply_to=reply)

    return hook


def map_arrays(
    record: str, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
) -> Callable[[RecordDict], RecordDict]:
    """A ``tamper`` change that rewrites the arrays of ArrayRecord ``record`` with ``fn``."""

    def change(content: RecordDict) -> RecordDict:
        out = RecordDict(dict(content.items()))
        out[record] = arrays_to_record(fn(record_to_arrays(content.array_records[record])))
        return out

    return change


def scaled_update(factor: float) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Weights multiplied by ``factor`` (``-1`` flips their sign): a bad-but-valid update."""
    return lambda arrays: {k: (v * factor).astype(v.dtype) for k, v in arrays.items()}


def nan_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every floating array set to NaN: an update the engine must reject."""
    return {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in arrays.items()}


def record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays -> ArrayRecord (to build mock replies)."""
    return arrays_to_record(dict(arrays))


__all__ = [
    "FAST",
    "ServerKilled",
    "comparable",
    "run_and_resume",
    "config",
    "fake_nodes",
    "grid",
    "map_arrays",
    "nan_arrays",
    "record",
    "run",
    "scaled_update",
    "tamper",
    "tiny_state",
]
