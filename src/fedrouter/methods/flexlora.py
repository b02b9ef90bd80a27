"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024, arXiv 2402.11505).

Clients of different compute train LoRA adapters of different ranks r_k (`lora.client_ranks`; without it
every client trains `lora.r`). Each round the server forms every upload's full-size product
dW_k = s_k B_k A_k (s_k = alpha / r_k, the client's LoRA scaling), averages them weighted by the clients'
example counts (the paper weights by data size) into the global update dW = sum_k p_k dW_k, and gives each
client selected next the rank-r_k truncated SVD of dW to train from: with dW = U S V^T, s_k B A = U_r S_r V_r^T,
the best rank-r_k approximation (Eckart-Young). The global model -- what every client evaluates and what the
run saves (`merged_update.safetensors`) -- is base + dW in full, the paper's full-size global LoRA weight:
no client's rank limits it; only what a client trains from is truncated.

Where this departs from the paper, and why:
- The server keeps dW as the round's uploads stacked along the rank (FLoRA's stacking, `lowrank.stack`:
  B_stack A_stack = dW exactly) rather than as a dense matrix, and truncates it through QR of those factors
  (`lowrank.svd_factors`): the same truncation as the SVD of the dense matrix, at a cost that grows with
  sum_k r_k instead of out x in. Clients evaluate here, not the server, so an evaluation message carries
  that stacked module (sum_k r_k ranks of the last round's clients) and the client forms dW from it.
- The product is all the method fixes; the split of S between the factors is ours: S^1/2 on each side
  (B = U_r S_r^1/2, A = S_r^1/2 V_r^T, divided by s_k), so both factors start with the same singular values
  and LoRA's two gradients (G A^T for B, B^T G for A) start on the same scale.
- Factors travel in unit scale, (sqrt(s_k) B, sqrt(s_k) A), whose product is the client's dense update
  itself: the client converts to and from its own scaling, so the server needs neither alpha nor a scaling
  the client reports.
- Before the first aggregation dW = 0, whose factors are zero and could never train (both LoRA gradients
  vanish at A = B = 0): a client starts from the run's initial adapter of its rank (random A, B = 0), which
  every client derives from the seed, so nothing is sent. Likewise, where dW has rank below r_k (only a few
  low-rank clients took part), the missing rows of A are the initial adapter's and B's columns stay zero:
  the product is unchanged and those directions can still learn, as a fresh LoRA's do.

Not under DP: the server folds the products s_k B_k A_k, not the uploads themselves, and clipping the
uploaded factors does not bound one client's change to the mean of products by the clip, so DP-FedAvg's noise
would not cover it. No options of its own.
"""

from __future__ import annotations

import math

import torch

from fedrouter.core import lowrank
from fedrouter.methods.base import Adapter, ClientPart, Message, MethodFacts, ServerPart
from fedrouter.methods.common import client_rank, fit_reply, mean_fit_metrics

OPTIONS: dict = {}


def revive(adapter: Adapter, initial: Adapter) -> Adapter:
    """`adapter` with each rank direction that is zero in both A (its row) and B (its column) given the
    initial adapter's row of A: B's column stays zero, so B @ A is unchanged, but the direction trains."""
    out = dict(adapter)
    for m in lowrank.modules(adapter):
        a, b = adapter[m + lowrank.A_SUFFIX], adapter[m + lowrank.B_SUFFIX]
        dead = (a == 0).all(dim=1) & (b == 0).all(dim=0)
        if bool(dead.any()):
            out[m + lowrank.A_SUFFIX] = torch.where(dead[:, None], initial[m + lowrank.A_SUFFIX].to(a.dtype), a)
    return out


class Server(ServerPart):
    FACTS = MethodFacts(adapters="a dense global update", writes_base_weights=True, takes_client_ranks=True,
                        private_refusal="averages the products B_k A_k of its uploads, not the uploads, so clipping "
                                        "them does not bound a client's effect on the mean that DP-FedAvg's noise assumes")

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.initial_shapes = {name: tuple(t.shape) for name, t in initial_adapter.items()}
        self.default_rank = lowrank.rank(initial_adapter)  # lora.r: what a client without a rank of its own trains
        self.stacked: Adapter = {}  # the global update dW as unit-scale stacked factors; {} before the first round
        self.stacked_ranks: list[int] = []

    def rank_of(self, client_id: int) -> int:
        return client_rank(self.method_setup, client_id) or self.default_rank

    def configure_fit(self, round_idx, client_ids):
        ranks = {cid: self.rank_of(cid) for cid in client_ids}
        # one truncation at the largest rank asked for: a lower rank's factors are its leading columns / rows
        top = lowrank.truncated(self.stacked, max(ranks.values())) if self.stacked and ranks else {}
        return {cid: Message(self.factors(top, r), {"round": round_idx, "rank": r}) for cid, r in ranks.items()}

    @staticmethod
    def factors(top: Adapter, r: int) -> Adapter:
        """The rank-r factors of dW from its truncation `top` at a rank of at least r."""
        return {name: (t[:r] if name.endswith(lowrank.A_SUFFIX) else t[:, :r]).contiguous() for name, t in top.items()}

    def expected_upload(self, client_id, sent):
        """The client's factors at its own rank: A is (r_k, in), B is (out, r_k)."""
        return lowrank.shapes_at_rank(self.initial_shapes, sent.config["rank"])

    def aggregate_fit(self, round_idx, replies):
        ids = sorted(replies)
        # unit-scale uploads: stacking with scaling 1 gives sum_k p_k s_k B_k A_k, the example-weighted mean
        self.stacked = lowrank.stack([replies[c].arrays for c in ids], [replies[c].config["n_examples"] for c in ids],
                                     [1.0] * len(ids))
        self.stacked_ranks.append(lowrank.rank(self.stacked))
        return {**mean_fit_metrics(replies), "stacked_rank": self.stacked_ranks[-1]}

    def configure_evaluate(self, client_ids):
        return {cid: Message(dict(self.stacked)) for cid in client_ids}

    def global_update(self) -> dict[str, torch.Tensor]:
        """dW, module by module (float64); {} before the first round."""
        return lowrank.dense_update(self.stacked, 1.0) if self.stacked else {}

    def tensor_files(self):
        """The model after the last round: base + this update (module name -> dense dW)."""
        return {"merged_update.safetensors": {m: d.float().contiguous() for m, d in self.global_update().items()}}

    def report(self, evaluations, truth=None):
        ranks = {str(c): self.rank_of(c) for c in self.client_ids}
        kept = {}
        if self.stacked:
            # the share of dW's squared Frobenius norm, over all modules, that each client rank's truncation keeps
            spectra = [lowrank.svd_factors(self.stacked[m + lowrank.B_SUFFIX], self.stacked[m + lowrank.A_SUFFIX], 1)[2]
                       for m in lowrank.modules(self.stacked)]
            total = sum(float((s**2).sum()) for s in spectra)
            kept = {str(r): sum(float((s[:r] ** 2).sum()) for s in spectra) / total if total > 0 else 1.0
                    for r in sorted(set(ranks.values()))}
        return {"flexlora": {"aggregation": "mean of full-size products, truncated by SVD to each client's rank",
                             "client_ranks": ranks, "stacked_rank_per_round": self.stacked_ranks,
                             "energy_kept_by_rank": kept}}


class Client(ClientPart):
    def fit(self, msg, ctx):
        wb = ctx.workbench
        r = msg.config["rank"] or wb.lora_rank()
        initial = wb.initial_adapter(rank=r)
        root = math.sqrt(wb.lora_scaling(r))
        start = revive(lowrank.scaled(msg.arrays, 1 / root), initial) if msg.arrays else initial
        adapter, stats = wb.train(start, msg.config["round"])
        return fit_reply(lowrank.scaled(adapter, root), stats, wb.n_train)

    def evaluate(self, msg, ctx):
        update = lowrank.dense_update(msg.arrays, 1.0) if msg.arrays else None
        return Message(config=ctx.workbench.evaluate(None, msg.config.get("split", "test"), base_update=update))
