"""Serving figures (issue 19): a mixed-adapter batch vs one adapter, and `fedrouter serve` under 32
concurrent clients vs one client sending the same requests one by one.

(1) generate() on a finished run's model, at the run's eval_batch_size (64 by default): --prompts test
    prompts of the embedded benchmark, max_new_tokens of the run (24), greedy,
      one adapter   every prompt through the run's first adapter (set_adapter; no mixing at all)
      routed        each prompt through the adapter the run's router picks (what `predict` and `serve` do)
      random        each prompt through an adapter drawn at random among the run's (the most mixed batches)
    each mixed assignment both stacked (fedrouter.core.mixed_lora, the default) and through peft's own
    `adapter_names` (the path `predict` used before). The variants are timed interleaved, --reps times;
    medians of wall time and of process CPU time (the machine is shared: CPU time is the steadier one).
    Asserts that every mixed path gives the answers of each prompt's adapter alone. A batch decodes until
    its longest answer ends, so a mix of adapters that answer at different lengths takes more steps than
    one adapter: the decoding steps (forward calls) of each variant are counted in an untimed pass, and
    the time per step is reported beside the total.
(2) `fedrouter serve RUN --threads 1` in its own process on loopback (default --max-batch 64,
    --max-wait-ms 20): --clients threads each sending --requests completions (plain HTTP, greedy), then one
    client sending the same requests one by one; requests/s, their ratio, and /metrics' batch counters.
    Asserts every answer is the same both ways. Repeated with --max-wait-ms 0 for the one-by-one side.

Usage: python bench/serve_speed.py [--run RUN_DIR] [--prompts 640] [--reps 5] [--clients 32] [--requests 20] [--only 1|2]
--run: a finished run directory; one that does not exist is made there first (and kept), as is one in a
temporary folder without --run: a short FedRouter run on the embedded benchmark (`fedrouter run --rounds 3`:
the default tiny base, scenario dual, 8 clients; about a minute warm).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def make_run(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--rounds", "3", "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def test_prompts(n: int) -> list[str]:
    from fedrouter.core import synthetic

    per_task = -(-n // len(synthetic.TASKS))
    prompts = [e["instruction"] for t in synthetic.TASKS for e in synthetic.generate_examples(t, per_task, seed="serve-speed")]
    random.Random(0).shuffle(prompts)
    return prompts[:n]


def batch_figures(run_dir: Path, prompts: list[str], reps: int) -> dict:
    from fedrouter.core.embed import resolve_embedder
    from fedrouter.core.generate import Row, generate, generate_rows
    from fedrouter.serving.finished_run import encode_prompts, load_run, route_prompts

    cfg, model, tokenizer, router = load_run(run_dir)
    embedder = resolve_embedder(router["embedder"], model, tokenizer) if router else None
    routed, _ = route_prompts(router, embedder, prompts)
    adapters = sorted(set(router["adapters"])) if router else ["global"]
    rng = random.Random(1)
    drawn = [rng.choice(adapters) for _ in prompts]
    ids = encode_prompts(cfg, tokenizer, prompts)
    batch, budget = cfg.eval_batch_size, cfg.max_new_tokens

    def mixed(names, stack):
        return [c.text for c in generate_rows(model, tokenizer, [Row(p, budget, n) for p, n in zip(ids, names)], batch,
                                              stack_adapters=stack)]

    def one_adapter():
        model.set_adapter(adapters[0])
        return generate(model, tokenizer, ids, budget, batch)

    variants = {"one adapter": one_adapter,
                "routed, stacked": lambda: mixed(routed, True), "routed, peft": lambda: mixed(routed, False),
                "random, stacked": lambda: mixed(drawn, True), "random, peft": lambda: mixed(drawn, False)}
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    answers = {}
    for _ in range(reps):
        for name, fn in variants.items():
            w, c = time.perf_counter(), time.process_time()
            answers[name] = fn()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    steps = {}
    counter = model.get_base_model().register_forward_pre_hook(lambda *_: steps.__setitem__("n", steps["n"] + 1))
    for name, fn in variants.items():
        steps["n"] = 0
        fn()
        steps[name] = steps["n"]
    counter.remove()
    alone = {}
    for a in adapters:
        model.set_adapter(a)
        alone[a] = generate(model, tokenizer, ids, budget, batch)
    for assignment, names in (("routed", routed), ("random", drawn)):
        want = [alone[n][i] for i, n in enumerate(names)]
        for path in ("stacked", "peft"):
            assert answers[f"{assignment}, {path}"] == want, f"{assignment}, {path}: not each adapter's own answers"

    def per_batch(names):  # distinct adapters per batch of the length-sorted order generate uses
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        return statistics.mean(len({names[i] for i in order[s : s + batch]}) for s in range(0, len(order), batch))

    return {"wall": {k: statistics.median(v) for k, v in wall.items()}, "cpu": {k: statistics.median(v) for k, v in cpu.items()},
            "steps": {k: steps[k] for k in variants},
            "adapters": len(adapters), "batch": batch, "budget": budget,
            "per_batch": {"routed": per_batch(routed), "random": per_batch(drawn)}, "prompts": len(prompts)}


class Server:
    def __init__(self, run_dir: Path, log: Path, *flags: str):
        cmd = [sys.executable, "-m", "fedrouter.cli", "serve", str(run_dir), "--port", "0", "--threads", "1",
               "--no-access-log", *flags]
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 300
        while not (found := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        self.url, self.model = found.group(1), run_dir.name

    def close(self) -> None:
        from fedrouter.testing import stop

        stop(self.proc, grace_s=60)
        self.log.close()


def _complete(http, server: Server, prompt: str) -> str:
    r = http.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": prompt, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def _metrics(http, server: Server) -> dict[str, float]:
    lines = http.get(f"{server.url}/metrics").text.splitlines()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if ln and not ln.startswith("#")}


def concurrency_figures(run_dir: Path, prompts: list[str], clients: int, requests: int, folder: Path) -> dict:
    import httpx

    work = [[prompts[(k * requests + i) % len(prompts)] for i in range(requests)] for k in range(clients)]
    flat = [p for w in work for p in w]
    out = {}
    server = Server(run_dir, folder / "serve-default.log")
    try:
        with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
            _complete(http, server, prompts[0])  # warm
            before = _metrics(http, server)
            answers: dict[int, list[str]] = {}

            def client(k: int) -> None:
                answers[k] = [_complete(http, server, p) for p in work[k]]

            threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out["concurrent_s"] = time.perf_counter() - start
            after = _metrics(http, server)
            out["batches"] = after["fedrouter_batches_total"] - before["fedrouter_batches_total"]
            out["mixed_batches"] = after["fedrouter_mixed_batches_total"] - before["fedrouter_mixed_batches_total"]
            out["max_rows"] = after["fedrouter_batch_rows_max"]
            out["max_adapters"] = after["fedrouter_batch_adapters_max"]
            start = time.perf_counter()
            sequential = [_complete(http, server, p) for p in flat]
            out["sequential_s"] = time.perf_counter() - start
            assert sequential == [a for k in range(clients) for a in answers[k]], "concurrent and one-by-one answers differ"
    finally:
        server.close()
    server = Server(run_dir, folder / "serve-nowait.log", "--max-wait-ms", "0")
    try:
        with httpx.Client(timeout=600) as http:
            _complete(http, server, prompts[0])
            start = time.perf_counter()
            for p in flat:
                _complete(http, server, p)
            out["sequential_nowait_s"] = time.perf_counter() - start
    finally:
        server.close()
    out["requests"] = len(flat)
    return out


def print_batch_figures(b: dict, args) -> None:
    print(f"(1) {b['prompts']} prompts, {b['adapters']} adapters, {b['batch']} prompts per generate call, up to "
          f"{b['budget']} new tokens, {args.threads} thread(s), median of {args.reps}")
    print(f"    adapters per batch: routed {b['per_batch']['routed']:.1f}, random {b['per_batch']['random']:.1f}")
    one_w, one_c, one_s = b["wall"]["one adapter"], b["cpu"]["one adapter"], b["steps"]["one adapter"]
    print(f"    {'':<16} {'wall':>14} {'cpu':>14} {'steps':>6} {'cpu per step':>14}")
    for name in b["wall"]:
        w, c, n = b["wall"][name], b["cpu"][name], b["steps"][name]
        print(f"    {name:<16} {w:6.2f} s {w / one_w:4.2f}x {c:6.2f} s {c / one_c:4.2f}x {n:6d} "
              f"{1000 * c / n:6.2f} ms {(c / n) / (one_c / one_s):4.2f}x")
    print("    target: a mixed batch <= 1.3x one adapter; every mixed path gave each adapter's own answers")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, help="a finished run directory (default: make a short FedRouter run)")
    ap.add_argument("--prompts", type=int, default=640, help="prompts for the batch figures (default 640: 10 batches of 64)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["1", "2"], help="only part (1), the batch figures, or (2), the server's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fedrouter.runtime import quiet_libraries

    quiet_libraries(progress_bars=False)
    with tempfile.TemporaryDirectory(prefix="serve-speed-") as tmp:
        run_dir = args.run or Path(tmp) / "fedrouter-run"
        if not run_dir.exists():
            make_run(run_dir)
        prompts = test_prompts(args.prompts)
        if args.only != "2":
            print_batch_figures(batch_figures(run_dir, prompts, args.reps), args)
        if args.only == "1":
            return
        c = concurrency_figures(run_dir, prompts, args.clients, args.requests, Path(tmp))
        n = c["requests"]
        conc, seq, nowait = n / c["concurrent_s"], n / c["sequential_s"], n / c["sequential_nowait_s"]
        print(f"(2) fedrouter serve, {args.clients} clients x {args.requests} requests = {n}, greedy, default batching")
        print(f"    concurrent   {conc:7.1f} req/s  ({c['batches']:.0f} batches, {c['mixed_batches']:.0f} mixed, "
              f"up to {c['max_rows']:.0f} rows and {c['max_adapters']:.0f} adapters in one)")
        print(f"    one by one   {seq:7.1f} req/s  (--max-wait-ms 20; {nowait:.1f} req/s with --max-wait-ms 0)")
        print(f"    concurrent / one by one: {conc / seq:.1f}x (target >= 5x; {conc / nowait:.1f}x against the no-wait server)")
        print("    the same answers both ways")


if __name__ == "__main__":
    main()
