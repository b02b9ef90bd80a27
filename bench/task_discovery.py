"""Task discovery: how well FedRouter finds the tasks in clients' data without labels.

Runs `fedrouter.study.clusters.cluster_data` (MiniLM embeddings, n_local and n_global "auto", K in 1..12:
the method's defaults, no training) and prints, per setting, the global K, the global and local clustering
accuracy, the router accuracy (local and global mode) and the wall time, then each group against its targets:
  synthetic  scenarios single/dual/all x seeds: K == 4 every time, local accuracy >= 0.99, every single-task
             client gets n_local == 1, local-mode router accuracy >= 0.98;
  hard       synthetic-hard, scenarios all/dual/single, first 3 seeds: global clustering accuracy >= 0.95 (true K 6);
  flan8      ../shared/data/flan8 (from the repo root), scenario all, seed 0: K == 8, global accuracy >= 0.98.
Every group runs once per `--cluster-on` value (default: all three -- the instructions alone; instruction +
answer; instruction + answer at the server only, the clients splitting by instructions: the method's default),
with each example assigned as `--assign` says (default "example", the method's; "sub-cluster": the paper's form)
and the router comparing inputs with clusters as `--global-router` says (default "discriminant", the method's;
"prototype": the paper's nearest prototype); `--answer-split off` leaves the clients' sub-clusters as K-Means
made them (default "on", the method's: split where their templates answer differently).
Usage: FEDROUTER_CACHE=/tmp/frcache python bench/task_discovery.py [--groups synthetic,hard,flan8]
       [--seeds 0-4] [--cluster-on instruction,instruction+output@server] [--assign sub-cluster] [--global-router prototype] [--answer-split off] [--json OUT]     (embeddings are cached under $FEDROUTER_CACHE)
Results go to docs/benchmark.md.
"""

import argparse
import os
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from fedrouter.config import load_config
from fedrouter.core.cluster import ASSIGN, CLUSTER_ON, DEFAULT_ASSIGN, DEFAULT_CLUSTER_ON, DEFAULT_GLOBAL_ROUTER, GLOBAL_ROUTERS
from fedrouter.runtime import quiet_libraries
from fedrouter.study.clusters import cluster_data, write_report

torch.set_num_threads(2)  # a shared 2-core machine; K-Means (OpenMP/BLAS) is capped alike in main()
FLAN8 = Path(__file__).resolve().parents[1].parent / "shared/data/flan8"


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def run(data: str, scenario: str, seed: int, cluster_on: str = DEFAULT_CLUSTER_ON, method: dict | None = None,
        **extra) -> dict:
    """One setting's report; `method`: the method options `assign`, `global_router` and `answer_split` (defaults
    if absent)."""
    overrides = {"data": data, "scenario": scenario, "seed": seed, **extra}
    if os.environ.get("FEDROUTER_CACHE"):
        overrides["cache_dir"] = os.environ["FEDROUTER_CACHE"]
    report = cluster_data(load_config(None, overrides), "minilm", "auto", "auto", range(1, 13), cluster_on, **(method or {}))
    single = [r for r in report["per_client"] if len(r["tasks"]) == 1]
    report["single_ok"] = sum(r["n_local"] == 1 for r in single), len(single)
    router = report["router_accuracy"]
    print(f"{Path(data).name:<15} {cluster_on:<26} {scenario:<7} seed {seed}  K {report['n_global']:>2}  "
          f"global acc {report['global_accuracy']:.3f}  local acc {report['local_accuracy']:.3f}  "
          f"router local {router['local']:.3f} global {router['global']:.3f} learned {router['learned']:.3f}  "
          f"single-task n_local==1 {report['single_ok'][0]}/{report['single_ok'][1]}  "
          f"n_local {','.join(map(str, report['n_local'].values()))}  {report['wall_s']:.1f} s", flush=True)
    return report


def verdict(label: str, ok: bool, detail: str) -> bool:
    print(f"  {'PASS' if ok else 'MISS'}  {label}: {detail}")
    return ok


def synthetic(seeds: list[int], modes: list[str], method: dict) -> list[dict]:
    return [report for mode in modes for report in synthetic_targets(seeds, mode, method)]


