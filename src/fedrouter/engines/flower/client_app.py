"""fedrouter's Flower ClientApp: a thin module (no torch at import), because Flower 1.41 starts a fresh
ClientApp process for every message in a deployment.

Each handler either does the client's work in this process (`fedrouter.engines.flower_node.serve_message`,
which imports torch and builds the model and data), or, when the SuperNode's node config names a
long-lived worker (`worker=<socket path>`, started with `fedrouter flower worker`), forwards the message
and the node's context.state to it and takes back the reply and the new state -- the model then stays
loaded across messages. Either way an exception on the node comes back to the server as an error reply.

The worker protocol (both ends here): the connection is authenticated by the key in `<socket>.key` (an
HMAC challenge, never pickle), then each side sends length-framed parts: a JSON header, then Flower
RecordDicts as Flower's own protobuf. Nothing received is unpickled; a malformed part is refused.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

RUN = "run"  # the record every message carries: the run's config and per-message engine fields
NODE = "node"  # the record every reply carries: which state the node's client is in now
HELLO, SETUP, SAVE, RESUME = (f"{MessageType.QUERY}.{name}" for name in ("hello", "setup", "save", "resume"))
MAX_PART = 1 << 31  # bytes of one framed part; a longer one is refused, not read


class WorkerProtocolError(ValueError):
    """A part of a worker message that is not what the protocol sends."""


def send_parts(conn, header: dict, *records: RecordDict) -> None:
    from flwr.common.serde import recorddict_to_proto

    conn.send_bytes(json.dumps(header).encode())
    for record in records:
        conn.send_bytes(recorddict_to_proto(record).SerializeToString())


def recv_header(conn) -> dict:
    try:
        header = json.loads(conn.recv_bytes(MAX_PART))
    except (ValueError, UnicodeDecodeError) as exc:
        raise WorkerProtocolError(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WorkerProtocolError("the header is not a JSON object")
    return header


def recv_records(conn, n: int) -> list[RecordDict]:
    from flwr.common.serde import ProtoRecordDict, recorddict_from_proto

    out = []
    for _ in range(n):
        proto = ProtoRecordDict()
        try:
            proto.ParseFromString(conn.recv_bytes(MAX_PART))
            out.append(recorddict_from_proto(proto))
        except (OSError, EOFError):
            raise
        except Exception as exc:  # protobuf's DecodeError, or records Flower cannot rebuild
            raise WorkerProtocolError(f"a record part is not a Flower RecordDict ({type(exc).__name__})") from None
    return out


def read_private_key(path: Path) -> bytes:
    """The worker's key, only from a file of this user's that nobody else can read."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise PermissionError(f"no worker key at {path}: is `fedrouter flower worker` running on that socket?") from None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} must be a regular file of this user, readable by nobody else (mode 0600)")
    return path.read_bytes()


def _raise_remote(name: str, text: str):
    # Re-raise under the worker's exception name, so the server's error reply reads "Name: text" as in-process.
    raise type(str(name), (RuntimeError,), {})(str(text))


def _via_worker(address: str, msg: Message, context: Context):
    from multiprocessing.connection import Client

    key = read_private_key(Path(address + ".key"))
    with Client(address, family="AF_UNIX", authkey=key) as conn:
        send_parts(conn, {"type": msg.metadata.message_type, "node_config": dict(context.node_config)},
                   msg.content, context.state)
        header = recv_header(conn)
        if header.get("status") != "ok":
            _raise_remote(header.get("name", "WorkerError"), header.get("text", "the worker refused the message"))
        content, state = recv_records(conn, 2)
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
