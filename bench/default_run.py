"""Wall time of `fedrouter run` with no arguments, cold cache (the tiny base is built first) and warm, and
the longest wait between two of its log lines.

Usage: python bench/default_run.py [--warm-only] [--set KEY=VALUE ...]
Prints the wall seconds of each run, the longest gap between two lines it wrote to stderr (a pipe, as in CI,
`| tee` or nohup: log lines, not bars), the run's rouge1 against base_rouge1 and its clustering (K, accuracy).
`--set` is passed to `fedrouter run` (to time a non-default setting beside the default).
bench/contention.py runs its runs through `timed_run` too.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def timed_run(cache: Path, out: Path, settings: list[str], timeout: float | None = None,
              env: dict | None = None) -> tuple[float | None, float]:
    """(wall seconds of one `fedrouter run`, None when it ran past `timeout` and was stopped; the longest time
    without a line on its stderr, from the start to the end)."""
    env = {**(os.environ if env is None else env), "FEDROUTER_CACHE": str(cache)}
    extra = [arg for setting in settings for arg in ("--set", setting)]
    start = time.perf_counter()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("fedrouter")), "run", "--out", str(out), *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter(), line) for line in proc.stderr))
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # by its own handle (its pid), never by name
        proc.wait()
    reader.join()
    end = time.perf_counter()
    stamps = [start, *(t for t, _ in lines), end]
    gap = max(b - a for a, b in zip(stamps, stamps[1:]))
    if proc.returncode and proc.returncode > 0:
        tail = "".join(line for _, line in lines[-5:])
        sys.exit(f"fedrouter run exited {proc.returncode}:\n{tail}")
    return (None if proc.returncode else end - start), gap


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm-only", action="store_true", help="skip the cold-cache run")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE passed to `fedrouter run --set`")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        cache = tmp / "cache"
        if not args.warm_only:
            seconds, gap = timed_run(cache, tmp / "cold", args.set)
            print(f"cold cache: {seconds:.1f} s (includes building the tiny base), longest gap between log lines {gap:.1f} s")
        else:
            shutil.copytree(Path(os.environ.get("FEDROUTER_CACHE", Path.home() / ".cache/fedrouter")), cache)
        seconds, gap = timed_run(cache, tmp / "warm", args.set)
        print(f"warm cache: {seconds:.1f} s, longest gap between log lines {gap:.1f} s")
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
