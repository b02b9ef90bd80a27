"""Privacy vs utility on the embedded benchmark: ROUGE-1 of FedIT and FedRouter against the ε their
central DP spends (noise multiplier swept, clip fixed), and FedRouter's routing with DP centroids against
the ε of the centroid release alone.

Usage: python bench/privacy_utility.py [--levels 0.5,1,2,4] [--clip 0.5] [--fedrouter-centroid-noise 4]
[--out docs/figures/privacy]. FedRouter's DP runs release their centroids through the Gaussian mechanism at
--fedrouter-centroid-noise (a FedRouter run under DP with exact centroids is refused: its epsilon would not
cover them), so FedRouter's epsilon is above FedIT's at the same noise. Runs the `--quick` size of `fedrouter compare` (10 rounds, 200 training examples per client), seed 0,
scenario dual; prints the tables and writes privacy_utility.png and privacy.json in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedrouter.cli import QUICK_OVERRIDES  # noqa: E402
from fedrouter.config import load_config  # noqa: E402
from fedrouter.experiment import run_experiment  # noqa: E402


# What FedRouter may release under DP centroids (`check_privacy`): a fixed number of sub-clusters per client
# (scenario dual: two tasks each), each example by its sub-cluster, the nearest-prototype router.
FEDROUTER_DP = {"n_local": 2, "assign": "sub-cluster", "global_router": "prototype"}


def one_run(overrides: dict, tmp: Path, name: str) -> dict:
    cfg = load_config(None, {**QUICK_OVERRIDES, "threads": 1, **overrides})
    return run_experiment(cfg, tmp / name, progress=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="0.5,1,2,4", help="noise multipliers to sweep (plus a run without DP)")
    ap.add_argument("--clip", type=float, default=0.5, help="update clip (L2) for every DP run")
    ap.add_argument("--fedrouter-centroid-noise", type=float, default=4.0,
                    help="centroid noise multiplier of FedRouter's DP runs in the sweep (default 4)")
    ap.add_argument("--centroid-levels", default="1,4,16", help="centroid noise multipliers for FedRouter's routing")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "privacy")
    args = ap.parse_args()
    torch.set_num_threads(1)
    levels = [float(v) for v in args.levels.split(",")]
    rows, centroid_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method in ("fedit", "fedrouter"):
            for z in [0.0, *levels]:
                privacy = {} if z == 0 else {"privacy": {"mode": "central", "noise_multiplier": z, "clip": args.clip}}
                if privacy and method == "fedrouter":
                    privacy["privacy"]["centroid_noise_multiplier"] = args.fedrouter_centroid_noise
                    privacy["method_options"] = FEDROUTER_DP
                r = one_run({"method": method, **privacy}, tmp, f"{method}-{z}")
                eps = r["privacy"]["epsilon"] if privacy else math.inf
                rows.append({"method": method, "noise_multiplier": z, "epsilon": eps, "rouge1": r["rouge1"],
                             "generalization": r["generalization"]["rouge1"]})
                print(f"{method:<10} z={z:<4g} epsilon={eps:>8.3g}  ROUGE-1 {r['rouge1']:.3f}  all tasks "
                      f"{r['generalization']['rouge1']:.3f}", flush=True)
        for zc in [float(v) for v in args.centroid_levels.split(",")]:
            privacy = {"mode": "central", "noise_multiplier": 1.0, "clip": args.clip, "centroid_noise_multiplier": zc}
            r = one_run({"method": "fedrouter", "rounds": 1, "privacy": privacy, "method_options": FEDROUTER_DP}, tmp, f"centroids-{zc}")
            from fedrouter.core.privacy import Accountant

            eps_c = Accountant(1.0, privacy.get("delta", 1e-5), 1, 1, zc).epsilon(0)  # the centroid release alone
            c = r["clustering"]
            centroid_rows.append({"centroid_noise_multiplier": zc, "epsilon_centroids": eps_c, "n_global": c["n_global"],
                                  "router_accuracy": c["router_accuracy"]["generalization"]})
            print(f"DP centroids z_c={zc:<4g} epsilon(release)={eps_c:.3g}: {c['n_global']} global clusters, router "
                  f"accuracy (all tasks) {c['router_accuracy']['generalization']:.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "privacy.json").write_text(json.dumps({"clip": args.clip, "runs": rows, "centroids": centroid_rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in ("fedit", "fedrouter"):
        pts = sorted((r["epsilon"], r["rouge1"]) for r in rows if r["method"] == method and math.isfinite(r["epsilon"]))
        free = next(r["rouge1"] for r in rows if r["method"] == method and not math.isfinite(r["epsilon"]))
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} (central DP)")[0]
        ax.axhline(free, color=line.get_color(), ls="--", lw=1, label=f"{method} without DP")
    ax.set(xscale="log", xlabel=f"epsilon (delta 1e-5), {QUICK_OVERRIDES['rounds']} rounds, clip {args.clip}",
           ylabel="ROUGE-1 (own tasks)", title="Privacy vs utility on the embedded benchmark (dual, seed 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "privacy_utility.png", dpi=110)
    print(f"wrote {args.out / 'privacy_utility.png'}")


if __name__ == "__main__":
    main()
