"""Per-cluster FedAvg once the clients are grouped: the shared second phase of FedCluster and FedLEASE.

The server holds one adapter per group; a client trains and is evaluated with its group's adapter, and
each group's adapter becomes the example-weighted average of its members' uploads.
"""

from __future__ import annotations

from fedrouter.core.aggregate import average_per_cluster
from fedrouter.methods.base import Message, ServerPart


class ClusteredServer(ServerPart):
    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.cluster_of: dict[int, int] = {}
        self.cluster_adapters: dict[int, dict] = {}

    def group(self, states: dict[int, dict], weights: dict[int, float], labels: dict[int, int]) -> None:
        """Put the clients in `labels` into their groups, each group's adapter its members' average;
        clients absent from `labels` (not sampled that round) join the largest group."""
        self.cluster_of = dict(labels)
        self.cluster_adapters = average_per_cluster(states, weights, self.cluster_of, self.average)
        largest = max(self.cluster_adapters, key=lambda k: (sum(v == k for v in labels.values()), -k))
        for cid in self.client_ids:
            self.cluster_of.setdefault(cid, largest)

    def clustered_messages(self, client_ids, config: dict) -> dict[int, Message]:
        return {cid: Message(dict(self.cluster_adapters[self.cluster_of[cid]]), dict(config)) for cid in client_ids}

    def average_clusters(self, replies: dict[int, Message]) -> None:
        states = {cid: r.arrays for cid, r in replies.items()}
        weights = {cid: r.config["n_examples"] for cid, r in replies.items()}
        self.cluster_adapters.update(average_per_cluster(states, weights, self.cluster_of, self.average))

    def configure_evaluate(self, client_ids):
        return self.clustered_messages(client_ids, {})

    def adapters(self):
        return {f"cluster{k}": a for k, a in sorted(self.cluster_adapters.items())}

    def report(self, evaluations, truth=None):
        return {"client_clusters": {str(cid): k for cid, k in sorted(self.cluster_of.items())}}
