"""One experiment, end to end: config -> data -> model -> method -> engine -> evaluation -> run directory.

A run directory holds `config.json` (resolved), `metrics.jsonl` (one line per round), `adapters/<name>/`
(PEFT format), `per_client.csv` and, written last and atomically, `results.json`. A run that fails leaves
`FAILED` with the reason and no `results.json`, so it never looks complete.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from fedrouter import checkpoint, rundir
from fedrouter.config import Config
from fedrouter.core.data import build_federated_data
from fedrouter.core.metrics import merge_per_task
from fedrouter.core.model import LoraSettings, TinyBaseSpec, load_base
from fedrouter.core.workbench import ClientWorkbench, SharedModel, TrainSettings
from fedrouter.engines.inprocess import InProcessTransport
from fedrouter.engines.loop import Traffic, evaluate_clients, run_rounds, run_setup
from fedrouter.errors import FedrouterError
from fedrouter.methods import load_method
from fedrouter.methods.base import ClientContext, MethodSetup

def default_run_dir(cfg: Config) -> Path:
    return rundir.default_path(cfg.method, cfg.scenario, cfg.seed)


def _client_row(cid: int, tasks: list[str], report: dict) -> dict:
    return {"client": cid, "tasks": tasks, "n_test": report["n"], "rouge1": report["rouge1"],
            "rougeL": report["rougeL"], "exact_match": report["exact_match"]}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def build_data(cfg: Config):
    """The federated split of the config's data (deterministic: every process that builds it agrees)."""
    return build_federated_data(
        cfg.data, cfg.scenario, cfg.n_clients, cfg.train_per_client, cfg.test_per_client,
        cfg.general_test_per_task, seed=cfg.seed, task_field=cfg.task_field, tasks=cfg.tasks,
        dirichlet_alpha=cfg.dirichlet_alpha,
    )


def build_shared(cfg: Config, progress: bool = True) -> SharedModel:
    """The base model with its LoRA slot and the training settings (the same initial adapter everywhere)."""
    tiny_spec = TinyBaseSpec(**cfg.tiny.model_dump())
    base, tokenizer = load_base(cfg.model, Path(cfg.cache_dir) if cfg.cache_dir else None, tiny_spec, progress)
    settings = TrainSettings(
        local_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay, total_rounds=cfg.rounds, max_seq_len=cfg.max_seq_len,
        max_new_tokens=cfg.max_new_tokens, eval_batch_size=cfg.eval_batch_size, prompt_template=cfg.prompt_template,
    )
    lora = LoraSettings(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, tuple(cfg.lora.target_modules))
    return SharedModel(base, tokenizer, lora, settings, seed=cfg.seed)


def method_setup(cfg: Config) -> MethodSetup:
    return MethodSetup(cfg.seed, cfg.rounds, dict(cfg.method_options), cfg.cache_dir)


def build_world(cfg: Config, progress: bool = True):
    """Data, the shared model, one workbench per client, and the method's two parts."""
    data = build_data(cfg)
    shared = build_shared(cfg, progress)
    general_encoded = shared.encode(data.general_test)  # the same for every client: encode once
    contexts = {
        c.client_id: ClientContext(c.client_id, ClientWorkbench(shared, c, data.general_test, cfg.seed, general_encoded))
        for c in data.clients
    }
    server_cls, client_cls = load_method(cfg.method)
    server = server_cls(method_setup(cfg), shared.initial_adapter, sorted(contexts))
    client = client_cls(method_setup(cfg))
    return data, shared, contexts, server, client


