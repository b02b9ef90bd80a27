"""A run on a busy machine: `fedrouter run` (the default experiment, warm cache) alone, then beside k busy
processes (k = the CPUs this process may use), in one invocation; prints both wall times and their ratio.
A fair share of the cores predicts at most (k + 1) / k x; oversubscribed threads make it many times that.

Each run writes its log to a pipe (not a terminal), and the longest gap between two of its lines is printed.

Usage: FEDROUTER_CACHE=... python bench/contention.py [--busy K] [--timeout S] [--set KEY=VALUE ...]
  --set threads=2   the same with torch's threads as before issue 34 (one per core, whatever else runs)
The run's threads are its own choice: OMP_NUM_THREADS and MKL_NUM_THREADS are removed from its environment.
Figures go to docs/benchmark.md ("How fast").
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from default_run import timed_run  # bench/ is on the path when a script in it runs

BUSY_LOOP = "while True: pass"


def rouge(out: Path) -> str:
    results = json.loads((out / "results.json").read_text())
    return f"rouge1 {results['rouge1']:.4f}, all tasks {results['generalization']['rouge1']:.4f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=len(os.sched_getaffinity(0)), help="busy processes beside the run")
    ap.add_argument("--timeout", type=float, default=1800.0, help="stop a run after this many seconds")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE passed to `fedrouter run --set`")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        cache = tmp / "cache"
        shutil.copytree(Path(os.environ.get("FEDROUTER_CACHE", Path.home() / ".cache/fedrouter")), cache)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        timed_run(cache, tmp / "warm-up", args.set, args.timeout, env)  # fills the embedding cache: both runs warm
        alone, alone_gap = timed_run(cache, tmp / "alone", args.set, args.timeout, env)
        if alone is None:
            sys.exit(f"contention: the run alone did not finish within {args.timeout:.0f} s")
        print(f"alone: {alone:.1f} s ({rouge(tmp / 'alone')}), longest gap between log lines {alone_gap:.1f} s", flush=True)
        busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
        try:
            loaded, loaded_gap = timed_run(cache, tmp / "loaded", args.set, args.timeout, env)
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
        if loaded is None:
            print(f"beside {args.busy} busy processes: not finished after {args.timeout:.0f} s "
                  f"(> {args.timeout / alone:.1f}x alone)")
            return
        print(f"beside {args.busy} busy processes: {loaded:.1f} s ({rouge(tmp / 'loaded')}), "
              f"longest gap between log lines {loaded_gap:.1f} s")
        print(f"ratio loaded / alone: {loaded / alone:.2f}x (a fair share of the cores: {(args.busy + 1) / args.busy:.2f}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
