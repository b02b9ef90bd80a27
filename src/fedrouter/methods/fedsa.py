"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025).

A matrices carry what clients share and are averaged across clients (weighted by examples); B matrices
carry what is client-specific and never leave the client (client-private state). Upload: A only.
"""

from __future__ import annotations

from fedrouter.core.aggregate import weighted_average
from fedrouter.methods.base import ClientPart, Message, ServerPart, fit_reply, mean_fit_metrics

SHARED = ".lora_A."


def shared_part(adapter: dict) -> dict:
    return {k: v for k, v in adapter.items() if SHARED in k}


def private_part(adapter: dict) -> dict:
    return {k: v for k, v in adapter.items() if SHARED not in k}


class Server(ServerPart):
    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.global_a = shared_part(initial_adapter)

    def configure_fit(self, round_idx, client_ids):
        return {cid: Message(dict(self.global_a), {"round": round_idx}) for cid in client_ids}

    def aggregate_fit(self, round_idx, replies):
        self.global_a = weighted_average([r.arrays for r in replies.values()], [r.config["n_examples"] for r in replies.values()])
        return mean_fit_metrics(replies)

    def configure_evaluate(self, client_ids):
        return {cid: Message(dict(self.global_a)) for cid in client_ids}


class Client(ClientPart):
    def _adapter(self, global_a: dict, ctx) -> dict:
        # B starts from the run's initialisation (zeros) and then stays the client's own.
        private = ctx.state.get("B") or private_part(ctx.workbench.shared.initial_adapter)
        return {**global_a, **private}

    def fit(self, msg, ctx):
        adapter, stats = ctx.workbench.train(self._adapter(msg.arrays, ctx), msg.config["round"])
        ctx.state["B"] = private_part(adapter)
        return fit_reply(shared_part(adapter), stats, ctx.workbench.n_train)

    def eval_adapter(self, msg, ctx):
        return self._adapter(msg.arrays, ctx)

    def adapters(self, ctx):
        return {}  # a client's full adapter needs the final global A: evaluation assembles it