def run_experiment(cfg: Config, out_dir: Path | None = None, progress: bool = True, resume: bool = False) -> dict:
    """Run `cfg` and write its run directory; returns the results dict (also in results.json).

    resume=True continues the unfinished run in `out_dir` from its newest readable checkpoint."""
    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run_dir = Path(out_dir) if out_dir else default_run_dir(cfg)
    saved = resumable(run_dir, cfg) if resume else None  # a run that cannot be resumed is refused before any work
    if cfg.engine == "flower":
        try:
            from fedrouter.engines.flower import run_simulation
        except ImportError as exc:
            raise FedrouterError(f"engine flower needs Flower ({exc.name} is missing): pip install 'fedrouter[flower]'") from None
        build_data(cfg)  # bad data fails here, before the run directory exists
        shared = build_shared(cfg, progress)
        return write_run(run_dir, cfg, lambda: run_simulation(cfg, run_dir, progress, shared, saved), start, resume)
    # Everything that can fail on bad input (data, model) is checked before the run directory exists.
    data, shared, contexts, server, client = build_world(cfg, progress)
    clients = InProcessClients(cfg, client, contexts, progress)
    return write_run(run_dir, cfg, lambda: run_with(cfg, run_dir, data.tasks, shared, server, clients, progress, saved),
                     start, resume)


def write_run(run_dir: Path, cfg: Config, produce, start: float | None = None, resume: bool = False) -> dict:
    """Claim `run_dir` (writing its config.json; a resumed run reopens it), let `produce()` fill it and
    return the results, then write results.json last -- or FAILED with the reason, so an unfinished run
    never looks complete. A write that fails (a full disk) ends in one FedrouterError with the reason."""
    start = time.perf_counter() if start is None else start
    if resume:
        rundir.reopen(run_dir)
    else:
        rundir.claim(run_dir, cfg.model_dump())
    try:
        results = produce()
        results["wall_s"] = time.perf_counter() - start
        results["run_dir"] = str(run_dir)
        rundir.finish(run_dir, results)
    except BaseException as exc:
        unrecorded = rundir.mark_failed(run_dir, exc)
        if isinstance(exc, OSError):
            where = f" ({exc.filename})" if exc.filename else ""
            also = f"; FAILED could not be written either ({unrecorded})" if unrecorded else ""
            raise FedrouterError(f"run {run_dir} failed: {exc.strerror or exc}{where}{also}") from None
        raise
    return results


def resumable(run_dir: Path, cfg: Config) -> dict:
    """The newest readable checkpoint of an unfinished run written under `cfg`, or one clear error."""
    if (run_dir / rundir.RESULTS).exists():
        raise FedrouterError(f"{run_dir} is a finished run (it has {rundir.RESULTS}); nothing to resume")
    saved = checkpoint.load_latest(run_dir)
    if saved is None:
        raise FedrouterError(f"{run_dir} has no readable checkpoint to resume from; run it again from the start")
    checkpoint.check_belongs(saved, cfg.model_dump(), run_dir / rundir.CONFIG)
    return saved


class InProcessClients:
    """The client side as the in-process engine holds it: every client's context in this process."""

    engine = "inprocess"

    def __init__(self, cfg: Config, client, contexts: dict, progress: bool = True):
        self.client, self.contexts = client, contexts
        self.transport = InProcessTransport(client, contexts, progress, cfg.inject_failures, cfg.seed, cfg.client_timeout_s)
        self.ids = sorted(contexts)

    def info(self) -> dict[int, dict]:
        """Each client's tasks and number of training examples (for the per-client table)."""
        return {cid: {"tasks": ctx.workbench.tasks, "n_train": ctx.workbench.n_train} for cid, ctx in self.contexts.items()}

    def save_adapters(self, run_dir: Path, shared: SharedModel) -> list[str]:
        """The clients' private adapters, in PEFT format under adapters/client<id>-<name>/."""
        return rundir.save_adapters(run_dir, shared, {f"client{cid}-{name}": adapter for cid, ctx in sorted(self.contexts.items())
                                           for name, adapter in self.client.adapters(ctx).items()})

    def save_embedding_map(self, run_dir: Path, seed: int) -> None:
        save_embedding_map(run_dir, self.client, self.contexts, seed)

    def state(self) -> dict:
        """What a checkpoint needs of the clients: private states, stream positions, failure draws."""
        return {"client_states": {cid: ctx.state for cid, ctx in self.contexts.items()},
                "streams": {cid: ctx.workbench.stream_state() for cid, ctx in self.contexts.items()},
                "failure_rng": self.transport.failure_rng.getstate()}

    def restore(self, saved: dict) -> None:
        for cid, ctx in self.contexts.items():
            ctx.state = saved["client_states"][cid]
            ctx.workbench.load_stream_state(saved["streams"][cid])
        self.transport.failure_rng.setstate(saved["failure_rng"])


