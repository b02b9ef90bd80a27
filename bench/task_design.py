"""Measures the embedded benchmark's three design properties on the tiny base (issue 2, docs/benchmark.md):

(a) a LoRA adapter fine-tuned on a task beats the untrained base on that task;
(b) one adapter trained on all tasks does worse than one adapter per task at the same total step budget;
(c) an adapter trained on one task does poorly on the other tasks.

Prints a ROUGE-1 matrix (rows: adapter, columns: test task) and the three comparisons.
Usage: python bench/task_design.py [--steps 250] [--test-per-task 100] [--threads 2]
"""

import argparse
import json
import time

import torch

from fedrouter.core import synthetic
from fedrouter.core.generate import generate
from fedrouter.core.metrics import score_predictions
from fedrouter.core.model import LoraSettings, adapter_parameters, attach_lora, get_adapter_state, load_base, set_adapter_state
from fedrouter.core.train import batch_stream, encode_examples, train_steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500, help="steps per single-task adapter (one-for-all gets 4x)")
    ap.add_argument("--test-per-task", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="data, batch order and LoRA initialisation")
    ap.add_argument("--json", help="write the matrix here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_base("tiny")
    torch.manual_seed(args.seed)
    model = attach_lora(model, LoraSettings(target_modules=tuple(args.targets.split(","))))
    params = list(adapter_parameters(model).values())
    init = get_adapter_state(model)
    tasks = list(synthetic.TASKS)
    train = {t: encode_examples(tok, synthetic.generate_examples(t, 2000, seed=f"design-train-{args.seed}")) for t in tasks}
    test = {t: synthetic.generate_examples(t, args.test_per_task, seed=f"design-test-{args.seed}") for t in tasks}
    test_enc = {t: encode_examples(tok, test[t]) for t in tasks}

    def evaluate():
        row = {}
        for t in tasks:
            preds = generate(model, tok, [e.prompt_ids for e in test_enc[t]], max_new_tokens=24)
            row[t] = score_predictions(preds, [x["output"] for x in test[t]], [t] * len(preds))["rouge1"]
        return row

    def train_on(examples, steps):
        set_adapter_state(model, init)
        stream = batch_stream(examples, args.batch, tok.pad_token_id, torch.Generator().manual_seed(args.seed))
        return train_steps(model, params, stream, steps, args.lr)

    t0 = time.time()
    matrix = {}
    with model.disable_adapter():
        matrix["base"] = evaluate()
    for t in tasks:
        train_on(train[t], args.steps)
        matrix[t] = evaluate()
    mixed = [e for t in tasks for e in train[t]]
    train_on(mixed, args.steps * len(tasks))
    matrix["one-for-all"] = evaluate()

    print(f"ROUGE-1 (rows: adapter; columns: test task); {args.steps} steps per task adapter, "
          f"{args.steps * len(tasks)} for one-for-all; {time.time() - t0:.0f} s")
    print(f"{'adapter':<14}" + "".join(f"{t:>14}" for t in tasks))
    for name, row in matrix.items():
        print(f"{name:<14}" + "".join(f"{row[t]:>14.3f}" for t in tasks))
    own = sum(matrix[t][t] for t in tasks) / len(tasks)
    base = sum(matrix["base"][t] for t in tasks) / len(tasks)
    mixed_mean = sum(matrix["one-for-all"][t] for t in tasks) / len(tasks)
    cross = [matrix[a][b] for a in tasks for b in tasks if a != b]
    print(f"(a) per-task adapter on its own task: {own:.3f} vs untrained base {base:.3f}")
    print(f"(b) one adapter for all tasks: {mixed_mean:.3f} vs one adapter per task: {own:.3f}")
    print(f"(c) adapter on the other tasks: {sum(cross) / len(cross):.3f} vs on its own task: {own:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(matrix, f, indent=2)


if __name__ == "__main__":
    main()
