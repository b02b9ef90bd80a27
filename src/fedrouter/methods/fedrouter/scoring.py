"""FedRouter's clustering and routing against the true tasks: one scorer, one set of keys, for results.json's
`clustering` and `fedrouter clusters`. Simulation only: labels never travel; an engine holding the clients'
data hands them over (`truth`), a deployment passes None and every score is null."""

from __future__ import annotations

from collections import Counter

import numpy as np

from fedrouter.core.metrics import adjusted_rand, clustering_accuracy, majority_cluster, purity
from fedrouter.core.data import UNLABELLED

SPLITS = {"test": "own_test", "general": "generalization"}  # evaluation split -> router accuracy key


def confusion(tasks: list, clusters: list) -> dict[str, dict[str, int]]:
    """{true task: {global cluster: training examples}}: which tasks share a cluster, which split."""
    table: dict[str, Counter] = {}
    for task, cluster in zip(tasks, clusters):
        table.setdefault(str(task), Counter())[str(int(cluster))] += 1
    return {task: dict(sorted(counts.items(), key=lambda kv: int(kv[0]))) for task, counts in sorted(table.items())}


def truth_scores(truth: dict | None, route_counts: dict[str, dict[int, dict]]) -> dict:
    """Scores from `truth` ({client: {"tasks", "clusters"}} of its training examples) and `route_counts`
    ({split: {client: {task: {cluster: inputs}}}}): an input is routed right when it reaches its task's
    cluster, the one most of the task's training examples went to."""
    if not truth or any(t in (None, UNLABELLED) for info in truth.values() for t in info["tasks"]):
        return {"accuracy": None, "ari": None, "purity": None, "local_accuracy": None, "local_ari": None, "per_client": None,
                "task_to_cluster": None, "confusion": None, "router_accuracy": {key: None for key in SPLITS.values()}}
    tasks = [t for info in truth.values() for t in info["tasks"]]
    clusters = [int(c) for info in truth.values() for c in info["clusters"]]
    table = confusion(tasks, clusters)
    task_cluster = majority_cluster({task: Counter({int(k): n for k, n in row.items()}) for task, row in table.items()})
    router = {}
    for split, key in SPLITS.items():
        hit = total = 0
        for per_task in route_counts.get(split, {}).values():
            for task, counts in per_task.items():
                total += sum(counts.values())
                hit += counts.get(str(task_cluster.get(task)), 0)
        router[key] = hit / total if total else None
    per_client = {str(cid): {"accuracy": clustering_accuracy(info["tasks"], info["clusters"]),
                             "ari": adjusted_rand(info["tasks"], info["clusters"])} for cid, info in sorted(truth.items())}
    return {"accuracy": clustering_accuracy(tasks, clusters), "ari": adjusted_rand(tasks, clusters), "purity": purity(tasks, clusters),
            **{f"local_{key}": float(np.mean([p[key] for p in per_client.values()])) for key in ("accuracy", "ari")},
            "per_client": per_client, "task_to_cluster": task_cluster, "confusion": table, "router_accuracy": router}
