"""The comparison tables, read from finished run directories: per cell, per method and scenario (mean
and std over seeds), the paper-style markdown table, summary.csv / summary.json; and the short terminal
summary of one run.

  summary.csv   one row per cell: ROUGE-1 (own tasks, all tasks), fairness, bytes, seconds
  summary.json  the cells and, per method and scenario, mean and std over seeds
  table.md      the paper's layout: rows = methods, columns = scenarios + average, mean ± std, best in
                bold; the generalization table (trained on single, tested on every task); fairness
                (std over clients and worst client); upload per client where clients send different
                amounts (ranks per client); per-task ROUGE-1
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from fedrouter import rundir
from fedrouter.atomic import write_text
from fedrouter.errors import FedrouterError
from fedrouter.methods import METHODS, NO_FACTS, facts_of

CELLS = "cells"
SCENARIO_ORDER = ("single", "dual", "all", "dirichlet")
UNEVEN = 1.1  # a cell's clients send different amounts when the most exceeds the least by more than this


def score_text(value) -> str:
    """A score to 3 decimals, or "n/a" where it is null (the clients' tasks unknown: no labels, a deployment)."""
    return "n/a" if value is None else f"{value:.3f}"


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
            # per client id (runs before per-client traffic was counted have none)
            "up_per_client": {int(c): n for c, n in r.get("bytes_per_client", {}).get("up", {}).items()},
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
            clients = sorted({c for r in group for c in r["up_per_client"]})
            entry["up_per_client"] = {c: statistics.mean(r["up_per_client"][c] for r in group if c in r["up_per_client"])
                                      for c in clients}
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
    # only where clients send different amounts (ranks per client): elsewhere bytes_up / n_clients says it all
    uneven = {key: c["up_per_client"] for key, c in cells.items()
              if c["up_per_client"] and max(c["up_per_client"].values()) > UNEVEN * min(c["up_per_client"].values())}
    clients = sorted({c for up in uneven.values() for c in up})
    if uneven:
        lines += ["", "## Upload per client (MB over the run, mean over seeds), where clients send different amounts", "",
                  "| method | scenario | " + " | ".join(f"client {c}" for c in clients) + " |",
                  "|---" * (len(clients) + 2) + "|"]
        for m in methods:
            for s in scenarios:
                up = uneven.get(f"{m}|{s}")
                if up:
                    lines.append(f"| {m} | {s} | " + " | ".join(f"{up[c] / 1e6:.3f}" if c in up else "-" for c in clients) + " |")
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
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "summary.csv", buffer.getvalue())
    summary = aggregate(rows)
    rundir.write_json(out / "summary.json", {**summary, "runs": rows})
    write_text(out / "table.md", table_markdown(summary))
    return summary


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
    if facts_of(results["method"], NO_FACTS).clustering_report and "clustering" in results:
        c = results["clustering"]
        router = c["router_accuracy"]
        lines.append(f"clusters: {c['n_global']} global | local clustering accuracy {score_text(c['local_accuracy'])} "
                     f"(ARI {score_text(c['local_ari'])}) | router accuracy: own tests {score_text(router['own_test'])}, "
                     f"all tasks {score_text(router['generalization'])}")
    return "\n".join(lines)
