"""A client's step: K-Means on the instruction and template views, K by silhouette against a structureless
reference (K = 1 included: one task stays one cluster); then each sub-cluster cut into template parts, joined
back while their answers are alike (two tasks asking different things of inputs laid out alike share a
sub-cluster, as the input outweighs the ask; their templates and answers do not). It sends each sub-cluster's
size, mean and spread (`summaries`): no example, no label.
"""

from __future__ import annotations

import itertools

import numpy as np

from fedrouter.core.cluster import AUTO, choose_k, kmeans
from fedrouter.methods.fedrouter.features import Features
from fedrouter.methods.fedrouter import thresholds as T  # read at call time: bench/task_discovery.py sweeps them


def answer_gap(blocks: list[np.ndarray], a: np.ndarray, b: np.ndarray, spreads: list[float]) -> float:
    """How far apart the answers of rows `a` and `b` lie in units of what sampling alone gives, in the view
    (meaning, form) where they differ most -- per view |mean_a - mean_b|^2 / (spread (1/|a| + 1/|b|)), about
    1 for parts drawn alike; per view so that a plain difference of form is not drowned by what answers say."""
    gaps = []
    for x, spread in zip(blocks, spreads):
        gap = x[a].mean(axis=0) - x[b].mean(axis=0)
        gaps.append(float(gap @ gap / (spread * (1 / len(a) + 1 / len(b)))) if spread > 0 else 0.0)
    return max(gaps)


def join_alike(blocks: list[np.ndarray], parts: list[np.ndarray]) -> list[np.ndarray]:
    """`parts` (row indices of one sub-cluster) joined, closest answers first, until every two left lie more
    than ANSWER_GAP apart; then each part under MIN_SPLIT_SHARE joins the closest (one client's odd content)."""
    parts = list(parts)
    n = sum(len(p) for p in parts)
    spreads = [sum(float(((x[p] - x[p].mean(axis=0)) ** 2).sum()) for p in parts) / max(1, n - len(parts)) for x in blocks]

    def gap(i: int, j: int) -> float:
        return answer_gap(blocks, parts[i], parts[j], spreads)

    def join(keep: int, gone: int) -> None:
        parts[keep] = np.concatenate([parts[keep], parts[gone]])
        del parts[gone]

    while len(parts) > 1:
        value, a, b = min((gap(a, b), a, b) for a, b in itertools.combinations(range(len(parts)), 2))
        if value > T.ANSWER_GAP:
            break
        join(a, b)
    while len(parts) > 1 and min(map(len, parts)) < T.MIN_SPLIT_SHARE * n:
        small = min(range(len(parts)), key=lambda i: len(parts[i]))
        join(min((i for i in range(len(parts)) if i != small), key=lambda i: gap(small, i)), small)
    return parts


def template_parts(features: Features, labels: np.ndarray, seed: int) -> np.ndarray:
    """`labels` (0..k-1) with each sub-cluster of at least TEMPLATE_PARTS x MIN_PART examples split where its
    template parts answer differently (new labels k, k+1, ...)."""
    blocks = features.answer_views
    split = labels.copy()
    next_label = int(labels.max()) + 1
    for j in range(next_label):
        members = np.flatnonzero(labels == j)
        if len(members) < T.TEMPLATE_PARTS * T.MIN_PART:
            continue
        _, part = kmeans(features.template[members], T.TEMPLATE_PARTS, seed, warn=False)  # fewer templates, fewer parts
        parts = join_alike(blocks, [members[part == p] for p in range(int(part.max()) + 1)])
        for rows in sorted(parts, key=lambda p: p.min())[1:]:  # the part holding the first example keeps the label
            split[rows] = next_label
            next_label += 1
    return split


def split(features: Features, n_local, k_max: int, seed: int) -> tuple[np.ndarray, dict | None]:
    """(sub-cluster of each example, the silhouette curve K was chosen by or None), with `n_local` "auto" or
    a fixed K (then no template parts either: the client's K is what was asked)."""
    seen = features.x[:, : features.split_dims]
    if n_local != AUTO:
        return kmeans(seen, int(n_local), seed)[1], None
    k, curve = choose_k(seen, range(1, k_max + 1), seed, T.NULL_MARGIN, T.NULL_MIN_POINTS)
    return template_parts(features, kmeans(seen, k, seed)[1], seed), curve


def summaries(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means (k, d), sizes (k,), spreads (k,): mean squared distance to the mean) of `x` under `labels`."""
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=k)
    means = np.stack([x[labels == j].mean(axis=0) for j in range(k)])
    spreads = np.array([((x[labels == j] - means[j]) ** 2).sum(axis=1).mean() for j in range(k)])
    return means, sizes, spreads
