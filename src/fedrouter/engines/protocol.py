"""What an engine provides, declared once: the `Transport` the round loop talks through, and the
`ClientSide` the driver runs a whole run against (the in-process engine's, or the Flower engine's).

Also here: the two things every engine does the same way -- turn a client that raised into a failed
reply (`failure_reply`), and decide which clients fail a round when failures are injected for testing
(`FailurePlan`, so both engines fail the same clients in the same rounds).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Protocol

from fedrouter.methods.base import Message


class Transport(Protocol):
    """Delivers one message per client to the client parts and brings back their replies.

    `evaluate` answers a message whose config has `base: true` itself, with the untrained base model on
    the message's split: no method needs to know about the base evaluation."""

    def setup(self, messages: dict[int, Message]) -> dict[int, Message]: ...

    def fit(self, messages: dict[int, Message]) -> dict[int, Message]: ...

    def evaluate(self, messages: dict[int, Message]) -> dict[int, Message]: ...


class ClientSide(Protocol):
    """The clients of a run as an engine holds them; the driver sees nothing else of the engine."""

    engine: str  # "inprocess" or "flower", for results.json
    transport: Transport
    ids: list[int]

    def info(self) -> dict[int, dict]:
        """Each client's tasks and number of training examples (for the per-client table)."""

    def save_adapters(self, run_dir: Path, shared) -> list[str]:
        """The clients' private adapters, saved where the engine keeps them; their names."""

    def embedding_map(self, seed: int) -> list[dict] | None:
        """Points of a 2-D map of the clients' training embeddings, where the engine may see them."""

    def training_truth(self) -> dict[int, dict] | None:
        """Per client, its training examples' true tasks and assigned clusters, where the engine holds the
        data (a simulation) and the method clusters; None where labels must not travel (a deployment)."""

    def mark_checkpoint(self) -> None:
        """A server checkpoint is being taken now (the Flower nodes keep what resuming to it needs)."""

    def state(self) -> dict:
        """What a checkpoint needs of the client side (plain data; reading it changes nothing)."""

    def restore(self, saved: dict) -> None:
        """Back to where a checkpoint found the clients."""


def failure_reply(exc: BaseException) -> Message:
    """What an engine hands the server for a client that raised instead of replying."""
    return Message(config={"failed": f"{type(exc).__name__}: {exc}"})


class InjectedFailure(RuntimeError):
    """A client crash simulated by `inject_failures` (raised before the client does anything)."""


class FailurePlan:
    """Which clients fail a round under `inject_failures` = p: one seeded draw per client message, in the
    order the messages go out -- the same draws on every engine, and in a checkpoint (`state`)."""

    def __init__(self, probability: float, seed: int):
        self.probability = probability
        self.rng = random.Random(f"inject-failures:{seed}")

    def fails(self) -> bool:
        return bool(self.probability) and self.rng.random() < self.probability

    def state(self):
        return self.rng.getstate()

    def restore(self, state) -> None:
        self.rng.setstate(state)
