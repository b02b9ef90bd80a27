"""FedRouter's router: which adapter an input goes to, from its instruction embedding alone. One function,
`route`, serves evaluation, `fedrouter clusters`, predict and serve: the highest of linear scores x . w + b,
among all clusters or a client's own. Both routers are such scores:
- "discriminant": the nearest cluster mean after whitening by the clusters' pooled covariance (linear
  discriminant analysis, equal priors): inputs of a cluster spread mostly over their content, two tasks on
  one input format differ along the few words of their ask, and whitening discounts the content. Built from
  each client's `cluster_moments` -- what pooling everyone's inputs would give, no example seen;
- "prototype" (the paper's): the nearest prototype; used under DP centroids (the moments would be a release
  the accountant does not cover) and where nothing varies within a cluster.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import shrunk_covariance

from fedrouter.core.cluster import points
from fedrouter.errors import FedrouterError
from fedrouter.methods.fedrouter import thresholds

DISCRIMINANT, PROTOTYPE = "discriminant", "prototype"


def cluster_moments(x, clusters, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A client's share of the discriminant router from its inputs' embeddings `x` and their clusters (0..k-1):
    per cluster the sum (k, d) and count (k,), and the scatter about each one's cluster mean here (d, d)."""
    x = points(x, "embeddings").astype(np.float64)
    clusters = np.asarray(clusters, dtype=np.int64)
    if clusters.shape != (len(x),) or (len(x) and (clusters.min() < 0 or clusters.max() >= k)):
        raise FedrouterError(f"{len(clusters)} cluster ids in 0..{k - 1} were needed for {len(x)} embeddings")
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, clusters, x)
    counts = np.bincount(clusters, minlength=k)
    centred = x - (sums / np.maximum(counts, 1)[:, None])[clusters]
    return sums, counts, centred.T @ centred


def discriminant(moments: list[tuple]) -> tuple[np.ndarray, np.ndarray] | None:
    """(cluster means (k, d), whitening map: the inverse square root of the pooled covariance, shrunk) from
    every client's `cluster_moments` -- each client's scatter about its own means plus how far they lie from
    the clusters' -- or None when nothing varies within a cluster (then route by prototypes)."""
    if not moments:
        raise FedrouterError("the discriminant router needs at least one client's moments")
    sums = sum(np.asarray(s, dtype=np.float64) for s, _, _ in moments)
    counts = sum(np.asarray(n, dtype=np.float64) for _, n, _ in moments)
    if (counts <= 0).any():
        raise FedrouterError(f"no client reported examples of cluster(s) {np.flatnonzero(counts <= 0).tolist()}")
    scatter = sum(np.asarray(w, dtype=np.float64) for _, _, w in moments)
    for s, n, _ in moments:
        n = np.asarray(n, dtype=np.float64)
        held = np.asarray(s, dtype=np.float64)[n > 0]
        scatter = scatter + (held.T / n[n > 0]) @ held
    scatter -= (sums.T / counts) @ sums
    if counts.sum() <= len(counts) or np.trace(scatter) <= 1e-12 * max(1.0, float(np.abs(sums).max())):
        return None
    values, vectors = np.linalg.eigh(shrunk_covariance(scatter / (counts.sum() - len(counts)), thresholds.SHRINKAGE))
    if values.min() <= 0 or not np.isfinite(values).all():
        return None
    return sums / counts[:, None], (vectors / np.sqrt(values)) @ vectors.T


def linear_scores(centroids, whiten=None) -> tuple[np.ndarray, np.ndarray]:
    """(weights (k, d), bias (k,)) with x . w_k + b_k = -|W x - W c_k|^2 / 2 + (a term of x alone), W the
    whitening map (None: identity): the highest score is the nearest centroid."""
    c = points(centroids, "centroids").astype(np.float64)
    w = np.eye(c.shape[1]) if whiten is None else points(whiten, "the whitening map").astype(np.float64)
    if w.shape != (c.shape[1], c.shape[1]):
        raise FedrouterError(f"the whitening map is {w.shape}, not ({c.shape[1]}, {c.shape[1]})")
    cw = c @ w
    return cw @ w.T, -0.5 * (cw * cw).sum(axis=1)


def route(x, weights, bias, owner=None, allowed=None) -> np.ndarray:
    """The cluster of each row of `x`: `owner` (None: the identity) of its highest score x . w_k + b_k, among
    the rows of the `allowed` clusters when given (a client's own); ties go to the lower row."""
    x = points(x, "embeddings").astype(np.float64)
    weights = points(weights, "the router's weights").astype(np.float64)
    bias = np.asarray(bias, dtype=np.float64)
    owner = np.arange(len(weights)) if owner is None else np.asarray(owner, dtype=np.int64)
    if len(weights) == 0 or bias.shape != (len(weights),) or owner.shape != bias.shape or not np.isfinite(bias).all():
        raise FedrouterError(f"the router has {len(weights)} weight rows, bias {bias.shape} and owners {owner.shape}: "
                             "not one finite bias and one cluster per row")
    if x.shape[1] != weights.shape[1]:
        raise FedrouterError(f"embedding dimension {x.shape[1]} does not match the router's {weights.shape[1]}")
    scores = x @ weights.T + bias
    if allowed is not None:
        ids = np.asarray(list(allowed), dtype=np.int64)
        if ids.size == 0 or not np.isin(ids, owner).all():
            raise FedrouterError(f"allowed clusters {ids.tolist()} are not among the router's {sorted(set(owner.tolist()))}")
        scores[:, ~np.isin(owner, ids)] = -np.inf
    return owner[np.argmax(scores, axis=1)] if len(x) else np.zeros(0, dtype=np.int64)

