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

Prints a short summary and writes everything as JSON (`--out`, default clusters.json).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from fedrouter.errors import FedrouterError

DEFAULT_OUT = "clusters.json"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "clusters", help="cluster clients' data as FedRouter does and score it against the true tasks",
        description="FedRouter's local and global clustering and its router on a data set, without training: "
                    "clustering accuracy against the true tasks and router accuracy in global and local mode.")
    p.add_argument("--data", required=True, help="'synthetic' (embedded) or a folder with train.jsonl and test.jsonl")
    p.add_argument("--scenario", required=True, help="single | dual | all | dirichlet")
    p.add_argument("--embedder", default="base",
                   help="'base' (mean last hidden state of --model; the paper's default), 'minilm' "
                        "(all-MiniLM-L6-v2), or a Hugging Face encoder id or path")
    p.add_argument("--n-local", default="auto",
                   help="local clusters per client: K, 'auto' (silhouette), or one K per client, comma-separated")
    p.add_argument("--n-global", default="auto", help="global clusters: K or 'auto' (silhouette)")
    p.add_argument("--k-min", default="2", help="smallest K the silhouette search tries (default 2)")
    p.add_argument("--k-max", default="12", help="largest K the silhouette search tries (default 12)")
    p.add_argument("--clients", dest="n_clients", type=int, default=None, help="number of clients (default as in run: 8)")
    p.add_argument("--task-field", default=None, help="JSONL field holding the task label (e.g. category)")
    p.add_argument("--train-per-client", type=int, default=None, help="training examples per client (default as in run)")
    p.add_argument("--test-per-client", type=int, default=None, help="test examples per client (default as in run)")
    p.add_argument("--seed", type=int, default=None, help="random seed (data split and K-Means)")
    p.add_argument("--model", default=None, help="base model for --embedder base: 'tiny', a Hugging Face id, or a path")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"JSON report (default: ./{DEFAULT_OUT})")


def _parse_int(text: str, flag: str, minimum: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise FedrouterError(f"{flag} expects an integer, got {text!r}") from None
    if value < minimum:
        raise FedrouterError(f"{flag} must be at least {minimum}, got {value}")
    return value


def parse_k(text: str, flag: str, n_clients: int | None = None):
    """'auto', a positive K, or (n_clients given) one positive K per client, comma-separated."""
    text = str(text).strip()
    if text == "auto":
        return "auto"
    if n_clients is not None and "," in text:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != n_clients:
            raise FedrouterError(f"{flag} lists {len(parts)} values for {n_clients} clients")
        return {i: _parse_int(p, flag, 1) for i, p in enumerate(parts)}
    try:
        value = int(text)
    except ValueError:
        raise FedrouterError(f"{flag} expects a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise FedrouterError(f"{flag} must be a positive integer or 'auto', got {value}")
    return value


def _config(args):
    """The data part of the run config, validated exactly as `fedrouter run` validates it."""
    from fedrouter.config import load_config

    flags = {"data": args.data, "scenario": args.scenario, "n_clients": args.n_clients, "task_field": args.task_field,
             "train_per_client": args.train_per_client, "test_per_client": args.test_per_client,
             "seed": args.seed, "model": args.model}
    return load_config(None, {k: v for k, v in flags.items() if v is not None})


def _build_data(cfg):
    from fedrouter.core.data import build_federated_data

    # the same call as fedrouter.experiment.build_world
    return build_federated_data(
        cfg.data, cfg.scenario, cfg.n_clients, cfg.train_per_client, cfg.test_per_client,
        cfg.general_test_per_task, seed=cfg.seed, task_field=cfg.task_field, tasks=cfg.tasks,
        dirichlet_alpha=cfg.dirichlet_alpha,
    )


def _embedder(spec: str, cfg):
    from fedrouter.core.embed import BASE, resolve_embedder

    if spec == BASE:
        from fedrouter.core.model import TinyBaseSpec, load_base

        tiny_spec = TinyBaseSpec(**cfg.tiny.model_dump())
        model, tokenizer = load_base(cfg.model, Path(cfg.cache_dir) if cfg.cache_dir else None, tiny_spec, progress=False)
        return resolve_embedder(spec, model, tokenizer, base_name=cfg.model)
    return resolve_embedder(spec)


def task_clusters(tasks: list[str], global_labels: list[int]) -> dict[str, int]:
    """Per task, the global cluster most of its training examples went to (the lower id on a tie)."""
    votes: dict[str, Counter] = {}
    for task, label in zip(tasks, global_labels):
        votes.setdefault(task, Counter())[int(label)] += 1
    return {t: min(c, key=lambda k: (-c[k], k)) for t, c in sorted(votes.items())}


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


def _write_json(path: Path, payload) -> None:
    from fedrouter.atomic import write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(_strict(payload), indent=2, allow_nan=False))
    except OSError as exc:
        raise FedrouterError(f"cannot write {path}: {exc.strerror or exc}") from None


def run(args) -> int:
    from fedrouter.core.embed import embed_cached
    from fedrouter.core.model import default_cache_dir

    start = time.perf_counter()
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # cheap checks first: nothing is loaded or embedded on bad input
    k_min = _parse_int(args.k_min, "--k-min", 2)
    k_max = _parse_int(args.k_max, "--k-max", k_min)
    cfg = _config(args)
    n_local = parse_k(args.n_local, "--n-local", cfg.n_clients)
    n_global = parse_k(args.n_global, "--n-global")
    if args.out.is_dir():
        raise FedrouterError(f"--out {args.out} is a directory; give a file name")
    data = _build_data(cfg)

    embedder = _embedder(args.embedder, cfg)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    train_vectors, test_vectors = {}, {}
    for client in data.clients:
        train_vectors[client.client_id] = embed_cached(embedder, [ex["instruction"] for ex in client.train], cache)
        test_vectors[client.client_id] = embed_cached(embedder, [ex["instruction"] for ex in client.test], cache)

    report = {
        "data": cfg.data, "scenario": cfg.scenario, "n_clients": cfg.n_clients, "seed": cfg.seed,
        "task_field": cfg.task_field, "embedder": args.embedder, "embedder_name": embedder.name,
        "model": cfg.model if args.embedder == "base" else None,
        "n_local_setting": n_local if not isinstance(n_local, dict) else {str(k): v for k, v in n_local.items()},
        "n_global_setting": n_global, "k_range": [k_min, k_max],
    }
    report.update(analyse(data, train_vectors, test_vectors, n_local, n_global, cfg.seed, range(k_min, k_max + 1)))
    report["wall_s"] = time.perf_counter() - start
    _write_json(args.out, report)
    print(format_summary(report))
    print(f"report: {args.out}")
    return 0
