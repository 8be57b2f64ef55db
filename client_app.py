"""Flower ClientApp: thin handlers that parse the message and call flux_app.client."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flux_app.client import ClientRuntime, Handler, handle_evaluate, handle_train
from flux_app.client_actions import QUERY_ACTIONS

app = ClientApp()


def _run(handler: Handler, msg: Message, context: Context) -> Message:
    runtime = ClientRuntime.from_context(context.run_config, context.node_config, context.state)
    return Message(handler(msg.content, runtime), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on the local train share."""
    return _run(handle_train, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the local test (and validation) share."""
    return _run(handle_evaluate, msg, context)


def _register(action: str, handler: Handler) -> None:
    def query(msg: Message, context: Context) -> Message:
        return _run(handler, msg, context)

    query.__name__ = f"query_{action}"
    app.query(action)(query)


for _action, _handler in QUERY_ACTIONS.items():
    _register(_action, _handler)
