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

import csv
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from fedrouter import rundir
from fedrouter.errors import FedrouterError

CELLS = "cells"
SCENARIO_ORDER = ("single", "dual", "all", "dirichlet")

# --quick: the paper's grid shape at a size that runs in minutes on 2 cores
QUICK_METHODS = ("fedrouter", "fedit", "local")
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
        from fedrouter.config import load_config

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


def _run_cell(cfg, out_dir: str) -> tuple[str, float]:
    """One cell in a worker process: quiet, one thread unless the config says otherwise."""
    import torch

    from fedrouter.cli import _quiet_libraries
    from fedrouter.experiment import run_experiment

    _quiet_libraries()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not cfg.threads:
        torch.set_num_threads(1)
    start = time.perf_counter()
    run_experiment(cfg, Path(out_dir), progress=False)
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
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_cell, cfg, str(cells_dir / name)): name for name, cfg in todo}
            for i, future in enumerate(as_completed(futures), 1):
                _, seconds = future.result()
                echo(_done_line(i, len(todo), futures[future], cells_dir, seconds))
    echo(f"{len(todo)} runs in {time.perf_counter() - start:.0f} s")
    return time.perf_counter() - start


def run_compare(spec: CompareSpec, out: Path, echo=print) -> dict:
    """Run every unfinished cell of the grid, then write the tables, plots and report; returns the summary."""
    from fedrouter.report import build_report

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
    from fedrouter.config import load_config

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
    from fedrouter.core.model import TinyBaseSpec, ensure_tiny_base

    for spec in {TinyBaseSpec(**cfg.tiny.model_dump()) for cfg in configs if cfg.model == "tiny"}:
        ensure_tiny_base(spec, Path(configs[0].cache_dir) if configs[0].cache_dir else None)


def _done_line(i: int, n: int, name: str, cells_dir: Path, seconds: float) -> str:
    r = rundir.read_results(cells_dir / name)
    return (f"[{i}/{n}] {name}: ROUGE-1 {r['rouge1']:.3f}, all tasks {r['generalization']['rouge1']:.3f} "
            f"({seconds:.0f} s)")


# --- tables ------------------------------------------------------------------------------------------

def load_cells(out: Path) -> list[dict]:
    """The finished cells' results, one dict each (what the tables are made of)."""
    rows = []
    for path in sorted((out / CELLS).glob("*/results.json")):
        r = rundir.read_results(path.parent)
        clients = [c["rouge1"] for c in r["per_client"]]
        rows.append({
            "method": r["method"], "scenario": r["scenario"], "seed": r["seed"], "rouge1": r["rouge1"],
            "generalization": r["generalization"]["rouge1"], "base_rouge1": r["base_rouge1"],
            "client_std": statistics.pstdev(clients), "worst_client": min(clients),
            "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"], "wall_s": r["wall_s"],
            "per_task": {t: v["rouge1"] for t, v in r["per_task"].items()}, "cell": path.parent.name,
        })
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _order(values, preferred) -> list:
    present = list(dict.fromkeys(values))
    return [v for v in preferred if v in present] + [v for v in present if v not in preferred]


def aggregate(rows: list[dict]) -> dict:
    """Per method and scenario: mean/std over seeds of ROUGE-1, all-task ROUGE-1 and fairness."""
    from fedrouter.methods import METHODS

    methods = _order([r["method"] for r in rows], list(METHODS))
    scenarios = _order([r["scenario"] for r in rows], SCENARIO_ORDER)
    out = {"methods": methods, "scenarios": scenarios, "cells": {}}
    for m in methods:
        for s in scenarios:
            group = [r for r in rows if r["method"] == m and r["scenario"] == s]
            if not group:
                continue
            entry = {"seeds": sorted(r["seed"] for r in group)}
            for key in ("rouge1", "generalization", "client_std", "worst_client", "wall_s"):
                entry[key], entry[key + "_std"] = _mean_std([r[key] for r in group])
            tasks = sorted({t for r in group for t in r["per_task"]})
            entry["per_task"] = {t: statistics.mean(r["per_task"][t] for r in group if t in r["per_task"]) for t in tasks}
            out["cells"][f"{m}|{s}"] = entry
    return out


def _bold_best(cells: dict[str, tuple[float, float] | None], with_std: bool = True) -> dict[str, str]:
    """'mean ± std' (or 'mean') per row, the best mean in bold, '-' where there is no value."""
    best = max((v[0] for v in cells.values() if v), default=None)
    out = {}
    for key, value in cells.items():
        if value is None:
            out[key] = "-"
            continue
        text = f"{value[0]:.3f} ± {value[1]:.3f}" if with_std and value[1] is not None else f"{value[0]:.3f}"
        out[key] = f"**{text}**" if value[0] == best else text
    return out


