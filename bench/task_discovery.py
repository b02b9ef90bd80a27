"""Task discovery: how well FedRouter finds the tasks in clients' data it was never tuned on.

Runs `fedrouter clusters` (the method's own setup, defaults unless --set) on every mixture -- synthetic,
synthetic-hard, flan8 and the three of ../shared/data/realmix (cls4, gen6, dolly8), plus any --mixture
folder -- in each scenario (all, dual, single) and seed, and prints per run K, clustering accuracy (one-to-one
matching), ARI, purity (many-to-one: a split task costs nothing), router accuracy on the clients' own tests
and on all tasks, and seconds -- at 8 clients, or at each --clients count (the same data in fewer, larger
clients or more, smaller ones: a check nothing was tuned on); then per mixture the supervised ceiling (a
logistic regression trained on the true tasks over the same features, 3-fold; the most any unsupervised
method could reach), and the targets.

--sweep "NAME=v1,v2;OTHER=w1" re-runs everything at the defaults and then for each other value of each named
threshold (methods/fedrouter/thresholds.py, one changed at a time), and prints per threshold the
leave-one-mixture-out choice: for each mixture, the value with the best mean accuracy on the OTHER mixtures,
and that mixture's accuracy at it (the held-out figure).

Usage: FEDROUTER_CACHE=/tmp/frcache python bench/task_discovery.py [--mixtures cls4,gen6] [--scenarios all]
       [--seeds 0] [--clients 4,8,16] [--mixture NAME=FOLDER] [--set method_options.n_global=6]
       [--sweep "ANSWER_GAP=6,24;NULL_MARGIN=1.5"] [--no-ceiling] [--json OUT]
Figures go to docs/benchmark.md ("How accurate the task discovery is").
"""

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from threadpoolctl import threadpool_limits

from fedrouter.config import load_config, parse_sets
from fedrouter.core.embed import embed_cached, resolve_embedder
from fedrouter.errors import FedrouterError
from fedrouter.methods.fedrouter import thresholds
from fedrouter.methods.fedrouter.features import task_features
from fedrouter.runtime import quiet_libraries
from fedrouter.study.clusters import cluster_data
from fedrouter.world import build_data

torch.set_num_threads(1)
SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"
MIXTURES = {"synthetic": "synthetic", "synthetic-hard": "synthetic-hard", "flan8": str(SHARED / "flan8"),
            "cls4": str(SHARED / "realmix/cls4"), "gen6": str(SHARED / "realmix/gen6"), "dolly8": str(SHARED / "realmix/dolly8")}
# the targets (scenario all unless said): (K wanted or a range, least accuracy)
TARGETS = {"synthetic": (4, 1.0), "synthetic-hard": (6, 0.95), "flan8": (8, 0.98), "cls4": (4, 0.95), "gen6": (6, 0.95),
           "dolly8": ((4, 12), 0.55)}


def overrides(mixture: str, scenario: str, seed: int, sets: dict, clients: int | None = None) -> dict:
    """The run's config keys; `clients` None: the config's own client count."""
    out = {"data": MIXTURES[mixture], "scenario": scenario, "seed": seed, **({"n_clients": clients} if clients else {}), **sets}
    if not out["data"].startswith("synthetic"):
        out["task_field"] = "task"
    if os.environ.get("FEDROUTER_CACHE"):
        out["cache_dir"] = os.environ["FEDROUTER_CACHE"]
    return out


def one(mixture: str, scenario: str, seed: int, sets: dict, clients: int | None) -> dict:
    cfg = load_config(None, overrides(mixture, scenario, seed, sets, clients))
    r, clients = cluster_data(cfg), cfg.n_clients  # the count the run used (a --set n_clients included)
    row = {"mixture": mixture, "scenario": scenario, "seed": seed, "clients": clients, "K": r["n_global"], "accuracy": r["accuracy"],
           "ari": r["ari"], "purity": r["purity"], "router_own": r["router_accuracy"]["own_test"],
           "router_all": r["router_accuracy"]["generalization"], "seconds": r["wall_s"],
           "n_local": list(r["n_local"].values())}
    print(f"{mixture:<15} {scenario:<7} seed {seed}  clients {clients:>2}  K {row['K']:>2}  accuracy {row['accuracy']:.3f}  ARI {row['ari']:.3f}  "
          f"purity {row['purity']:.3f}  router own {row['router_own']:.3f} all {row['router_all']:.3f}  "
          f"n_local {','.join(map(str, row['n_local']))}  {row['seconds']:.0f} s", flush=True)
    return row


def ceiling(mixture: str) -> dict:
    """Supervised accuracy on the clustering features and on the instruction embedding alone (scenario all)."""
    cfg = load_config(None, overrides(mixture, "all", 0, {}))
    embedder = resolve_embedder("minilm")
    cache = os.environ.get("FEDROUTER_CACHE") or str(Path.home() / ".cache/fedrouter")
    xs, tasks = [], []
    for c in build_data(cfg).clients:
        xs.append(task_features(c.train, lambda texts: embed_cached(embedder, texts, cache)).x)
        tasks += [e["task"] for e in c.train]
    x, d = np.vstack(xs), xs[0].shape[1] // 3
    score = {name: float(cross_val_score(LogisticRegression(max_iter=3000), part, tasks, cv=3).mean())
             for name, part in (("features", x), ("instruction", x[:, :d]))}
    print(f"{mixture:<15} supervised ceiling: {score['features']:.3f} on the clustering features, "
          f"{score['instruction']:.3f} on the instruction embedding", flush=True)
    return score


