"""Tokens/s of local training inside a federated round vs a bare peft training loop (issue 2).

Both sides train the same LoRA model on the same batches (one client's seeded batch stream, replayed):
- federated: `fedrouter` FedIT rounds through the in-process engine (configure, load adapter, train,
  read adapter back, aggregate) -- everything a round costs;
- bare: one AdamW loop over the same batches, no federation around it.
Prints both figures and the ratio (median over --repeats alternating trials).
Usage: python bench/train_throughput.py [--rounds 10] [--local-steps 10] [--repeats 3] [--threads 1]
"""

import argparse
import statistics
import time

import torch

from fedrouter.config import load_config
from fedrouter.core.train import batch_stream
from fedrouter.engines.inprocess import InProcessTransport
from fedrouter.engines.loop import RoundLoop
from fedrouter.world import World, client_part, server_part


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, {"method": "fedit", "n_clients": 1, "rounds": args.rounds, "local_steps": args.local_steps,
                             "test_per_client": 8, "general_test_per_task": 2, "scenario": "all"})
    world = World(cfg, progress=False)
    shared, contexts = world.shared, world.contexts()
    server, client = server_part(cfg, shared, sorted(contexts)), client_part(cfg)
    workbench = contexts[0].workbench
    steps = args.rounds * args.local_steps
    pad = shared.tokenizer.pad_token_id

    def batches():  # the exact batches the client draws in the federated run
        return [b for _, b in zip(range(steps), batch_stream(workbench.train_examples, cfg.batch_size, pad,
                                                               torch.Generator().manual_seed(cfg.seed * 100_003)))]

    def federated() -> float:
        # Replay the client's stream from its start, so both sides see the same batches each trial.
        workbench._generator = torch.Generator().manual_seed(cfg.seed * 100_003)
        workbench._stream = batch_stream(workbench.train_examples, cfg.batch_size, pad, workbench._generator)
        start = time.perf_counter()
        history = RoundLoop(server, InProcessTransport(client, contexts, False), [0], args.rounds, 1.0, cfg.seed,
                            progress=False).run()
        elapsed = time.perf_counter() - start
        tokens = sum(r["tokens"] for r in history)
        assert tokens == sum(int(b["attention_mask"].sum()) for b in batches()), "batches differ from the bare loop's"
        return tokens / elapsed

    def bare() -> float:
        data = batches()
        tokens = sum(int(b["attention_mask"].sum()) for b in data)
        shared.load(shared.initial_adapter)
        model = shared.model
        params = list(shared.live_parameters().values())
        optimizer = torch.optim.AdamW(params, lr=cfg.lr)
        model.train()
        start = time.perf_counter()
        for batch in data:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        model.eval()
        return tokens / elapsed

    bare()  # warm-up
    fed_rates, bare_rates = [], []
    for _ in range(args.repeats):
        bare_rates.append(bare())
        fed_rates.append(federated())
    fed, raw = statistics.median(fed_rates), statistics.median(bare_rates)
    print(f"{steps} steps (batch {cfg.batch_size}, {args.threads} thread(s)), median of {args.repeats}:")
    print(f"  bare peft loop        {raw:10.0f} tokens/s")
    print(f"  federated round       {fed:10.0f} tokens/s")
    print(f"  ratio federated/bare  {fed / raw:10.3f}")


if __name__ == "__main__":
    main()
