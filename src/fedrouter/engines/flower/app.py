"""The Flower apps: the ServerApp `flwr run` starts (its run config says what to run), the app folder
that `fedrouter flower app DIR` writes for it, and Flower's simulation runtime for `fedrouter run --engine
flower` (Ray actors for the clients, in this process).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrouter import rundir
from fedrouter.atomic import write_bytes
from fedrouter.config import Config, load_config, load_saved, parse_sets
from fedrouter.engines.flower import patches
from fedrouter.engines.flower.client_app import client_app
from fedrouter.engines.flower.node import NODE_DIR_ENV
from fedrouter.engines.flower.server import PULL_INTERVAL_S, run_on_grid
from fedrouter.errors import FedrouterError

log = logging.getLogger(__name__)

# The app's components come from the installed fedrouter package: every node (and the SuperLink's
# ServerApp process) needs fedrouter[flower] installed; the app bundle itself carries only this file.
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedrouter-app"
version = "1.0.0"
description = "fedrouter on Flower: every node needs `pip install fedrouter[flower]`"
license = "Apache-2.0"
dependencies = []  # fedrouter is installed on every node; nothing is installed at run time

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedrouter"

[tool.flwr.app.components]
serverapp = "fedrouter.engines.flower.app:server_app"
clientapp = "fedrouter.engines.flower.client_app:client_app"

[tool.flwr.app.config]
config = ""          # a fedrouter TOML config (absolute path on the SuperLink's machine); "" = defaults
set = ""             # space-separated KEY=VALUE overrides, as `fedrouter run --set`
out = ""             # the run directory (absolute path); "" = runs/<method>-<scenario>-seed<seed>-<time>
node-wait-s = 300    # how long to wait for n_clients SuperNodes to connect
resume = false       # true: continue the unfinished run in `out` from its newest checkpoint (no config / set)
pull-interval-s = 0.2  # how often the ServerApp asks the SuperLink for replies while it waits for them
"""


def write_app(out: Path) -> Path:
    """The app folder (its pyproject.toml) that `flwr run DIR <connection>` packages and runs."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FedrouterError(f"{out} is a file, not a folder for the app")
    path = out / "pyproject.toml"
    if path.exists():
        raise FedrouterError(f"{path} already exists; choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_bytes(path, APP_PYPROJECT.encode())
    except OSError as exc:
        raise FedrouterError(f"cannot write the app in {out}: {exc.strerror or exc}") from None
    return path


# The ServerApp of the app `fedrouter flower app DIR` writes for `flwr run`: its run config says what to run.
server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    pull_interval_s = float(run_config.get("pull-interval-s", PULL_INTERVAL_S))  # an app written before it: the default
    if not 0 < pull_interval_s <= 60:  # (NaN fails this too)
        raise FedrouterError(f"pull-interval-s must be in (0, 60] seconds, got {pull_interval_s:g}")
    node_wait_s = float(run_config.get("node-wait-s", 120))
    if not 0 < node_wait_s <= 86400:  # NaN or inf would wait for the nodes forever
        raise FedrouterError(f"node-wait-s must be in (0, 86400] seconds, got {node_wait_s:g}")
    saved = lock = None
    if run_config.get("resume"):  # the run in `out`, with its own config, from its newest checkpoint
        if not run_config.get("out") or run_config.get("config") or run_config.get("set"):
            raise FedrouterError("resume=true continues the run in out=DIR with its own config.json: give out and no config or set")
        run_dir = Path(run_config["out"])
        cfg = load_saved(run_dir)
        lock, saved = rundir.lock_for_resume(run_dir, cfg.model_dump())  # one run or resume of a run at a time
    else:
        sets = {**parse_sets(str(run_config.get("set", "")).split()), "engine": "flower"}
        cfg = load_config(run_config.get("config") or None, sets)
        run_dir = Path(run_config.get("out") or rundir.default_path(cfg.method, cfg.scenario, cfg.seed))
    # A reply is visible to the server a moment before its objects are: pulled then, Flower waits 1 s before
    # asking again; in this ServerApp process it asks again after pull-interval-s (on the pinned flwr only).
    patches.apply("serverapp", pull_interval_s)
    results = rundir.write_run(run_dir, cfg.model_dump(), lambda: run_on_grid(grid, cfg, run_dir, progress=False, saved=saved,
                                                                        node_wait_s=node_wait_s,
                                                                        pull_interval_s=pull_interval_s),
                               resumed_under=lock)
    log.warning("fedrouter: %s %s ROUGE-1 %.4f, run directory %s", cfg.method, cfg.scenario, results["rouge1"], run_dir)


# ----------------------------------------------------------------------------------- simulation runtime

SIMULATION_PULL_INTERVAL_S = 0.05  # Flower's in-memory grid itself asks every 0.1 s


def run_simulation(cfg: Config, run_dir: Path, progress: bool = True, shared=None, saved: dict | None = None) -> dict:
    """`cfg` on Flower's simulation runtime in this process: n_clients virtual SuperNodes (Ray actors,
    one CPU each); returns the results the ServerApp wrote. `saved`: the server checkpoint to resume from."""
    from flwr.simulation import run_simulation as flower_simulation  # start-up cost: Ray and the simulation runtime (1.1 s)

    for key, value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                       "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    outcome: dict = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            # the replies are in this process's memory: asking for them is cheap, so ask often
            outcome["results"] = run_on_grid(grid, cfg, run_dir, progress, shared=shared, saved=saved,
                                       pull_interval_s=SIMULATION_PULL_INTERVAL_S)
        except BaseException as exc:  # carried out of Flower's thread, raised below
            outcome["error"] = exc

    cpus = max(1, min(os.cpu_count() or 1, cfg.n_clients))
    # The simulated nodes are this machine: their files go in the run directory itself (the node folder
    # is <FEDROUTER_NODE_DIR>/<run name>); Ray's worker processes inherit the variable.
    before = os.environ.get(NODE_DIR_ENV)
    os.environ[NODE_DIR_ENV] = str(Path(run_dir).resolve().parent)
    try:
        flower_simulation(server_app=app, client_app=client_app, num_supernodes=cfg.n_clients,
                          backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": cpus}})
    finally:
        if before is None:
            os.environ.pop(NODE_DIR_ENV, None)
        else:
            os.environ[NODE_DIR_ENV] = before
    if "error" in outcome:
        raise outcome["error"]
    if "results" not in outcome:
        raise FedrouterError("the Flower simulation ended without a result (see the log above)")
    return outcome["results"]
