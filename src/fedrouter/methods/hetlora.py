"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024).

Clients of different compute train LoRA adapters of different ranks around one global adapter:
1. distribution by truncation: the server keeps one global LoRA at rank R = max(lora.client_ranks) and sends
   client k the first r_k rank components (A[:r_k], B[:, :r_k]), r_k its current rank;
2. local rank self-pruning: the local loss carries `prune_reg` * sum over modules of ||B_tail A_tail||_F, the
   product of the tail ranks a prune would cut (r_k - floor(`decay` * r_k) of them); after training, when
   that tail's norm over the whole model is below `prune_threshold` times the kept ranks' norm, the client
   drops the tail and trains floor(decay * r_k) ranks from then on (never fewer than 1); the server, which
   tracks every client's rank, takes only the kept ranks of that upload;
3. sparsity-weighted aggregation: every upload is zero-padded to R and the global adapter becomes
   sum_k S_k / Z * padded_k, A and B alike, with S_k = ||B_k A_k||_F over the whole model and Z = sum_k S_k.

Without `lora.client_ranks` every client starts at `lora.r` (HetLoRA is then homogeneous LoRA with pruning
and norm weights: only self-pruning can make the ranks differ).

Where it departs from the paper, and why:
- the pruning decision: as we read the paper, a client prunes when its regularized tail norm has shrunk
  over its rounds; here it compares the tail with the kept ranks of the same adapter, a ratio that needs no
  norm remembered from an earlier round (the client keeps no state, and its first round has nothing to
  compare with) and does not depend on the round's learning rate;
- LoRA's scaling alpha / r differs per rank, which the paper does not discuss: the global adapter is kept
  at the scaling of rank R, and both factors are multiplied by sqrt(r_k / R) on the way down and by
  sqrt(R / r_k) on the way up, so the update a client starts from, (alpha / r_k) B_k A_k, is exactly the
  global update's truncation (alpha / R) B[:, :r_k] A[:r_k], and S_k is measured at the global scaling;
- the global adapter is evaluated (and saved, at rank R != lora.r) as its dense update alpha / R * B A: the
  shared model's serving slot holds rank lora.r only. At R == lora.r it is saved as a PEFT adapter too;
- before the first aggregation at R != lora.r the server holds no rank-R adapter (the run's initial adapter
  has rank lora.r): every client derives the same seeded rank-R initialisation, which is never sent.

