"""Wall time of `fedrouter run` with no arguments, cold cache (the tiny base is built first) and warm.

Usage: python bench/default_run.py [--warm-only] [--set KEY=VALUE ...]
Prints the wall seconds of each run, the run's rouge1 against base_rouge1 and its clustering (K, accuracy).
`--set` is passed to `fedrouter run` (to time a non-default setting beside the default).
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


def timed_run(cache: Path, out: Path, settings: list[str]) -> float:
    env = {**os.environ, "FEDROUTER_CACHE": str(cache)}
    extra = [arg for setting in settings for arg in ("--set", setting)]
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("fedrouter")), "run", "--quiet", "--out", str(out), *extra],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm-only", action="store_true", help="skip the cold-cache run")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE passed to `fedrouter run --set`")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        cache = tmp / "cache"
        if not args.warm_only:
            print(f"cold cache: {timed_run(cache, tmp / 'cold', args.set):.1f} s (includes building the tiny base)")
        else:
            shutil.copytree(Path(os.environ.get("FEDROUTER_CACHE", Path.home() / ".cache/fedrouter")), cache)
        print(f"warm cache: {timed_run(cache, tmp / 'warm', args.set):.1f} s")
        results = json.loads((tmp / "warm" / "results.json").read_text())
        print(f"{results['method']} {results['scenario']}: rouge1 {results['rouge1']:.3f} "
              f"vs base_rouge1 {results['base_rouge1']:.3f}; generalization {results['generalization']['rouge1']:.3f}")
        clustering = results.get("clustering") or {}
        if clustering:
            print(f"clustering: K {clustering.get('n_global')}, accuracy {clustering.get('accuracy')}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