def summary(rows: list[dict]) -> None:
    by = defaultdict(list)
    for r in rows:
        by[(r["mixture"], r["scenario"], r["clients"])].append(r)
    print("summary (mean over seeds):")
    for (mixture, scenario, clients), rs in by.items():
        acc = float(np.mean([r["accuracy"] for r in rs]))
        ks = [r["K"] for r in rs]
        line = f"  {mixture:<15} {scenario:<7} clients {clients:>2}  K {ks}  accuracy {acc:.3f}  purity {np.mean([r['purity'] for r in rs]):.3f}"
        target = TARGETS.get(mixture)
        if target and scenario == "all":
            want, least = target
            k_ok = all((want[0] <= k <= want[1]) if isinstance(want, tuple) else k == want for k in ks)
            line += f"   target K {want}, accuracy >= {least}: {'PASS' if k_ok and acc >= least else 'MISS'}"
        elif target:
            base = [r["accuracy"] for r in by.get((mixture, "all", clients), [])]
            if base:
                line += f"   no worse than all ({np.mean(base):.3f}): {'PASS' if acc >= np.mean(base) - 1e-9 else 'MISS'}"
        print(line)


def leave_one_out(name: str, table: dict) -> None:
    """table: value -> mixture -> mean accuracy over scenarios and seeds."""
    values, mixtures = sorted(table), list(next(iter(table.values())))
    print(f"leave-one-mixture-out for {name} (mean accuracy over scenarios):")
    print(f"  {'mixture':<15} " + " ".join(f"{str(v):>8}" for v in values) + "   chosen on the others -> held-out")
    for m in mixtures:
        others = {v: np.mean([table[v][o] for o in mixtures if o != m]) for v in values}
        best = max(values, key=lambda v: (others[v], v == getattr(thresholds, name)))
        print(f"  {m:<15} " + " ".join(f"{table[v][m]:>8.3f}" for v in values) + f"   {best} -> {table[best][m]:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixtures", default=",".join(MIXTURES), help="comma-separated names (default: all)")
    ap.add_argument("--mixture", action="append", default=[], metavar="NAME=FOLDER", help="another mixture (repeatable)")
    ap.add_argument("--scenarios", default="all,dual,single")
    ap.add_argument("--seeds", default="0", help="comma-separated")
    ap.add_argument("--clients", default=None, help="comma-separated client counts (default: the config's, 8): the same data "
                    "in fewer, larger clients or more, smaller ones (nothing was tuned on the count; the targets are at 8)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="a config key for every run")
    ap.add_argument("--sweep", default=None, metavar="NAME=v1,v2", help="a threshold and the values to try")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the supervised ceilings")
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args()
    quiet_libraries(progress_bars=False)
    for item in args.mixture:
        name, _, folder = item.partition("=")
        MIXTURES[name] = folder
    names = [m for m in args.mixtures.split(",") if m] + [i.partition("=")[0] for i in args.mixture]
    unknown = [m for m in names if m not in MIXTURES]
    if unknown:
        ap.error(f"unknown mixture(s) {unknown}; known: {sorted(MIXTURES)}")
    names = [m for m in dict.fromkeys(names) if MIXTURES[m].startswith("synthetic") or (Path(MIXTURES[m]) / "train.jsonl").exists()]
    scenarios, seeds, sets = args.scenarios.split(","), [int(s) for s in args.seeds.split(",")], parse_sets(args.sets)
    client_counts = [int(c) for c in args.clients.split(",")] if args.clients else [None]
    settings = [(None, None)]  # the defaults, then one threshold changed at a time
    for item in filter(None, (args.sweep or "").split(";")):
        name, _, text = item.partition("=")
        if not hasattr(thresholds, name):
            ap.error(f"{name} is not a threshold in methods/fedrouter/thresholds.py")
        settings += [(name, type(getattr(thresholds, name))(v)) for v in text.split(",") if float(v) != getattr(thresholds, name)]
    start, rows, tables = time.perf_counter(), [], {}
    with threadpool_limits(1):
        for name, value in settings:
            default = getattr(thresholds, name) if name else None
            if name:
                setattr(thresholds, name, value)
                print(f"--- {name} = {value}", flush=True)
            part = [dict(one(m, sc, s, sets, c), setting=name, value=value)
                    for m in names for c in client_counts for sc in scenarios for s in seeds]
            if name:
                setattr(thresholds, name, default)
            means = {m: float(np.mean([r["accuracy"] for r in part if r["mixture"] == m])) for m in names}
            tables[(name, value)] = means
            summary(part)
            rows += part
        for name in dict.fromkeys(n for n, _ in settings if n):
            table = {v: t for (n, v), t in tables.items() if n == name}
            leave_one_out(name, {getattr(thresholds, name): tables[(None, None)], **table})
        ceilings = {} if args.no_ceiling or args.sweep else {m: ceiling(m) for m in names}
    print(f"total wall time: {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ceilings": ceilings}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except FedrouterError as exc:
        sys.exit(f"task_discovery: {exc}")
