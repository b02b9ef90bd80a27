"""`fedrouter compare`: a grid of runs (methods x scenarios x seeds) and the paper-style tables from it.

Each cell is an ordinary run directory, `<out>/cells/<method>-<scenario>-seed<seed>/`. A cell with a
`results.json` is finished and is skipped when the command is run again; a cell directory without one
was interrupted (or failed) and is run again from scratch. The tables are rebuilt from the cells alone,
so `fedrouter report DIR` can rebuild them at any time:

  summary.csv   one row per cell: ROUGE-1 (own tasks, all tasks), fairness, bytes, seconds
  summary.json  the cells and, per method and scenario, mean and std over seeds
  table.md      the paper's layout: rows = methods, columns = scenarios + average, mean ± std, best in
                bold; the generalization table (trained on single, tested on every task); fairness
                (std over clients and worst client); per-task ROUGE-1

`method_options` in a compare is per method: `--set method_options.fedprox.mu=0.1`.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from fedrouter import rundir
from fedrouter.config import load_config, tiny_spec
from fedrouter.core.model import ensure_tiny_base
from fedrouter.errors import FedrouterError
from fedrouter.experiment import run_experiment
from fedrouter.runtime import quiet_libraries
from fedrouter.study.report import build_report
from fedrouter.study.tables import CELLS, write_tables

# --quick: the paper's grid shape at a size that runs in minutes on 2 cores
QUICK_OVERRIDES = {"rounds": 10, "train_per_client": 200, "test_per_client": 40, "general_test_per_task": 20}


@dataclass
class Cell:
    method: str
    scenario: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-{self.scenario}-seed{self.seed}"


@dataclass
class CompareSpec:
    methods: list[str]
    scenarios: list[str]
    seeds: list[int]
    overrides: dict = field(default_factory=dict)  # config keys for every cell (method_options per method)
    config_path: Path | None = None
    jobs: int = 1

    def cells(self) -> list[Cell]:
        """Seed by seed: a grid stopped early still holds every method and scenario on the first seeds."""
        return [Cell(m, s, seed) for seed in self.seeds for s in self.scenarios for m in self.methods]

    def config(self, cell: Cell):
        overrides = {k: v for k, v in self.overrides.items() if not k.startswith("method_options")}
        per_method = self.overrides.get("method_options", {})
        for key, value in self.overrides.items():  # dotted: method_options.<method>.<key>
            if key.startswith("method_options."):
                parts = key.split(".")
                if len(parts) != 3:
                    raise FedrouterError(f"in compare, method options are per method: method_options.<method>.<key>, got {key!r}")
                per_method = {**per_method, parts[1]: {**per_method.get(parts[1], {}), parts[2]: value}}
        unknown = sorted(set(per_method) - set(self.methods))
        if unknown:
            raise FedrouterError(f"method_options for {', '.join(unknown)}, which is not among the compared methods")
        overrides.update({"method": cell.method, "scenario": cell.scenario, "seed": cell.seed,
                          "method_options": per_method.get(cell.method, {})})
        return load_config(self.config_path, overrides)


def _run_cell(cfg, out_dir: str, processes: int = 1) -> tuple[str, float]:
    """One cell, quiet, as one of `processes` cells running at once (its share of the CPUs sizes its threads)."""
    quiet_libraries(progress_bars=False)
    start = time.perf_counter()
    run_experiment(cfg, Path(out_dir), progress=False, processes=processes)
    return out_dir, time.perf_counter() - start


def run_cells(configs: dict, cells_dir: Path, jobs: int, echo=print) -> float:
    """Run every config in `configs` (cell name -> Config) whose cell under `cells_dir` is not finished;
    returns the seconds it took. A finished cell has results.json; any other cell directory is redone."""
    cells_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for name, cfg in configs.items():
        cell_dir = cells_dir / name
        if (cell_dir / rundir.RESULTS).is_file():
            echo(f"{name}: finished earlier, skipped")
            continue
        if cell_dir.exists():
            rundir.RunLock(cell_dir).release()  # a cell another compare is running now is refused, not deleted under it
            echo(f"{name}: interrupted earlier, running again")
            shutil.rmtree(cell_dir)
        todo.append((name, cfg))
    _prepare_models([cfg for _, cfg in todo])
    start = time.perf_counter()
    if jobs <= 1 or len(todo) <= 1:
        for i, (name, cfg) in enumerate(todo, 1):
            _, seconds = _run_cell(cfg, str(cells_dir / name))
            echo(_done_line(i, len(todo), name, cells_dir, seconds))
    else:
        processes = min(jobs, len(todo))  # cells at once, each with its share of the CPUs
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_cell, cfg, str(cells_dir / name), processes): name for name, cfg in todo}
            for i, future in enumerate(as_completed(futures), 1):
                _, seconds = future.result()
                echo(_done_line(i, len(todo), futures[future], cells_dir, seconds))
    echo(f"{len(todo)} runs in {time.perf_counter() - start:.0f} s")
    return time.perf_counter() - start


def run_compare(spec: CompareSpec, out: Path, echo=print) -> dict:
    """Run every unfinished cell of the grid, then write the tables, plots and report; returns the summary."""
    configs = {cell.name: spec.config(cell) for cell in spec.cells()}  # every config checked first
    seconds = run_cells(configs, out / CELLS, spec.jobs, echo)
    summary = write_tables(out)
    summary["grid_wall_s"] = seconds
    echo(f"tables and report: {build_report(out)}")
    return summary


SCALING = "scaling"


def run_scaling(method: str, scenario: str, clients: list[int], overrides: dict, config_path, out: Path,
                jobs: int = 1, echo=print) -> list[dict]:
    """One run per number of clients (seed 0); writes scaling.json and returns its rows."""
    configs = {f"{method}-{scenario}-n{n}": load_config(config_path, {**overrides, "method": method, "scenario": scenario,
                                                                      "n_clients": n}) for n in clients}
    run_cells(configs, out / SCALING, jobs, echo)
    rows = []
    for n, name in zip(clients, configs):
        r = rundir.read_results(out / SCALING / name)
        rows.append({"n_clients": n, "rouge1": r["rouge1"], "generalization": r["generalization"]["rouge1"],
                     "wall_s": r["wall_s"], "rounds_s": r["timings"]["rounds_s"], "bytes_up": r["bytes_up"]})
    rundir.write_json(out / "scaling.json", {"method": method, "scenario": scenario, "rows": rows})
    return rows


def _prepare_models(configs) -> None:
    """Build the tiny base once, here, rather than in several workers at the same time."""
    for spec in {tiny_spec(cfg) for cfg in configs if cfg.model == "tiny"}:
        ensure_tiny_base(spec, Path(configs[0].cache_dir) if configs[0].cache_dir else None)


def _done_line(i: int, n: int, name: str, cells_dir: Path, seconds: float) -> str:
    r = rundir.read_results(cells_dir / name)
    return (f"[{i}/{n}] {name}: ROUGE-1 {r['rouge1']:.3f}, all tasks {r['generalization']['rouge1']:.3f} "
            f"({seconds:.0f} s)")
