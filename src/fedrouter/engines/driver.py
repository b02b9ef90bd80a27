"""One run, whatever engine carries its messages: the server's side from the base evaluation to the
results.

`drive` evaluates the untrained base, runs the method's setup and the training rounds (`RoundLoop`),
checkpoints after every round, evaluates at the end and writes the run directory's files (through
`rundir`). The engine appears only as a `ClientSide` (`engines.protocol`): its transport, its clients'
info, their private adapters, and what a checkpoint needs of them. A resumed run (`saved`) puts the server,
the loop, the clients and torch's generator back where the checkpoint found them and goes on from there.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from fedrouter import checkpoint, rundir
from fedrouter import config
from fedrouter.config import Config
from fedrouter.core.metrics import merge_per_task
from fedrouter.engines.loop import RoundLoop
from fedrouter.engines.protocol import ClientSide
from fedrouter.methods.base import ServerPart
from fedrouter.progress import phase


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def epsilon_fields(epsilon: float) -> dict:
    """epsilon as JSON can hold it: a number, or (no noise: no privacy at all) null with "epsilon_infinite":
    true -- never the non-standard literal Infinity, which strict readers refuse and lax ones read as a number."""
    if math.isinf(epsilon):
        return {"epsilon": None, "epsilon_infinite": True}
    return {"epsilon": epsilon, "epsilon_infinite": False}


def checkpoint_payload(cfg: Config, server: ServerPart, clients: ClientSide, loop: RoundLoop, base_reports: dict,
                       setup_report: dict, timings: dict) -> dict:
    """Everything the rest of a run depends on, after a round (see `fedrouter.checkpoint`)."""
    return {"config": cfg.model_dump(), "server": server.state_dict(), **clients.state(), **loop.state(),
            "torch_rng": torch.get_rng_state(), "base_reports": base_reports, "setup_report": setup_report,
            "timings": timings}


def drive(cfg: Config, run_dir: Path, tasks: list[str], shared, server: ServerPart, clients: ClientSide,
          progress: bool = True, saved: dict | None = None) -> dict:
    """The whole run on `clients`; returns the results (results.json is written by the caller)."""
    loop = RoundLoop(server, clients.transport, clients.ids, cfg.rounds, cfg.client_fraction, cfg.seed, progress,
                     cfg.update_norm_ratio, cfg.min_updates)
    accountant = config.accountant(cfg)
    if saved is None:
        clock, timings = time.perf_counter(), {}
        phase("evaluating the base model", progress)
        base_reports = loop.evaluate("test", base=True)
        timings["base_eval_s"], clock = time.perf_counter() - clock, time.perf_counter()
        setup_report = loop.setup()
        timings["setup_s"], clock = time.perf_counter() - clock, time.perf_counter()
    else:  # everything as it stood after the checkpoint's round
        server.load_state_dict(saved["server"])
        clients.restore(saved)
        loop.restore(saved)
        torch.set_rng_state(saved["torch_rng"])
        base_reports, setup_report, timings = saved["base_reports"], saved["setup_report"], dict(saved["timings"])
        clock = time.perf_counter()
        phase(f"resuming after round {len(loop.history)}", progress)
    rounds_before = timings.pop("rounds_s", 0.0)  # training time of the process(es) before a resume

    def on_round(record: dict) -> None:
        if accountant is not None:
            record.update(epsilon_fields(accountant.epsilon(record["round"])))
        if cfg.eval_every and (record["round"] % cfg.eval_every == 0 or record["round"] == cfg.rounds):
            record["rouge1"] = _mean(r["rouge1"] for r in loop.evaluate("test").values())
        metrics.append(record)
        if cfg.checkpoint_keep:
            clients.mark_checkpoint()
            payload = checkpoint_payload(cfg, server, clients, loop, base_reports, setup_report,
                                         {**timings, "rounds_s": rounds_before + time.perf_counter() - clock})
            checkpoint.save(run_dir, record["round"], payload, cfg.checkpoint_keep)

    with rundir.MetricsLog(run_dir, loop.history) as metrics:  # rounds past a resumed checkpoint are dropped
        history = loop.run(on_round)
    timings["rounds_s"] = rounds_before + time.perf_counter() - clock
    clock = time.perf_counter()
    phase("evaluating the trained model (own tasks, all tasks)", progress)
    test_reports, general_reports = loop.evaluate_splits(["test", "general"])
    timings["final_eval_s"] = time.perf_counter() - clock
    results = _results(cfg, run_dir, tasks, shared, server, clients, history, loop,
                       {"base": base_reports, "test": test_reports, "general": general_reports}, setup_report, timings)
    if accountant is not None:
        results["privacy"] = {**cfg.privacy.model_dump(), **epsilon_fields(accountant.epsilon(cfg.rounds)),
                              "epsilon_per_round": [h.get("epsilon") for h in history],
                              "accountant": "dp_accounting RDP, replace-one neighbours",
                              "sampled_per_round": config.sampled_clients(cfg)}
    return results


def _results(cfg, run_dir, tasks, shared, server, clients, history, loop, reports, setup_report, timings) -> dict:
    """Save the adapters, router and other files; the results dict of results.json."""
    ids, info = clients.ids, clients.info()
    base_reports, test_reports, general_reports = reports["base"], reports["test"], reports["general"]
    per_client = [{"client": cid, "tasks": info[cid]["tasks"], "n_test": test_reports[cid]["n"],
                   "rouge1": test_reports[cid]["rouge1"], "rougeL": test_reports[cid]["rougeL"],
                   "exact_match": test_reports[cid]["exact_match"], "n_train": info[cid]["n_train"],
                   "base_rouge1": base_reports[cid]["rouge1"], "general_rouge1": general_reports[cid]["rouge1"]}
                  for cid in ids]
    adapters = sorted(rundir.save_adapters(run_dir, shared, server.adapters()) + clients.save_adapters(run_dir, shared))
    rundir.save_router(run_dir, server.router())
    rundir.save_base(run_dir, cfg.model, shared.base_fingerprint)
    for filename, tensors in server.tensor_files().items():
        rundir.save_tensors(run_dir, filename, tensors)
    rundir.save_embedding_map(run_dir, clients.embedding_map(cfg.seed))
    rundir.write_per_client_csv(run_dir, per_client)
    return {
        "method": cfg.method,
        "scenario": cfg.scenario,
        "seed": cfg.seed,
        "model": cfg.model,
        "engine": clients.engine,
        "tasks": tasks,
        "rouge1": _mean(r["rouge1"] for r in per_client),
        "base_rouge1": _mean(r["rouge1"] for r in base_reports.values()),
        "rougeL": _mean(r["rougeL"] for r in per_client),
        "exact_match": _mean(r["exact_match"] for r in per_client),
        "per_client": per_client,
        "per_task": merge_per_task([test_reports[cid]["per_task"] for cid in ids]),
        "base_per_task": merge_per_task([base_reports[cid]["per_task"] for cid in ids]),
        "generalization": {
            "rouge1": _mean(r["rouge1"] for r in general_reports.values()),
            "per_task": merge_per_task([general_reports[cid]["per_task"] for cid in ids]),
        },
        "bytes_up": loop.traffic.up,
        "bytes_down": loop.traffic.down,
        "bytes_per_client": loop.traffic.by_client,
        "rejected_updates": [{"round": h["round"], **r} for h in history for r in h["rejected"]],
        "skipped_rounds": [h["round"] for h in history if "skipped" in h],
        "client_failures_per_round": [sum(r["reason"].startswith("client failed") for r in h["rejected"]) for h in history],
        "adapters": adapters,
        "timings": timings,
        **setup_report,
        **server.report({"test": test_reports, "general": general_reports}, clients.training_truth()),
    }
