"""An in-process Flower ``Grid``: the real ServerApp logic talks to the real ClientApp in one
Python process, with no Ray and no SuperLink.

It serves unit tests (a strategy round trip in about a second), benchmarks on machines where Ray
is unwanted, and GPU machines without Flower's simulation extras. Messages go through the same
``ClientApp.__call__`` as in ``flwr run``; exceptions in a handler become error replies, as
they do there. Nodes can be made to fail, stay silent, or join late to test the strategies'
tolerance.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1


def set_task_identity(run_id: int = 1, node_id: int = SERVER_NODE_ID, task_id: int = 1) -> None:
    """Messages read the sender's identity from a process-wide slot that Flower's runtime
    normally fills; set it when running outside that runtime."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app : ClientApp
        The app to serve every node (normally ``client_app.app``).
    run_config : Mapping[str, Any]
        The run-config every node sees (kebab-case keys).
    num_nodes : int
        Nodes to create, with ``partition-id`` 0..num_nodes-1 and ``num-partitions=num_nodes``.
    node_configs : list of dict, optional
        Explicit node-configs instead (one per node).
    hooks : Mapping[int, Callable[[Message], Message | None]], optional
        Per partition id, a function that may replace a node's reply (return a Message), drop
        it (return None), or raise (-> error reply). For fault-injection tests.
    late : Mapping[int, int], optional
        Partition id -> the number of ``get_node_ids`` calls before the node appears.
    """

    #: every reply is computed when pulled: nothing arrives later (no polling needed)
    answers_at_once = True

    def __init__(
        self,
        client_app: ClientApp,
        run_config: Mapping[str, Any],
        num_nodes: int = 0,
        *,
        node_configs: list[dict[str, Any]] | None = None,
        hooks: Mapping[int, Callable[[Message], Message | None]] | None = None,
        late: Mapping[int, int] | None = None,
    ) -> None:
        set_task_identity()
        self.client_app = client_app
        self.run_config = dict(run_config)
        if node_configs is None:
            node_configs = [
                {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)
            ]
        self.contexts: dict[int, Context] = {}
        self.partition_of: dict[int, int] = {}
        # Node ids are not partition ids in Flower either; make them differ here too.
        for i, node_config in enumerate(node_configs):
            node_id = 1000 + 7 * i
            self.contexts[node_id] = Context(
                run_id=1,
                node_id=node_id,
                node_config=dict(node_config),
                state=RecordDict(),
                run_config=self.run_config,
            )
            self.partition_of[node_id] = int(node_config.get("partition-id", i))
        self.hooks = dict(hooks or {})
        self.late = dict(late or {})
        self._calls = 0
        self._ids = itertools.count(1)
        self._rejoined = itertools.count(1)
        self._outbox: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=1)
        self.messages_sent = 0

    # ------------------------------------------------------------------ faults
    def leave(self, partition_id: int) -> int:
        """The node of ``partition_id`` disconnects (a crashed SuperNode): it is no longer
        listed and messages to it get no reply. Returns its node id."""
        node_id = next(n for n, p in self.partition_of.items() if p == partition_id)
        del self.partition_of[node_id]
        self.contexts.pop(node_id)
        return node_id

    def rejoin(self, partition_id: int, num_partitions: int) -> int:
        """A restarted SuperNode of ``partition_id`` connects with a new node id and fresh
        state (same data). Returns the new id."""
        node_id = 1_000_000 + next(self._rejoined)  # never an id seen before
        self.contexts[node_id] = Context(
            run_id=1,
            node_id=node_id,
            node_config={"partition-id": partition_id, "num-partitions": num_partitions},
            state=RecordDict(),
            run_config=self.run_config,
        )
        self.partition_of[node_id] = partition_id
        return node_id

    # ------------------------------------------------------------------ Grid API
    def set_run(self, run: Run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Run:  # noqa: D102
        return self._run

    def create_message(  # noqa: D102
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        self._calls += 1
        return [n for n, pid in self.partition_of.items() if self._calls > self.late.get(pid, 0)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            self._outbox[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        out = []
        for mid in message_ids:
            msg = self._outbox.pop(mid, None)
            if msg is None:
                continue
            reply = self._deliver(msg)
            if reply is not None:
                out.append(reply)
        return out

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(list(messages)))

    # ------------------------------------------------------------------ delivery
    def _deliver(self, msg: Message) -> Message | None:
        node_id = msg.metadata.dst_node_id
        context = self.contexts.get(node_id)
        if context is None:
            return None  # unknown node: nobody answers, like a node that left
        self.messages_sent += 1
        set_task_identity(node_id=node_id)
        hook = self.hooks.get(self.partition_of[node_id])
        try:
            reply = self.client_app(msg, context)
            if hook is not None:
                reply = hook(reply)
        except Exception as err:  # the runtime turns handler exceptions into error replies
            reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
        finally:
            set_task_identity()
        if reply is not None:
            reply.metadata.__dict__["_src_node_id"] = node_id
            reply.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
        return reply


def run_inprocess(
    run_config: Mapping[str, Any], num_nodes: int, **grid_kwargs: Any
) -> tuple[dict[str, Any], str]:
    """Run one experiment in this process: the same code paths as ``flwr run``, minus Ray.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        Overrides on top of the app's defaults (kebab-case keys).
    num_nodes : int
        Number of SuperNodes to emulate.

    Returns
    -------
    results, run_dir
        results.json's content and the run's folder.
    """
    from client_app import app as client_app
    from flux_app.engine.config import RunConfig
    from flux_app.engine.server import run_server

    cfg = RunConfig.from_mapping(run_config)
    grid = InProcessGrid(client_app, cfg.to_dict(), num_nodes, **grid_kwargs)
    t0 = time.time()
    results, run_dir = run_server(grid, cfg)
    results.setdefault("final", {})["inprocess_seconds"] = round(time.time() - t0, 3)
    return results, run_dir
