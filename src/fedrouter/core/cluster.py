"""Clustering points, generic (scikit-learn does the math): K-Means, K chosen by silhouette against a
structureless reference, the silhouette of parts of the data, nearest-centroid assignment. Bad input is one
`FedrouterError` line; a K above the distinct points is clipped to them, with a warning. (Clients clustered
by their weights: `core.client_clusters`; scores against true labels: `core.metrics`.)
"""

from __future__ import annotations

import functools
import logging
import warnings

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_samples
from threadpoolctl import threadpool_limits

from fedrouter.errors import FedrouterError
from fedrouter.threads import chosen_threads

log = logging.getLogger(__name__)

AUTO = "auto"  # choose K from the data


def points(x, what: str) -> np.ndarray:
    """`x` as a finite 2-d numeric array (points x dimensions); zero points allowed (an empty 1-d array)."""
    try:
        x = np.asarray(x)
        if x.dtype.kind in "Ob":
            x = x.astype(np.float64)
    except (TypeError, ValueError):
        raise FedrouterError(f"{what} must be a 2-d array of numbers (points x dimensions)") from None
    if x.dtype.kind not in "iuf":
        raise FedrouterError(f"{what} must be numbers, got dtype {x.dtype}")
    if x.ndim == 1 and x.size == 0:
        x = x.reshape(0, 0)
    if x.ndim != 2:
        raise FedrouterError(f"{what} must be a 2-d array (points x dimensions), got shape {x.shape}")
    if len(x) and x.shape[1] == 0:
        raise FedrouterError(f"{what} have 0 dimensions (shape {x.shape})")
    bad = int((~np.isfinite(x).all(axis=1)).sum()) if x.size else 0
    if bad:
        raise FedrouterError(f"{what} contain NaN or Inf ({bad} row{'s' if bad != 1 else ''} of {len(x)})")
    return x