def table_markdown(summary: dict) -> str:
    methods, scenarios, cells = summary["methods"], summary["scenarios"], summary["cells"]
    def get(m, s, key):
        """(mean, std over seeds) of a cell, std None for a single seed; None for a missing cell."""
        c = cells.get(f"{m}|{s}")
        return None if c is None else (c[key], c[key + "_std"] if len(c["seeds"]) > 1 else None)

    seeds = sorted({seed for c in cells.values() for seed in c["seeds"]})
    lines = [f"# Comparison: ROUGE-1 on each client's own tasks (mean ± std over seeds {seeds})", "",
             "| method | " + " | ".join(scenarios) + " | average |", "|---" * (len(scenarios) + 2) + "|"]
    def mark_partial(column: dict[str, str], s: str) -> dict[str, str]:
        """A cell with fewer seeds than the grid (a study still running) says how many it has."""
        for m in methods:
            n = len(cells.get(f"{m}|{s}", {}).get("seeds", seeds))
            if n < len(seeds):
                column[m] += f" (n={n})"
        return column

    columns = {s: mark_partial(_bold_best({m: get(m, s, "rouge1") for m in methods}), s) for s in scenarios}
    averages = {}
    for m in methods:
        means = [get(m, s, "rouge1")[0] for s in scenarios if get(m, s, "rouge1")]
        averages[m] = (statistics.mean(means), 0.0) if len(means) == len(scenarios) else None
    avg_col = _bold_best(averages, with_std=False)
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(columns[s][m] for s in scenarios) + f" | {avg_col[m]} |")
    if "single" in scenarios:
        lines += ["", "## Generalization: trained on single, tested on every task", "",
                  "| method | ROUGE-1 (all tasks) |", "|---|---|"]
        col = mark_partial(_bold_best({m: get(m, "single", "generalization") for m in methods}), "single")
        lines += [f"| {m} | {col[m]} |" for m in methods]
    lines += ["", "## Fairness: std of ROUGE-1 over clients, and the worst client (means over seeds)", "",
              "| method | " + " | ".join(f"{s} std | {s} worst" for s in scenarios) + " |",
              "|---" * (2 * len(scenarios) + 1) + "|"]
    for m in methods:
        parts = []
        for s in scenarios:
            c = cells.get(f"{m}|{s}")
            parts += [f"{c['client_std']:.3f}", f"{c['worst_client']:.3f}"] if c else ["-", "-"]
        lines.append(f"| {m} | " + " | ".join(parts) + " |")
    for s in scenarios:
        tasks = sorted({t for m in methods if f"{m}|{s}" in cells for t in cells[f"{m}|{s}"]["per_task"]})
        lines += ["", f"## Per task, scenario {s} (ROUGE-1, mean over seeds)", "",
                  "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for m in methods:
            c = cells.get(f"{m}|{s}")
            if c:
                lines.append(f"| {m} | " + " | ".join(f"{c['per_task'][t]:.3f}" if t in c["per_task"] else "-" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


SUMMARY_COLUMNS = ["method", "scenario", "seed", "rouge1", "generalization", "base_rouge1", "client_std",
                   "worst_client", "bytes_up", "bytes_down", "wall_s", "cell"]


def write_tables(out: Path) -> dict:
    """summary.csv, summary.json and table.md from the finished cells under `out`."""
    rows = load_cells(out)
    if not rows:
        raise FedrouterError(f"no finished runs under {out / CELLS}; nothing to tabulate")
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = aggregate(rows)
    rundir.write_json(out / "summary.json", {**summary, "runs": rows})
    (out / "table.md").write_text(table_markdown(summary))
    return summary


# --- command line ------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="run a grid of methods x scenarios x seeds and tabulate it",
                       description="Run methods x scenarios x seeds (resumable) and write summary.csv, "
                                   "summary.json and table.md in --out.")
    p.add_argument("--methods", help="comma-separated methods (default: fedrouter,fedit,local)")
    p.add_argument("--scenarios", default="single,dual,all", help="comma-separated scenarios (default: single,dual,all)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds, 0..N-1 (default 3; 1 with --quick)")
    p.add_argument("--generalization", action="store_true",
                   help="also report training on single and testing on every task (adds single if missing)")
    p.add_argument("--quick", action="store_true",
                   help=f"a small grid for a first look: {', '.join(f'{k}={v}' for k, v in QUICK_OVERRIDES.items())}")
    p.add_argument("--jobs", type=int, default=None, help="cells run in parallel, one process each (default 1; 2 with --quick)")
    p.add_argument("--scale", metavar="N,N,...",
                   help="instead of the grid: a scaling sweep of the first method on the first scenario over these "
                        "numbers of clients (e.g. 4,8,16,32), written to scaling.json and a plot")
    p.add_argument("--config", type=Path, help="TOML config for every cell")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config key for every cell (method options: method_options.<method>.<key>=...)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="compare directory (default runs/compare)")


def _csv_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise FedrouterError(f"--{what} is empty")
    return list(dict.fromkeys(items))


def run(args) -> int:
    from fedrouter.config import parse_sets

    scenarios = _csv_list(args.scenarios, "scenarios")
    if args.generalization and "single" not in scenarios:
        scenarios.insert(0, "single")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    jobs = args.jobs if args.jobs is not None else (2 if args.quick else 1)
    if seeds < 1 or jobs < 1:
        raise FedrouterError("--seeds and --jobs must be positive")
    overrides = {**(QUICK_OVERRIDES if args.quick else {}), **parse_sets(args.sets)}
    methods = _csv_list(args.methods, "methods") if args.methods else list(QUICK_METHODS)
    if args.scale:
        from fedrouter.report import build_report

        try:
            clients = [int(n) for n in _csv_list(args.scale, "scale")]
        except ValueError:
            raise FedrouterError(f"--scale expects numbers of clients such as 4,8,16,32, got {args.scale!r}") from None
        if any(n < 1 for n in clients):
            raise FedrouterError("--scale: numbers of clients must be positive")
        rows = run_scaling(methods[0], scenarios[0], clients, overrides, args.config, args.out, jobs)
        for row in rows:
            print(f"{row['n_clients']:>4} clients: ROUGE-1 {row['rouge1']:.3f}, {row['wall_s']:.0f} s")
        print(f"report: {build_report(args.out)}")
        return 0
    spec = CompareSpec(methods, scenarios, list(range(seeds)), overrides, args.config, jobs)
    run_compare(spec, args.out)
    print((args.out / "table.md").read_text())
    return 0
