"""Same results before and after a change that should not change them (a move, a refactor).

Runs `fedrouter run --rounds 3` for fedrouter, fedit, feddpa and flora in-process and fedrouter on
`--engine flower` (the default experiment otherwise), and records a digest of each run's results.json
(but `wall_s`, `timings`, `run_dir`; one digest per key, so that a check names the keys that differ and
tells a key added to results.json from a number that changed), metrics.jsonl (but the per-round seconds)
and every adapter (its tensors, bit for bit). Each invocation runs on its own empty model cache (the tiny base
built once, the embeddings computed as a first run computes them): an encoder's vectors differ in their last
bits with the threads that computed them, and a digest must not depend on what a cache happened to hold.

Usage:
  python bench/same_results.py --record bench/same_results.json   # before the change
  python bench/same_results.py --check bench/same_results.json    # after: prints a verdict per run, exit 1 on a difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {
    "fedrouter": ["--method", "fedrouter"],
    "fedit": ["--method", "fedit"],
    "feddpa": ["--method", "feddpa"],
    "flora": ["--method", "flora"],
    "fedrouter-flower": ["--method", "fedrouter", "--engine", "flower"],
}
TIMING_RESULTS = {"wall_s", "timings", "run_dir"}
TIMING_ROUND = {"round_s", "slowest_client_s"}


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def fingerprint(run_dir: Path) -> dict:
    """Digests of what a run produced, timings left out."""
    from safetensors.torch import load_file

    results = json.loads((run_dir / "results.json").read_text())
    rounds = [{k: v for k, v in json.loads(line).items() if k not in TIMING_ROUND}
              for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    adapters = {}
    for name in results["adapters"]:
        tensors = load_file(str(run_dir / "adapters" / name / "adapter_model.safetensors"))
        h = hashlib.sha256()
        for key in sorted(tensors):
            h.update(key.encode())
            h.update(tensors[key].contiguous().numpy().tobytes())
        adapters[name] = h.hexdigest()
    return {"results": {k: _digest(v) for k, v in results.items() if k not in TIMING_RESULTS},
            "metrics": _digest(rounds), "adapters": adapters, "rouge1": results["rouge1"]}


def run_all(workdir: Path, only: list[str]) -> dict:
    cli = Path(sys.executable).with_name("fedrouter")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_HOME": str(workdir / "flwr-home"),
           "FEDROUTER_CACHE": str(workdir / "cache")}
    out = {}
    for name in only:
        run_dir = workdir / name
        subprocess.run([str(cli), "run", "--quiet", "--rounds", "3", "--out", str(run_dir), *RUNS[name]],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        out[name] = fingerprint(run_dir)
        print(f"{name}: ROUGE-1 {out[name]['rouge1']:.4f}, results {_digest(out[name]['results'])[:12]}, "
              f"metrics {out[name]['metrics'][:12]}, {len(out[name]['adapters'])} adapter(s)", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--record", type=Path, help="write the fingerprints here")
    what.add_argument("--check", type=Path, help="compare with the fingerprints recorded here")
    ap.add_argument("--only", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    args = ap.parse_args()
    only = [n for n in args.only.split(",") if n]
    with tempfile.TemporaryDirectory() as tmp:
        found = run_all(Path(tmp), only)
    if args.record:
        args.record.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
        print(f"recorded {args.record}")
        return 0
    recorded = json.loads(args.check.read_text())
    same = True
    for name, fp in found.items():
        before, now = recorded[name]["results"], fp["results"]
        changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
        differs = [f"results[{k}]" for k in changed] + [k for k in ("metrics", "adapters") if fp[k] != recorded[name][k]]
        added, gone = sorted(now.keys() - before.keys()), sorted(before.keys() - now.keys())
        print(f"{name}: {'identical' if not differs else 'DIFFERS in ' + ', '.join(differs)}"
              + (f"; results.json keys added: {', '.join(added)}" if added else "")
              + (f"; keys gone: {', '.join(gone)}" if gone else ""))
        same &= not differs and not gone
    print("same results: " + ("yes" if same else "NO"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
