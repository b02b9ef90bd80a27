"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024).

FedAvg on LoRA: every round each selected client trains the global adapter on its data and uploads it;
the server replaces the global adapter with the example-weighted average of the uploaded A and B matrices.
"""

from __future__ import annotations

from fedrouter.core.aggregate import weighted_average
from fedrouter.methods.base import ClientPart, Message, ServerPart, fit_reply, mean_fit_metrics


class Server(ServerPart):
    """Sends the travelling part of the global adapter and replaces it by the clients' example-weighted
    average. FedIT: all of it; FedSA-LoRA and FFA-LoRA override `travelling` (A only, B only)."""

    def travelling(self, adapter: dict) -> dict:
        return adapter

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.initial_adapter = initial_adapter
        self.global_adapter = self.travelling(initial_adapter)

    def configure_fit(self, round_idx, client_ids):
        return {cid: Message(dict(self.global_adapter), {"round": round_idx}) for cid in client_ids}

    def aggregate_fit(self, round_idx, replies):
        self.global_adapter = weighted_average(
            [r.arrays for r in replies.values()], [r.config["n_examples"] for r in replies.values()]
        )
        return mean_fit_metrics(replies)

    def configure_evaluate(self, client_ids):
        return {cid: Message(dict(self.global_adapter)) for cid in client_ids}

    def adapters(self):
        # what never travels stays at the run's initialisation (FFA's frozen A)
        return {"global": {**self.initial_adapter, **self.global_adapter}}


class Client(ClientPart):
    def fit(self, msg, ctx):
        adapter, stats = ctx.workbench.train(msg.arrays, msg.config["round"])
        return fit_reply(adapter, stats, ctx.workbench.n_train)

    def eval_adapter(self, msg, ctx):
        return msg.arrays
