"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

A is frozen at an initialisation every client shares (the run's seeded LoRA init, which each client
derives itself); only B is trained, uploaded and averaged. With A common and fixed, the average of the
clients' B·A equals (average B)·A exactly, so averaging loses nothing.
"""

from __future__ import annotations

from fedrouter.core.aggregate import weighted_average
from fedrouter.methods.base import ClientPart, Message, ServerPart, fit_reply, mean_fit_metrics

TRAINED = ".lora_B."


def trained_part(adapter: dict) -> dict:
    return {k: v for k, v in adapter.items() if TRAINED in k}


def frozen_part(adapter: dict) -> dict:
    return {k: v for k, v in adapter.items() if TRAINED not in k}


class Server(ServerPart):
    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.frozen_a = frozen_part(initial_adapter)  # kept only to save full adapters; never sent
        self.global_b = trained_part(initial_adapter)

    def configure_fit(self, round_idx, client_ids):
        return {cid: Message(dict(self.global_b), {"round": round_idx}) for cid in client_ids}

    def aggregate_fit(self, round_idx, replies):
        self.global_b = weighted_average([r.arrays for r in replies.values()], [r.config["n_examples"] for r in replies.values()])
        return mean_fit_metrics(replies)

    def configure_evaluate(self, client_ids):
        return {cid: Message(dict(self.global_b)) for cid in client_ids}

    def adapters(self):
        return {"global": {**self.frozen_a, **self.global_b}}


class Client(ClientPart):
    def _adapter(self, global_b: dict, ctx) -> dict:
        return {**frozen_part(ctx.workbench.shared.initial_adapter), **global_b}

    def fit(self, msg, ctx):
        adapter, stats = ctx.workbench.train(self._adapter(msg.arrays, ctx), msg.config["round"], trainable="lora_B")
        return fit_reply(trained_part(adapter), stats, ctx.workbench.n_train)

    def eval_adapter(self, msg, ctx):
        return self._adapter(msg.arrays, ctx)
