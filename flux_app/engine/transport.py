"""Talking to nodes: one Message per node, replies checked, every rejection recorded.

:meth:`Transport.send` delivers and returns the replies that arrived without error;
:meth:`Transport.collect` also parses each reply with the caller's validator, so a malformed
reply never reaches a model or the clustering: it is logged with the node and the reason and,
when the caller keeps an exclusion book, recorded there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, TypeVar

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from flux_app.engine.traffic import Traffic

if TYPE_CHECKING:  # pragma: no cover
    from flux_app.engine.config import RunConfig

logger = logging.getLogger("flwr")

T = TypeVar("T")

#: first and longest pause between two pulls of replies (seconds)
POLL_FIRST, POLL_MAX = 0.05, 0.2
#: what a validator may raise for a bad reply (OverflowError etc. are ArithmeticErrors)
REPLY_ERRORS: tuple[type[Exception], ...] = (ValueError, KeyError, TypeError, ArithmeticError)


class Transport:
    """Sends Messages through a Grid and counts their bytes.

    Parameters
    ----------
    grid : Grid
        Flower's Grid (simulation, deployment or :class:`InProcessGrid`).
    timeout : float
        Seconds to wait for the replies of one ``send`` (run-config ``round-timeout``).
    order : callable
        Sorts node ids (the strategy's stable partition order).
    traffic : Traffic, optional
        Where bytes are counted (a fresh one by default).
    max_in_flight : int
        Most messages awaiting a reply at once (run-config ``max-messages-in-flight``);
        0 = all of a ``send`` at once.
    """

    def __init__(
        self,
        grid: Grid,
        timeout: float,
        order: Callable[[list[int]], list[int]],
        traffic: Traffic | None = None,
        max_in_flight: int = 0,
    ) -> None:
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0, got {max_in_flight}")
        self.grid = grid
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.order = order
        self.traffic = traffic if traffic is not None else Traffic()
        #: node -> reason of its latest error reply (what a node's own failure was)
        self.errors: dict[int, str] = {}
        #: this round's nodes: ``asked`` (sent a message), ``answered`` (replied without an
        #: error, valid or not), ``offline`` (not connected when a message was due: not sent),
        #: ``timed_out`` (let a message time out: not asked again this round)
        self.round_nodes: dict[str, set[int]] = {
            "asked": set(),
            "answered": set(),
            "offline": set(),
            "timed_out": set(),
        }
        #: the nodes Flower listed as connected at the round's start (``None``: not known)
        self.online: set[int] | None = None

    @classmethod
    def for_run(
        cls,
        grid: Grid,
        cfg: RunConfig,
        order: Callable[[list[int]], list[int]],
        traffic: Traffic | None = None,
    ) -> Transport:
        """A Transport with the run-config's ``round-timeout`` and ``max-messages-in-flight``."""
        return cls(grid, cfg.round_timeout, order, traffic, cfg.max_messages_in_flight)

    def start_round(self) -> None:
        """Reset :attr:`round_nodes`."""
        self.round_nodes = {k: set() for k in self.round_nodes}

    def send(
        self, message_type: str, contents: Mapping[int, RecordDict], server_round: int
    ) -> dict[int, RecordDict]:
        """One Message per node; the content of every reply that arrived without error.

        Error replies and nodes that did not answer within the timeout are logged and left out.
        """
        if not contents:
            return {}
        online = self.online
        gone = [n for n in contents if online is not None and n not in online]
        if gone:  # Flower reported them offline at the round's start: do not wait for them
            logger.warning(
                "%s: %d node(s) offline, not asked: %s", message_type, len(gone), sorted(gone)
            )
            self.round_nodes["offline"].update(gone)
        # a node that let a message of this round time out is not waited for again this round
        late = [n for n in contents if n in self.round_nodes["timed_out"] and n not in gone]
        if late:
            logger.warning(
                "%s: %d node(s) timed out earlier this round, not asked: %s",
                message_type,
                len(late),
                sorted(late),
            )
        contents = {n: c for n, c in contents.items() if n not in gone and n not in late}
        if not contents:
            return {}
        self.round_nodes["asked"].update(contents)
        messages = []
        for node_id in self.order(list(contents)):
            content = contents[node_id]
            self.traffic.count(message_type, "down", content)
            messages.append(
                Message(
                    content,
                    dst_node_id=node_id,
                    message_type=message_type,
                    group_id=str(server_round),
                )
            )
        out: dict[int, RecordDict] = {}
        for reply in self.exchange(messages):
            src = reply.metadata.src_node_id
            if src not in contents:
                logger.warning(
                    "%s: reply from node %s, which was not asked; ignored", message_type, src
                )
                continue
            if reply.has_error():
                self.errors[src] = reply.error.reason
                logger.warning(
                    "node %s (%s): error reply: %s", src, message_type, reply.error.reason
                )
                continue
            self.traffic.count(message_type, "up", reply.content)
            self.round_nodes["answered"].add(src)
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

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Push ``messages``, pull their replies until all came or ``timeout`` passed.

        Flower's ``send_and_receive`` sleeps 3 s between pulls, which is most of a deployment
        round when nodes answer in a second; this polls from 50 ms, backing off to 0.2 s.
        With ``max_in_flight`` set, at most that many messages wait for a reply at once (in
        the order given) and the next go out as replies come: Flower 1.42's simulation engine
        scans every stored message for every node each 0.1 s, so a round that pushes all its
        messages at once costs its driver nodes x messages work per scan.
        """
        if getattr(self.grid, "answers_at_once", False):  # in-process: a dropped reply is gone
            return list(self.grid.send_and_receive(messages, timeout=self.timeout))
        window = self.max_in_flight or len(messages)
        queue = list(messages)
        dst: dict[str, int] = {}
        pending: set[str] = set()
        deadline = time.monotonic() + self.timeout
        replies: list[Message] = []
        delay = POLL_FIRST
        while queue or pending:
            if queue and len(pending) < window:
                batch, queue = queue[: window - len(pending)], queue[window - len(pending) :]
                ids = list(self.grid.push_messages(batch))
                dst.update((mid, m.metadata.dst_node_id) for mid, m in zip(ids, batch, strict=True))
                pending.update(ids)
                delay = POLL_FIRST
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            left = deadline - time.monotonic()
            if left <= 0 or not (queue or pending):
                break
            if got and queue:  # room in the window: push the next at once
                continue
            time.sleep(min(delay, left))
            if not queue:  # messages still to push: keep the window full, no back-off
                delay = min(delay * 1.5, POLL_MAX)
        if queue:
            unsent = sorted(m.metadata.dst_node_id for m in queue)
            logger.warning("round-timeout %.0f s passed before asking %s", self.timeout, unsent)
            self.round_nodes["timed_out"].update(unsent)
        if pending:
            late = sorted(dst[mid] for mid in pending)
            logger.warning("no reply within round-timeout %.0f s from %s", self.timeout, late)
            self.round_nodes["timed_out"].update(late)
        return replies

    def collect(
        self,
        message_type: str,
        contents: Mapping[int, RecordDict],
        server_round: int,
        parse: Callable[[int, RecordDict], T],
        *,
        what: str,
        excluded: MutableMapping[int, str] | None = None,
        exclude_missing: bool = True,
    ) -> dict[int, T]:
        """Send, then validate every reply with ``parse(node_id, content)``.

        Parameters
        ----------
        message_type, contents, server_round
            As for :meth:`send`.
        parse : callable
            Returns the parsed value or raises (one of :data:`REPLY_ERRORS`) for a bad reply.
        what : str
            Names the reply in log lines and exclusion reasons (e.g. ``"descriptor"``).
        excluded : dict, optional
            Exclusion book (node -> reason): a rejected reply is recorded as
            ``invalid <what>: <reason>``, a missing one as ``no <what> reply`` (keeping an earlier
            reason) unless ``exclude_missing`` is false (the node may still answer later).

        Returns
        -------
        dict
            Node -> parsed value, for the nodes whose reply passed, in node order.
        """
        replies = self.send(message_type, contents, server_round)
        out: dict[int, T] = {}
        for node_id in self.order(list(contents)):
            if node_id not in replies:
                if excluded is not None and exclude_missing:
                    excluded.setdefault(node_id, f"no {what} reply")
                continue
            try:
                out[node_id] = parse(node_id, replies[node_id])
            except REPLY_ERRORS as err:
                logger.warning("node %s: invalid %s rejected: %s", node_id, what, err)
                if excluded is not None:
                    excluded[node_id] = f"invalid {what}: {err}"
        return out


__all__ = ["REPLY_ERRORS", "Transport"]
