"""`fedrouter clusters`: FedRouter's clustering and router on a data set, without any training.

Builds the federated data exactly as `fedrouter run` does, embeds each client's training examples as
FedRouter does (instruction and answer, or the instruction only: `cluster_on`; cached), clusters them
locally per client and globally on the server (`core.cluster.local_then_global`), and measures how well
clusters match the true tasks:

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

from fedrouter.core.cluster import DEFAULT_ASSIGN, DEFAULT_CLUSTER_ON, DEFAULT_GLOBAL_ROUTER, example_features
from fedrouter.errors import FedrouterError
from fedrouter.study.tables import score_text



def embedding_function(cfg, spec: str):
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


def confusion(tasks: list[str], clusters: list[int]) -> dict[str, dict[str, int]]:
    """{true task: {global cluster: training examples}}: which tasks share a cluster, which split."""
    table: dict[str, Counter] = {}
    for task, cluster in zip(tasks, clusters):
        table.setdefault(task, Counter())[str(int(cluster))] += 1
    return {task: dict(sorted(counts.items(), key=lambda kv: int(kv[0]))) for task, counts in sorted(table.items())}


def analyse(data, train_vectors: dict[int, np.ndarray], test_vectors: dict[int, np.ndarray],
            n_local, n_global, seed: int, k_range, cluster_on: str, router_dims: int, assign: str = DEFAULT_ASSIGN,
            global_router: str = DEFAULT_GLOBAL_ROUTER, answer_split: bool = True) -> dict:
    """Cluster the training examples' task features (`train_vectors`, as `example_features` gives them for
    `cluster_on`, their first `router_dims` dimensions the instruction part; `assign`, `global_router` and
    `answer_split` as the method's options), then score clusters and the
    router (which sees the test instructions' embeddings, `test_vectors`) against the true tasks (when the
    data has them); a JSON-able report."""
    from fedrouter.core.cluster import adjusted_rand, clustering_accuracy, learned_route, local_then_global, split_dims

    texts = {c.client_id: [ex["instruction"] for ex in c.train] for c in data.clients} if answer_split else None
    result = local_then_global(train_vectors, n_local, n_global, seed, k_range, router_dims,
                               split_dims(cluster_on, router_dims), assign, global_router, texts)
    clients = {c.client_id: c for c in data.clients}
    ids = sorted(clients)
    from fedrouter.core.data import UNLABELLED

    labelled = all(ex.get("task") not in (None, UNLABELLED) for c in data.clients for ex in c.train)

    all_tasks, all_global = [], []
    for cid in ids:
        all_tasks += [ex.get("task") for ex in clients[cid].train]
        all_global += result.global_labels(cid).tolist()
    owner = task_clusters(all_tasks, all_global) if labelled else {}

    def curve(c):
        return None if c is None else {str(k): v for k, v in sorted(c.items())}

    rows = []
    for cid in ids:
        client = clients[cid]
        true_train = [ex.get("task") for ex in client.train]
        local = result.local_labels(cid)
        target = np.array([owner.get(ex.get("task"), -1) for ex in client.test])
        routed_global, routed_local = result.route(test_vectors[cid]), result.route(test_vectors[cid], cid)
        routed_learned = learned_route(train_vectors[cid][:, :router_dims], result.global_labels(cid), test_vectors[cid])
        scored = labelled and len(target)
        rows.append({
            "client": cid,
            "tasks": client.tasks,
            "n_train": len(client.train),
            "n_test": len(client.test),
            "n_sub": len(result.sub_centroids[cid]),
            "n_local": result.n_local(cid),
            "silhouette": curve(result.sub_silhouette.get(cid)),
            "local_accuracy": clustering_accuracy(true_train, local) if labelled else None,
            "local_ari": adjusted_rand(true_train, local) if labelled else None,
            "global_clusters": [int(g) for g in result.allowed(cid)],
            "sub_to_global": [int(g) for g in result.step.sub_to_global[cid]],
            "router_global": float(np.mean(routed_global == target)) if scored else None,
            "router_local": float(np.mean(routed_local == target)) if scored else None,
            "router_learned": float(np.mean(routed_learned == target)) if scored else None,
        })

    def mean(key):
        return _mean(r[key] for r in rows) if labelled else None

    return {
        "tasks": data.tasks,
        "labelled": labelled,
        "n_global": result.n_global,
        "n_prototypes": len(result.prototypes),
        "merged_prototypes": result.step.merged,
        "assignment": result.assignment,
        "n_local": {str(cid): result.n_local(cid) for cid in ids},
        "local_accuracy": mean("local_accuracy"),
        "local_ari": mean("local_ari"),
        "global_accuracy": clustering_accuracy(all_tasks, all_global) if labelled else None,
        "global_ari": adjusted_rand(all_tasks, all_global) if labelled else None,
        "task_clusters": owner or None,
        "confusion": confusion(all_tasks, all_global) if labelled else None,
        "router_accuracy": {"global": mean("router_global"), "local": mean("router_local"), "learned": mean("router_learned")},
        "silhouette": {"global": curve(result.step.silhouette),
                       "local": {str(c): curve(v) for c, v in sorted(result.sub_silhouette.items())} or None},
        "per_client": rows,
    }


def _curve_line(curve: dict | None) -> str:
    """'1:0.081* 2:0.212 ...': silhouette by K (K=1: the bar a split must clear), * on the chosen K."""
    if not curve:
        return "-"
    best = max(curve.values())
    chosen = min(int(k) for k, v in curve.items() if v == best)
    return " ".join(f"{k}:{v:.3f}{'*' if int(k) == chosen else ''}" for k, v in curve.items())


def format_summary(report: dict) -> str:
    sil = report["silhouette"]["global"]
    merged = report["merged_prototypes"]
    lines = [
        f"clusters | {report['data']} | scenario {report['scenario']} | {report['n_clients']} clients | "
        f"embedder {report['embedder']} on {report['cluster_on']}, assign by {report['assign']} | {report['wall_s']:.0f} s",
        f"global: {report['n_global']} clusters from {report['n_prototypes']} prototypes"
        f"{f' ({len(merged)} groups merged by co-occurrence)' if merged else ''}, clustering accuracy "
        f"{score_text(report['global_accuracy'])}, ARI {score_text(report['global_ari'])}",
        f"local: mean clustering accuracy {score_text(report['local_accuracy'])}, mean ARI {score_text(report['local_ari'])}",
        f"router accuracy ({report['global_router']} router): global {score_text(report['router_accuracy']['global'])}, "
        f"local {score_text(report['router_accuracy']['local'])}, learned {score_text(report['router_accuracy']['learned'])}",
    ]
    if report.get("assignment"):
        done = report["assignment"]
        lines.append(f"each example to its nearest cluster centre: {done['clusters_before']} clusters -> {report['n_global']} "
                     f"(emptied and dropped: {done['emptied'] or 'none'}; joined by co-occurrence: {done['joined'] or 'none'})")
    if sil:
        lines.append("silhouette of the prototypes by K: " + _curve_line(sil))
    lines.append(f"{'client':>6}  {'tasks':<28} {'sub':>4} {'n_local':>7} {'local acc':>9} {'ARI':>6} {'router G':>8} "
                 f"{'router L':>8}  silhouette by K (1 = the bar a split must clear; * chosen)")
    for r in report["per_client"]:
        lines.append(f"{r['client']:>6}  {'+'.join(map(str, r['tasks']))[:28]:<28} {r['n_sub']:>4} {r['n_local']:>7} "
                     f"{score_text(r['local_accuracy']):>9} {score_text(r['local_ari']):>6} {score_text(r['router_global']):>8} "
                     f"{score_text(r['router_local']):>8}  {_curve_line(r['silhouette'])}")
    if report.get("confusion"):
        clusters = sorted({int(k) for counts in report["confusion"].values() for k in counts})
        lines.append("confusion (training examples of each true task per global cluster):")
        lines.append(f"{'task':<28} " + " ".join(f"{'c' + str(k):>6}" for k in clusters))
        for task, counts in report["confusion"].items():
            lines.append(f"{str(task)[:28]:<28} " + " ".join(f"{counts.get(str(k), 0):>6}" for k in clusters))
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


def cluster_data(cfg, embedder: str, n_local, n_global, k_range: range, cluster_on: str = DEFAULT_CLUSTER_ON,
                 assign: str = DEFAULT_ASSIGN, global_router: str = DEFAULT_GLOBAL_ROUTER, answer_split: bool = True) -> dict:
    """FedRouter's clustering and router on the config's data, without training: the JSON-able report
    (the same data split, embeddings and clustering steps as a run of the method)."""
    from fedrouter.world import build_data

    start = time.perf_counter()
    data = build_data(cfg)
    embed, embedder_name = embedding_function(cfg, embedder)
    features = {c.client_id: example_features(c.train, embed, cluster_on) for c in data.clients}
    train_vectors = {cid: x for cid, (x, _) in features.items()}
    router_dims = next(iter(features.values()))[1]  # the instruction embeddings' width, the same for every client
    test_vectors = {c.client_id: embed([ex["instruction"] for ex in c.test]) for c in data.clients}
    report = {
        "data": cfg.data, "scenario": cfg.scenario, "n_clients": cfg.n_clients, "seed": cfg.seed,
        "task_field": cfg.task_field, "embedder": embedder, "embedder_name": embedder_name, "cluster_on": cluster_on, "assign": assign, "global_router": global_router, "answer_split": answer_split, "model": cfg.model if embedder == "base" else None,
        "n_local_setting": n_local if not isinstance(n_local, dict) else {str(k): v for k, v in n_local.items()},
        "n_global_setting": n_global, "k_range": [k_range.start, k_range.stop - 1],
    }
    report.update(analyse(data, train_vectors, test_vectors, n_local, n_global, cfg.seed, k_range, cluster_on, router_dims, assign,
                          global_router, answer_split))
    report["wall_s"] = time.perf_counter() - start
    return report


def write_report(path: Path, report: dict) -> None:
    from fedrouter.atomic import write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(_strict(report), indent=2, allow_nan=False))
    except OSError as exc:
        raise FedrouterError(f"cannot write {path}: {exc.strerror or exc}") from None
