"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024).

Each round every selected client trains a fresh LoRA adapter of its own rank r_k; the server stacks them
along the rank (A_k rows scaled by p_k * alpha / r_k, B_k columns concatenated), so the stacked product is
exactly sum_k p_k * (alpha / r_k) * B_k A_k -- no cross terms, unlike averaging A and B separately.

Merged, not kept stacked: every client adds each round's stacked module to its base weights and starts
the next round from a fresh adapter, as the paper does. A stacked adapter kept across rounds would grow by
sum_k r_k ranks every round; the merged update is one dense matrix per adapted module. The download is
the stacked module itself (sum_k r_k ranks), so it grows with the number of clients per round. A client
gets every module it has not merged when it next trains or evaluates (`common.CatchUp`): a sampled-out
client catches up, and one whose round failed or was rejected gets that round's modules again (numbered:
it merges each once), so every client trains on the same base.

Per-client ranks come from the run's `lora.client_ranks` (e.g. [4, 8, 16]: client i trains rank
ranks[i % 3]); without them every client trains `lora.r`. No options of its own.
"""

from __future__ import annotations

from fedrouter.core import lowrank
from fedrouter.methods.base import ClientPart, Message, MethodFacts, ServerPart
from fedrouter.methods.common import CatchUp, client_rank, fit_reply, mean_fit_metrics, merge_new

OPTIONS: dict = {}


class Server(ServerPart):
    # stacked, not averaged (outside DP's mean); merged into the base weights, which a quantized base cannot hold
    FACTS = MethodFacts(adapters="a merged dense update", writes_base_weights=True, takes_client_ranks=True)

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.initial_shapes = {name: tuple(t.shape) for name, t in initial_adapter.items()}
        self.stacked = CatchUp()  # each aggregated round's stacked module, merged by every client once
        self.stacked_ranks: list[int] = []

    def configure_fit(self, round_idx, client_ids):
        return {cid: Message(arrays, {"round": round_idx, "rank": client_rank(self.method_setup, cid)})
                for cid, arrays in self.stacked.for_training(client_ids).items()}

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
        self.stacked.add(module)
        self.stacked.confirm(ids)
        self.stacked_ranks.append(lowrank.rank(module))
        return {**mean_fit_metrics(replies), "stacked_rank": self.stacked_ranks[-1]}

    def configure_evaluate(self, client_ids):
        return {cid: Message(arrays) for cid, arrays in self.stacked.for_evaluation(client_ids).items()}

    def tensor_files(self):
        """The model after the last round: base + this update (module name -> dense delta W)."""
        merged = self.stacked.merged()
        return {"merged_update.safetensors": {name: delta.float().contiguous() for name, delta in merged.items()}}

    def report(self, evaluations, truth=None):
        return {"flora": {"aggregation": "stacked per round, merged into the base",
                          "stacked_rank_per_round": self.stacked_ranks,
                          "client_ranks": {str(c): client_rank(self.method_setup, c) for c in self.client_ids}}}


class Client(ClientPart):
    def fit(self, msg, ctx):
        merged = merge_new(ctx, msg.arrays)
        wb = ctx.workbench
        r = msg.config["rank"] or wb.lora_rank()
        # a fresh adapter of this client's rank each round, trained on top of the merged update
        adapter, stats = wb.train(wb.initial_adapter(rank=r), msg.config["round"], base_update=merged)
        reply = fit_reply(adapter, stats, wb.n_train)
        reply.config["scaling"] = wb.lora_scaling(r)
        return reply

    def evaluate(self, msg, ctx):
        merged = merge_new(ctx, msg.arrays)
        return Message(config=ctx.workbench.evaluate(None, msg.config.get("split", "test"), base_update=merged))
