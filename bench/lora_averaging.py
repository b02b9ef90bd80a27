"""What FedRouter's per-cluster averaging does to one round's update, on the `single` scenario.

In `single` a FedRouter cluster is the two clients of one task: each round both train the cluster's
adapter on their own data and the server averages LoRA A and B separately. This measures, per round, on the
study protocol (configs/study.toml) and the first task held by two clients:
  - how far the factor average is from the mean of the two clients' products B·A (the update they meant),
  - how large the mean update is against one client's own update (averaging shrinks noisy steps),
  - how far the two clients' A matrices drift apart in a round, relative to |A|.
Usage: FEDROUTER_CACHE=/tmp/frcache python bench/lora_averaging.py [--rounds 4]
Results go to docs/benchmark.md ("FedRouter vs Local on single").
"""

import argparse
import os

import torch

from fedrouter.config import load_config
from fedrouter.runtime import quiet_libraries
from fedrouter.world import World, build_data

torch.set_num_threads(2)


def study_pair(task: str | None):
    """(config, world, task, its two clients) on the study protocol's `single` scenario (configs/study.toml;
    $FEDROUTER_CACHE as the cache): the clients that hold `task`, or the first task two clients hold."""
    overrides = {"scenario": "single"}
    if os.environ.get("FEDROUTER_CACHE"):
        overrides["cache_dir"] = os.environ["FEDROUTER_CACHE"]
    cfg = load_config("configs/study.toml", overrides)
    data = build_data(cfg)
    by_task: dict[str, list[int]] = {}
    for c in data.clients:
        if len(c.tasks) == 1:
            by_task.setdefault(c.tasks[0], []).append(c.client_id)
    pairs = [(t, ids) for t, ids in by_task.items() if len(ids) == 2 and task in (None, t)]
    if not pairs:
        raise SystemExit(f"no task{'' if task is None else ' ' + repr(task)} is held by exactly two clients in this config")
    task, pair = pairs[0]
    return cfg, World(cfg, progress=False, data=data), task, pair


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--task", default=None, help="the task whose two clients to pair (default: the first such task)")
    args = ap.parse_args()
    quiet_libraries(progress_bars=False)
    cfg, world, task, pair = study_pair(args.task)
    benches = [world.workbench(c) for c in pair]
    adapter = {k: v.clone() for k, v in benches[0].initial_adapter().items()}
    pairs = [(a, a.replace("lora_A", "lora_B")) for a in sorted(adapter) if "lora_A" in a]
    print(f"task {task}, clients {pair}")
    for rnd in range(args.rounds):
        trained = [wb.train(adapter, rnd)[0] for wb in benches]
        averaged = {k: (trained[0][k] + trained[1][k]) / 2 for k in adapter}
        error = mean_sq = own_sq = drift = 0.0
        for a, b in pairs:
            start = adapter[b] @ adapter[a]
            own = [t[b] @ t[a] - start for t in trained]
            meant = (own[0] + own[1]) / 2
            error += float((averaged[b] @ averaged[a] - start - meant).norm() ** 2)
            mean_sq += float(meant.norm() ** 2)
            own_sq += float(sum(o.norm() ** 2 for o in own) / 2)
            drift = max(drift, float((trained[0][a] - trained[1][a]).norm() / adapter[a].norm()))
        print(f"round {rnd}: |factor average - mean product update| / |mean product update| {(error / mean_sq) ** 0.5:.3f}; "
              f"|mean update| / rms |one client's update| {(mean_sq / own_sq) ** 0.5:.3f}; "
              f"largest A drift between the clients / |A| {drift:.3f}", flush=True)
        adapter = averaged


if __name__ == "__main__":
    main()
