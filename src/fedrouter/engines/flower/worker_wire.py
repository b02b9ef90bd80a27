"""What crosses between the Flower server, the ClientApp, the node and its worker, torch-free (the thin
ClientApp imports it): the records every message and reply carry, fedrouter's message types, and the
worker protocol.

The worker protocol: the connection is authenticated by the key in `<socket>.key` (an HMAC challenge,
never pickle), then each side sends length-framed parts: a JSON header, then Flower RecordDicts as
Flower's own protobuf. Nothing received is unpickled; a malformed part is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from flwr.app import MessageType, RecordDict
from flwr.common.serde import ProtoRecordDict, recorddict_from_proto, recorddict_to_proto

RUN = "run"  # the record every message carries: per-message engine fields, the run's config hash (the config at hello)
NODE = "node"  # the record every reply carries: which state the node's client is in now
HELLO, SETUP, SAVE, RESUME = (f"{MessageType.QUERY}.{name}" for name in ("hello", "setup", "save", "resume"))
MAX_PART = 1 << 31  # bytes of one framed part; a longer one is refused, not read


def config_hash(config_text: str) -> str:
    """What messages call the run's config by: the server sends the config itself only at hello (and again
    to a node that no longer holds it), and its hash in every message."""
    return hashlib.sha256(config_text.encode()).hexdigest()


class RunConfigUnknownError(RuntimeError):
    """A node asked about a run config it does not hold (its memory is gone): the server sends it again."""


class WorkerProtocolError(ValueError):
    """A part of a worker message that is not what the protocol sends."""


def send_parts(conn, header: dict, *records: RecordDict) -> None:
    conn.send_bytes(json.dumps(header).encode())
    for record in records:
        conn.send_bytes(recorddict_to_proto(record).SerializeToString())


def recv_header(conn) -> dict:
    try:
        header = json.loads(conn.recv_bytes(MAX_PART))
    except (ValueError, UnicodeDecodeError) as exc:
        raise WorkerProtocolError(f"the header is not JSON ({exc})") from None
    except RecursionError:  # a header nested deeper than the parser goes: refused like any malformed one
        raise WorkerProtocolError("the header is nested too deeply") from None
    if not isinstance(header, dict):
        raise WorkerProtocolError("the header is not a JSON object")
    return header


def recv_records(conn, n: int) -> list[RecordDict]:
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
