"""ROUGE-1 of several methods over several seeds on one scenario (mean ± std), with everything else at
the defaults of `fedrouter run`. Until `fedrouter compare` exists, this is how the docs' comparisons
are made.

Usage: python bench/method_seeds.py [--methods fedit fedrouter] [--seeds 0 1 2] [--scenario dual]
                                    [--set key=value ...]
"""

import argparse
import json
import statistics
import tempfile

from fedrouter.config import load_config, parse_value
from fedrouter.experiment import run_experiment


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["fedit", "fedrouter"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--scenario", default="dual")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--json", help="write every run's headline figures here")
    args = ap.parse_args()
    extra = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.sets)}
    rows = {}
    for method in args.methods:
        for seed in args.seeds:
            cfg = load_config(None, {**extra, "method": method, "seed": seed, "scenario": args.scenario})
            with tempfile.TemporaryDirectory() as out:
                r = run_experiment(cfg, out + "/run", progress=False)
            rows.setdefault(method, []).append({"seed": seed, "rouge1": r["rouge1"], "base_rouge1": r["base_rouge1"],
                                                "generalization": r["generalization"]["rouge1"], "wall_s": r["wall_s"],
                                                "clustering": r.get("clustering", {}).get("router_accuracy")})
            print(f"{method:<18} seed {seed}: rouge1 {r['rouge1']:.3f}  generalization {r['generalization']['rouge1']:.3f}"
                  f"  ({r['wall_s']:.0f} s)", flush=True)
    print(f"\nscenario {args.scenario}, seeds {args.seeds}: ROUGE-1 mean ± std (own tasks | all tasks)")
    for method, runs in rows.items():
        own = [r["rouge1"] for r in runs]
        gen = [r["generalization"] for r in runs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{method:<18} {statistics.mean(own):.3f} ± {sd(own):.3f}   |   {statistics.mean(gen):.3f} ± {sd(gen):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
