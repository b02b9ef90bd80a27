"""fedrouter `Message`s on Flower's wire: tensors as one float32 Array, the config as JSON text.

All of a message's tensors travel packed in one float32 Array (their names and shapes, in order, in the
`layout` record), not one Array each: on a deployment Flower pulls and pushes every Array as objects of
their own, one request each (two at a time), so a message of 16 LoRA tensors was ~36 requests each way
and ~0.4 s per push or pull on loopback with TLS; packed it is 6. A message written one Array per tensor
(no `layout` record) is still read.

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
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedrouter.core import statefile
from fedrouter.methods.base import Message

ARRAYS, CONFIG, LAYOUT = "arrays", "config", "layout"
PACKED = "packed"  # the one Array of ARRAYS that holds every tensor, flattened one after another
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
    """A message as Flower records (plus any `extra` records, e.g. the run's config): its tensors as float32,
    packed in one Array, their names and shapes in LAYOUT."""
    tensors = {name: t.detach().to(torch.float32).contiguous() for name, t in msg.arrays.items()}
    records = {ARRAYS: ArrayRecord(), CONFIG: ConfigRecord({"json": config_json(msg.config)})}
    if tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors.values()]) if len(tensors) > 1 else next(iter(tensors.values())).reshape(-1)
        records[ARRAYS] = ArrayRecord({PACKED: Array(flat.numpy())})
        records[LAYOUT] = ConfigRecord({"json": json.dumps([[name, list(t.shape)] for name, t in tensors.items()])})
    return RecordDict({**records, **(extra or {})})


def _unpack(arrays: ArrayRecord, layout_json: str) -> dict[str, torch.Tensor]:
    """The tensors of a packed ArrayRecord (see to_records); a layout that does not fit the Array is refused."""
    try:
        layout = json.loads(layout_json)
        entries = [(str(name), [int(n) for n in shape]) for name, shape in layout]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"a message's tensor layout is malformed: {exc}") from None
    if not entries:
        return {}
    if PACKED not in arrays:
        raise ValueError("a message's tensor layout names tensors but its Array is missing")
    flat = arrays[PACKED].numpy()
    if flat.dtype != np.float32 or flat.ndim != 1:
        raise ValueError(f"a message's packed Array is {flat.dtype} {flat.ndim}-d, not float32 1-d")
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in entries]
    if any(n < 0 for _, shape in entries for n in shape) or sum(sizes) != flat.size or len({n for n, _ in entries}) != len(entries):
        raise ValueError("a message's tensor layout does not fit its packed Array")
    out, start = {}, 0
    for (name, shape), size in zip(entries, sizes):
        out[name] = torch.from_numpy(flat[start:start + size].copy()).reshape(shape)  # each its own, as Flower's
        start += size
    return out


def from_records(content: RecordDict) -> Message:
    if LAYOUT in content:
        arrays = _unpack(content[ARRAYS] if ARRAYS in content else ArrayRecord(), content[LAYOUT]["json"])
    else:  # one Array per tensor
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
