"""What a method is: a server part and a client part that exchange `Message`s. No engine in sight.

A `Message` is plain data -- named float tensors plus a small JSON-able dict -- so it maps one-to-one onto
Flower's ArrayRecord / ConfigRecord. Client-private state (a local adapter, private B matrices, local
cluster labels) lives in `ClientContext.state`, which the engine keeps per client and never shows the
server. A client part reaches the model only through its `Workbench`: train, evaluate, embed, its data
and the run's initial adapter -- never the peft model itself. This module holds only these protocols;
the helpers methods share are in `fedrouter.methods.common`.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from fedrouter.core.aggregate import weighted_average
from fedrouter.core.gated_mix import GatedMix
from fedrouter.methods.facts import MethodFacts

Adapter = dict[str, torch.Tensor]


@dataclass
class Message:
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of the tensors on the wire (float32, as Flower's ArrayRecord carries them)."""
        return sum(t.numel() * 4 for t in self.arrays.values())


class Workbench(Protocol):
    """What a client part may do with the shared model and its own data (the engine provides it).

    Capabilities, each a general one that any method may use:
    - `train(adapter, round_idx, ...)`: the round's local steps from `adapter` (its rank picks the slot), on
      all examples or a named `subset`, updating only the `trainable` matrices ("lora_A" / "lora_B"),
      with a `penalty(live parameters)` added to the loss, on top of a frozen dense `base_update`, or
      mixed token by token with a frozen partner adapter by a gate trained alongside (`mixer`, a
      `core.gated_mix.GatedMix`);
    - `evaluate*`: ROUGE on a split with one adapter (or one mixed with its partner by `mixer`), one
      adapter per example (`evaluate_routed`), or a per-example weighted mix of adapters (`evaluate_weighted`);
    - `embed(texts, embedder)`: frozen embeddings of texts (cached), or with `adapter` active;
    - `loss(adapter)`: mean training loss on the first examples.
    """

    client_id: int
    tasks: list[str]
    n_train: int

    def examples(self, split: str) -> list[dict]: ...

    def initial_adapter(self, rank: int | None = None) -> Adapter: ...

    def lora_rank(self) -> int: ...

    def lora_scaling(self, rank: int | None = None) -> float: ...

    def train(self, adapter: Adapter, round_idx: int, *, subset: tuple[str, list[int]] | None = None,
              trainable: str | None = None, penalty=None, base_update: dict | None = None,
              mixer: GatedMix | None = None): ...

    def loss(self, adapter: Adapter, n_examples: int = 32) -> float: ...

    def evaluate(self, adapter: Adapter | None, split: str = "test", *, base_update: dict | None = None,
                 mixer: GatedMix | None = None) -> dict: ...

    def evaluate_routed(self, adapters: dict[str, Adapter], assignment: list[str], split: str = "test",
                        mixed: bool = False) -> dict: ...

    def evaluate_weighted(self, adapters: list[Adapter], weights: torch.Tensor, split: str = "test") -> dict: ...

    def embed(self, texts: list[str], embedder: str = "base", *, adapter: Adapter | None = None) -> np.ndarray: ...


@dataclass
class ClientContext:
    """What the engine hands a client part: its workbench (data + capabilities) and private state."""

    client_id: int
    workbench: Workbench
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSetup:
    """What both parts of a method are built from: the run's seed and rounds, and the method's options
    (already checked and completed with their defaults by the registry, `fedrouter.methods.options_for`)."""

    seed: int
    rounds: int
    options: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)  # the run's [privacy] section when it is on (FedRouter's centroids)
    client_ranks: tuple[int, ...] | None = None  # lora.client_ranks, for the methods that take them (`common.client_rank`)


def with_defaults(part, options: dict) -> dict:
    """`options` over the defaults its method module declares (`OPTIONS`), for a part built directly
    (the registry has checked and completed them already when the config made the part)."""
    module = type(part).__module__  # the method's module, or the package a method split by axis declares them in
    while "." in module and not hasattr(sys.modules[module], "OPTIONS"):
        module = module.rpartition(".")[0]
    return {**getattr(sys.modules[module], "OPTIONS", {}), **options}


# The mean a wrapper around a server part hands it for one call (`folding`); None: the example-weighted one.
_FOLD: ContextVar[Callable | None] = ContextVar("fold", default=None)


