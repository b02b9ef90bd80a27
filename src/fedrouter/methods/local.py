"""Local: every client fine-tunes its own adapter on its own data; nothing is shared.

The reference point of personalization: no communication of weights, no help from other clients.
"""

from __future__ import annotations

from fedrouter.methods.base import ClientPart, Message, MethodFacts, ServerPart
from fedrouter.methods.common import InitialOnce, fit_reply, mean_fit_metrics, own_adapter

OPTIONS: dict = {}


class Server(ServerPart):
    FACTS = MethodFacts(adapters="{n_clients} private adapters")  # nothing shared: nothing for DP to fold

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        # Clients start from the run's shared initialisation, sent once with their first task.
        self.initial = InitialOnce(initial_adapter)

    def configure_fit(self, round_idx, client_ids):
        return {cid: Message(self.initial.arrays_for(cid), {"round": round_idx}) for cid in client_ids}

    def expected_upload(self, client_id, sent):
        return {}  # nothing leaves a Local client

    def aggregate_fit(self, round_idx, replies):
        return mean_fit_metrics(replies)


class Client(ClientPart):
    def fit(self, msg, ctx):
        ctx.state["adapter"], stats = ctx.workbench.train(own_adapter(ctx, "adapter", msg), msg.config["round"])
        return fit_reply(None, stats, ctx.workbench.n_train)

    def eval_adapter(self, msg, ctx):
        # A client never selected for training evaluates the untrained initialisation (LoRA B = 0).
        return ctx.state.get("adapter") or ctx.workbench.initial_adapter()

    def adapters(self, ctx):
        return {"local": ctx.state["adapter"]} if "adapter" in ctx.state else {}
