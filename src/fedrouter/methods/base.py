"""What a method is: a server part and a client part that exchange `Message`s. No engine in sight.

A `Message` is plain data -- named float tensors plus a small JSON-able dict -- so it maps one-to-one onto
Flower's ArrayRecord / ConfigRecord. Client-private state (a local adapter, private B matrices, local
centroids) lives in `ClientContext.state`, which the engine keeps per client and never shows the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedrouter.core.workbench import Adapter, ClientWorkbench
from fedrouter.errors import FedrouterError


@dataclass
class Message:
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of the tensors on the wire (float32, as Flower's ArrayRecord carries them)."""
        return sum(t.numel() * 4 for t in self.arrays.values())


@dataclass
class ClientContext:
    """What the engine hands a client part: its workbench (data + shared model) and private state."""

    client_id: int
    workbench: ClientWorkbench
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSetup:
    """What both parts of a method are built from: the run's seed and rounds, and the method's options."""

    seed: int
    rounds: int
    options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None  # where a method may cache derived data (e.g. embeddings); None = default


class ServerPart:
    """Decides what each client gets each round and folds their replies into the server state."""

    def __init__(self, setup: MethodSetup, initial_adapter: Adapter, client_ids: list[int]):
        self.settings = setup
        self.client_ids = list(client_ids)

    def configure_setup(self, client_ids: list[int]) -> dict[int, Message]:
        """A one-time exchange before the first round (e.g. FedRouter's local centroids); none by default."""
        return {}

    def aggregate_setup(self, replies: dict[int, Message]) -> dict:
        return {}

    def configure_fit(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        raise NotImplementedError

    def expected_upload(self, client_id: int, sent: Message) -> dict[str, tuple[int, ...]] | None:
        """The tensors (name -> shape) a training reply to `sent` must carry; the engine rejects a reply
        that differs before `aggregate_fit` sees it. By default what was sent comes back, trained;
        methods whose upload differs from their download override this (None: no structural check)."""
        return {name: tuple(t.shape) for name, t in sent.arrays.items()}

    def aggregate_fit(self, round_idx: int, replies: dict[int, Message]) -> dict[str, float]:
        """Update the server state from the replies; return round metrics (JSON-able)."""
        raise NotImplementedError

    def configure_evaluate(self, client_ids: list[int]) -> dict[int, Message]:
        """What each client needs to evaluate (by default nothing: the client holds its adapter)."""
        return {cid: Message() for cid in client_ids}

    def adapters(self) -> dict[str, Adapter]:
        """The server-side adapters worth saving, by name."""
        return {}

    def tensor_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """Other tensors worth saving in the run directory, by file name (FLoRA: its merged update)."""
        return {}

    def router(self) -> dict | None:
        """How to route a new prompt to one of `adapters()`: {"centroids": array (k, d), "adapters": [name
        per centroid], "embedder": spec}, or None when the method keeps a single shared adapter."""
        return None

    def report(self, evaluations: dict[str, dict[int, dict]]) -> dict:
        """Extra keys for results.json, from the final evaluation replies by split and client."""
        return {}

    def state_dict(self) -> dict:
        """The server's state as plain data, for a checkpoint: every attribute but its settings (which a
        resumed run rebuilds from the same config); an attribute with a `state_dict` of its own (a server
        optimizer) gives that. Reading it has no side effect."""
        return {name: value.state_dict() if hasattr(value, "state_dict") else value
                for name, value in vars(self).items() if name != "settings"}

    def load_state_dict(self, state: dict) -> None:
        """Back to a `state_dict()` taken earlier (on a server built from the same config)."""
        for name, value in state.items():
            if not name.isidentifier() or name.startswith("__") or callable(getattr(type(self), name, None)):
                raise ValueError(f"server state names {name!r}, which is not a state attribute")
            current = getattr(self, name, None)
            if hasattr(current, "load_state_dict"):
                current.load_state_dict(value)
            else:
                setattr(self, name, value)


class ClientPart:
    """Trains on a client's data when asked, and evaluates with the adapter the method prescribes."""

    def __init__(self, setup: MethodSetup):
        self.settings = setup

    def setup(self, msg: Message, ctx: ClientContext) -> Message:
        return Message()

    def fit(self, msg: Message, ctx: ClientContext) -> Message:
        raise NotImplementedError

    def eval_adapter(self, msg: Message, ctx: ClientContext) -> Adapter:
        """The adapter this client evaluates with."""
        raise NotImplementedError

    def evaluate(self, msg: Message, ctx: ClientContext) -> Message:
        """Report on msg.config["split"]; with msg.config["base"] the untrained base is evaluated."""
        split = msg.config.get("split", "test")
        adapter = None if msg.config.get("base") else self.eval_adapter(msg, ctx)
        return Message(config=ctx.workbench.evaluate(adapter, split))

    def adapters(self, ctx: ClientContext) -> dict[str, Adapter]:
        """The client-private adapters worth saving, by name."""
        return {}

    def diagnostics(self, ctx: ClientContext) -> dict | None:
        """What a simulation may show of this client's private state, for plots only (never sent in a
        federation): FedRouter gives {"vectors": (n, d) training embeddings, "tasks": [...], "clusters":
        [global cluster per example]}. None by default."""
        return None


def lora_matrices(adapter: Adapter, kind: str, exclude: bool = False) -> Adapter:
    """The adapter's `kind` ("lora_A" or "lora_B") matrices, or with exclude=True all the others."""
    marker = f".{kind}."
    return {k: v for k, v in adapter.items() if (marker in k) != exclude}


def fit_reply(adapter: Adapter | None, stats, n_examples: int) -> Message:
    """The usual reply of a training client: its adapter (if uploaded) and how it trained."""
    return Message(
        arrays=adapter or {},
        config={"n_examples": n_examples, "loss": stats.loss, "tokens": stats.tokens, "train_s": stats.seconds},
    )


def failure_reply(exc: BaseException) -> Message:
    """What an engine hands the server for a client that raised instead of replying."""
    return Message(config={"failed": f"{type(exc).__name__}: {exc}"})


def mean_fit_metrics(replies: dict[int, Message]) -> dict[str, float]:
    """Example-weighted training loss and summed tokens over a round's replies."""
    n = sum(r.config["n_examples"] for r in replies.values())
    return {
        "train_loss": sum(r.config["loss"] * r.config["n_examples"] for r in replies.values()) / max(1, n),
        "tokens": sum(r.config["tokens"] for r in replies.values()),
        "clients": len(replies),
    }


def read_options(method: str, options: dict, defaults: dict) -> dict:
    """`options` over `defaults`, each checked against its default's type; one clear error otherwise.

    A float option takes an int too; bools are never numbers; a default of None accepts anything (the
    method checks it).
    """
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        known = ", ".join(defaults) or "none"
        raise FedrouterError(f"{method}: unknown method option(s) {', '.join(unknown)}; known: {known}")
    out = {**defaults, **options}
    for key, default in defaults.items():
        value = out[key]
        if default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
        if not ok:
            kind = {bool: "true or false", float: "a number", int: "an integer", str: "a string"}.get(type(default), type(default).__name__)
            raise FedrouterError(f"{method}: option {key} must be {kind}, got {value!r}")
    return out


def pack_under(prefix: str, adapter: Adapter) -> dict[str, torch.Tensor]:
    """An adapter's tensors under "<prefix>/<name>", so several can share one message."""
    return {f"{prefix}/{name}": t for name, t in adapter.items()}


def unpack_under(arrays: dict[str, torch.Tensor], prefix: str) -> Adapter:
    """The adapter `pack_under(prefix, ...)` put into `arrays`."""
    cut = len(prefix) + 1
    return {key[cut:]: t for key, t in arrays.items() if key.startswith(prefix + "/")}


def pack(adapters: dict[int, Adapter]) -> dict[str, torch.Tensor]:
    """Several numbered adapters in one message's arrays: adapter k under prefix "k"."""
    return {key: t for k, a in adapters.items() for key, t in pack_under(str(k), a).items()}


def unpack(arrays: dict[str, torch.Tensor]) -> dict[int, Adapter]:
    """The inverse of `pack`."""
    numbers = sorted({int(key.split("/", 1)[0]) for key in arrays})
    return {k: unpack_under(arrays, str(k)) for k in numbers}
