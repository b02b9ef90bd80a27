"""fedrouter's Flower ClientApp: a thin module (no torch at import), because Flower 1.41 starts a fresh
ClientApp process for every message in a deployment.

Each handler either does the client's work in this process (`fedrouter.engines.flower_node.serve_message`,
which imports torch and builds the model and data), or, when the SuperNode's node config names a
long-lived worker (`worker=<socket path>`, started with `fedrouter flower worker`), forwards the message
and the node's context.state to it and takes back the reply and the new state -- the model then stays
loaded across messages. Either way an exception on the node comes back to the server as an error reply.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

RUN = "run"  # the record every message carries: the run's config and per-message engine fields
NODE = "node"  # the record every reply carries: which state the node's client is in now
HELLO, SETUP, SAVE, RESUME = (f"{MessageType.QUERY}.{name}" for name in ("hello", "setup", "save", "resume"))


def _raise_remote(name: str, text: str):
    # Re-raise under the worker's exception name, so the server's error reply reads "Name: text" as in-process.
    raise type(name, (RuntimeError,), {})(text)


def _via_worker(address: str, msg: Message, context: Context):
    from multiprocessing.connection import Client

    key = Path(address + ".key").read_bytes()
    with Client(address, family="AF_UNIX", authkey=key) as conn:
        conn.send((msg.metadata.message_type, msg.content, dict(context.node_config), context.state))
        status, payload = conn.recv()
    if status != "ok":
        _raise_remote(*payload)
    content, state = payload
    for name in list(context.state.keys()):
        del context.state[name]
    for name, record in state.items():
        context.state[name] = record
    return content


def _handle(msg: Message, context: Context) -> Message:
    worker = context.node_config.get("worker")
    if worker:
        content = _via_worker(str(worker), msg, context)
    else:
        from fedrouter.engines.flower_node import serve_message

        content = serve_message(msg.metadata.message_type, msg.content, dict(context.node_config), context.state)
    return Message(content, reply_to=msg)


client_app = ClientApp()
# One handler for every message fedrouter sends; Flower dispatches on the message type it is registered under.
for _action in ("hello", "setup", "save", "resume"):
    client_app.query(_action)(_handle)
client_app.train()(_handle)
client_app.evaluate()(_handle)
