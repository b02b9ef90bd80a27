"""ROUGE-1/2/L (rouge-score) and exact match, per example, then averaged per client and per task; and
clusters scored against true labels (reporting only)."""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache

import numpy as np

METRICS = ("rouge1", "rouge2", "rougeL", "exact_match")


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer  # start-up cost: rouge-score (1.3 s, nltk)

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def score_example(prediction: str, reference: str) -> dict[str, float]:
    """F-measures of ROUGE-1/2/L and exact match (case- and whitespace-insensitive) for one prediction."""
    scores = _scorer().score(reference, prediction)
    out = {name: scores[name].fmeasure for name in ("rouge1", "rouge2", "rougeL")}
    out["exact_match"] = float(_normalise(prediction) == _normalise(reference))
    return out


def score_predictions(predictions: list[str], references: list[str], tasks: list[str]) -> dict:
    """Per-task sums and counts plus overall means, in a JSON-able dict that merges across clients.

    Returned shape: ``{"n": N, "rouge1": mean, ..., "per_task": {task: {"n": n, "rouge1": mean, ...}}}``.
    """
    if not (len(predictions) == len(references) == len(tasks)):
        raise ValueError("predictions, references and tasks must have the same length")
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for pred, ref, task in zip(predictions, references, tasks):
        s = score_example(pred, ref)
        sums[task]["n"] += 1
        for k in METRICS:
            sums[task][k] += s[k]
    per_task = {t: {"n": int(v["n"]), **{k: v[k] / v["n"] for k in METRICS}} for t, v in sorted(sums.items())}
    return {**merge_task_means([per_task]), "per_task": per_task}


def merge_task_means(per_task_reports: list[dict[str, dict]]) -> dict:
    """Example-weighted means over several per-task reports (e.g. one per client).

    Returns ``{"n": N, metric: mean, ...}`` over all examples, or just ``{"n": 0}`` when there are none.
    """
    n = sum(v["n"] for rep in per_task_reports for v in rep.values())
    if n == 0:
        return {"n": 0}
    return {"n": n, **{k: sum(v[k] * v["n"] for rep in per_task_reports for v in rep.values()) / n for k in METRICS}}


def merge_per_task(per_task_reports: list[dict[str, dict]]) -> dict[str, dict]:
    """Per task, example-weighted means over several per-task reports."""
    tasks = sorted({t for rep in per_task_reports for t in rep})
    return {t: merge_task_means([{t: rep[t]} for rep in per_task_reports if t in rep]) for t in tasks}


def _table(true_labels, cluster_labels) -> np.ndarray:
    """Contingency table true label x cluster (labels of any hashable kind)."""
    true_labels, cluster_labels = list(true_labels), list(cluster_labels)
    if len(true_labels) != len(cluster_labels):
        raise ValueError("true and cluster labels must have the same length")
    _, t = np.unique(np.asarray(true_labels, dtype=object).astype(str), return_inverse=True)
    _, c = np.unique(np.asarray(cluster_labels, dtype=object).astype(str), return_inverse=True)
    table = np.zeros((t.max() + 1, c.max() + 1), dtype=np.int64)
    np.add.at(table, (t, c), 1)
    return table


def clustering_accuracy(true_labels, cluster_labels) -> float:
    """Accuracy under the best one-to-one matching of clusters to true labels (Hungarian); clusters left
    without a partner count as wrong. NaN for no labels."""
    if len(true_labels) == 0:
        return float("nan")
    from scipy.optimize import linear_sum_assignment  # start-up cost: every run imports this module, few score clusters

    table = _table(true_labels, cluster_labels)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / table.sum())


def purity(true_labels, cluster_labels) -> float:
    """Share of examples whose cluster's majority task is their own (many-to-one: splitting a task costs
    nothing, merging two does)."""
    if len(true_labels) == 0:
        return float("nan")
    table = _table(true_labels, cluster_labels)
    return float(table.max(axis=0).sum() / table.sum())


def adjusted_rand(true_labels, cluster_labels) -> float:
    from sklearn.metrics import adjusted_rand_score  # start-up cost: scikit-learn's metrics take 1.4 s to import

    return float(adjusted_rand_score(list(true_labels), list(cluster_labels)))


def majority_cluster(votes: dict) -> dict:
    """Per task, the cluster most of its examples went to (the lower id on a tie), from
    {task: Counter(cluster -> examples)}: how clusters are matched to tasks for reporting."""
    return {task: min(counts, key=lambda k: (-counts[k], k)) for task, counts in sorted(votes.items())}
