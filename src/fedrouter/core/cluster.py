"""Clustering for FedRouter: K-Means, silhouette choice of K, nearest-centroid routing, clustering scores.

Plain functions, numpy in and out; scikit-learn does the math. `nearest` is the one routing step that
FedRouter's server (local centroid -> global cluster) and router (test input -> adapter) both call.
`local_then_global` is FedRouter's clustering pipeline without the training: K-Means per client, then
K-Means on the server over all clients' local centroids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Auto = str  # the literal "auto": choose K by silhouette score
AUTO = "auto"


def _as_2d(x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array (points x dimensions), got shape {x.shape}")
    return x


def n_distinct(x) -> int:
    x = _as_2d(x)
    return len(np.unique(x, axis=0)) if len(x) else 0


def kmeans(x, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k', d), labels (n,)) of K-Means with k' = min(k, distinct points), 10 restarts."""
    from sklearn.cluster import KMeans

    x = _as_2d(x)
    if len(x) == 0:
        raise ValueError("cannot cluster an empty set of points")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(int(k), n_distinct(x))
    model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    return model.cluster_centers_, model.labels_.astype(np.int64)


def silhouette_curve(x, k_values, seed: int = 0) -> dict[int, float]:
    """Silhouette score of K-Means for each k in `k_values` that the points allow (2 <= k < n, k <= distinct)."""
    from sklearn.metrics import silhouette_score

    x = _as_2d(x)
    n, distinct = len(x), n_distinct(x)
    curve = {}
    for k in sorted({int(k) for k in k_values}):
        if k < 2 or k >= n or k > distinct:
            continue
        _, labels = kmeans(x, k, seed)
        if len(np.unique(labels)) < 2:
            continue
        curve[k] = float(silhouette_score(x, labels))
    return curve


def choose_k(x, k_values, seed: int = 0) -> tuple[int, dict[int, float]]:
    """(the k of the highest silhouette score -- the smallest on a tie --, the curve).

    When no k in `k_values` can be scored (too few distinct points), the answer is 1 with an empty curve.
    """
    curve = silhouette_curve(x, k_values, seed)
    if not curve:
        return 1, curve
    best = max(curve.values())
    return min(k for k, s in curve.items() if s == best), curve


def nearest(x, centroids) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) for each row of `x`; ties go to the lower index."""
    x = _as_2d(x).astype(np.float64)
    c = _as_2d(centroids).astype(np.float64)
    if len(c) == 0:
        raise ValueError("no centroids to assign to")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"points have {x.shape[1]} dimensions, centroids {c.shape[1]}")
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.argmin(d2, axis=1).astype(np.int64)


def route(x, global_centroids, allowed=None) -> np.ndarray:
    """Global cluster id per row of `x`: the nearest global centroid (global mode), or the nearest among
    the `allowed` global cluster ids only (local mode: the clusters a client's local centroids map to)."""
    if allowed is None:
        return nearest(x, global_centroids)
    allowed = np.unique(np.asarray(list(allowed), dtype=np.int64))
    centroids = _as_2d(global_centroids)
    if len(allowed) == 0:
        raise ValueError("local routing needs at least one allowed cluster")
    if allowed.min() < 0 or allowed.max() >= len(centroids):
        raise ValueError(f"allowed cluster ids must lie in [0, {len(centroids)})")
    return allowed[nearest(x, centroids[allowed])]


def clustering_accuracy(true_labels, cluster_labels) -> float:
    """Accuracy under the best one-to-one matching of clusters to true labels (Hungarian algorithm).

    Labels may be of any hashable kind (e.g. task names). Clusters left without a partner count as wrong.
    """
    from scipy.optimize import linear_sum_assignment

    true_labels, cluster_labels = list(true_labels), list(cluster_labels)
    if len(true_labels) != len(cluster_labels):
        raise ValueError("true and cluster labels must have the same length")
    if not true_labels:
        return float("nan")
    _, t = np.unique(np.asarray(true_labels, dtype=object).astype(str), return_inverse=True)
    _, c = np.unique(np.asarray(cluster_labels, dtype=object).astype(str), return_inverse=True)
    table = np.zeros((t.max() + 1, c.max() + 1), dtype=np.int64)
    np.add.at(table, (t, c), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(true_labels))


def adjusted_rand(true_labels, cluster_labels) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(list(true_labels), list(cluster_labels)))


