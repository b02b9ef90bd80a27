"""`fedrouter clusters`: FedRouter's clustering and router on a data set, without any training.

Builds the federated data exactly as `fedrouter run` does, embeds each client's training instructions
(cached), clusters them locally per client and globally on the server (`core.cluster.local_then_global`),
and measures how well clusters match the true tasks:

- local clustering accuracy: per client, local clusters vs true tasks (best one-to-one matching), and ARI;
- global clustering accuracy: each training example's global cluster (that of its local cluster) vs its
  true task, over all clients;
- router accuracy on each client's test inputs, in global mode (nearest of all global centroids) and local
  mode (nearest among the client's own mapped clusters): an input is routed correctly when it reaches its
  task's global cluster -- the one most of that task's training examples were assigned to.

Prints a short summary and writes everything as JSON (the command line's `--out`, default clusters.json).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from fedrouter.errors import FedrouterError



def _embed(cfg, spec: str):
    """(texts -> embeddings, the embedder's name), exactly as FedRouter's clients embed them (the base
    model through the shared model's embedder, cached; other encoders without loading the base model)."""
    from fedrouter.core.embed import BASE, embed_cached, resolve_embedder
    from fedrouter.core.model import default_cache_dir
    from fedrouter.world import build_shared

    if spec == BASE:
        shared = build_shared(cfg, progress=False)
        return (lambda texts: shared.embed(texts, spec)), shared.embedder(spec).name
    embedder = resolve_embedder(spec)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    return (lambda texts: embed_cached(embedder, texts, cache)), embedder.name


def task_clusters(tasks: list[str], global_labels: list[int]) -> dict[str, int]:
    """Per task, the global cluster most of its training examples went to (the lower id on a tie)."""
    from fedrouter.core.cluster import majority_cluster

    votes: dict[str, Counter] = {}
    for task, label in zip(tasks, global_labels):
        votes.setdefault(task, Counter())[int(label)] += 1
    return majority_cluster(votes)


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def analyse(data, train_vectors: dict[int, np.ndarray], test_vectors: dict[int, np.ndarray],
            n_local, n_global, seed: int, k_range) -> dict:
    """Cluster, then score clusters and router against the true tasks; a JSON-able report."""
    from fedrouter.core.cluster import adjusted_rand, clustering_accuracy, local_then_global, route

    result = local_then_global(train_vectors, n_local, n_global, seed, k_range)
    clients = {c.client_id: c for c in data.clients}
    ids = sorted(clients)

    all_tasks, all_global = [], []
    for cid in ids:
        all_tasks += [ex["task"] for ex in clients[cid].train]
        all_global += result.global_labels(cid).tolist()
    owner = task_clusters(all_tasks, all_global)

    rows = []
    for cid in ids:
        client = clients[cid]
        true_train = [ex["task"] for ex in client.train]
        local = result.local_labels[cid]
        target = np.array([owner.get(ex["task"], -1) for ex in client.test])
        allowed = result.allowed(cid)
        routed_global = route(test_vectors[cid], result.global_centroids)
        routed_local = route(test_vectors[cid], result.global_centroids, allowed)
        rows.append({
            "client": cid,
            "tasks": client.tasks,
            "n_train": len(client.train),
            "n_test": len(client.test),
            "n_local": result.n_local[cid],
            "local_accuracy": clustering_accuracy(true_train, local),
            "local_ari": adjusted_rand(true_train, local),
            "global_clusters": [int(g) for g in allowed],
            "local_to_global": [int(g) for g in result.local_to_global[cid]],
            "router_global": float(np.mean(routed_global == target)) if len(target) else float("nan"),
            "router_local": float(np.mean(routed_local == target)) if len(target) else float("nan"),
        })

    def curve(c):
        return None if c is None else {str(k): v for k, v in sorted(c.items())}

    return {
        "tasks": data.tasks,
        "n_global": result.n_global,
        "n_local": {str(cid): result.n_local[cid] for cid in ids},
        "local_accuracy": _mean(r["local_accuracy"] for r in rows),
        "local_ari": _mean(r["local_ari"] for r in rows),
        "global_accuracy": clustering_accuracy(all_tasks, all_global),
        "global_ari": adjusted_rand(all_tasks, all_global),
        "task_clusters": owner,
        "router_accuracy": {"global": _mean(r["router_global"] for r in rows),
                            "local": _mean(r["router_local"] for r in rows)},
        "silhouette": {"global": curve(result.global_silhouette),
                       "local": {str(c): curve(v) for c, v in sorted(result.local_silhouette.items())} or None},
        "per_client": rows,
    }


def format_summary(report: dict) -> str:
    sil = report["silhouette"]["global"]
    lines = [
        f"clusters | {report['data']} | scenario {report['scenario']} | {report['n_clients']} clients | "
        f"embedder {report['embedder']} | {report['wall_s']:.0f} s",
        f"global: {report['n_global']} clusters{' (silhouette)' if sil else ''}, clustering accuracy "
        f"{report['global_accuracy']:.3f}, ARI {report['global_ari']:.3f}",
        f"local: mean clustering accuracy {report['local_accuracy']:.3f}, mean ARI {report['local_ari']:.3f}",
        f"router accuracy: global {report['router_accuracy']['global']:.3f}, local {report['router_accuracy']['local']:.3f}",
    ]
    if sil:
        lines.append("silhouette (global): " + " ".join(f"{k}:{v:.3f}" for k, v in sil.items()))
    lines.append(f"{'client':>6}  {'tasks':<28} {'n_local':>7} {'local acc':>9} {'ARI':>6} {'router G':>8} {'router L':>8}")
    for r in report["per_client"]:
        lines.append(f"{r['client']:>6}  {'+'.join(r['tasks'])[:28]:<28} {r['n_local']:>7} {r['local_accuracy']:>9.3f} "
                     f"{r['local_ari']:>6.3f} {r['router_global']:>8.3f} {r['router_local']:>8.3f}")
    return "\n".join(lines)


def _strict(value):
    """NaN/inf -> None, so the report is strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def cluster_data(cfg, embedder: str, n_local, n_global, k_range: range) -> dict:
    """FedRouter's clustering and router on the config's data, without training: the JSON-able report
    (the same data split, embeddings and clustering steps as a run of the method)."""
    from fedrouter.world import build_data

    start = time.perf_counter()
    data = build_data(cfg)
    embed, embedder_name = _embed(cfg, embedder)
    train_vectors = {c.client_id: embed([ex["instruction"] for ex in c.train]) for c in data.clients}
    test_vectors = {c.client_id: embed([ex["instruction"] for ex in c.test]) for c in data.clients}
    report = {
        "data": cfg.data, "scenario": cfg.scenario, "n_clients": cfg.n_clients, "seed": cfg.seed,
        "task_field": cfg.task_field, "embedder": embedder, "embedder_name": embedder_name, "model": cfg.model if embedder == "base" else None,
        "n_local_setting": n_local if not isinstance(n_local, dict) else {str(k): v for k, v in n_local.items()},
        "n_global_setting": n_global, "k_range": [k_range.start, k_range.stop - 1],
    }
    report.update(analyse(data, train_vectors, test_vectors, n_local, n_global, cfg.seed, k_range))
    report["wall_s"] = time.perf_counter() - start
    return report


def write_report(path: Path, report: dict) -> None:
    from fedrouter.atomic import write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(_strict(report), indent=2, allow_nan=False))
    except OSError as exc:
        raise FedrouterError(f"cannot write {path}: {exc.strerror or exc}") from None
