"""fedrouter `Message`s on Flower's wire: tensors as a float32 ArrayRecord, the config as JSON text.

The config travels as JSON (not pickle: a message from the network must never run code when read), so
what a method puts in it must survive `json.dumps` / `json.loads` unchanged -- numbers, strings, bools,
None, lists and dicts with string keys. numpy and torch scalars or arrays are turned into plain numbers
and lists; anything else is refused with a line naming the key. Tensors go as float32 (Flower's Array
cannot hold bfloat16); the receiver gets float32.

A client's private state (its `ClientContext.state` and its batch-stream position) never leaves its node:
it is kept in Flower's `context.state` between messages (and in the node's own checkpoint files) as
`fedrouter.core.statefile` bytes (safetensors + JSON), which read back without running any code.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedrouter.core import statefile
from fedrouter.methods.base import Message

ARRAYS, CONFIG = "arrays", "config"
STATE = "fedrouter"  # the key of this client's private state in Flower's context.state


def _plain(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} cannot travel in a message's config")


def config_json(config: dict) -> str:
    """The config as JSON text; a value that cannot be sent is named in the error."""
    try:
        return json.dumps(config, default=_plain)
    except TypeError as exc:
        bad = next((k for k, v in config.items() if _unsendable(v)), "?")
        raise TypeError(f"message config key {bad!r}: {exc}") from None


def _unsendable(value) -> bool:
    try:
        json.dumps(value, default=_plain)
        return False
    except TypeError:
        return True


def to_records(msg: Message, extra: dict[str, ConfigRecord] | None = None) -> RecordDict:
    """A message as Flower records (plus any `extra` records, e.g. the run's config)."""
    arrays = {name: t.detach().to(torch.float32).contiguous() for name, t in msg.arrays.items()}
    records = {ARRAYS: ArrayRecord(arrays), CONFIG: ConfigRecord({"json": config_json(msg.config)})}
    return RecordDict({**records, **(extra or {})})


def from_records(content: RecordDict) -> Message:
    arrays = dict(content[ARRAYS].to_torch_state_dict()) if ARRAYS in content else {}
    config = json.loads(content[CONFIG]["json"]) if CONFIG in content else {}
    return Message(arrays, config)


PARTS = "fedrouter.parts"  # a message made of several, one after another: their configs (their arrays by index)


def join_parts(parts: list[Message]) -> Message:
    """Several messages for one client as one (each part's arrays under "<index>/<name>")."""
    arrays = {f"{i}/{name}": t for i, part in enumerate(parts) for name, t in part.arrays.items()}
    return Message(arrays, {PARTS: [part.config for part in parts]})


def split_parts(msg: Message) -> list[Message]:
    """The messages `join_parts` joined."""
    parts = [Message({}, dict(config)) for config in msg.config[PARTS]]
    for key, t in msg.arrays.items():
        index, name = key.split("/", 1)
        parts[int(index)].arrays[name] = t
    return parts


def roundtrip(msg: Message) -> Message:
    """What the receiver of `msg` gets (for checking that a method's messages survive the wire)."""
    return from_records(to_records(msg))


def state_bytes(state: dict) -> bytes:
    return statefile.dumps(state)


def state_from_bytes(blob: bytes) -> dict:
    """A state `state_bytes` wrote; `statefile.UnreadableState` for anything else (nothing is executed)."""
    return statefile.loads(blob)
