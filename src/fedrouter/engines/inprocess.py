"""The in-process engine: every client part runs in this process, against ONE shared base model.

Clients differ only in the adapter weights loaded before they work and in their private state dict, so
memory grows with adapters and data, not with the number of clients.
"""

from __future__ import annotations

from fedrouter.methods.base import ClientContext, ClientPart, Message


class InProcessTransport:
    def __init__(self, client_part: ClientPart, contexts: dict[int, ClientContext], progress: bool = True):
        self.client_part = client_part
        self.contexts = contexts
        self.progress = progress

    def _deliver(self, messages: dict[int, Message], handler, desc: str) -> dict[int, Message]:
        from tqdm import tqdm

        items = tqdm(messages.items(), desc=desc, leave=False, disable=None if self.progress else True)
        return {cid: handler(msg, self.contexts[cid]) for cid, msg in items}

    def setup(self, messages):
        return self._deliver(messages, self.client_part.setup, "clients setting up")

    def fit(self, messages):
        return self._deliver(messages, self.client_part.fit, "clients training")

    def evaluate(self, messages):
        return self._deliver(messages, self.client_part.evaluate, "clients evaluating")
