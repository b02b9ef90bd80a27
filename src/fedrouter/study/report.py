"""`fedrouter report DIR`: (re)build the tables and plots of a compare or run directory and write one
self-contained HTML page (`report.html`: tables inline, figures embedded as PNG data) beside them.

A compare directory (from `fedrouter compare`) gets its tables rebuilt from the finished cells, bars of
the comparison and generalization tables, per-scenario round curves, and, from a cell of a method with a
clustering report (FedRouter's), the embedding map and silhouette curves; a scaling sweep (scaling.json)
gets its plot. A single run directory gets its round curve, and the embedding map and silhouette curves
where it left them.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
import tempfile
from pathlib import Path

from fedrouter.atomic import write_text
from fedrouter.errors import FedrouterError
from fedrouter.methods import NO_FACTS, facts_of
from fedrouter.rundir import read_json, read_results
from fedrouter.study import plots
from fedrouter.study.tables import CELLS, format_summary, load_cells, write_tables

REPORT = "report.html"
FIGURES = "figures"


def _markdown_to_html(text: str) -> str:
    """Enough markdown for our tables: '#' headings, pipe tables, **bold**, paragraphs."""
    out, table = [], []

    def inline(s: str) -> str:
        parts = html.escape(s).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{inline(c)}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _page(title: str, sections: list[str]) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}"
             "figure{margin:1.5em 0}figcaption{color:#555;font-size:13px}pre{background:#f6f6f6;padding:1em;overflow-x:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(sections) + "</body></html>\n")


def _clustering_figures(run_dir: Path, figures: Path, prefix: str) -> list[str]:
    """The embedding map and silhouette curves of a run whose method clusters (where it left them)."""
    sections = []
    emb = plots.embedding_map(run_dir, figures / f"{prefix}embedding-map.png")
    if emb:
        sections.append(_image(emb, f"Embedding map of the clients' training data ({run_dir.name})"))
    results_path = run_dir / "results.json"
    if results_path.exists():
        sil = plots.silhouette_curves(read_json(results_path, "the run's results"), figures / f"{prefix}silhouette.png")
        if sil:
            sections.append(_image(sil, f"Silhouette vs K, local and global clustering ({run_dir.name})"))
    return sections


def build_report(directory: Path) -> Path:
    """Rebuild tables and figures under `directory` and write report.html there; returns its path.

    The figures are drawn into a fresh folder beside figures/ and moved into it only once the whole report
    is built: a damaged run stops the report with one error and leaves figures/ as it was."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FedrouterError(f"no such directory: {directory}")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{FIGURES}-", dir=directory))
    except OSError as exc:
        raise FedrouterError(f"cannot write the report in {directory}: {exc.strerror or exc}") from None
    try:
        title, sections = _build(directory, staging)
        (directory / FIGURES).mkdir(exist_ok=True)
        for png in sorted(staging.iterdir()):
            os.replace(png, directory / FIGURES / png.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    path = directory / REPORT
    write_text(path, _page(title, sections))
    return path


def _build(directory: Path, figures: Path) -> tuple[str, list[str]]:
    """The report's title and sections, its figures drawn in `figures`."""
    sections: list[str] = []
    is_compare = (directory / CELLS).is_dir() and any((directory / CELLS).glob("*/results.json"))
    if is_compare:
        title = f"fedrouter comparison: {directory.name}"
        summary = write_tables(directory)
        sections.append(_image(plots.comparison_bars(summary, figures / "comparison.png"), "ROUGE-1 by scenario and method"))
        if "single" in summary["scenarios"]:
            sections.append(_image(plots.comparison_bars(summary, figures / "generalization.png", "generalization",
                                                         "ROUGE-1 on every task"),
                                   "Generalization: ROUGE-1 on every task (the single-scenario cells test on all tasks)"))
        sections.append(_markdown_to_html((directory / "table.md").read_text()))
        rows = load_cells(directory)
        for scenario in summary["scenarios"]:
            runs = {m: [directory / CELLS / r["cell"] for r in rows if r["method"] == m and r["scenario"] == scenario]
                    for m in summary["methods"]}
            runs = {m: v for m, v in runs.items() if v}
            png = plots.round_curves(runs, figures / f"rounds-{scenario}.png", f"scenario {scenario}")
            sections.append(_image(png, f"Per round, scenario {scenario} (mean over seeds)"))
        clustered = sorted((r for r in rows if facts_of(r["method"], NO_FACTS).clustering_report),
                           key=lambda r: (r["scenario"] != "dual", r["seed"], r["method"]))
        if clustered:
            sections += _clustering_figures(directory / CELLS / clustered[0]["cell"], figures, "")
    elif (directory / "results.json").exists():
        results = read_results(directory)
        title = f"fedrouter run: {directory.name}"
        sections.append(f"<pre>{html.escape(format_summary(results))}</pre>")
        png = plots.round_curves({results["method"]: [directory]}, figures / "rounds.png", results["method"])
        sections.append(_image(png, "Per round"))
        sections += _clustering_figures(directory, figures, "")
    elif not (directory / "scaling.json").exists():
        raise FedrouterError(f"{directory} holds neither finished compare cells, a run's results.json, nor scaling.json")
    else:
        title = f"fedrouter scaling: {directory.name}"
    if (directory / "scaling.json").exists():
        scaling = read_json(directory / "scaling.json", "the scaling sweep")
        png = plots.scaling_plot(scaling["rows"], figures / "scaling.png", scaling["method"])
        table = "\n".join(["| clients | ROUGE-1 | all tasks | wall s | training s |", "|---|---|---|---|---|"]
                          + [f"| {r['n_clients']} | {r['rouge1']:.3f} | {r['generalization']:.3f} | {r['wall_s']:.0f} | "
                             f"{r['rounds_s']:.0f} |" for r in scaling["rows"]])
        sections += [f"<h2>Scaling: {html.escape(scaling['method'])}, scenario {html.escape(scaling['scenario'])}</h2>",
                     _markdown_to_html(table), _image(png, "ROUGE-1 and wall time vs number of clients")]
    return title, sections
