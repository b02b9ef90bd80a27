"""Local: every client fine-tunes its own adapter on its own data; nothing is shared.

The reference point of personalization: no communication of weights, no help from other clients.
"""

from __future__ import annotations

from fedrouter.methods.base import ClientPart, Message, ServerPart, fit_reply, mean_fit_metrics


class Server(ServerPart):
    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        # Clients start from the run's shared initialisation, sent once with their first task.
        self.initial_adapter = initial_adapter
        self._started: set[int] = set()

    def configure_fit(self, round_idx, client_ids):
        out = {}
        for cid in client_ids:
            arrays = {} if cid in self._started else dict(self.initial_adapter)
            self._started.add(cid)
            out[cid] = Message(arrays, {"round": round_idx})
        return out

    def expected_upload(self, client_id, sent):
        return {}  # nothing leaves a Local client

    def aggregate_fit(self, round_idx, replies):
        return mean_fit_metrics(replies)


class Client(ClientPart):
    def fit(self, msg, ctx):
        # The server sends the initialisation once; a client that failed that round gets nothing later,
        # and starts from the same shared initialisation it holds anyway.
        start = ctx.state.get("adapter") or msg.arrays or ctx.workbench.shared.initial_adapter
        ctx.state["adapter"], stats = ctx.workbench.train(start, msg.config["round"])
        return fit_reply(None, stats, ctx.workbench.n_train)

    def eval_adapter(self, msg, ctx):
        # A client never selected for training evaluates the untrained initialisation (LoRA B = 0).
        return ctx.state.get("adapter") or ctx.workbench.shared.initial_adapter

    def adapters(self, ctx):
        return {"local": ctx.state["adapter"]} if "adapter" in ctx.state else {}
