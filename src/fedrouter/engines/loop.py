"""The server's round loop, written once for every engine.

An engine supplies a `Transport`: something that delivers one message per client to the client parts
and brings back their replies. The loop knows nothing about how (a function call in-process, a Flower
Grid across machines); it counts the bytes each way and records per-round metrics.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Protocol

from fedrouter.methods.base import Message, ServerPart


class Transport(Protocol):
    def setup(self, messages: dict[int, Message]) -> dict[int, Message]: ...

    def fit(self, messages: dict[int, Message]) -> dict[int, Message]: ...

    def evaluate(self, messages: dict[int, Message]) -> dict[int, Message]: ...


class Traffic:
    """Bytes sent to clients (down) and received from them (up), over the whole run."""

    def __init__(self):
        self.down = 0
        self.up = 0

    def count(self, sent: dict[int, Message], received: dict[int, Message]) -> None:
        self.down += sum(m.nbytes() for m in sent.values())
        self.up += sum(m.nbytes() for m in received.values())


def sample_clients(client_ids: list[int], fraction: float, rng: random.Random) -> list[int]:
    """A sorted random subset of max(1, round(fraction * n)) clients; all of them when fraction is 1."""
    if fraction >= 1:
        return list(client_ids)
    k = max(1, round(fraction * len(client_ids)))
    return sorted(rng.sample(list(client_ids), k))


def run_setup(server: ServerPart, transport: Transport, traffic: Traffic, client_ids: list[int]) -> dict:
    """The method's one-time exchange before training, if it has one."""
    messages = server.configure_setup(client_ids)
    if not messages:
        return {}
    replies = transport.setup(messages)
    traffic.count(messages, replies)
    return server.aggregate_setup(replies)


def run_rounds(
    server: ServerPart,
    transport: Transport,
    traffic: Traffic,
    client_ids: list[int],
    rounds: int,
    client_fraction: float,
    seed: int,
    on_round: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run `rounds` training rounds; return (and pass to `on_round`) one metrics dict per round."""
    from tqdm import tqdm

    rng = random.Random(f"client-sampling:{seed}")
    history = []
    bar = tqdm(range(rounds), desc="rounds", unit="round", disable=None if progress else True)
    for round_idx in bar:
        start = time.perf_counter()
        selected = sample_clients(client_ids, client_fraction, rng)
        messages = server.configure_fit(round_idx, selected)
        replies = transport.fit(messages)
        traffic.count(messages, replies)
        metrics = server.aggregate_fit(round_idx, replies)
        record = {"round": round_idx + 1, **metrics, "bytes_down": traffic.down, "bytes_up": traffic.up,
                  "round_s": time.perf_counter() - start}
        history.append(record)
        bar.set_postfix(loss=f"{metrics.get('train_loss', float('nan')):.3f}")
        if on_round is not None:
            on_round(record)
    return history


def evaluate_clients(server: ServerPart, transport: Transport, traffic: Traffic, client_ids: list[int],
                     split: str, base: bool = False) -> dict[int, dict]:
    """Each client's evaluation report on `split` (its own "test" set, or the "general" all-task set)."""
    messages = server.configure_evaluate(client_ids) if not base else {cid: Message() for cid in client_ids}
    for msg in messages.values():
        msg.config.update({"split": split, "base": base})
    replies = transport.evaluate(messages)
    traffic.count(messages, replies)
    return {cid: reply.config for cid, reply in replies.items()}
