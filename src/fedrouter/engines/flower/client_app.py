"""fedrouter's Flower ClientApp: a thin module (no torch at import), because Flower starts a ClientApp
process for every message in a deployment (a new Python under `flower-supernode`; forked from one that
has imported Flower and this module under `fedrouter flower supernode`).

Each handler either does the client's work in this process (`fedrouter.engines.flower.node.handle_message`,
which imports torch and builds the model and data), or, when the SuperNode's node config names a
long-lived worker (`worker=<socket path>`, started with `fedrouter flower worker`), forwards the message
and the node's context.state to it and takes back the reply and the new state -- the model then stays
loaded across messages. Either way an exception on the node comes back to the server as an error reply.

The worker protocol is in `engines.flower.worker_wire`.
"""

from __future__ import annotations

from pathlib import Path
from multiprocessing.connection import Client

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedrouter.engines.flower.worker_wire import read_private_key, recv_header, recv_records, send_parts


def _raise_remote(name: str, text: str):
    # Re-raise under the worker's exception name, so the server's error reply reads "Name: text" as in-process.
    raise type(str(name), (RuntimeError,), {})(str(text))


def _via_worker(address: str, msg: Message, context: Context):
    key = read_private_key(Path(address + ".key"))
    with Client(address, family="AF_UNIX", authkey=key) as conn:
        send_parts(conn, {"type": msg.metadata.message_type, "node_config": dict(context.node_config)},
                   msg.content, context.state)
        header = recv_header(conn)
        if header.get("status") != "ok":
            _raise_remote(header.get("name", "WorkerError"), header.get("text", "the worker refused the message"))
        changed = header.get("state", True) is not False
        content, *state = recv_records(conn, 2 if changed else 1)
    if state:  # the node's state changed: keep the new one
        for name in list(context.state.keys()):
            del context.state[name]
        for name, record in state[0].items():
            context.state[name] = record
    return content


def _handle(msg: Message, context: Context) -> Message:
    worker = context.node_config.get("worker")
    if worker:
        content = _via_worker(str(worker), msg, context)
    else:
        from fedrouter.engines.flower.node import handle_message  # start-up cost: torch and the model, without a worker only

        content, _ = handle_message(msg.metadata.message_type, msg.content, dict(context.node_config), context.state)
    return Message(content, reply_to=msg)


client_app = ClientApp()
# One handler for every message fedrouter sends; Flower dispatches on the message type it is registered under.
for _action in ("hello", "setup", "save", "resume"):
    client_app.query(_action)(_handle)
client_app.train()(_handle)
client_app.evaluate()(_handle)
