"""Plain data with tensors in it, as bytes that can be read back without running any code.

What a checkpoint or a Flower node keeps (adapters, private client state, random generator states, round
records) is a tree of dicts, lists, tuples, sets, numbers, strings, None, torch tensors and numpy arrays.
`dumps` writes it as one safetensors blob: every tensor and array is a safetensors tensor (dtype and
values exact), and the tree around them is JSON in the blob's metadata, each container tagged with its
kind so that it comes back as it went (a tuple stays a tuple, an int key stays an int). `loads` reads it
back with safetensors and `json` only -- never pickle -- so a crafted file can be refused, never executed.
Anything else in the tree (an object of some class) is refused when writing, naming where it sits.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch
from safetensors.torch import load, save

META_KEY = "fedrouter"
FORMAT = "fedrouter-state-1"


class UnreadableState(ValueError):
    """The bytes are not a state this module wrote (truncated, damaged, foreign, or crafted)."""


def _encode(obj, tensors: dict[str, torch.Tensor], where: str):
    # Every JSON object in the encoding is a tag with exactly one key, so decoding is unambiguous.
    if isinstance(obj, np.generic):  # before int and float: np.float64 is a float, and must stay np.float64
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{where}: a numpy scalar of dtype {obj.dtype} cannot be stored")
        return {"s": [obj.dtype.str, _encode(obj.item(), tensors, where)]}
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return {"f": repr(obj)}  # repr round-trips every float exactly, nan and inf included
    if isinstance(obj, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"t": name}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{where}: a numpy array of dtype {obj.dtype} cannot be stored")
        name = str(len(tensors))
        tensors[name] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
        return {"n": name}
    if isinstance(obj, dict):
        return {"d": [[_encode(k, tensors, f"{where} key"), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, list):
        return {"l": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, tuple):
        return {"u": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, (set, frozenset)):
        return {"e": [_encode(v, tensors, f"{where} item") for v in sorted(obj, key=repr)]}
    raise TypeError(f"{where}: a {type(obj).__name__} is not plain data (dicts, lists, numbers, strings, tensors, arrays)")


def dumps(obj) -> bytes:
    """`obj` (plain data and tensors) as safetensors bytes; TypeError naming what cannot be stored."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors, "state")
    return save(tensors, metadata={META_KEY: json.dumps({"format": FORMAT, "tree": tree})})


def _metadata(blob: bytes) -> dict:
    """The safetensors header's metadata, read with `struct` and `json` only."""
    if len(blob) < 8:
        raise UnreadableState(f"{len(blob)} bytes: too short for a safetensors file")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > len(blob) - 8:
        raise UnreadableState("the header runs past the end (truncated)")
    try:
        header = json.loads(blob[8 : 8 + size])
        meta = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError, RecursionError):
        raise UnreadableState("not a fedrouter state (no readable metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UnreadableState(f"not a fedrouter state of format {FORMAT}")
    return meta


def _decode(node, tensors: dict[str, torch.Tensor]):
    if node is None or isinstance(node, (bool, str, int)):
        return node
    if not isinstance(node, dict) or len(node) != 1:
        raise UnreadableState(f"unexpected element {str(node)[:60]!r}")
    (tag, value), = node.items()
    if tag == "f":
        return float(value)
    if tag in ("t", "n"):
        if value not in tensors:
            raise UnreadableState(f"tensor {value!r} is missing")
        return tensors[value] if tag == "t" else tensors[value].numpy()
    if tag == "s":
        dtype, item = value
        return np.dtype(dtype).type(_decode(item, tensors))
    if tag == "d":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    if tag == "l":
        return [_decode(v, tensors) for v in value]
    if tag == "u":
        return tuple(_decode(v, tensors) for v in value)
    if tag == "e":
        return {_decode(v, tensors) for v in value}
    raise UnreadableState(f"unknown element kind {tag!r}")


def loads(blob: bytes):
    """What `dumps` wrote; UnreadableState (one line) for anything else. Runs no code from the bytes."""
    meta = _metadata(bytes(blob))
    try:
        tensors = load(bytes(blob))
        return _decode(meta["tree"], tensors)
    except UnreadableState:
        raise
    except Exception as exc:  # safetensors' own errors, or a tree of the wrong shape
        raise UnreadableState(f"damaged ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