def positive_k(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise FedrouterError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def n_distinct(x: np.ndarray) -> int:
    return len(np.unique(x, axis=0)) if len(x) else 0


def one_blas_thread(fn):
    """`fn` with BLAS single-threaded (BLAS threads under K-Means' OpenMP ones oversubscribe: 5.6 s instead of
    1.4 s on 2 cores) and OpenMP at torch's threads when chosen (`threads.set_threads`), not every core."""

    @functools.wraps(fn)
    def limited(*args, **kwargs):
        threads = chosen_threads()
        with threadpool_limits(limits={"blas": 1, **({"openmp": threads} if threads else {})}):
            return fn(*args, **kwargs)

    return limited


def _kmeans(x: np.ndarray, k: int, seed: int, weights=None, warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """K-Means (10 restarts) on validated points; K clipped to the distinct points and the clusters formed."""
    distinct = n_distinct(x)
    if k > distinct and warn:
        log.warning("K-Means: requested K=%d, but there are only %d distinct point(s) among %d; using K=%d",
                    k, distinct, len(x), distinct)
    with warnings.catch_warnings():  # near-duplicates np.unique tells apart but K-Means cannot: handled below
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = KMeans(n_clusters=min(k, distinct), n_init=10, random_state=seed).fit(x, sample_weight=weights)
    used, labels = np.unique(model.labels_, return_inverse=True)
    return model.cluster_centers_[used], labels.astype(np.int64)


@one_blas_thread
def kmeans(x, k: int, seed: int = 0, weights=None, warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k', d), labels (n,)) of K-Means, k' = min(k, distinct points); `weights` per point;
    `warn`: log when K is clipped (off where fewer clusters than asked is expected)."""
    x = points(x, "embeddings")
    if len(x) == 0:
        raise FedrouterError("nothing to cluster: no points were given")
    return _kmeans(x, positive_k(k, "K"), seed, weights, warn)


def silhouette_of_parts(means: np.ndarray, self_distance: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One silhouette per part of the data (`means`), clustered as `labels` says; a part alone in its cluster
    is not scored 0 (scikit-learn's convention) but with its `self_distance` -- how far two halves of it would
    lie apart -- as its distance to its own cluster: a client holding one task sends it as one part, and
    scored 0 it would always merge into its neighbour (merging two tasks costs more than splitting one)."""
    k = int(labels.max()) + 1
    if k < 2:
        return np.full(len(means), -1.0)
    dist = np.sqrt(np.maximum(((means[:, None, :] - means[None, :, :]) ** 2).sum(-1), 0.0))
    own, other = np.empty(len(means)), np.empty(len(means))
    for u in range(len(means)):
        mates = np.flatnonzero(labels == labels[u])
        mates = mates[mates != u]
        own[u] = dist[u, mates].mean() if len(mates) else self_distance[u]
        other[u] = min(dist[u, labels == j].mean() for j in range(k) if j != labels[u])
    return (other - own) / np.maximum(np.maximum(own, other), 1e-300)


def null_reference(x: np.ndarray, seed: int) -> np.ndarray:
    """A structureless stand-in for `x`: one Gaussian with `x`'s mean and principal variances (the null
    model of the gap statistic)."""
    rng = np.random.default_rng([seed, 7919])
    _, spectrum, basis = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    draws = rng.standard_normal((len(x), len(spectrum)))
    return x.mean(axis=0) + (draws * (spectrum / np.sqrt(max(1, len(x) - 1)))) @ basis


def _curve(x, ks, seed, weights, score, k_top: int) -> dict[int, np.ndarray]:
    """K -> the per-point silhouettes of K-Means with that K."""
    out = {}
    for k in ks:
        if 2 <= k <= min(n_distinct(x), k_top):
            _, labels = _kmeans(x, k, seed, weights, warn=False)
            if labels.max() + 1 == k:  # near-duplicates merged clusters: this k is not what would be scored
                out[k] = np.asarray(score(x, labels), dtype=np.float64)
    return out


@one_blas_thread
def choose_k(x, ks, seed: int, margin: float, min_points: int, weights=None, score=None,
             keep_apart: bool = False) -> tuple[int, dict[int, float]]:
    """(K, its curve): the K in `ks` whose K-Means has the best mean silhouette (`score(points, labels)`, one
    per point; default scikit-learn's), the smallest on a tie -- or with `keep_apart` the largest within one
    standard error of the best (a difference below its own noise is no reason to merge). K = 1 (in `ks`,
    `min_points` or more) scores `margin` x the best K-Means reaches on `null_reference(x)`: a split must beat
    noise of the same spread. No K >= 2 scorable: min(max(ks), distinct points), with a warning."""
    x = points(x, "embeddings")
    if len(x) == 0:
        raise FedrouterError("nothing to cluster: no points were given")
    # scikit-learn's silhouette needs K < points; a score of parts (`silhouette_of_parts`) can take K = points
    k_top = len(x) - 1 if score is None else len(x)
    score = score or silhouette_samples
    samples = _curve(x, ks, seed, weights, score, k_top)
    if not samples:
        k = max(1, min(max(ks), n_distinct(x)))
        log.warning("choosing K on %d points (%d distinct): no K in %s can be scored; using K=%d", len(x), n_distinct(x), list(ks), k)
        return k, {}
    curve = {k: float(s.mean()) for k, s in samples.items()}
    best = max(curve.values())
    top = min(k for k, s in curve.items() if s == best)
    noise = float(samples[top].std(ddof=1) / np.sqrt(len(x)))  # the standard error of the best mean silhouette
    if 1 in ks and len(x) >= min_points:
        reference = _curve(null_reference(x, seed), list(curve), seed, weights, score, k_top)
        bar = margin * max((float(s.mean()) for s in reference.values()), default=0.0)
        curve = {1: bar, **curve}
        if bar >= best:
            return 1, curve
    if keep_apart:
        return max(k for k, s in curve.items() if k >= 2 and s >= best - noise), curve
    return top, curve


def nearest(x, centroids) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) for each row of `x`; ties go to the lower index."""
    x, c = points(x, "embeddings").astype(np.float64), points(centroids, "centroids").astype(np.float64)
    if len(c) == 0:
        raise FedrouterError("no centroids to assign to")
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    if x.shape[1] != c.shape[1]:
        raise FedrouterError(f"embedding dimension {x.shape[1]} does not match the centroids' {c.shape[1]}")
    with np.errstate(over="ignore", invalid="ignore"):
        d2 = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    if not np.isfinite(d2).all():
        raise FedrouterError("distances between embeddings and centroids overflow: values are too large")
    return np.argmin(d2, axis=1).astype(np.int64)