@contextmanager
def folding(mean: Callable):
    """Within the block, `ServerPart.average` is `mean` (DP-FedAvg's wrapper: unweighted and noised)."""
    token = _FOLD.set(mean)
    try:
        yield
    finally:
        _FOLD.reset(token)


class ServerPart:
    """Decides what each client gets each round and folds their replies into the server state.

    A method declares its facts (`MethodFacts`) as the class attribute `FACTS`."""

    FACTS: MethodFacts

    def __init__(self, setup: MethodSetup, initial_adapter: Adapter, client_ids: list[int]):
        self.method_setup = setup
        self.options = with_defaults(self, setup.options)
        self.client_ids = list(client_ids)

    def average(self, states: list[Adapter], weights: list[float]) -> Adapter:
        """The mean every averaging method folds uploads with: example-weighted -- or the mean a wrapper
        hands the part for the call (`folding`: central DP's, unweighted and noised)."""
        return (_FOLD.get() or weighted_average)(states, weights)

    def upload_reference(self, client_id: int, sent: "Message") -> dict[str, torch.Tensor]:
        """What each uploaded tensor is a change of (for clipping an update): by default the tensor of the
        same name that was sent."""
        return sent.arrays

    def configure_setup(self, client_ids: list[int]) -> dict[int, Message]:
        """Exchanges before the first round (e.g. FedRouter's local centroids): the engine sends these
        messages and hands the replies to `aggregate_setup`, again and again until this returns none (so
        a method with setup must move on in `aggregate_setup`); none by default."""
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

    def report(self, evaluations: dict[str, dict[int, dict]], truth: dict[int, dict] | None = None) -> dict:
        """Extra keys for results.json, from the final evaluation replies by split and client. `truth`:
        where the engine holds the clients' data (a simulation), each client's training examples' true
        tasks and the clusters its method put them in ({"tasks", "clusters"}); None in a deployment."""
        return {}

    def state_dict(self) -> dict:
        """The server's state as plain data, for a checkpoint: every attribute but its setup (which a
        resumed run rebuilds from the same config); an attribute with a `state_dict` of its own (a server
        optimizer) gives that. Reading it has no side effect."""
        return {name: value.state_dict() if hasattr(value, "state_dict") else value
                for name, value in vars(self).items() if name != "method_setup"}

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
    """Trains on a client's data when asked, and evaluates with the adapter the method prescribes. (The
    untrained base is evaluated by the engine itself: no method needs to know about it.)"""

    def __init__(self, setup: MethodSetup):
        self.method_setup = setup
        self.options = with_defaults(self, setup.options)

    def setup(self, msg: Message, ctx: ClientContext) -> Message:
        return Message()

    def warm_cache(self, ctx: ClientContext) -> None:
        """Compute now what this client will later compute without the base model, through a workbench
        that can only give examples and embed them with an encoder (cached on disk): a cold run does it in a
        second process while the base model builds. Nothing by default."""

    def fit(self, msg: Message, ctx: ClientContext) -> Message:
        raise NotImplementedError

    def eval_adapter(self, msg: Message, ctx: ClientContext) -> Adapter:
        """The adapter this client evaluates with."""
        raise NotImplementedError

    def evaluate(self, msg: Message, ctx: ClientContext) -> Message:
        """Report on msg.config["split"] ("test": the client's own tasks; "general": every task)."""
        return Message(config=ctx.workbench.evaluate(self.eval_adapter(msg, ctx), msg.config.get("split", "test")))

    def adapters(self, ctx: ClientContext) -> dict[str, Adapter]:
        """The client-private adapters worth saving, by name."""
        return {}

    def upload_reference(self, msg: Message) -> dict[str, torch.Tensor]:
        """What each tensor of this client's upload is a change of (its server part's `upload_reference`,
        seen from the client: for clipping and noising its update itself, under local DP)."""
        return msg.arrays

    def diagnostics(self, ctx: ClientContext) -> dict | None:
        """What a simulation may show of this client's private state, for plots only (never sent in a
        federation): FedRouter gives {"vectors": (n, d) training embeddings, "tasks": [...], "clusters":
        [global cluster per example]}. None by default."""
        return None
