"""Clustering clients by their LoRA weights (FedCluster, FedLEASE): cosine distances between clients' weight
blocks, and average-linkage agglomerative clustering on them, K given or chosen by silhouette."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import silhouette_score

from fedrouter.core.cluster import positive_k
from fedrouter.errors import FedrouterError

log = logging.getLogger(__name__)


def cosine_distance_matrix(blocks: list) -> np.ndarray:
    """(n, n) mean over blocks of 1 - cos(row i, row j); each block is (n, d_b), e.g. one per module.
    An all-zero row has no direction: its distance to every other row is taken as 1 (orthogonal)."""
    mats = [np.asarray(b, dtype=np.float64) for b in blocks]
    if not mats or any(m.ndim != 2 or m.shape[0] != mats[0].shape[0] for m in mats):
        raise FedrouterError("client clustering needs one (clients x features) block per module, same clients in each")
    if not all(np.isfinite(m).all() for m in mats):
        raise FedrouterError("client clustering: LoRA weights contain NaN or Inf")
    out = np.zeros((mats[0].shape[0],) * 2)
    for m in mats:
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        unit = np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)
        out += 1.0 - unit @ unit.T
    out /= len(mats)
    np.fill_diagonal(out, 0.0)
    return np.clip((out + out.T) / 2, 0.0, 2.0)


def agglomerative(distance: np.ndarray, n_clusters: int) -> np.ndarray:
    """Average-linkage agglomerative clustering on precomputed distances; K clipped to the points; ids in
    order of first appearance (readable)."""
    n = distance.shape[0]
    k = positive_k(n_clusters, "the number of client clusters")
    if k > n:
        log.warning("asked for %d client clusters but there are %d clients; using %d", k, n, n)
        k = n
    if k == 1 or n == 1:
        return np.zeros(n, dtype=int)
    labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distance)
    first: dict[int, int] = {}
    return np.array([first.setdefault(int(label), len(first)) for label in labels])


def agglomerative_auto(distance: np.ndarray, k_values) -> tuple[int, np.ndarray, dict[int, float]]:
    """Agglomerative clustering with K by the best silhouette (precomputed distances). With fewer than 3
    clients, or no K in 2..n-1, every client goes in one cluster (with a warning) and the curve is empty."""
    n = distance.shape[0]
    ks = sorted({int(k) for k in k_values if 2 <= int(k) <= n - 1})
    if not ks:
        log.warning("cannot choose the number of client clusters by silhouette with %d clients; using 1", n)
        return 1, np.zeros(n, dtype=int), {}
    labelings = {k: agglomerative(distance, k) for k in ks}
    curve = {k: float(silhouette_score(distance, labelings[k], metric="precomputed")) if len(set(labelings[k])) > 1 else -1.0
             for k in ks}
    best = max(ks, key=lambda k: (curve[k], -k))
    return best, labelings[best], curve
