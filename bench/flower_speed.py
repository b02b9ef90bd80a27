"""What Flower costs (issue 6), on the same experiment:

- simulation: wall time of `fedrouter run --engine flower` (Flower's simulation runtime, one Ray actor per
  core, one torch thread each) against `fedrouter run` in-process (one process, `--threads` torch
  threads), the same config; prints both and the ratio (median over --repeats alternating trials);
- deployment: a loopback federation (SuperLink + one SuperNode per client, `flwr run`; TLS with SuperNode
  authentication unless --insecure), and per round the time beyond the slowest client's own training
  (`round_s - slowest_client_s` in metrics.jsonl): that is what the engine, the messages and the
  ClientApp processes cost (with a `fedrouter flower worker` per node unless --no-workers), with Flower's
  stock `flower-supernode` (3-s idle poll: the "before" figure) and with `fedrouter flower supernode`
  (short polls, ClientApp processes forked), in turn, in one run (--supernode both, the default; `all`
  adds `--fresh-clientapps`: short polls only; --before-code SRC_DIR adds a first run of an older
  checkout's code with the stock SuperNode).

Usage: python bench/flower_speed.py [--part simulation|deployment|both] [--repeats 1]
[--supernode stock|fresh|fedrouter|both|all] [--before-code SRC_DIR] [--poll-interval 0.1] [--set KEY=VALUE ...]
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
from fedrouter.testing import POLL_S, LoopbackFederation, flower_env, stop


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


def deployed(args, work: Path, kind: str, name: str) -> list[float]:
    """One loopback run; prints its line and returns its per-round overheads (round_s - slowest_client_s)."""
    overrides = parse_sets(args.sets)
    n = int(overrides.get("n_clients", 8))
    run_dir = work / f"deployed-{name}"
    start = time.perf_counter()
    workers = list(range(n)) if not args.no_workers else []
    poll = None if kind in ("stock", "code") else args.poll_interval
    before = os.environ.get("PYTHONPATH")
    if kind == "code":  # the federation's processes (ServerApp, ClientApps, workers) run that code
        os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(args.before_code).resolve()), *([before] if before else [])])
    try:
        with LoopbackFederation(work / f"federation-{name}", supernodes=n, tls=not args.insecure, workers=workers,
                                poll_interval_s=poll, fork_clientapps=kind == "fedrouter") as federation:
            federation.run({**overrides, "threads": 1}, run_dir, timeout_s=3600)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    wall = time.perf_counter() - start
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    beyond = [r["round_s"] - r["slowest_client_s"] for r in rounds]
    results = json.loads((run_dir / "results.json").read_text())
    node = ("stock flower-supernode" if poll is None else f"fedrouter flower supernode --poll-interval {poll:g}"
            + (" --fresh-clientapps" if kind == "fresh" else "")) + (f", code of {args.before_code}" if kind == "code" else "")
    print(f"deployment [{node}] ({'insecure' if args.insecure else 'TLS + SuperNode auth'}, {n} SuperNodes, "
          f"{'no workers' if args.no_workers else 'a worker per node'}, loopback): "
          f"{len(rounds)} rounds, round {statistics.median(r['round_s'] for r in rounds):.1f} s median, of which "
          f"{statistics.median(beyond):.2f} s beyond the slowest client's training (min {min(beyond):.2f}, max {max(beyond):.2f}); "
          f"whole run {wall:.0f} s; ROUGE-1 {results['rouge1']:.4f}", flush=True)
    return beyond


def deployment(args, work: Path) -> None:
    """Each --supernode kind in turn, --repeats times, in this one process; then each kind's median
    per-round overhead over all its rounds, and its ratio to the stock SuperNode's ("before")."""
    kinds = {"all": ["stock", "fresh", "fedrouter"], "both": ["stock", "fedrouter"]}.get(args.supernode, [args.supernode])
    if args.before_code:
        kinds = ["code", *kinds]
    beyond: dict = {kind: [] for kind in kinds}
    for i in range(args.repeats):
        for kind in kinds:
            beyond[kind] += deployed(args, work, kind, f"{kind}-{i}")
    medians = {kind: statistics.median(values) for kind, values in beyond.items()}
    print("per-round overhead, median over all rounds: " + "; ".join(
        f"{kind} {m:.2f} s ({len(beyond[kind])} rounds" + (f", {m / medians['stock']:.2f} of stock)" if "stock" in medians else ")")
        for kind, m in medians.items()))


def main():
    # SIGTERM unwinds like Ctrl-C, so the federation's processes are stopped by pid on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["simulation", "deployment", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the in-process run (default 2 = the cores here)")
    ap.add_argument("--insecure", action="store_true", help="deployment without TLS")
    ap.add_argument("--no-workers", action="store_true", help="deployment without `fedrouter flower worker`s")
    ap.add_argument("--supernode", choices=["stock", "fresh", "fedrouter", "both", "all"], default="both",
                    help="deployment: Flower's flower-supernode (stock: the before figure), `fedrouter flower supernode "
                         "--fresh-clientapps` (fresh: short polls only), `fedrouter flower supernode` (fedrouter: short "
                         "polls, forked ClientApps); both = stock and fedrouter, all = the three, in turn (default both)")
    ap.add_argument("--before-code", metavar="SRC_DIR",
                    help="deployment: also a run (first, 'code') with the stock SuperNode and the fedrouter package in "
                         "SRC_DIR (e.g. an older checkout's src) first on the federation's PYTHONPATH")
    ap.add_argument("--poll-interval", type=float, default=POLL_S,
                    help=f"`fedrouter flower supernode --poll-interval` (default {POLL_S:g})")
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
