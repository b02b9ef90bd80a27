"""Wall time of `fedrouter run` with no arguments, cold cache (the tiny base is built first) and warm.

Usage: python bench/default_run.py [--warm-only]
Prints the wall seconds of each run and FedIT's rouge1 against base_rouge1.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(cache: Path, out: Path) -> float:
    env = {**os.environ, "FEDROUTER_CACHE": str(cache)}
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("fedrouter")), "run", "--quiet", "--out", str(out)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm-only", action="store_true", help="skip the cold-cache run")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        cache = tmp / "cache"
        if not args.warm_only:
            print(f"cold cache: {timed_run(cache, tmp / 'cold'):.1f} s (includes building the tiny base)")
        else:
            shutil.copytree(Path(os.environ.get("FEDROUTER_CACHE", Path.home() / ".cache/fedrouter")), cache)
        print(f"warm cache: {timed_run(cache, tmp / 'warm'):.1f} s")
        results = json.loads((tmp / "warm" / "results.json").read_text())
        print(f"{results['method']} {results['scenario']}: rouge1 {results['rouge1']:.3f} "
              f"vs base_rouge1 {results['base_rouge1']:.3f}; generalization {results['generalization']['rouge1']:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
