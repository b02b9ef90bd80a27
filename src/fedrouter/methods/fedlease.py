"""FedLEASE (Wang et al., "FedLEASE: Adaptive LoRA Experts Allocation and Selection for Federated
Fine-Tuning", NeurIPS 2025).

Warm-up: every client trains its own LoRA adapter, nothing averaged. At the end of the warm-up the
clients upload their adapters and the server clusters them by the similarity of their LoRA B matrices
(per module 1 - cosine of the flattened B, averaged over modules; agglomerative, average linkage), with
the number of clusters chosen by the best silhouette score over 2..max_clusters. One expert adapter per
cluster starts as its members' average; from then on each client trains its cluster's expert and the
server averages each expert over its cluster.

Serving: each client is served by its own cluster's expert, the most similar one. The paper's adaptive
top-M router, which can mix in other experts per token, is not implemented (M = 1).

Options: warmup_rounds (5; clamped to the run's rounds), max_clusters (4).
"""

from __future__ import annotations

import numpy as np

from fedrouter.core import lowrank
from fedrouter.core.client_clusters import agglomerative_auto, cosine_distance_matrix
from fedrouter.methods.base import ClientPart, Message, MethodFacts
from fedrouter.methods.clustered import ClusteredServer
from fedrouter.methods.common import InitialOnce, fit_reply, mean_fit_metrics, own_adapter, require

OPTIONS = {"warmup_rounds": 5, "max_clusters": 4}


def check_options(method: str, opts: dict) -> None:
    require(opts["warmup_rounds"] >= 1 and opts["max_clusters"] >= 2, method, "warmup_rounds must be >= 1 and max_clusters >= 2")


def b_distance(adapters: list[dict]) -> np.ndarray:
    """Clients' pairwise distance: 1 - cos of each module's flattened B, averaged over the modules."""
    names = lowrank.modules(adapters[0])
    blocks = [np.stack([a[m + lowrank.B_SUFFIX].double().flatten().numpy() for a in adapters]) for m in names]
    return cosine_distance_matrix(blocks)


class Server(ClusteredServer):
    # its clients' warm-up adapters are clustered as they are, a release outside DP's mean
    FACTS = MethodFacts(adapters="up to {max_clusters} experts")

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.warmup = min(self.options["warmup_rounds"], setup.rounds)
        self.initial_shapes = {n: tuple(t.shape) for n, t in initial_adapter.items()}
        self.initial = InitialOnce(initial_adapter)
        self.silhouette: dict[int, float] = {}

    def configure_fit(self, round_idx, client_ids):
        if round_idx >= self.warmup:
            return self.clustered_messages(client_ids, {"round": round_idx})
        # warm-up: the initial adapter once, then the client continues its own
        config = {"round": round_idx, "warmup": True, "upload": round_idx + 1 == self.warmup}
        return {cid: Message(self.initial.arrays_for(cid), dict(config)) for cid in client_ids}

    def expected_upload(self, client_id, sent):
        if sent.config.get("warmup"):  # warm-up: the client's own adapter, and only at the last round
            return dict(self.initial_shapes) if sent.config["upload"] else {}
        return super().expected_upload(client_id, sent)

    def aggregate_fit(self, round_idx, replies):
        metrics = mean_fit_metrics(replies)
        if round_idx >= self.warmup:
            self.average_clusters(replies)
        elif round_idx + 1 == self.warmup:
            ids = sorted(replies)
            k, labels, self.silhouette = agglomerative_auto(b_distance([replies[c].arrays for c in ids]),
                                                            range(2, self.options["max_clusters"] + 1))
            self.group({c: replies[c].arrays for c in ids}, {c: replies[c].config["n_examples"] for c in ids},
                       {c: int(label) for c, label in zip(ids, labels)})
            metrics["n_clusters"] = k
        return metrics

    def configure_evaluate(self, client_ids):
        if not self.cluster_adapters:  # still warming up: each client evaluates its own adapter
            return {cid: Message() for cid in client_ids}
        return super().configure_evaluate(client_ids)

    def report(self, evaluations, truth=None):
        return {**super().report(evaluations), "warmup_rounds": self.warmup,
                "silhouette": {str(k): v for k, v in self.silhouette.items()}}


class Client(ClientPart):
    def fit(self, msg, ctx):
        if msg.config.get("warmup"):
            ctx.state["warmup"], stats = ctx.workbench.train(own_adapter(ctx, "warmup", msg), msg.config["round"])
            return fit_reply(ctx.state["warmup"] if msg.config["upload"] else None, stats, ctx.workbench.n_train)
        adapter, stats = ctx.workbench.train(msg.arrays, msg.config["round"])
        return fit_reply(adapter, stats, ctx.workbench.n_train)

    def eval_adapter(self, msg, ctx):
        return msg.arrays or ctx.state.get("warmup") or ctx.workbench.initial_adapter()
