"""Flower ClientApp: thin handlers that parse the message and call the engine's client side.

``train`` and ``evaluate`` are the engine's generic handlers; every ``query.<action>`` is a
handler registered with ``@register_query`` (built-in methods, and the plug-ins named by the
run-config key ``plugins``, imported before the message is dispatched).
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flux_app.engine.client import ClientRuntime, Handler, handle_evaluate, handle_train
from flux_app.engine.registry import QUERIES, load_plugins


class PluginClientApp(ClientApp):
    """A ClientApp that serves every registered query, plug-ins included."""

    def __call__(self, message: Message, context: Context) -> Message:  # noqa: D102
        load_plugins(str(context.run_config.get("plugins", "")))
        for action, handler in QUERIES.items():
            if f"query.{action}" not in self._registered_funcs:
                _register(self, action, handler)
        return super().__call__(message, context)


app = PluginClientApp()


def _run(handler: Handler, msg: Message, context: Context) -> Message:
    runtime = ClientRuntime.from_context(context.run_config, context.node_config, context.state)
    group = str(msg.metadata.group_id)  # the engine sends every message of a round in its group
    runtime.server_round = int(group) if group.isdigit() else 0
    return Message(handler(msg.content, runtime), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on the local train share."""
    return _run(handle_train, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the local test (and validation) share."""
    return _run(handle_evaluate, msg, context)


def _register(client_app: ClientApp, action: str, handler: Handler) -> None:
    def query(msg: Message, context: Context) -> Message:
        return _run(handler, msg, context)

    query.__name__ = f"query_{action}"
    client_app.query(action)(query)


load_plugins()  # the built-in methods' queries, registered at import like any ClientApp's
for _action, _handler in QUERIES.items():
    _register(app, _action, _handler)