def checkpoint_payload(cfg, server, clients, sampling, traffic, history, base_reports, setup_report, timings) -> dict:
    """Everything the rest of a run depends on, after a round (see `fedrouter.checkpoint`)."""
    return {
        "config": cfg.model_dump(), "server": server.state_dict(), **clients.state(),
        "torch_rng": torch.get_rng_state(), "sampling_rng": sampling.getstate(), "traffic": (traffic.down, traffic.up),
        "history": list(history), "base_reports": base_reports, "setup_report": setup_report, "timings": timings,
    }


def run_with(cfg: Config, run_dir: Path, tasks: list[str], shared: SharedModel, server, clients,
             progress: bool = True, saved: dict | None = None) -> dict:
    """The server's side of a run, whatever engine carries the messages: base evaluation, setup, rounds
    (a checkpoint after each), final evaluation, and the run directory's files. `clients` is the engine's
    client side (`InProcessClients`, or the Flower engine's): what it returns from `state()` goes into
    each checkpoint, and `restore(saved)` puts the clients back where a checkpoint found them."""
    transport, ids = clients.transport, clients.ids
    traffic = Traffic()
    info = clients.info()
    sampling = random.Random(f"client-sampling:{cfg.seed}")
    metrics_path = run_dir / rundir.METRICS
    if saved is None:
        clock = time.perf_counter()
        timings = {}
        base_reports = evaluate_clients(server, transport, Traffic(), ids, "test", base=True)
        timings["base_eval_s"], clock = time.perf_counter() - clock, time.perf_counter()
        setup_report = run_setup(server, transport, traffic, ids)
        timings["setup_s"], clock = time.perf_counter() - clock, time.perf_counter()
        done, earlier = 0, []
        metrics_path.write_text("")
    else:  # everything as it stood after round `done`
        server.load_state_dict(saved["server"])
        clients.restore(saved)
        torch.set_rng_state(saved["torch_rng"])
        sampling.setstate(saved["sampling_rng"])
        traffic.down, traffic.up = saved["traffic"]
        base_reports, setup_report, timings, earlier = saved["base_reports"], saved["setup_report"], saved["timings"], saved["history"]
        done = saved["round"]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in earlier))  # drop rounds past the checkpoint
        clock = time.perf_counter()
    metrics_file = metrics_path.open("a")
    rounds_before = timings.pop("rounds_s", 0.0)  # training time of the process(es) before a resume

    def on_round(record: dict) -> None:
        if cfg.eval_every and (record["round"] % cfg.eval_every == 0 or record["round"] == cfg.rounds):
            reports = evaluate_clients(server, transport, traffic, ids, "test")
            record["rouge1"] = _mean(r["rouge1"] for r in reports.values())
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        earlier.append(record)
        if cfg.checkpoint_keep:
            checkpoint.save(run_dir, record["round"], checkpoint_payload(
                cfg, server, clients, sampling, traffic, earlier, base_reports, setup_report,
                {**timings, "rounds_s": rounds_before + time.perf_counter() - clock}), cfg.checkpoint_keep)

    try:
        run_rounds(server, transport, traffic, ids, cfg.rounds, cfg.client_fraction, cfg.seed, on_round,
                   progress, cfg.update_norm_ratio, cfg.min_updates, start_round=done, rng=sampling)
    finally:
        metrics_file.close()
    history = earlier
    timings["rounds_s"] = rounds_before + time.perf_counter() - clock
    clock = time.perf_counter()

    test_reports = evaluate_clients(server, transport, traffic, ids, "test")
    general_reports = evaluate_clients(server, transport, traffic, ids, "general")
    timings["final_eval_s"] = time.perf_counter() - clock
    per_client = [_client_row(cid, info[cid]["tasks"], test_reports[cid]) for cid in ids]
    for row, cid in zip(per_client, ids):
        row["n_train"] = info[cid]["n_train"]
        row["base_rouge1"] = base_reports[cid]["rouge1"]
        row["general_rouge1"] = general_reports[cid]["rouge1"]

    saved = sorted(rundir.save_adapters(run_dir, shared, server.adapters()) + clients.save_adapters(run_dir, shared))
    rundir.save_router(run_dir, server.router())
    for filename, tensors in server.tensor_files().items():
        rundir.save_tensors(run_dir, filename, tensors)
    clients.save_embedding_map(run_dir, cfg.seed)
    rounds_of_failures = [sum(r["reason"].startswith("client failed") for r in h["rejected"]) for h in history]
    results = {
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
        "bytes_up": traffic.up,
        "bytes_down": traffic.down,
        "rejected_updates": [{"round": h["round"], **r} for h in history for r in h["rejected"]],
        "skipped_rounds": [h["round"] for h in history if "skipped" in h],
        "client_failures_per_round": rounds_of_failures,
        "adapters": saved,
        "timings": timings,
        **setup_report,
        **server.report({"test": test_reports, "general": general_reports}),
    }
    rundir.write_per_client_csv(run_dir, per_client)
    return results



