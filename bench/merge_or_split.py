"""What merging two tasks costs against splitting one: FedRouter against fedrouter-oracle (clusters = the true
tasks) on the embedded benchmark, with K found (the defaults), and forced to tasks + 2 (a split) and tasks - 1
(a merge) -- ROUGE-1 on the clients' own tasks and on all tasks, mean ± std over seeds. It decides how eager
the server's K may be to merge (methods/fedrouter/server_step.py keeps apart what scores within noise).

Usage: python bench/merge_or_split.py [--seeds 0,1,2] [--scenario dual] [--only found,oracle,split,merge]
       [--set KEY=VALUE ...]
Figures go to docs/benchmark.md ("How accurate the task discovery is").
"""

import argparse
import statistics
import tempfile
from pathlib import Path

from fedrouter.config import load_config, parse_sets
from fedrouter.experiment import run_experiment

TASKS = 4  # the embedded benchmark's
VARIANTS = {"fedrouter (K found)": ("fedrouter", {}), "fedrouter-oracle": ("fedrouter-oracle", {}),
            f"fedrouter, K = {TASKS + 2} (split)": ("fedrouter", {"method_options.n_global": TASKS + 2}),
            f"fedrouter, K = {TASKS - 1} (merge)": ("fedrouter", {"method_options.n_global": TASKS - 1})}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--scenario", default="dual")
    ap.add_argument("--only", default="found,oracle,split,merge", help="which variants (default: all four)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    extra = parse_sets(args.sets)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (method, options) in VARIANTS.items():
            if not any(word in name.replace("K found", "found") for word in args.only.split(",")):
                continue
            for seed in seeds:
                cfg = load_config(None, {"threads": 1, **extra, **options, "method": method, "seed": seed, "scenario": args.scenario})
                r = run_experiment(cfg, Path(tmp) / f"{method}-{len(rows)}-{seed}", progress=False)
                rows.setdefault(name, []).append((r["rouge1"], r["generalization"]["rouge1"], r.get("clustering", {}).get("n_global")))
                print(f"{name:<28} seed {seed}  ROUGE-1 {r['rouge1']:.3f}  all tasks {r['generalization']['rouge1']:.3f}  "
                      f"K {rows[name][-1][2]}", flush=True)
    print(f"\n| variant ({args.scenario}, seeds {args.seeds}) | ROUGE-1 own tasks | all tasks | K |\n| --- | --- | --- | --- |")
    for name, runs in rows.items():
        own, every = [r[0] for r in runs], [r[1] for r in runs]
        spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"| {name} | {statistics.mean(own):.3f} ± {spread(own):.3f} | {statistics.mean(every):.3f} ± {spread(every):.3f} "
              f"| {', '.join(str(r[2]) for r in runs)} |")


if __name__ == "__main__":
    main()
