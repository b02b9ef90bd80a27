"""What Flower costs (issue 6), on the same experiment:

- simulation: wall time of `fedrouter run --engine flower` (Flower's simulation runtime, one Ray actor per
  core, one torch thread each) against `fedrouter run` in-process (one process, `--threads` torch
  threads), the same config; prints both and the ratio (median over --repeats alternating trials);
- deployment: a loopback federation (SuperLink + one SuperNode per client, `flwr run`; TLS with SuperNode
  authentication unless --insecure), and per round the time beyond the slowest client's own training
  (`round_s - slowest_client_s` in metrics.jsonl): that is what the engine, the messages and the
  ClientApp processes cost (with a `fedrouter flower worker` per node unless --no-workers).

Usage: python bench/flower_speed.py [--part simulation|deployment|both] [--repeats 1] [--set KEY=VALUE ...]
(default: the default experiment, FedRouter on `dual` with 8 clients and 25 rounds; e.g.
`--set rounds=5 --set n_clients=4` for a quicker look).
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedrouter.config import parse_sets
from fedrouter.testing import LoopbackFederation, flower_env, stop


def timed_run(extra: list[str], sets: list[str], env: dict, out: Path) -> float:
    cmd = [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--out", str(out), *extra]
    for item in sets:
        cmd += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=(out.parent / f"{out.name}.log").open("w"))
    try:
        code = proc.wait()
    finally:
        stop(proc)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {out.parent / f'{out.name}.log'}")
    return time.perf_counter() - start


def simulation(args, work: Path) -> None:
    env = flower_env(work / "flwr-home")
    threads = str(args.threads)
    inproc, flower = [], []
    for i in range(args.repeats):
        inproc.append(timed_run(["--threads", threads], args.sets, env, work / f"inprocess-{i}"))
        flower.append(timed_run(["--engine", "flower", "--threads", "1"], args.sets, env, work / f"flower-{i}"))
    a, b = statistics.median(inproc), statistics.median(flower)
    ra = json.loads((work / "inprocess-0" / "results.json").read_text())
    rb = json.loads((work / "flower-0" / "results.json").read_text())
    print(f"simulation: in-process ({threads} thread(s)) {a:.1f} s, Flower simulation ({os.cpu_count()} actors x 1 thread) "
          f"{b:.1f} s -> ratio {b / a:.2f} (median of {args.repeats}); ROUGE-1 {ra['rouge1']:.4f} vs {rb['rouge1']:.4f}")


def deployment(args, work: Path) -> None:
    overrides = parse_sets(args.sets)
    n = int(overrides.get("n_clients", 8))
    run_dir = work / "deployed"
    start = time.perf_counter()
    workers = list(range(n)) if not args.no_workers else []
    with LoopbackFederation(work / "federation", supernodes=n, tls=not args.insecure, workers=workers) as federation:
        federation.run({**overrides, "threads": 1}, run_dir, timeout_s=3600)
    wall = time.perf_counter() - start
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    beyond = [r["round_s"] - r["slowest_client_s"] for r in rounds]
    results = json.loads((run_dir / "results.json").read_text())
    print(f"deployment ({'insecure' if args.insecure else 'TLS + SuperNode auth'}, {n} SuperNodes, "
          f"{'no workers' if args.no_workers else 'a worker per node'}, loopback): "
          f"{len(rounds)} rounds, round {statistics.median(r['round_s'] for r in rounds):.1f} s median, of which "
          f"{statistics.median(beyond):.1f} s beyond the slowest client's training (min {min(beyond):.1f}, max {max(beyond):.1f}); "
          f"whole run {wall:.0f} s; ROUGE-1 {results['rouge1']:.4f}")


def main():
    # SIGTERM unwinds like Ctrl-C, so the federation's processes are stopped by pid on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["simulation", "deployment", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the in-process run (default 2 = the cores here)")
    ap.add_argument("--insecure", action="store_true", help="deployment without TLS")
    ap.add_argument("--no-workers", action="store_true", help="deployment without `fedrouter flower worker`s")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flower-bench-") as tmp:
        work = Path(tmp)
        if args.part in ("simulation", "both"):
            simulation(args, work)
        if args.part in ("deployment", "both"):
            deployment(args, work)


if __name__ == "__main__":
    main()