def save_embedding_map(run_dir: Path, client, contexts, seed: int, per_client: int = 150) -> None:
    """A 2-D PCA of (a sample of) the clients' training embeddings with true task and global cluster,
    for the embedding-map plot; only methods whose clients embed their data (FedRouter) have one."""
    import numpy as np
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    vectors, points = [], []
    for cid, ctx in sorted(contexts.items()):
        diag = client.diagnostics(ctx)
        if not diag:
            continue
        n = len(diag["tasks"])
        keep = np.sort(rng.choice(n, size=min(per_client, n), replace=False))
        vectors.append(np.asarray(diag["vectors"])[keep])
        points += [{"client": cid, "task": diag["tasks"][i], "cluster": int(diag["clusters"][i])} for i in keep]
    if not points:
        return
    x = np.concatenate(vectors)
    xy = PCA(n_components=2, random_state=seed).fit_transform(x) if x.shape[0] > 2 else np.zeros((x.shape[0], 2))
    for point, (a, b) in zip(points, xy):
        point["x"], point["y"] = float(a), float(b)
    rundir.write_json(run_dir / rundir.EMBEDDING_MAP, {"projection": "PCA", "points": points})


def format_summary(results: dict) -> str:
    """A short table for the terminal: per client, then the means."""
    lines = [f"{results['method']} | scenario {results['scenario']} | seed {results['seed']} | "
             f"{results['wall_s']:.0f} s | up {results['bytes_up'] / 1e6:.2f} MB, down {results['bytes_down'] / 1e6:.2f} MB",
             f"{'client':>6}  {'tasks':<28} {'base R1':>8} {'ROUGE-1':>8} {'ROUGE-L':>8} {'EM':>6} {'general':>8}"]
    for row in results["per_client"]:
        lines.append(f"{row['client']:>6}  {'+'.join(row['tasks'])[:28]:<28} {row['base_rouge1']:>8.3f} "
                     f"{row['rouge1']:>8.3f} {row['rougeL']:>8.3f} {row['exact_match']:>6.3f} {row['general_rouge1']:>8.3f}")
    lines.append(f"{'mean':>6}  {'':<28} {results['base_rouge1']:>8.3f} {results['rouge1']:>8.3f} "
                 f"{results['rougeL']:>8.3f} {results['exact_match']:>6.3f} {results['generalization']['rouge1']:>8.3f}")
    if "clustering" in results:
        c = results["clustering"]
        router = c["router_accuracy"]
        lines.append(f"clusters: {c['n_global']} global | local clustering accuracy {c['local_accuracy']:.3f} "
                     f"(ARI {c['local_ari']:.3f}) | router accuracy: own tests {router['own_test']:.3f}, "
                     f"all tasks {router['generalization']:.3f}")
    return "\n".join(lines)
