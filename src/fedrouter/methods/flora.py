"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024).

Each round every selected client trains a fresh LoRA adapter of its own rank r_k; the server stacks them
along the rank (A_k rows scaled by p_k * alpha / r_k, B_k columns concatenated), so the stacked product is
exactly sum_k p_k * (alpha / r_k) * B_k A_k -- no cross terms, unlike averaging A and B separately.

Merged, not kept stacked: every client adds each round's stacked module to its base weights and starts
the next round from a fresh adapter, as the paper does. A stacked adapter kept across rounds would grow by
sum_k r_k ranks every round; the merged update is one dense matrix per adapted module. The download is
the stacked module itself (sum_k r_k ranks), so it grows with the number of clients per round.

Per-client ranks come from the run's `lora.client_ranks` (e.g. [4, 8, 16]: client i trains rank
ranks[i % 3]); without them every client trains `lora.r`. No options of its own.
"""

from __future__ import annotations

from fedrouter.core import lowrank
from fedrouter.methods.base import ClientPart, Message, MethodFacts, ServerPart
from fedrouter.methods.common import client_rank, fit_reply, mean_fit_metrics, pack, unpack

OPTIONS: dict = {}


class Server(ServerPart):
    # stacked, not averaged (outside DP's mean); merged into the base weights, which a quantized base cannot hold
    FACTS = MethodFacts(adapters="a merged dense update", writes_base_weights=True, takes_client_ranks=True)

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.initial_shapes = {name: tuple(t.shape) for name, t in initial_adapter.items()}
        self.stacked: dict[int, dict] = {}    # round -> that round's stacked module
        self.seen: dict[int, int] = {}        # client -> rounds of stacked modules it already merged
        self.stacked_ranks: list[int] = []

    def _unseen(self, cid: int) -> dict:
        """The stacked modules this client has not merged yet (all of them for a client new to the run)."""
        start = self.seen.get(cid, 0)
        self.seen[cid] = len(self.stacked)
        return pack({t: m for t, m in self.stacked.items() if t >= start})

    def configure_fit(self, round_idx, client_ids):
        return {cid: Message(self._unseen(cid), {"round": round_idx, "rank": client_rank(self.method_setup, cid)})
                for cid in client_ids}

    def expected_upload(self, client_id, sent):
        """A fresh adapter of the client's rank: A is (r, in), B is (out, r)."""
        r = sent.config["rank"]
        if r is None:
            return dict(self.initial_shapes)
        return lowrank.shapes_at_rank(self.initial_shapes, r)

    def aggregate_fit(self, round_idx, replies):
        ids = sorted(replies)
        module = lowrank.stack([replies[c].arrays for c in ids], [replies[c].config["n_examples"] for c in ids],
                               [replies[c].config["scaling"] for c in ids])
        self.stacked[len(self.stacked)] = module
        self.stacked_ranks.append(lowrank.rank(module))
        return {**mean_fit_metrics(replies), "stacked_rank": self.stacked_ranks[-1]}

    def configure_evaluate(self, client_ids):
        return {cid: Message(self._unseen(cid)) for cid in client_ids}

    def tensor_files(self):
        """The model after the last round: base + this update (module name -> dense delta W)."""
        merged = lowrank.add_updates(*(lowrank.dense_update(m, 1.0) for _, m in sorted(self.stacked.items())))
        return {"merged_update.safetensors": {name: delta.float().contiguous() for name, delta in merged.items()}}

    def report(self, evaluations, truth=None):
        return {"flora": {"aggregation": "stacked per round, merged into the base",
                          "stacked_rank_per_round": self.stacked_ranks,
                          "client_ranks": {str(c): client_rank(self.method_setup, c) for c in self.client_ids}}}


class Client(ClientPart):
    def _merge(self, msg, ctx) -> dict:
        """Add the newly received stacked modules (scaling folded into A already) to this client's base."""
        updates = [lowrank.dense_update(m, 1.0) for _, m in sorted(unpack(msg.arrays).items())]
        ctx.state["merged"] = lowrank.add_updates(ctx.state.get("merged", {}), *updates)
        return ctx.state["merged"]

    def fit(self, msg, ctx):
        merged = self._merge(msg, ctx)
        wb = ctx.workbench
        r = msg.config["rank"] or wb.lora_rank()
        # a fresh adapter of this client's rank each round, trained on top of the merged update
        adapter, stats = wb.train(wb.initial_adapter(rank=r), msg.config["round"], base_update=merged)
        reply = fit_reply(adapter, stats, wb.n_train)
        reply.config["scaling"] = wb.lora_scaling(r)
        return reply

    def evaluate(self, msg, ctx):
        merged = self._merge(msg, ctx)
        return Message(config=ctx.workbench.evaluate(None, msg.config.get("split", "test"), base_update=merged))