@dataclass
class Clustering:
    """FedRouter's two-level clustering: local K-Means per client, global K-Means over local centroids."""

    local_centroids: dict[int, np.ndarray]  # client -> (n_local[client], d)
    local_labels: dict[int, np.ndarray]  # client -> local cluster of each training example
    global_centroids: np.ndarray  # (n_global, d)
    local_to_global: dict[int, np.ndarray]  # client -> global cluster of each local cluster
    n_local: dict[int, int]
    n_global: int
    local_silhouette: dict[int, dict[int, float]] = field(default_factory=dict)  # clients chosen by "auto"
    global_silhouette: dict[int, float] | None = None  # when n_global was "auto"

    def global_labels(self, client: int) -> np.ndarray:
        """Global cluster of each of `client`'s training examples, via its local cluster."""
        return self.local_to_global[client][self.local_labels[client]]

    def allowed(self, client: int) -> np.ndarray:
        """The global clusters that `client`'s local centroids map to: its candidates in local routing."""
        return np.unique(self.local_to_global[client])


def _check_k(value, what: str) -> None:
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive int or {AUTO!r}, got {value!r}")


def local_then_global(
    client_embeddings: dict[int, np.ndarray],
    n_local: int | dict[int, int] | Auto,
    n_global: int | Auto,
    seed: int = 0,
    k_range=range(2, 13),
) -> Clustering:
    """K-Means per client (`n_local`: one int, an int per client, or "auto"), then K-Means over all local
    centroids on the server (`n_global`: int or "auto"); each local cluster maps to the global centroid
    nearest its local centroid. "auto" picks K by silhouette score over `k_range`."""
    if not client_embeddings:
        raise ValueError("no clients to cluster")
    clients = sorted(client_embeddings)
    per_client = n_local if isinstance(n_local, dict) else {c: n_local for c in clients}
    missing = [c for c in clients if c not in per_client]
    if missing:
        raise ValueError(f"n_local gives no value for client(s) {missing}")
    for c in clients:
        _check_k(per_client[c], f"n_local for client {c}")
    _check_k(n_global, "n_global")
    k_range = list(k_range)

    centroids, labels, chosen, local_curves = {}, {}, {}, {}
    for c in clients:
        centroids[c], labels[c], curve = cluster_local(client_embeddings[c], per_client[c], seed, k_range)
        chosen[c] = len(centroids[c])
        if curve is not None:
            local_curves[c] = curve
    stacked = np.concatenate([centroids[c] for c in clients])
    global_centroids, global_curve = cluster_global(stacked, n_global, seed, k_range)
    mapping = {c: nearest(centroids[c], global_centroids) for c in clients}
    return Clustering(centroids, labels, global_centroids, mapping, chosen, len(global_centroids), local_curves, global_curve)


def cluster_local(x, n_local: int | Auto, seed: int = 0, k_range=range(2, 13)):
    """A client's step: K-Means on its embeddings -> (centroids, labels, silhouette curve or None)."""
    _check_k(n_local, "n_local")
    x = _as_2d(x)
    curve = None
    if n_local == AUTO:
        n_local, curve = choose_k(x, list(k_range), seed)
    centroids, labels = kmeans(x, n_local, seed)
    return centroids, labels, curve


def cluster_global(local_centroids, n_global: int | Auto, seed: int = 0, k_range=range(2, 13)):
    """The server's step: K-Means over every client's local centroids -> (global centroids, curve or None)."""
    _check_k(n_global, "n_global")
    x = _as_2d(local_centroids)
    curve = None
    if n_global == AUTO:
        n_global, curve = choose_k(x, list(k_range), seed)
    centroids, _ = kmeans(x, n_global, seed)
    return centroids, curve
