"""Peak RSS of a run with 32 simulated clients vs 1 client (issue 2: ratio must stay <= 1.2).

Each size runs in a fresh process (FedIT, in-process engine, the default per-client training data of
600 examples, short rounds and small test sets so the run is quick); the process reports its own peak
RSS (ru_maxrss). The base model is loaded once per process whatever the number of clients.
Usage: python bench/memory.py [--clients 1 32]
"""

import argparse
import json
import resource
import subprocess
import sys


def child(n_clients: int) -> None:
    from fedrouter.config import load_config
    from fedrouter.experiment import run_experiment
    import tempfile

    cfg = load_config(None, {"method": "fedit", "n_clients": n_clients, "rounds": 2, "local_steps": 2, "test_per_client": 8,
                             "general_test_per_task": 2, "threads": 1, "scenario": "dual"})
    with tempfile.TemporaryDirectory() as out:
        run_experiment(cfg, out + "/run", progress=False)
    print(json.dumps({"clients": n_clients, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    peaks = {}
    for n in args.clients:
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        print(f"{n:>3} client(s): peak RSS {peaks[n]:7.1f} MB")
    lo, hi = min(args.clients), max(args.clients)
    print(f"ratio {hi} clients / {lo} client(s): {peaks[hi] / peaks[lo]:.3f}")


if __name__ == "__main__":
    main()
