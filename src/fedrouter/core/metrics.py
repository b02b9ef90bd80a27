"""ROUGE-1/2/L (rouge-score) and exact match, per example, then averaged per client and per task."""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache

METRICS = ("rouge1", "rouge2", "rougeL", "exact_match")


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

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
