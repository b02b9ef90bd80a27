"""Figures from run and compare directories (matplotlib, PNG), each readable without the code:
titled, axes labelled, a legend where there is more than one line.

- `round_curves`: training loss per round per method (mean over seeds), and ROUGE-1 per round where the
  runs evaluated during training (`eval_every`);
- `embedding_map`: a FedRouter run's training embeddings (PCA), coloured by true task, marked by cluster;
- `silhouette_curves`: silhouette score vs K for each client's local clustering and the server's global one;
- `comparison_bars`: the comparison table as grouped bars with std error bars;
- `scaling_plot`: ROUGE-1 and wall time vs number of clients.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedrouter.rundir import read_embedding_map, read_metrics  # noqa: E402

MARKERS = "osD^v<>pPX*h"


def method_colours(methods: list[str]) -> dict[str, tuple]:
    """One colour per method, distinct for up to 20: matplotlib's default cycle repeats after 10, and the
    study compares more methods than that."""
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)


def round_curves(runs_by_method: dict[str, list[Path]], path: Path, title: str) -> Path:
    """Per method, the mean over its runs of train loss (and ROUGE-1 where evaluated) per round."""
    has_rouge = any("rouge1" in m for runs in runs_by_method.values() for r in runs for m in _metrics(r))
    fig, axes = plt.subplots(1, 2 if has_rouge else 1, figsize=(11 if has_rouge else 6, 4), squeeze=False)
    colour = method_colours(list(runs_by_method))
    for method, runs in runs_by_method.items():
        for ax, key in zip(axes[0], ("train_loss", "rouge1")):
            by_round: dict[int, list[float]] = {}
            for run in runs:
                for record in _metrics(run):
                    if key in record:
                        by_round.setdefault(record["round"], []).append(record[key])
            if by_round:
                rounds = sorted(by_round)
                ax.plot(rounds, [statistics.mean(by_round[r]) for r in rounds], marker="o" if key == "rouge1" else None,
                        markersize=4, label=method, color=colour[method])
    axes[0][0].set(xlabel="round", ylabel="training loss (mean over clients and seeds)", title=f"{title}: training loss")
    if has_rouge:
        axes[0][1].set(xlabel="round", ylabel="ROUGE-1 on own tasks", title=f"{title}: ROUGE-1 during training")
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def embedding_map(run_dir: Path, path: Path) -> Path | None:
    """Training embeddings (2-D PCA): colour = true task, marker = the global cluster FedRouter put them in."""
    points = read_embedding_map(run_dir)
    if not points:
        return None
    tasks = sorted({p["task"] for p in points})
    clusters = sorted({p["cluster"] for p in points})
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for ti, task in enumerate(tasks):
        for ci, cluster in enumerate(clusters):
            sel = [p for p in points if p["task"] == task and p["cluster"] == cluster]
            if sel:
                ax.scatter([p["x"] for p in sel], [p["y"] for p in sel], s=14, alpha=0.7, color=colours(ti % 10),
                           marker=MARKERS[ci % len(MARKERS)], label=f"{task} / cluster {cluster}")
    ax.set(xlabel="PC 1", ylabel="PC 2",
           title="Client training data: colour = true task, marker = FedRouter global cluster")
    ax.legend(fontsize=7, ncol=2, loc="best")
    return _save(fig, path)


def server_k(clustering: dict) -> int | None:
    """The K the server chose for its prototypes: the best K of its silhouette curve (the lower on a tie),
    else the number of prototypes. Not the final number of prototypes: the per-example assignment drops
    the prototypes of clusters it empties."""
    curve = (clustering.get("silhouette") or {}).get("global")
    if curve:
        return min(int(k) for k, v in curve.items() if v == max(curve.values()))
    return clustering.get("n_prototypes", clustering.get("n_global"))


def silhouette_curves(results: dict, path: Path) -> Path | None:
    """Silhouette score vs K: one thin line per client's local clustering, a thick one for the global."""
    curves = results.get("clustering", {}).get("silhouette", {})
    if not curves or not (curves.get("global") or curves.get("local")):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (cid, curve) in enumerate(sorted(curves.get("local", {}).items(), key=lambda kv: int(kv[0]))):
        ks = sorted(curve, key=int)
        ax.plot([int(k) for k in ks], [curve[k] for k in ks], color="grey", alpha=0.5, lw=1,
                label="local (one line per client)" if i == 0 else None)
    if curves.get("global"):
        ks = sorted(curves["global"], key=int)
        ax.plot([int(k) for k in ks], [curves["global"][k] for k in ks], color="C3", lw=2.5, marker="o", label="global (server)")
    chosen = server_k(results["clustering"])
    if chosen:
        merged = results["clustering"].get("n_global")
        ax.axvline(chosen, color="C3", ls="--", lw=1,
                   label=f"chosen K = {chosen}" + (f", {merged} clusters in the end" if merged != chosen else ""))
    ax.set(xlabel="K (at K = 1: the bar a split must clear)", ylabel="silhouette score",
           title="Choosing K: silhouette vs number of clusters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def comparison_bars(summary: dict, path: Path, key: str = "rouge1", ylabel: str = "ROUGE-1 (own tasks)") -> Path:
    """Grouped bars: scenarios on the x axis, one bar per method, std over seeds as error bars."""
    methods, scenarios, cells = summary["methods"], summary["scenarios"], summary["cells"]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(scenarios) * max(1, len(methods)) / 3), 4.2))
    colour = method_colours(methods)
    for i, m in enumerate(methods):
        xs, ys, errs = [], [], []
        for j, s in enumerate(scenarios):
            c = cells.get(f"{m}|{s}")
            if c:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(c[key])
                errs.append(c[key + "_std"])
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=m, color=colour[m])
    ax.set_xticks(range(len(scenarios)), scenarios)
    seeds = sorted({seed for c in cells.values() for seed in c["seeds"]})
    ax.set(ylabel=ylabel, title=f"{ylabel} by scenario (mean ± std over seeds {seeds})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    return _save(fig, path)


def scaling_plot(rows: list[dict], path: Path, method: str) -> Path:
    """ROUGE-1 and wall time vs number of clients (rows: {"n_clients", "rouge1", "wall_s"})."""
    rows = sorted(rows, key=lambda r: r["n_clients"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r["n_clients"] for r in rows]
    ax.plot(xs, [r["rouge1"] for r in rows], marker="o", color="C0", label="ROUGE-1")
    ax.set(xlabel="clients", ylabel="ROUGE-1 (own tasks)", title=f"{method}: scaling with the number of clients")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    twin = ax.twinx()
    twin.plot(xs, [r["wall_s"] for r in rows], marker="s", color="C1", label="wall time")
    twin.set_ylabel("wall time (s)")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, ["ROUGE-1", "wall time (s)"], fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)
