"""FedRouter vs Local on `single`, without batch-order luck: one task's two clients, many batch orders.

In `single` a FedRouter cluster is the two clients of one task, averaged every round; Local trains each
client alone. With the study protocol (configs/study.toml) this trains both ways from the same batch
orders (a client draws the same batches in both, as FedRouter's one-cluster clients now do), for
several batch orders (the data stay those of the config's seed), and prints ROUGE-1 on each client's own
test set: the spread over orders is the noise a single study seed carries; the paired difference is
what averaging does.
Usage: FEDROUTER_CACHE=/tmp/frcache python bench/batch_order_noise.py [--task data_to_text] [--orders 5]
Results go to docs/benchmark.md ("FedRouter vs Local on single").
"""

import argparse
import statistics

import torch
from lora_averaging import study_pair  # bench/ is the script's folder: the same study pair

from fedrouter.runtime import quiet_libraries

torch.set_num_threads(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="data_to_text")
    ap.add_argument("--orders", type=int, default=5, help="batch orders (train seeds 0..N-1)")
    args = ap.parse_args()
    quiet_libraries(progress_bars=False)
    cfg, world, _, pair = study_pair(args.task)
    print(f"task {args.task}, clients {pair}, {cfg.rounds} rounds of {cfg.local_steps} steps")
    local_scores, averaged_scores = [], []
    for order in range(args.orders):
        # two workbenches per client with the same train seed: the same batches and dropout masks
        alone = [world.workbench(c, train_seed=order) for c in pair]
        together = [world.workbench(c, train_seed=order) for c in pair]
        initial = alone[0].initial_adapter()
        own, shared = [initial, initial], initial
        for rnd in range(cfg.rounds):
            own = [wb.train(a, rnd)[0] for wb, a in zip(alone, own)]
            trained = [wb.train(shared, rnd)[0] for wb in together]
            shared = {k: (trained[0][k] + trained[1][k]) / 2 for k in shared}  # equal sizes: the plain mean
        local = [wb.evaluate(a)["rouge1"] for wb, a in zip(alone, own)]
        averaged = [wb.evaluate(shared)["rouge1"] for wb in together]
        local_scores += local
        averaged_scores += averaged
        print(f"order {order}: Local {local[0]:.3f} {local[1]:.3f}   averaged {averaged[0]:.3f} {averaged[1]:.3f}", flush=True)
    diffs = [a - b for a, b in zip(averaged_scores, local_scores)]
    print(f"Local    mean {statistics.mean(local_scores):.3f}, std over orders and clients {statistics.pstdev(local_scores):.3f}")
    print(f"averaged mean {statistics.mean(averaged_scores):.3f}, std {statistics.pstdev(averaged_scores):.3f}")
    print(f"averaged - Local, paired: mean {statistics.mean(diffs):+.3f}, ahead in {sum(d > 0 for d in diffs)}/{len(diffs)}")


if __name__ == "__main__":
    main()
