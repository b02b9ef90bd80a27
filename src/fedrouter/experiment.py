"""One experiment, end to end: pick the engine, run the driver, write the run directory.

Everything that can fail on bad input (config, data, model) fails before the run directory is claimed.
The run directory's format is `fedrouter.rundir`'s; the run itself is `engines.driver.drive`'s, on the
in-process engine here or on Flower's simulation runtime (`engines.flower.app.run_simulation`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fedrouter import config, rundir
from fedrouter.config import Config
from fedrouter.engines.driver import drive
from fedrouter.engines.inprocess import InProcessClients
from fedrouter.errors import FedrouterError
from fedrouter.threads import set_threads
from fedrouter.world import World, build_data, build_shared, client_part, server_part


def default_run_dir(cfg: Config) -> Path:
    return rundir.default_path(cfg.method, cfg.scenario, cfg.seed)


def run_experiment(cfg: Config, out_dir: Path | None = None, progress: bool = True, resume: bool = False,
                   processes: int = 1) -> dict:
    """Run `cfg` and write its run directory; returns the results dict (also in results.json).

    resume=True continues the unfinished run in `out_dir` from its newest readable checkpoint (refused,
    before any work, when there is none or it was written under another config). `processes`: how many
    fedrouter processes (this one included) share the CPUs, as in `compare --jobs`; it sizes torch's threads."""
    start = time.perf_counter()
    set_threads(config.cpu_threads(cfg, processes), cfg.threads, processes)
    torch.manual_seed(cfg.seed)
    run_dir = Path(out_dir) if out_dir else default_run_dir(cfg)
    # a resume holds the run's lock from before it reads its checkpoint: a second one is refused, naming this pid
    lock, saved = rundir.lock_for_resume(run_dir, cfg.model_dump()) if resume else (None, None)
    try:
        if cfg.engine == "flower":
            try:
                from fedrouter.engines.flower.app import run_simulation  # optional extra: flower
            except ImportError as exc:
                raise FedrouterError(f"engine flower needs Flower ({exc.name} is missing): pip install 'fedrouter[flower]'") from None
            build_data(cfg)  # bad data fails here, before the run directory exists
            shared = build_shared(cfg, progress)  # the server's model: its initial adapter and the PEFT files it saves
            produce = lambda: run_simulation(cfg, run_dir, progress, shared, saved)  # noqa: E731
        else:
            world = World(cfg, progress, warm_ahead=True)
            contexts = world.contexts()
            server = server_part(cfg, world.shared, sorted(contexts))
            clients = InProcessClients(client_part(cfg), contexts, progress, cfg.inject_failures, cfg.seed,
                                       cfg.client_timeout_s)
            produce = lambda: drive(cfg, run_dir, world.data.tasks, world.shared, server, clients, progress, saved)  # noqa: E731
        return rundir.write_run(run_dir, cfg.model_dump(), produce, lock, start)
    finally:
        if lock is not None:
            lock.release()
