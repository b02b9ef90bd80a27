"""FedCluster: clustered federated learning on LoRA, as the FedRouter paper's FedCluster baseline
(after Sattler et al., "Clustered Federated Learning", IEEE TNNLS 2021).

Rounds 1..cluster_round are FedIT. At the end of round `cluster_round` the server clusters the clients by
the cosine similarity of their LoRA updates (client adapter - global adapter, all matrices flattened;
agglomerative, average linkage) into n_clusters groups; from then on it runs FedAvg within each group,
and every client trains and is evaluated with its group's adapter.

Options: cluster_round (5; clamped to the run's rounds), n_clusters (4).
"""

from __future__ import annotations

import numpy as np
import torch

from fedrouter.core.client_clusters import agglomerative, cosine_distance_matrix
from fedrouter.methods import fedit
from fedrouter.methods.base import MethodFacts
from fedrouter.methods.clustered import ClusteredServer
from fedrouter.methods.common import mean_fit_metrics, require

OPTIONS = {"cluster_round": 5, "n_clusters": 4}


def check_options(method: str, opts: dict) -> None:
    for key in OPTIONS:
        require(opts[key] >= 1, method, f"{key} must be a positive integer, got {opts[key]!r}")

Client = fedit.Client


def flat_update(adapter: dict, start: dict) -> np.ndarray:
    """adapter - start, every matrix flattened into one vector (keys in sorted order)."""
    return torch.cat([(adapter[k].double() - start[k].double()).flatten() for k in sorted(start)]).numpy()


class Server(ClusteredServer):
    # per-cluster means, which DP covers given the clustering (the clustering itself is of clean clipped updates)
    FACTS = MethodFacts(adapters="up to {n_clusters} cluster adapters", folds_by_mean=True)

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        # Clustering at round R needs round R to happen; clamp so a short run still clusters at its end.
        self.cluster_round = min(self.options["cluster_round"], setup.rounds)
        self.cluster_of = {cid: 0 for cid in client_ids}  # one group, i.e. FedIT, until the clustering round
        self.cluster_adapters = {0: dict(initial_adapter)}

    def configure_fit(self, round_idx, client_ids):
        return self.clustered_messages(client_ids, {"round": round_idx})

    def aggregate_fit(self, round_idx, replies):
        sent = {cid: self.cluster_adapters[self.cluster_of[cid]] for cid in replies}
        self.average_clusters(replies)
        metrics = mean_fit_metrics(replies)
        if round_idx + 1 == self.cluster_round:
            ids = sorted(replies)
            updates = np.stack([flat_update(replies[cid].arrays, sent[cid]) for cid in ids])
            labels = agglomerative(cosine_distance_matrix([updates]), self.options["n_clusters"])
            self.group({cid: replies[cid].arrays for cid in ids}, {cid: replies[cid].config["n_examples"] for cid in ids},
                       {cid: int(k) for cid, k in zip(ids, labels)})
            metrics["n_clusters"] = len(self.cluster_adapters)
        return metrics

    def report(self, evaluations, truth=None):
        return {**super().report(evaluations), "cluster_round": self.cluster_round}