def synthetic_targets(seeds: list[int], mode: str, method: dict) -> list[dict]:
    reports = [run("synthetic", sc, s, mode, method) for sc in ("single", "dual", "all") for s in seeds]
    ks = [r["n_global"] for r in reports]
    local = [r["local_accuracy"] for r in reports]
    single = [sum(x) for x in zip(*(r["single_ok"] for r in reports))]
    r_local = [r["router_accuracy"]["local"] for r in reports]
    r_global = [r["router_accuracy"]["global"] for r in reports]
    print(f"synthetic summary, cluster_on {mode} ({len(reports)} runs):")
    verdict("global K == 4 in every case", all(k == 4 for k in ks), f"{sum(k == 4 for k in ks)}/{len(ks)}, K seen {sorted(set(ks))}")
    verdict("local clustering accuracy >= 0.99", min(local) >= 0.99, f"min {min(local):.3f}, mean {sum(local) / len(local):.3f}")
    verdict("single-task clients n_local == 1", single[0] == single[1], f"{single[0]}/{single[1]}")
    verdict("router accuracy (local) >= 0.98", min(r_local) >= 0.98,
            f"min {min(r_local):.3f}, mean {sum(r_local) / len(r_local):.3f} "
            f"(global mode: min {min(r_global):.3f}, mean {sum(r_global) / len(r_global):.3f})")
    return reports


HARD_SCENARIOS = ("all", "dual", "single")


def hard(seeds: list[int], modes: list[str], method: dict) -> list[dict]:
    reports = [run("synthetic-hard", sc, s, mode, method) for mode in modes for sc in HARD_SCENARIOS for s in seeds[:3]]
    print(f"hard summary ({len(reports)} runs, true K 6):")
    for mode in modes:
        for sc in HARD_SCENARIOS:
            acc = [r["global_accuracy"] for r in reports if r["scenario"] == sc and r["cluster_on"] == mode]
            ks = [r["n_global"] for r in reports if r["scenario"] == sc and r["cluster_on"] == mode]
            verdict(f"cluster_on {mode}, scenario {sc}: global clustering accuracy >= 0.95", min(acc) >= 0.95,
                    f"{' '.join(f'{a:.3f}' for a in acc)} (min {min(acc):.3f}); K {ks}")
    return reports


def flan8(seeds: list[int], modes: list[str], method: dict) -> list[dict]:
    if not (FLAN8 / "train.jsonl").exists():
        print(f"flan8: SKIPPED, no data at {FLAN8}")
        return []
    reports = [run(str(FLAN8), "all", 0, mode, method, task_field="task") for mode in modes]
    print("flan8 summary:")
    for report in reports:
        mode = report["cluster_on"]
        verdict(f"cluster_on {mode}: K == 8", report["n_global"] == 8, f"K {report['n_global']}")
        verdict(f"cluster_on {mode}: global clustering accuracy >= 0.98", report["global_accuracy"] >= 0.98,
                f"{report['global_accuracy']:.3f}")
        print(f"  wall time of the clustering: {report['wall_s']:.1f} s")
    return reports


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default="synthetic,hard,flan8", help="comma-separated: synthetic,hard,flan8")
    ap.add_argument("--seeds", default="0-4", help="'0-4' or '0,2'; the hard group uses the first 3")
    ap.add_argument("--cluster-on", default=",".join(CLUSTER_ON),
                    help="what each group clusters (comma-separated values of cluster_on)")
    ap.add_argument("--assign", default=DEFAULT_ASSIGN, choices=ASSIGN, help="how an example gets its global cluster")
    ap.add_argument("--global-router", default=DEFAULT_GLOBAL_ROUTER, choices=GLOBAL_ROUTERS,
                    help="how the router compares inputs with clusters")
    ap.add_argument("--answer-split", default="on", choices=("on", "off"),
                    help="split the clients' sub-clusters where their templates answer differently")
    ap.add_argument("--json", type=Path, help="also write every report here")
    args = ap.parse_args()
    quiet_libraries(progress_bars=False)
    modes = [m.strip() for m in args.cluster_on.split(",") if m.strip()]
    method = {"assign": args.assign, "global_router": args.global_router, "answer_split": args.answer_split == "on"}
    print(f"assign: {args.assign}, global router: {args.global_router}, answer split: {args.answer_split}")
    groups = {name: lambda s, group=group: group(s, modes, method)
              for name, group in (("synthetic", synthetic), ("hard", hard), ("flan8", flan8))}
    chosen = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = sorted(set(chosen) - set(groups))
    if unknown:
        ap.error(f"unknown group(s) {unknown}; choose from {sorted(groups)}")
    seeds, start, reports = parse_seeds(args.seeds), time.perf_counter(), []
    with threadpool_limits(2):
        for name in chosen:
            reports += groups[name](seeds)
    print(f"total wall time: {time.perf_counter() - start:.0f} s")
    if args.json:
        for r in reports:
            r["single_ok"] = list(r["single_ok"])
        write_report(args.json, {"reports": reports})
        print(f"reports: {args.json}")


if __name__ == "__main__":
    main()
