"""The in-process engine: every client part runs in this process, against ONE shared base model.

Clients differ only in the adapter weights loaded before they work and in their private state dict, so
memory grows with adapters and data, not with the number of clients.
"""

from __future__ import annotations

import random
import time

from fedrouter.core.train import ClientTimeout, time_budget
from fedrouter.methods.base import ClientContext, ClientPart, Message, failure_reply


class InjectedFailure(RuntimeError):
    """A client crash simulated by `inject_failures` (raised before the client does anything)."""


class InProcessTransport:
    """Delivers messages by calling the client part. In training, a client that raises is reported as
    a failed reply (the round goes on with the others); `inject_failures` = p makes each client fail a
    round with probability p (seeded), to exercise that path; a client whose training runs past
    `client_timeout_s` is cut off at its next training step (or, if the time went elsewhere, its reply
    is treated as arriving too late); its update is dropped and what it did to its own state stays, as
    on a real slow machine."""

    def __init__(self, client_part: ClientPart, contexts: dict[int, ClientContext], progress: bool = True,
                 inject_failures: float = 0.0, seed: int = 0, client_timeout_s: float | None = None):
        self.client_part = client_part
        self.contexts = contexts
        self.progress = progress
        self.inject_failures = inject_failures
        self.failure_rng = random.Random(f"inject-failures:{seed}")
        self.client_timeout_s = client_timeout_s

    def _deliver(self, messages: dict[int, Message], handler, desc: str) -> dict[int, Message]:
        from tqdm import tqdm

        items = tqdm(messages.items(), desc=desc, leave=False, disable=None if self.progress else True)
        return {cid: handler(msg, self.contexts[cid]) for cid, msg in items}

    def setup(self, messages):
        return self._deliver(messages, self.client_part.setup, "clients setting up")

    def _fit_one(self, msg: Message, ctx: ClientContext) -> Message:
        try:
            if self.inject_failures and self.failure_rng.random() < self.inject_failures:
                raise InjectedFailure("injected failure")
            start = time.perf_counter()
            with time_budget(self.client_timeout_s):  # training steps past the budget are cut off
                reply = self.client_part.fit(msg, ctx)
            took = time.perf_counter() - start
            if self.client_timeout_s is not None and took > self.client_timeout_s:
                raise ClientTimeout(f"took {took:.1f} s, over the {self.client_timeout_s:g} s budget")
            return reply
        except Exception as exc:  # a failing client is this round's loss, not the run's
            return failure_reply(exc)

    def fit(self, messages):
        return self._deliver(messages, self._fit_one, "clients training")

    def evaluate(self, messages):
        return self._deliver(messages, self.client_part.evaluate, "clients evaluating")