A rank that no client of a round trained (a client sample with no rank-R client in it) comes out zero, as
the paper's zero-padding makes it. The weights are the uploads' own norms, not a plain mean, so
client-level DP does not cover the method.
"""

from __future__ import annotations

import math

from fedrouter.core import lowrank
from fedrouter.errors import FedrouterError
from fedrouter.methods.base import Adapter, ClientPart, Message, MethodFacts, ServerPart
from fedrouter.methods.common import client_rank, fit_reply, mean_fit_metrics, require

OPTIONS = {"prune_threshold": 0.1, "decay": 0.9, "prune_reg": 0.01}


def check_options(method: str, opts: dict) -> None:
    require(opts["prune_threshold"] >= 0, method, f"prune_threshold must be at least 0, got {opts['prune_threshold']!r}")
    require(0 < opts["decay"] < 1, method, f"decay must be in (0, 1), got {opts['decay']!r}")
    require(opts["prune_reg"] >= 0, method, f"prune_reg must be at least 0, got {opts['prune_reg']!r}")


def pruned_rank(r: int, decay: float) -> int:
    """The rank a client of rank r keeps when it prunes: floor(decay * r), at least one rank cut and one kept
    (so a rank-1 client cannot prune)."""
    return max(1, min(r - 1, math.floor(decay * r)))


def product_norm(adapter: Adapter) -> float:
    """||B A||_F over all modules at once."""
    return float(sum(n ** 2 for n in lowrank.product_norms({k: t.double() for k, t in adapter.items()}).values()) ** 0.5)


def should_prune(adapter: Adapter, keep: int, threshold: float) -> bool:
    """The tail beyond `keep` ranks is small next to the kept ranks (its product's norm below threshold times theirs)."""
    r = lowrank.rank(adapter)
    if keep >= r:
        return False
    head, tail = lowrank.rank_slice(adapter, 0, keep), lowrank.rank_slice(adapter, keep, r)
    return product_norm(tail) < threshold * product_norm(head)


def sparsity_weighted(uploads: list[Adapter], global_rank: int, average) -> tuple[Adapter, list[float]]:
    """The uploads zero-padded to `global_rank` and folded with weights S_k / sum S (S_k = ||B_k A_k||_F) by
    `average` (a weighted mean that normalizes its weights); equal weights if every product is zero."""
    norms = [product_norm(u) for u in uploads]
    weights = norms if sum(norms) > 0 else [1.0] * len(uploads)
    return average([lowrank.pad_rank(u, global_rank) for u in uploads], weights), [w / sum(weights) for w in weights]


def tail_penalty(live: dict, keep: int):
    """sum over modules of ||B[:, keep:] A[keep:]||_F on the live parameters: pushes the tail a prune would cut
    towards zero (differentiable; zero gradient at a zero product; r x r work per module at every step)."""
    return sum(lowrank.product_norms(lowrank.rank_slice(live, keep, lowrank.rank(live))).values())


class Server(ServerPart):
    # clients evaluate the global adapter as a dense update on the base, which a quantized base cannot hold
    FACTS = MethodFacts(adapters="1 global adapter at the largest client rank", takes_client_ranks=True,
                        writes_base_weights=True,
                        private_refusal="weights each upload by the norm of its own product B_k A_k, not by a plain "
                                        "mean, so one client's data sets its weight, which the accountant does not cover")

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.base_rank = base_rank = lowrank.rank(initial_adapter)
        self.initial_shapes = {name: tuple(t.shape) for name, t in initial_adapter.items()}
        self.global_rank = max(setup.client_ranks) if setup.client_ranks else base_rank
        # None until the first aggregation when R is not lora.r: the clients derive the seeded rank-R start
        self.global_adapter = dict(initial_adapter) if self.global_rank == base_rank else None
        self.ranks = {cid: client_rank(setup, cid) or base_rank for cid in self.client_ids}
        self.weights: dict[int, float] = {}  # the last aggregation's sparsity weights, for the report

    def _truncation(self, r: int) -> Adapter:
        """The global adapter's first r ranks at the scaling of rank r (nothing before the first aggregation
        at R != lora.r: the client starts from its own seeded copy of the same initialisation)."""
        if self.global_adapter is None:
            return {}
        return lowrank.scaled(lowrank.rank_slice(self.global_adapter, 0, r), math.sqrt(r / self.global_rank))

    def configure_fit(self, round_idx, client_ids):
        return {cid: Message(self._truncation(self.ranks[cid]),
                             {"round": round_idx, "rank": self.ranks[cid], "global_rank": self.global_rank})
                for cid in client_ids}

    def expected_upload(self, client_id, sent):
        """The client trains and uploads its current rank: A is (r_k, in), B is (out, r_k)."""
        return lowrank.shapes_at_rank(self.initial_shapes, sent.config["rank"])

    def aggregate_fit(self, round_idx, replies):
        ids = sorted(replies)
        uploads, pruned = [], 0
        for cid in ids:
            flag = replies[cid].config.get("pruned")
            if not isinstance(flag, bool):
                raise FedrouterError(f"client {cid} sent pruned {flag!r}: not true or false")
            r = lowrank.rank(replies[cid].arrays)
            kept = pruned_rank(r, self.options["decay"]) if flag else r
            pruned += kept < r
            self.ranks[cid] = kept
            # back at the global scaling, the pruned tail left out (it counts as zero after padding)
            uploads.append(lowrank.scaled(lowrank.rank_slice(replies[cid].arrays, 0, kept), math.sqrt(self.global_rank / r)))
        merged, weights = sparsity_weighted(uploads, self.global_rank, self.average)
        self.global_adapter = {k: t.to(uploads[0][k].dtype) for k, t in merged.items()}
        self.weights = dict(zip(ids, weights))
        return {**mean_fit_metrics(replies), "pruned": pruned,
                "mean_rank": sum(self.ranks[c] for c in ids) / len(ids)}

    def configure_evaluate(self, client_ids):
        arrays = dict(self.global_adapter) if self.global_adapter is not None else {}
        return {cid: Message(arrays, {"global_rank": self.global_rank}) for cid in client_ids}

    def adapters(self):
        # the shared model's serving slot holds rank lora.r only: another rank is saved as factors (tensor_files)
        if self.global_adapter is None or self.global_rank != self.base_rank:
            return {}
        return {"global": dict(self.global_adapter)}

    def tensor_files(self):
        if self.global_adapter is None or self.global_rank == self.base_rank:
            return {}
        return {"global_adapter.safetensors": {k: t.float().contiguous() for k, t in self.global_adapter.items()}}

    def report(self, evaluations, truth=None):
        return {"hetlora": {"global_rank": self.global_rank, "client_ranks": {str(c): r for c, r in sorted(self.ranks.items())},
                            "last_weights": {str(c): w for c, w in sorted(self.weights.items())}}}


class Client(ClientPart):
    def fit(self, msg, ctx):
        wb = ctx.workbench
        r, big = msg.config["rank"], msg.config["global_rank"]
        start = msg.arrays or lowrank.scaled(lowrank.rank_slice(wb.initial_adapter(rank=big), 0, r), math.sqrt(r / big))
        keep = pruned_rank(r, self.options["decay"])
        reg = self.options["prune_reg"]
        penalty = (lambda live: reg * tail_penalty(live, keep)) if reg > 0 and keep < r else None
        adapter, stats = wb.train(start, msg.config["round"], penalty=penalty)
        reply = fit_reply(adapter, stats, wb.n_train)
        # the whole trained rank goes up (its shape is what the server expects); the server drops a pruned tail
        reply.config["pruned"] = should_prune(adapter, keep, self.options["prune_threshold"])
        return reply

    def evaluate(self, msg, ctx):
        wb = ctx.workbench
        big = msg.config["global_rank"]
        adapter = msg.arrays or wb.initial_adapter(rank=big)
        update = lowrank.dense_update(adapter, wb.lora_scaling(big))
        return Message(config=wb.evaluate(None, msg.config.get("split", "test"), base_update=update))
