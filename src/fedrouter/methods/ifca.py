"""IFCA (Ghosh et al., "An Efficient Framework for Clustered Federated Learning", NeurIPS 2020), on LoRA.

The server keeps K cluster adapters and sends all K to every selected client. The client picks the one
with the lowest loss on its local training data, trains it, and uploads it with its choice; the server
averages each cluster's uploads (weighted by examples). A client is evaluated with its lowest-loss cluster.

The K adapters start different, as IFCA's K models do: cluster k's A is seeded per cluster (cluster 0
keeps the run's initialisation) and its B is N(0, init_std^2) instead of LoRA's zeros; with all B at
zero the K adapters would be the same function and every client would pick cluster 0.

Options: k (4), init_std (0.01), loss_examples (32: the local examples the choice is scored on).
"""

from __future__ import annotations

import math

import torch

from fedrouter.core.aggregate import average_per_cluster
from fedrouter.errors import FedrouterError
from fedrouter.methods.base import ClientPart, Message, MethodFacts, ServerPart
from fedrouter.methods.common import fit_reply, mean_fit_metrics, pack, require, unpack

OPTIONS = {"k": 4, "init_std": 0.01, "loss_examples": 32}


def check_options(method: str, opts: dict) -> None:
    require(opts["k"] >= 1 and opts["init_std"] >= 0 and opts["loss_examples"] >= 1, method,
            "k and loss_examples must be positive integers and init_std non-negative")


def initial_clusters(initial_adapter: dict, k: int, init_std: float, seed: int) -> dict[int, dict]:
    """K distinct starting adapters (see the module docstring)."""
    out = {}
    for cluster in range(k):
        g = torch.Generator().manual_seed(seed * 7_919 + cluster)
        adapter = {}
        for name, t in initial_adapter.items():
            if ".lora_A." in name:
                bound = 1 / math.sqrt(t.shape[1])  # the scale of peft's default (Kaiming-uniform) A
                adapter[name] = t.clone() if cluster == 0 else (torch.rand(t.shape, generator=g) * 2 - 1) * bound
            else:
                adapter[name] = torch.randn(t.shape, generator=g) * init_std
        out[cluster] = adapter
    return out


def lowest_loss(losses: dict[int, float]) -> int:
    """The cluster with the lowest loss (ties: the lowest id)."""
    return min(losses, key=lambda k: (losses[k], k))


class Server(ServerPart):
    # each client picks its cluster by its loss on its own data: a choice outside DP's mean
    FACTS = MethodFacts(adapters="{k} cluster adapters")

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.clusters = initial_clusters(initial_adapter, self.options["k"], self.options["init_std"], setup.seed)
        self.choice: dict[int, int] = {}

    def configure_fit(self, round_idx, client_ids):
        return {cid: Message(pack(self.clusters), {"round": round_idx}) for cid in client_ids}

    def expected_upload(self, client_id, sent):
        return {name: tuple(t.shape) for name, t in self.clusters[0].items()}  # the one cluster it trained

    def aggregate_fit(self, round_idx, replies):
        choice = {cid: r.config["cluster"] for cid, r in replies.items()}
        if any(not 0 <= k < len(self.clusters) for k in choice.values()):
            raise FedrouterError(f"ifca: a client chose a cluster outside 0..{len(self.clusters) - 1}")
        self.choice.update(choice)
        states = {cid: r.arrays for cid, r in replies.items()}
        self.clusters.update(average_per_cluster(states, {c: r.config["n_examples"] for c, r in replies.items()}, choice))
        metrics = mean_fit_metrics(replies)
        metrics["cluster_sizes"] = [sum(k == c for c in choice.values()) for k in range(len(self.clusters))]
        return metrics

    def configure_evaluate(self, client_ids):
        return {cid: Message(pack(self.clusters)) for cid in client_ids}

    def adapters(self):
        return {f"cluster{k}": a for k, a in self.clusters.items()}

    def report(self, evaluations, truth=None):
        return {"client_clusters": {str(cid): k for cid, k in sorted(self.choice.items())}}


class Client(ClientPart):
    def choose(self, clusters: dict[int, dict], ctx) -> tuple[int, dict[int, float]]:
        losses = {k: ctx.workbench.loss(a, self.options["loss_examples"]) for k, a in clusters.items()}
        return lowest_loss(losses), losses

    def fit(self, msg, ctx):
        clusters = unpack(msg.arrays)
        k, losses = self.choose(clusters, ctx)
        adapter, stats = ctx.workbench.train(clusters[k], msg.config["round"])
        reply = fit_reply(adapter, stats, ctx.workbench.n_train)
        reply.config.update({"cluster": k, "cluster_losses": [losses[j] for j in sorted(losses)]})
        return reply

    def eval_adapter(self, msg, ctx):
        clusters = unpack(msg.arrays)
        return clusters[self.choose(clusters, ctx)[0]]
