"""``max-messages-in-flight``: the Transport never has more messages awaiting a reply than the
window, sends them in the order given, and gets every reply; an unsent node at the deadline
counts as timed out."""

from __future__ import annotations

import logging

import pytest
from flwr.app import Message, RecordDict

from flux_app.engine.transport import Transport


class SlowGrid:
    """Answers at most ``per_pull`` of the waiting messages per pull (oldest first), and never
    answers the nodes in ``silent``; records how many waited at once."""

    answers_at_once = False

    def __init__(self, per_pull: int = 1, silent: tuple[int, ...] = ()) -> None:
        self.per_pull = per_pull
        self.silent = set(silent)
        self.waiting: dict[str, Message] = {}
        self.pushed: list[int] = []
        self.most_waiting = 0
        self._next = 0

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self._next += 1
            mid = f"m{self._next}"
            msg.metadata.__dict__["_message_id"] = mid
            self.waiting[mid] = msg
            self.pushed.append(msg.metadata.dst_node_id)
            ids.append(mid)
        self.most_waiting = max(self.most_waiting, len(self.waiting))
        return ids

    def pull_messages(self, message_ids):
        out = []
        for mid in [m for m in list(self.waiting) if m in set(message_ids)]:
            msg = self.waiting[mid]
            if msg.metadata.dst_node_id in self.silent:
                continue
            del self.waiting[mid]
            reply = Message(RecordDict(), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            out.append(reply)
            if len(out) == self.per_pull:
                break
        return out


def _send(grid: SlowGrid, window: int, nodes: list[int], timeout: float = 30.0):
    transport = Transport(grid, timeout, sorted, max_in_flight=window)
    replies = transport.send("query.info", {n: RecordDict() for n in nodes}, server_round=1)
    return transport, replies


@pytest.mark.parametrize("window", [1, 3, 7])
def test_window_bounds_waiting_messages_and_every_node_answers(window: int) -> None:
    grid = SlowGrid(per_pull=2)
    nodes = list(range(10, 30))
    _, replies = _send(grid, window, nodes)
    assert sorted(replies) == nodes
    assert grid.most_waiting == window
    assert grid.pushed == nodes  # in the strategy's order


def test_no_window_sends_the_batch_at_once() -> None:
    grid = SlowGrid(per_pull=3)
    nodes = list(range(12))
    _, replies = _send(grid, 0, nodes)
    assert sorted(replies) == nodes
    assert grid.most_waiting == len(nodes)


def test_deadline_counts_unsent_nodes_as_timed_out(caplog: pytest.LogCaptureFixture) -> None:
    grid = SlowGrid(per_pull=1, silent=(1, 2))  # the first window never answers
    with caplog.at_level(logging.WARNING, logger="flwr"):
        transport, replies = _send(grid, 2, [1, 2, 3, 4, 5], timeout=0.3)
    assert replies == {}
    assert grid.pushed == [1, 2]
    assert transport.round_nodes["timed_out"] == {1, 2, 3, 4, 5}
    assert "before asking [3, 4, 5]" in caplog.text


def test_negative_window_is_refused() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        Transport(SlowGrid(), 1.0, sorted, max_in_flight=-1)


def test_config_refuses_a_negative_window() -> None:
    from flux_app.engine.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="max-messages-in-flight"):
        RunConfig.from_mapping({"max-messages-in-flight": -1})


def test_a_windowed_run_computes_what_an_unwindowed_one_does() -> None:
    """FLUX (descriptors, clustering, cluster models) through a polled grid, with a window of
    2 messages and without: equal results, and the window held."""
    from client_app import app
    from flux_app.engine.inprocess import InProcessGrid, set_task_identity
    from flux_app.engine.server import build_strategy
    from flux_app.testing import FAST, comparable, config

    class Polled(InProcessGrid):
        answers_at_once = False  # replies are polled, as from a SuperLink
        most_waiting = 0

        def push_messages(self, messages):
            ids = super().push_messages(messages)
            self.most_waiting = max(self.most_waiting, len(self._outbox))
            return ids

    out = {}
    for window in (0, 2):
        cfg = config(
            FAST | {"strategy": "flux", "num-server-rounds": 3}, max_messages_in_flight=window
        )
        set_task_identity()
        grid = Polled(app, cfg.to_dict(), 6)
        out[window] = comparable(build_strategy(cfg).start(grid))
        assert grid.most_waiting == (window or 6)
    assert out[0] == out[2]
    assert out[2]["final"]["num_clusters"] >= 1
