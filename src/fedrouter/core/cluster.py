"""Clustering for FedRouter: K-Means, silhouette choice of K, nearest-centroid routing, clustering scores.

Plain functions, numpy in and out; scikit-learn does the math. `nearest` is the one routing step that
FedRouter's server (local centroid -> global cluster) and router (test input -> adapter) both call.
`local_then_global` is FedRouter's clustering pipeline without the training: K-Means per client
(sub-clusters), then `server_step` over all clients' sub-centroids, then (by default) each example to
its nearest cluster centre and `regroup_by_examples`.

How K is chosen ("auto"), measured in docs/benchmark.md (bench/task_discovery.py):
- Silhouette over k_min..k_max, and K = 1 when 1 is in the range: it scores the bar NULL_MARGIN x the best
  silhouette that K-Means reaches on one structureless Gaussian with the points' own spectrum, so a split
  must beat what noise of the same shape gives (silhouette values alone cannot: real 8-task text scores
  0.1, one task split by its content 0.2). Below NULL_MIN_POINTS points K = 1 is not offered.
- Then (given the instructions' texts and answers beside the split dimensions) each sub-cluster is split
  where its templates answer differently (`split_by_answers`): two tasks that share an input format on
  every client (the `all` scenario) share a sub-cluster, and nothing later could part them.
- On the server, K-Means prototypes over the sub-centroids, then `cooccurring`: prototypes that occur on
  the same clients in the same proportions are parts of one task (its templates, its sub-topics) and
  become one global cluster.
- Then, by default (`assign` "example"), every training example goes on its own to the nearest cluster
  centre (`cluster_centres`: a cluster's mean task feature, instruction and answer) among the clusters
  nearest to at least MIN_SHARE of the client's examples (`nearest_held`); clusters no example went to
  are dropped and clusters that now co-occur are joined (`regroup_by_examples`). Why: a client whose
  instructions cannot tell two tasks apart (two tasks sharing an input format) sends one half-and-half
  sub-cluster, which the server cannot split; the example's answer, next to the centres, can
  (synthetic-hard `dual`, seeds 0-2: 0.72-0.79 -> 1.000; nothing else moved). "sub-cluster" keeps the
  paper's form: an example goes where its sub-cluster went.
- A client's local clusters are the global clusters holding its examples, so a single-task client ends
  with one however its data split.
- The router (global router "discriminant", the default) compares an input with each cluster's mean
  instruction embedding after whitening by the clusters' pooled covariance (`discriminant`, from each
  client's `cluster_moments`): linear discriminant analysis with equal priors. "prototype" keeps the
  paper's nearest prototype.

Bad input is told as one `FedrouterError` line before scikit-learn sees it: no points (nothing to
cluster), NaN or Inf in embeddings or centroids, a non-2-d or non-numeric array, an embedding dimension
that differs from the centroids', an empty or out-of-range set of allowed clusters, a K that is not a
positive integer (or "auto").

The documented fallback for a K the points cannot carry: K is clipped to the number of distinct points
(K-Means cannot make more clusters than that), with a warning on this module's logger naming the
requested and the used K. So a client with one example gets K = 1 (its one centroid is that example,
its labels [0]), and duplicated embeddings never reach scikit-learn as more clusters than points. "auto"
needs a silhouette score, which needs at least 3 distinct points and some K in the range with
2 <= K <= min(distinct points, points - 1); otherwise K falls back to the number of distinct points
(capped by the range's largest K) with a warning, and the returned silhouette curve is empty.
"""

from __future__ import annotations

import functools
import itertools
import logging
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from fedrouter.errors import FedrouterError

log = logging.getLogger(__name__)

Auto = str  # the literal "auto": choose K by silhouette score
AUTO = "auto"

# What FedRouter clusters: each training example's instruction embedding alone, or followed by its output's
# -- everywhere ("instruction+output"), or only where the server groups a client's sub-clusters, the client
# splitting its data by instructions ("instruction+output@server").
INSTRUCTION = "instruction"
INSTRUCTION_AND_OUTPUT = "instruction+output"
OUTPUT_AT_SERVER = "instruction+output@server"
CLUSTER_ON = (INSTRUCTION, INSTRUCTION_AND_OUTPUT, OUTPUT_AT_SERVER)
# the default of the method and of `fedrouter clusters`: the only one at every target of docs/benchmark.md
# that instructions alone meet, and also at synthetic-hard `single` (1.000 against 0.625)
DEFAULT_CLUSTER_ON = OUTPUT_AT_SERVER

# How a client's training examples get their global cluster: each on its own, to the nearest cluster centre
# (the default), or all of a sub-cluster to where the server put that sub-cluster (the paper's form).
EXAMPLE, SUB_CLUSTER = "example", "sub-cluster"
ASSIGN = (EXAMPLE, SUB_CLUSTER)
DEFAULT_ASSIGN = EXAMPLE
# A cluster nearer than all others to fewer than this share of a client's examples is not one of its
# clusters: its few examples go to their nearest among the rest (5 % keeps every single-task client of the
# benchmarks at one cluster: bench/task_discovery.py, docs/benchmark.md).
MIN_SHARE = 0.05


def task_features(instruction_vectors, output_vectors=None) -> np.ndarray:
    """The vectors FedRouter clusters a client's training examples by: the instruction embeddings, followed
    (when `output_vectors` is given) by the embeddings of the answers, side by side with equal weight.

    Why the answer: a task is what is asked of an input. Tasks that share an input format (two questions:
    "are they duplicates?" / "who is the first one about?") differ little in their instructions and much in
    their answers, while one task written in several templates keeps one kind of answer. Measured in
    docs/benchmark.md (bench/task_discovery.py). The router never sees an answer: it compares an input's
    instruction embedding with the leading instruction part of each prototype (`Clustering.router_dims`),
    which is a mean of instruction embeddings, as a K-Means centroid of stacked vectors is the stack of means.
    """
    x = _points(instruction_vectors, "instruction embeddings")
    if output_vectors is None:
        return x
    y = _points(output_vectors, "output embeddings")
    if len(y) != len(x):
        raise FedrouterError(f"{len(y)} output embeddings were given for {len(x)} instructions")
    return np.hstack([x, y]).astype(np.float32)


def example_features(examples: list[dict], embed, cluster_on: str) -> tuple[np.ndarray, int]:
    """A client's training `examples` as the vectors it clusters them by (`task_features`, as `cluster_on`
    says), and the width of their instruction part (what the router compares an input with); `embed` maps
    texts to an (n, d) array. FedRouter's clients and `fedrouter clusters` both call this, so they cluster
    the same vectors."""
    if cluster_on not in CLUSTER_ON:
        raise FedrouterError(f"cluster_on must be one of {', '.join(map(repr, CLUSTER_ON))}, got {cluster_on!r}")
    instructions = _points(embed([e["instruction"] for e in examples]), "instruction embeddings")
    answers = embed([e["output"] for e in examples]) if cluster_on != INSTRUCTION else None
    return task_features(instructions, answers), instructions.shape[1]


def split_dims(cluster_on: str, router_dims: int) -> int | None:
    """How many leading dimensions of the task features a client's K-Means splits its data by (None: all):
    with "instruction+output@server", the instruction part (`router_dims` wide) only.

    Why: answers tell apart tasks that share an input format (a yes/no against a name), but within a
    client they also split one task by its answer kinds (snli's "yes" from its "it is not possible to
    tell"), which the server then groups with another task's alike answers (glue_qqp's yes/no): flan8 0.745
    with answers everywhere. Split by instructions, each sub-cluster's answer mean describes its whole
    answer mix, and the server tells a format-sharing pair apart by it (docs/benchmark.md)."""
    return router_dims if cluster_on == OUTPUT_AT_SERVER else None


def label_means(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, d): the mean of `x`'s rows with each label 0..k-1 (every label must occur)."""
    return np.stack([x[labels == j].mean(axis=0) for j in range(k)])


def _points(x, what: str) -> np.ndarray:
    """`x` as a 2-d numeric array (points x dimensions) with finite values; FedrouterError otherwise.

    An empty 1-d array reads as zero points; callers decide whether zero points is an error.
    """
    try:
        x = np.asarray(x)
    except (TypeError, ValueError):  # ragged nested lists
        raise FedrouterError(f"{what} must be a 2-d array of numbers (points x dimensions)") from None
    if x.dtype.kind == "O":
        try:
            x = x.astype(np.float64)
        except (TypeError, ValueError):
            raise FedrouterError(f"{what} must be numbers, got non-numeric values") from None
    elif x.dtype.kind == "b":
        x = x.astype(np.float64)
    elif x.dtype.kind not in "iuf":
        raise FedrouterError(f"{what} must be numbers, got dtype {x.dtype}")
    if x.ndim == 1 and x.size == 0:
        x = x.reshape(0, 0)
    if x.ndim != 2:
        raise FedrouterError(f"{what} must be a 2-d array (points x dimensions), got shape {x.shape}")
    if len(x) and x.shape[1] == 0:
        raise FedrouterError(f"{what} have 0 dimensions (shape {x.shape})")
    if x.dtype.kind == "f" and x.size:
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        if bad:
            raise FedrouterError(f"{what} contain NaN or Inf ({bad} row{'s' if bad != 1 else ''} of {len(x)})")
    return x


def _positive_k(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise FedrouterError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _k_values(k_values, what: str = "the K range for 'auto'", allow_empty: bool = False) -> list[int]:
    """The distinct integer K values in `k_values`, sorted; FedrouterError for a non-integer (or empty) range."""
    if isinstance(k_values, (str, bytes)):
        raise FedrouterError(f"{what} must be a list of integers, got {k_values!r}")
    try:
        values = list(k_values)
    except TypeError:
        raise FedrouterError(f"{what} must be a list of integers, got {k_values!r}") from None
    out = set()
    for k in values:
        if isinstance(k, (bool, np.bool_)):
            ok = False
        elif isinstance(k, (int, np.integer)):
            ok = True
        else:
            ok = isinstance(k, (float, np.floating)) and bool(np.isfinite(k)) and k == int(k)
        if not ok:
            raise FedrouterError(f"{what} must hold integers, got {k!r}")
        out.add(int(k))
    if not out and not allow_empty:
        raise FedrouterError(f"{what} is empty: no K to try")
    return sorted(out)


def n_distinct(x) -> int:
    x = _points(x, "points")
    return len(np.unique(x, axis=0)) if len(x) else 0


def _one_blas_thread(fn):
    """`fn` runs with BLAS single-threaded: scikit-learn's K-Means and silhouette run OpenMP threads, and BLAS
    threads under them oversubscribe the cores (on 2 cores, a client's K choice took 5.6 s instead of 1.4 s,
    with the same labels; docs/benchmark.md, `fedrouter run` with no arguments). Applied to this module's
    entry points, not its inner steps: setting the limit costs about 4 ms each time."""

    @functools.wraps(fn)
    def limited(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return limited


def _kmeans(x: np.ndarray, k: int, seed: int, what: str, warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """K-Means on validated, non-empty points; K clipped to the distinct points, with a warning if `warn`."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    n, distinct = len(x), n_distinct(x)
    if k > distinct and warn:
        log.warning("K-Means on %s: requested K=%d, but there are only %d distinct point(s) among %d; using K=%d",
                    what, k, distinct, n, distinct)
    k = min(k, distinct)
    with warnings.catch_warnings():
        # near-duplicates that np.unique tells apart but K-Means cannot: handled below, not a warning
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    centroids, labels = model.cluster_centers_, model.labels_.astype(np.int64)
    used = np.unique(labels)
    if len(used) < k:
        log.warning("K-Means on %s: requested K=%d, but the points (near-duplicates) form only %d clusters; "
                    "using K=%d", what, k, len(used), len(used))
        centroids, labels = centroids[used], np.searchsorted(used, labels).astype(np.int64)
    return centroids, labels


@_one_blas_thread
def kmeans(x, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k', d), labels (n,)) of K-Means with k' = min(k, distinct points), 10 restarts.

    A k above the number of distinct points is clipped to it, with a warning (see the module docstring).
    """
    x = _points(x, "embeddings")
    if len(x) == 0:
        raise FedrouterError("nothing to cluster: no points were given")
    return _kmeans(x, _positive_k(k, "K"), seed, "the embeddings")


def _silhouette_curve(x: np.ndarray, ks: list[int], seed: int, what: str) -> dict[int, float]:
    from sklearn.metrics import silhouette_score

    n, distinct = len(x), n_distinct(x)
    curve = {}
    for k in ks:
        if k < 2 or k >= n or k > distinct:
            continue
        _, labels = _kmeans(x, k, seed, what)
        if len(np.unique(labels)) != k:  # near-duplicates merged clusters: this k is not what was scored
            continue
        curve[k] = float(silhouette_score(x, labels))
    return curve


@_one_blas_thread
def silhouette_curve(x, k_values, seed: int = 0) -> dict[int, float]:
    """Silhouette score of K-Means for each k in `k_values` that the points allow (2 <= k < n, k <= distinct)."""
    x = _points(x, "embeddings")
    ks = _k_values(k_values, "k_values", allow_empty=True)
    return _silhouette_curve(x, ks, seed, "the embeddings")


NULL_MARGIN = 1.25  # K >= 2 must beat a structureless reference's silhouette by this factor
NULL_MIN_POINTS = 20  # below this, random points score high silhouettes too: K = 1 is not offered


def _null_reference(x: np.ndarray, seed: int) -> np.ndarray:
    """A structureless stand-in for `x`: one Gaussian with `x`'s mean and principal variances (the null
    model of the gap statistic, here scored by silhouette)."""
    rng = np.random.default_rng([seed, 7919])
    centred = x - x.mean(axis=0)
    _, spectrum, basis = np.linalg.svd(centred, full_matrices=False)
    draws = rng.standard_normal((len(x), len(spectrum)))
    return x.mean(axis=0) + (draws * (spectrum / np.sqrt(max(1, len(x) - 1)))) @ basis


def _choose_k(x: np.ndarray, k_values, seed: int, what: str) -> tuple[int, dict[int, float]]:
    ks = _k_values(k_values)
    n, distinct = len(x), n_distinct(x)
    usable = [k for k in ks if 2 <= k <= min(distinct, n - 1)]
    curve = _silhouette_curve(x, usable, seed, what) if distinct >= 3 else {}
    if not curve:
        k = max(1, min(ks[-1], distinct))
        if distinct < 3:
            reason = f"only {distinct} distinct point(s) among {n}, too few for a silhouette score"
        else:
            reason = f"no K in {ks[0]}..{ks[-1]} can be scored with {distinct} distinct points among {n}"
        log.warning("choosing K by silhouette on %s: %s; falling back to K=%d", what, reason, k)
        return k, {}
    skipped = [k for k in ks if k >= 2 and k not in curve]
    if skipped:
        log.info("choosing K by silhouette on %s: skipped K=%s (%d distinct points among %d)",
                 what, ",".join(map(str, skipped)), distinct, n)
    if ks[0] == 1 and n >= NULL_MIN_POINTS:
        # K = 1 scores the bar a split must clear: NULL_MARGIN times the best silhouette that the same
        # K-Means finds in one structureless Gaussian of the same spread. Silhouette values alone cannot
        # say 1 (real text mixtures score 0.1, one task split by content 0.2); against its own null they can.
        reference = _silhouette_curve(_null_reference(x, seed), list(curve), seed, f"a reference for {what}")
        curve = {1: NULL_MARGIN * max(reference.values(), default=0.0), **curve}
    best = max(curve.values())
    return min(k for k, s in curve.items() if s == best), curve


@_one_blas_thread
def choose_k(x, k_values, seed: int = 0) -> tuple[int, dict[int, float]]:
    """(the k of the highest silhouette score -- the smallest on a tie --, the curve).

    When no k in `k_values` can be scored (fewer than 3 distinct points, or every k too large for the
    points), the answer is the number of distinct points capped by the largest k (at least 1), with a
    warning and an empty curve.
    """
    x = _points(x, "embeddings")
    if len(x) == 0:
        raise FedrouterError("nothing to cluster: no points were given")
    return _choose_k(x, k_values, seed, "the embeddings")


def nearest(x, centroids) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) for each row of `x`; ties go to the lower index."""
    x = _points(x, "embeddings").astype(np.float64)
    c = _points(centroids, "centroids").astype(np.float64)
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


def route(x, global_centroids, allowed=None, owner=None) -> np.ndarray:
    """Global cluster id per row of `x`: that of the nearest centroid (global mode), or of the nearest
    among the centroids of the `allowed` cluster ids only (local mode: a client's own clusters).

    `owner` gives the cluster of each centroid when several centroids (prototypes) share a cluster;
    without it centroid i is cluster i.
    """
    centroids = _points(global_centroids, "centroids")
    owner = np.arange(len(centroids)) if owner is None else np.asarray(owner, dtype=np.int64)
    if owner.shape != (len(centroids),):
        raise FedrouterError(f"{len(owner)} cluster ids were given for {len(centroids)} centroids")
    if allowed is None:
        return owner[nearest(x, centroids)]
    ids = _allowed_ids(allowed, int(owner.max()) + 1 if len(owner) else 0)
    candidates = np.flatnonzero(np.isin(owner, ids))
    return owner[candidates[nearest(x, centroids[candidates])]]


def _allowed_ids(allowed, n_clusters: int) -> np.ndarray:
    """The `allowed` cluster ids of local routing, checked: integers in [0, n_clusters), at least one."""
    try:
        ids = np.asarray(allowed).ravel() if isinstance(allowed, np.ndarray) else np.asarray(list(allowed))
    except (TypeError, ValueError):
        raise FedrouterError(f"allowed clusters must be a list of cluster ids, got {allowed!r}") from None
    if ids.size == 0:
        raise FedrouterError("local routing needs at least one allowed cluster; the allowed list is empty")
    if ids.ndim != 1 or ids.dtype.kind not in "iuf" or (
            ids.dtype.kind == "f" and not (np.isfinite(ids).all() and (ids == np.round(ids)).all())):
        raise FedrouterError(f"allowed clusters must be integer cluster ids, got {allowed!r}")
    ids = np.unique(ids.astype(np.int64))
    bad = ids[(ids < 0) | (ids >= n_clusters)]
    if len(bad):
        raise FedrouterError(f"allowed cluster ids must lie in [0, {n_clusters}), got {bad.tolist()}")
    return ids


# How inputs are compared with clusters when the router picks among them (test-time generalization,
# serving, and the "local" and "global" modes on a client's own tests): "discriminant" (the default) by a
# distance that discounts what varies within a cluster (`discriminant`), "prototype" (the paper's) by the
# Euclidean distance to the server's prototypes.
DISCRIMINANT, PROTOTYPE = "discriminant", "prototype"
GLOBAL_ROUTERS = (DISCRIMINANT, PROTOTYPE)
DEFAULT_GLOBAL_ROUTER = DISCRIMINANT
# Weight of the identity (scaled to the covariance's mean variance) in the router's covariance: 0.01 to
# 0.6 route alike on every benchmark (docs/benchmark.md); some is needed, as 384 dimensions can have
# fewer examples behind them.
SHRINKAGE = 0.1


def cluster_moments(x, clusters, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A client's share of the discriminant router, from its training inputs' embeddings `x` and each
    one's global cluster (0..k-1): per cluster the sum of its vectors (k, d) and their count (k,), and
    the scatter of every vector about its own cluster's mean on this client, summed (d, d). Sums and
    scatters add up over clients, so the server gets what pooling everyone's data would give
    (`discriminant`) without seeing an example."""
    x = _points(x, "embeddings").astype(np.float64)
    clusters = np.asarray(clusters, dtype=np.int64)
    if clusters.shape != (len(x),) or (len(x) and (clusters.min() < 0 or clusters.max() >= k)):
        raise FedrouterError(f"{len(clusters)} cluster ids in 0..{k - 1} were needed for {len(x)} embeddings")
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, clusters, x)
    counts = np.bincount(clusters, minlength=k)
    centred = x - (sums / np.maximum(counts, 1)[:, None])[clusters]
    return sums, counts, centred.T @ centred


def discriminant(moments: list[tuple], shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """The discriminant router from every client's `cluster_moments`: the clusters' means (k, d) and a
    whitening map (d, d) -- the inverse square root of the clusters' pooled covariance, shrunk toward the
    identity (scikit-learn's `shrunk_covariance`) -- so that the nearest mean after whitening
    (`whitened`; as linear scores, `linear_router` and `route_linear`) is linear discriminant analysis
    with equal priors.

    Why: within a cluster, inputs spread mostly over their content (names, facts), and two tasks that
    share an input format differ along the few words of their ask. The Euclidean distance to the nearest
    prototype is dominated by the content; whitening discounts it (synthetic-hard `dual`, inputs of every
    task among all clusters: 0.76-0.96 -> 1.000; docs/benchmark.md). The covariance pools the scatter
    about each cluster's mean over all clients: each client's scatter about its own means, plus how far
    its means lie from the clusters' (from the sums)."""
    from sklearn.covariance import shrunk_covariance

    if not moments:
        raise FedrouterError("the discriminant router needs at least one client's moments")
    sums = sum(np.asarray(s, dtype=np.float64) for s, _, _ in moments)
    counts = sum(np.asarray(n, dtype=np.float64) for _, n, _ in moments)
    if (counts <= 0).any():
        raise FedrouterError(f"no client reported examples of cluster(s) {np.flatnonzero(counts <= 0).tolist()}")
    scatter = sum(np.asarray(w, dtype=np.float64) for _, _, w in moments)
    for s, n, _ in moments:  # each client's cluster means about the clusters' means
        n = np.asarray(n, dtype=np.float64)
        held = np.asarray(s, dtype=np.float64)[n > 0]
        scatter = scatter + (held.T / n[n > 0]) @ held
    scatter -= (sums.T / counts) @ sums
    covariance = shrunk_covariance(scatter / max(counts.sum() - len(counts), 1.0), shrinkage)
    values, vectors = np.linalg.eigh(covariance)
    if values.min() <= 0 or not np.isfinite(values).all():
        raise FedrouterError("the clusters' pooled covariance is degenerate (no spread within clusters)")
    return sums / counts[:, None], (vectors / np.sqrt(values)) @ vectors.T


def linear_router(means, whiten) -> tuple[np.ndarray, np.ndarray]:
    """The discriminant router as linear scores, what travels to the clients (k x d numbers, not the d x d
    map): weights (k, d) and bias (k,) such that x . w_k + b_k is minus half the squared distance of x to
    mean k after whitening, plus a term of x alone -- so the highest score is the nearest mean."""
    means_w = whitened(means, whiten)
    return means_w @ np.asarray(whiten, dtype=np.float64).T, -0.5 * (means_w * means_w).sum(axis=1)


def route_linear(x, weights, bias, allowed=None) -> np.ndarray:
    """Cluster per row of `x`: the highest of the scores x . w_k + b_k (`linear_router`), among all
    clusters or the `allowed` ones only (a client's own, on its own tests); ties go to the lower id."""
    x = _points(x, "embeddings").astype(np.float64)
    weights = _points(weights, "the router's weights").astype(np.float64)
    bias = np.asarray(bias, dtype=np.float64)
    if len(weights) == 0 or bias.shape != (len(weights),) or not np.isfinite(bias).all():
        raise FedrouterError(f"the router has {len(weights)} weight rows and bias of shape {bias.shape}: not one finite bias per cluster")
    if x.shape[1] != weights.shape[1]:
        raise FedrouterError(f"embedding dimension {x.shape[1]} does not match the router's {weights.shape[1]}")
    scores = x @ weights.T + bias
    if allowed is not None:
        scores[:, np.setdiff1d(np.arange(len(weights)), _allowed_ids(allowed, len(weights)))] = -np.inf
    return np.argmax(scores, axis=1).astype(np.int64)


def whitened(x, whiten) -> np.ndarray:
    """`x`'s rows mapped through the router's whitening matrix (`discriminant`), checked."""
    x = _points(x, "embeddings").astype(np.float64)
    whiten = _points(whiten, "the router's whitening matrix").astype(np.float64)
    if whiten.shape != (x.shape[1], x.shape[1]):
        raise FedrouterError(f"the router's whitening matrix is {whiten.shape}, not ({x.shape[1]}, {x.shape[1]}) for "
                             f"embeddings of dimension {x.shape[1]}")
    return x @ whiten


@_one_blas_thread
def learned_route(train_x, train_clusters, x) -> np.ndarray:
    """Global cluster per row of `x`, by a logistic regression fit on a client's own training inputs
    (`train_x`) and the clusters its examples were put in (`train_clusters`): the "learned" local router.
    Why: two tasks that share an input format have nearly the same instruction embeddings, so the nearest
    prototype confuses them; their examples, put apart by their answers, teach a linear boundary along
    the few words that differ (synthetic-hard `dual` router 0.866-0.979 -> 1.000; docs/benchmark.md)."""
    from sklearn.linear_model import LogisticRegression

    train_x = _points(train_x, "training embeddings")
    train_clusters = np.asarray(train_clusters, dtype=np.int64)
    x = _points(x, "embeddings")
    if len(train_x) != len(train_clusters) or len(train_x) == 0:
        raise FedrouterError(f"{len(train_clusters)} clusters were given for {len(train_x)} training embeddings")
    if x.shape[1] != train_x.shape[1]:
        raise FedrouterError(f"embedding dimension {x.shape[1]} does not match the training embeddings' {train_x.shape[1]}")
    classes = np.unique(train_clusters)
    if len(classes) == 1 or len(x) == 0:
        return np.full(len(x), classes[0], dtype=np.int64)
    return LogisticRegression(max_iter=2000).fit(train_x, train_clusters).predict(x).astype(np.int64)


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
class GlobalStep:
    """The server's step: prototypes (its K-Means centroids over every client's sub-cluster centroids), the
    global cluster -- one per task, one adapter each -- that each prototype belongs to (several prototypes
    share a cluster when co-occurrence merged them), and each client's sub-clusters mapped to clusters."""

    prototypes: np.ndarray  # (n_prototypes, d)
    prototype_cluster: np.ndarray  # (n_prototypes,) global cluster of each prototype
    sub_to_global: dict[int, np.ndarray]  # client -> global cluster of each of its sub-clusters
    silhouette: dict[int, float] | None  # the curve K was chosen by ("auto"), else None
    merged: list[list[int]]  # groups of prototypes merged into one cluster by co-occurrence

    @property
    def n_global(self) -> int:
        return int(self.prototype_cluster.max()) + 1 if len(self.prototype_cluster) else 0

    def regroup(self, groups: list[list[int]]) -> tuple["GlobalStep", np.ndarray]:
        """This step with its global clusters regrouped: new cluster g joins the old clusters `groups[g]`;
        an old cluster in no group is dropped, with its prototypes (the router must not send an input to
        an adapter nobody trained) and a sub-cluster mapped to it maps to -1. Returns the new step and the
        old -> new cluster id map (-1: dropped)."""
        remap = np.full(self.n_global, -1, dtype=np.int64)
        for g, members in enumerate(groups):
            members = np.asarray(members, dtype=np.int64)
            if len(members) == 0 or members.min() < 0 or members.max() >= self.n_global or (remap[members] >= 0).any():
                raise FedrouterError(f"cluster groups must be disjoint, non-empty sets of 0..{self.n_global - 1}, got {groups}")
            remap[members] = g
        if not groups:
            raise FedrouterError("no global cluster would be left")
        cluster_of = remap[self.prototype_cluster]
        kept = np.flatnonzero(cluster_of >= 0)
        merged = [m for m in (np.flatnonzero(cluster_of[kept] == g).tolist() for g in range(len(groups))) if len(m) > 1]
        step = GlobalStep(self.prototypes[kept], cluster_of[kept], {c: remap[m] for c, m in self.sub_to_global.items()},
                          self.silhouette, merged)
        return step, remap


def regroup_by_examples(step: GlobalStep, held: dict[int, np.ndarray], merge: bool) -> tuple[GlobalStep, np.ndarray]:
    """The server's step after the assignment (`nearest_held`), from each client's count of examples per
    global cluster (`held`): clusters no example went to are dropped, and (`merge`, with n_global "auto")
    clusters that now co-occur (`cooccurring`) are joined. Why join again: before the assignment a client
    that holds two tasks of one format sent half-and-half parts, which hid that one task's two parts (for
    instance data_to_text's two- and three-fact sentences) sit on the same clients in the same
    proportions; after it, they do."""
    counts = np.stack([np.asarray(held[c], dtype=np.float64) for c in sorted(held)], axis=1)  # clusters x clients
    groups = cooccurring(counts) if merge else [[g] for g in range(len(counts))]
    return step.regroup([g for g in groups if counts[g].sum() > 0])


def regroup_summary(remap: np.ndarray) -> dict:
    """What `regroup_by_examples` did, from its old -> new cluster map: how many clusters there were, which
    were emptied (dropped), which were joined (old ids)."""
    remap = np.asarray(remap)
    return {"clusters_before": len(remap), "emptied": np.flatnonzero(remap < 0).tolist(),
            "joined": [m for m in (np.flatnonzero(remap == g).tolist() for g in range(int(remap.max(initial=-1)) + 1)) if len(m) > 1]}


def cluster_centres(step: GlobalStep, sub_centroids: dict[int, np.ndarray], sizes: dict[int, np.ndarray]) -> np.ndarray:
    """(n_global, d): each global cluster's mean task feature over the examples the server put in it --
    the sub-centroids mapped to it, weighted by their sizes; what a client assigns its examples by."""
    d = next(iter(sub_centroids.values())).shape[1]
    sums, counts = np.zeros((step.n_global, d)), np.zeros(step.n_global)
    for c, centroids in sub_centroids.items():
        weights = np.asarray(sizes[c], dtype=np.float64)
        np.add.at(sums, step.sub_to_global[c], weights[:, None] * np.asarray(centroids, dtype=np.float64))
        np.add.at(counts, step.sub_to_global[c], weights)
    if (counts <= 0).any():
        raise FedrouterError(f"global cluster(s) {np.flatnonzero(counts <= 0).tolist()} hold no examples")
    return sums / counts[:, None]


def nearest_held(x, centres, min_share: float = MIN_SHARE) -> np.ndarray:
    """A client's step: each of its examples' task features `x` to the nearest of the `centres`
    (`cluster_centres`), among those nearest to at least `min_share` of the examples (the largest such
    cluster always stays)."""
    first = nearest(x, centres)
    counts = np.bincount(first, minlength=len(centres))
    held = np.flatnonzero(counts >= max(min_share * len(first), 1))
    if len(held) == 0:
        held = np.array([int(np.argmax(counts))])
    return held[nearest(x, np.asarray(centres)[held])]


@dataclass
class Clustering:
    """FedRouter's two-level clustering. Each client splits its data into sub-clusters (K-Means) and sends
    their centroids; the server groups all sub-centroids into global clusters (`GlobalStep`); then, with
    assign "example", each example goes to its nearest cluster centre (`example_clusters`). A client's
    local clusters are the global clusters holding its examples, so a single-task client whose task the
    server sees as one cluster has one local cluster, however many sub-clusters it sent."""

    sub_centroids: dict[int, np.ndarray]  # client -> (n_sub[client], d)
    sub_labels: dict[int, np.ndarray]  # client -> sub-cluster of each training example
    step: GlobalStep
    sub_silhouette: dict[int, dict[int, float]] = field(default_factory=dict)  # clients chosen by "auto"
    router_dims: int | None = None  # leading dimensions of a prototype an input is compared with (None: all)
    example_clusters: dict[int, np.ndarray] | None = None  # client -> global cluster of each example
    # (assign "example"; None: via its sub-cluster)
    assignment: dict | None = None  # what the assignment changed (`regroup_summary`; None: assign "sub-cluster")
    discriminant: tuple[np.ndarray, np.ndarray] | None = None  # the router's cluster means and whitening map
    # (global router "discriminant": `discriminant`); None: the nearest prototype

    @property
    def n_global(self) -> int:
        return self.step.n_global

    @property
    def prototypes(self) -> np.ndarray:
        return self.step.prototypes

    @property
    def router_centroids(self) -> np.ndarray:
        """The prototypes as the router sees them: their instruction part (see `task_features`)."""
        return self.step.prototypes[:, : self.router_dims]

    def global_labels(self, client: int) -> np.ndarray:
        """Global cluster of each of `client`'s training examples: its own (assign "example"), or its
        sub-cluster's."""
        if self.example_clusters is not None:
            return self.example_clusters[client]
        return self.step.sub_to_global[client][self.sub_labels[client]]

    def allowed(self, client: int) -> np.ndarray:
        """The global clusters that hold `client`'s examples: its local clusters, and its candidates in
        local routing."""
        return np.unique(self.global_labels(client))

    def n_local(self, client: int) -> int:
        return len(self.allowed(client))

    def local_labels(self, client: int) -> np.ndarray:
        """Local cluster of each training example: 0.. in the order of `allowed(client)`."""
        return np.searchsorted(self.allowed(client), self.global_labels(client))

    def route(self, x, client: int | None = None) -> np.ndarray:
        """Global cluster per row of `x`, among all (client None) or among `client`'s local clusters: the
        nearest cluster mean after whitening (the discriminant router), else the nearest prototype."""
        allowed = None if client is None else self.allowed(client)
        if self.discriminant is not None:
            return route_linear(x, *linear_router(*self.discriminant), allowed)
        return route(x, self.router_centroids, allowed, self.step.prototype_cluster)

    def with_discriminant(self, client_embeddings: dict[int, np.ndarray]) -> "Clustering":
        """This clustering with the discriminant router, from each client's `cluster_moments` of its
        examples' instruction part and their global clusters -- the method's last setup exchange."""
        moments = [cluster_moments(np.asarray(client_embeddings[c])[:, : self.router_dims], self.global_labels(c), self.n_global)
                   for c in sorted(client_embeddings)]
        return replace(self, discriminant=discriminant(moments))


def _check_k(value, what: str) -> None:
    if isinstance(value, str) and value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise FedrouterError(f"{what} must be a positive integer or {AUTO!r}, got {value!r}")


def local_then_global(
    client_embeddings: dict[int, np.ndarray],
    n_local: int | dict[int, int] | Auto,
    n_global: int | Auto,
    seed: int = 0,
    k_range=range(1, 13),
    router_dims: int | None = None,
    local_dims: int | None = None,
    assign: str = DEFAULT_ASSIGN,
    global_router: str = DEFAULT_GLOBAL_ROUTER,
    client_texts: dict[int, list[str]] | None = None,
) -> Clustering:
    """FedRouter's clustering without the training: K-Means per client (`n_local`: one int, an int per
    client, or "auto" = chosen by silhouette against a null reference over `k_range`), then the server's
    `server_step` over every client's sub-centroids (`n_global`: int or "auto"). A K above a client's
    distinct points is clipped with a warning (see the module docstring). `client_embeddings` are the
    clients' `task_features`; `router_dims` says how many leading dimensions of them the router compares
    an input's embedding with (None: all), `local_dims` how many of them the clients' K-Means splits by
    (None: all; see `split_dims`), `assign` how an example gets its global cluster (`ASSIGN`),
    `global_router` how the router compares inputs with clusters (`GLOBAL_ROUTERS`); with `client_texts`
    (each client's training instructions) and `local_dims`, the clients' sub-clusters are split where their
    templates answer differently (`split_by_answers`)."""
    if assign not in ASSIGN:
        raise FedrouterError(f"assign must be one of {', '.join(map(repr, ASSIGN))}, got {assign!r}")
    if global_router not in GLOBAL_ROUTERS:
        raise FedrouterError(f"global_router must be one of {', '.join(map(repr, GLOBAL_ROUTERS))}, got {global_router!r}")
    if not client_embeddings:
        raise FedrouterError("nothing to cluster: no clients were given")
    clients = sorted(client_embeddings)
    per_client = n_local if isinstance(n_local, dict) else {c: n_local for c in clients}
    missing = [c for c in clients if c not in per_client]
    if missing:
        raise ValueError(f"n_local gives no value for client(s) {missing}")
    for c in clients:
        _check_k(per_client[c], f"n_local for client {c}")
    _check_k(n_global, "n_global")
    k_range = list(k_range)
    if AUTO in (n_global, *[v for v in per_client.values() if isinstance(v, str)]):
        _k_values(k_range)

    centroids, labels, curves = {}, {}, {}
    for c in clients:
        centroids[c], labels[c], curve = _cluster_local(client_embeddings[c], per_client[c], seed, k_range, f"client {c}",
                                                             local_dims, None if client_texts is None else client_texts[c])
        if curve is not None:
            curves[c] = curve
    sizes = {c: np.bincount(labels[c], minlength=len(centroids[c])) for c in clients}
    step = server_step(centroids, n_global, seed, k_range, sizes)
    if assign == SUB_CLUSTER:
        result = Clustering(centroids, labels, step, curves, router_dims)
    else:
        centres = cluster_centres(step, centroids, sizes)
        nearest_centre = {c: nearest_held(client_embeddings[c], centres) for c in clients}
        held = {c: np.bincount(nearest_centre[c], minlength=len(centres)) for c in clients}
        step, remap = regroup_by_examples(step, held, merge=n_global == AUTO)
        result = Clustering(centroids, labels, step, curves, router_dims, {c: remap[nearest_centre[c]] for c in clients},
                            regroup_summary(remap))
    return result.with_discriminant(client_embeddings) if global_router == DISCRIMINANT else result


def server_step(sub_centroids: dict[int, np.ndarray], n_global: int | Auto, seed: int = 0, k_range=range(1, 13),
                sizes: dict[int, np.ndarray] | None = None) -> GlobalStep:
    """FedRouter's server step, the one both the method and `fedrouter clusters` run: K-Means over every
    client's sub-cluster centroids (in client order) gives prototypes; each sub-cluster goes to its nearest
    prototype. With n_global "auto" and the sub-clusters' sizes, prototypes that co-occur (`cooccurring`)
    are then merged into one global cluster: the parts of one task travel together from client to client."""
    clients = sorted(sub_centroids)
    stacked = np.concatenate([np.asarray(sub_centroids[c]) for c in clients])
    prototypes, curve = cluster_global(stacked, n_global, seed, k_range)
    nearest_prototype = {c: nearest(sub_centroids[c], prototypes) for c in clients}
    groups = [[p] for p in range(len(prototypes))]
    if n_global == AUTO and sizes is not None:
        counts = np.zeros((len(prototypes), len(clients)))
        for j, c in enumerate(clients):
            np.add.at(counts[:, j], nearest_prototype[c], np.asarray(sizes[c], dtype=np.float64))
        groups = cooccurring(counts)
    cluster_of = np.empty(len(prototypes), dtype=np.int64)
    for g, members in enumerate(groups):
        cluster_of[members] = g
    mapping = {c: cluster_of[nearest_prototype[c]] for c in clients}
    return GlobalStep(prototypes, cluster_of, mapping, curve, [m for m in groups if len(m) > 1])


COOCCURRENCE_P = 0.01  # merge two prototypes unless their counts' proportions differ at this level


def cooccurring(counts: np.ndarray, p_value: float = COOCCURRENCE_P) -> list[list[int]]:
    """Groups of prototypes that are parts of one task, from `counts` (prototypes x clients: training
    examples of each client at each prototype), in order of their first member.

    Two prototypes join when they occur on exactly the same clients, at least two but not all of them, in
    proportions a chi-square test of homogeneity cannot tell apart (p > `p_value`). Why: a task's
    templates and sub-topics are drawn with the task, so they appear wherever it does and in the same
    ratio; two tasks held by the same clients in the same ratios everywhere are indistinguishable by this
    test (and merged), and a prototype on every client carries no such evidence (never merged by it), so
    the all-tasks-everywhere case is left to geometry. Merging is transitive (union-find).
    """
    from scipy.stats import chi2_contingency

    counts = np.asarray(counts, dtype=np.float64)
    n = len(counts)
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    present = counts > 0
    for a in range(n):
        for b in range(a + 1, n):
            holders = present[a]
            if not np.array_equal(holders, present[b]) or holders.sum() < 2 or holders.all():
                continue
            table = np.stack([counts[a, holders], counts[b, holders]])
            if chi2_contingency(table)[1] > p_value:
                parent[root(b)] = root(a)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def majority_cluster(votes: dict) -> dict:
    """Per task, the global cluster most of its examples went to (the lower id on a tie), from
    {task: Counter(cluster -> examples)}: how clusters are matched to tasks for reporting."""
    return {task: min(counts, key=lambda k: (-counts[k], k)) for task, counts in sorted(votes.items())}


@_one_blas_thread
def _cluster_local(x, n_local, seed, k_range, who: str, dims: int | None = None, texts: list[str] | None = None):
    _check_k(n_local, "n_local")
    x = _points(x, f"{who}'s embeddings")
    if len(x) == 0:
        raise FedrouterError(f"nothing to cluster: {who} has no training examples")
    if dims is not None and not 0 < dims <= x.shape[1]:
        raise FedrouterError(f"{who}: cannot split by the first {dims} of {x.shape[1]} dimensions")
    if texts is not None and len(texts) != len(x):
        raise FedrouterError(f"{who}: {len(texts)} instructions were given for {len(x)} embeddings")
    seen = x if dims is None else x[:, :dims]
    curve = None
    if n_local == AUTO:
        n_local, curve = _choose_k(seen, k_range, seed, f"{who}'s embeddings")
    centroids, labels = _kmeans(seen, int(n_local), seed, f"{who}'s embeddings")
    if dims is not None:  # the sub-clusters' means over every dimension: what the server groups them by
        if texts is not None and dims < x.shape[1]:
            labels = _split_by_answers(x[:, dims:], texts, labels, seed)
        centroids = label_means(x, labels, int(labels.max()) + 1)
    return centroids, labels, curve


def cluster_local(x, n_local: int | Auto, seed: int = 0, k_range=range(1, 13), dims: int | None = None,
                  texts: list[str] | None = None):
    """A client's step: K-Means on its embeddings -> (centroids, labels, silhouette curve or None). With
    `dims`, the K-Means sees only the first `dims` dimensions (`split_dims`) and the centroids are the
    sub-clusters' means over all of them; with `texts` too (the examples' instructions) and answers in the
    dimensions after `dims`, each sub-cluster is then split where its templates answer differently
    (`split_by_answers`).

    No examples -> FedrouterError; K above the distinct embeddings -> clipped with a warning; "auto" on
    fewer than 3 distinct embeddings -> K = their number, with a warning and an empty curve.
    """
    return _cluster_local(x, n_local, seed, k_range, "the client", dims, texts)


# `split_by_answers`, measured in docs/benchmark.md ("Template parts split by their answers"):
TEMPLATE_SHARE = 0.05  # a word 1-3-gram is a template's word where at least this share of a sub-cluster's instructions hold it
TEMPLATE_PARTS = 8  # a sub-cluster is cut into at most this many template parts ...
MIN_PART = 8  # ... of this many examples on average: a smaller sub-cluster is left whole
ANSWER_GAP = 12.0  # two parts stay apart when their answer means lie further apart than this many times what sampling gives
MIN_SPLIT_SHARE = 0.25  # and each part kept apart holds at least this share of its sub-cluster


def template_view(texts: list[str], min_share: float = TEMPLATE_SHARE, n_features: int = 1024) -> np.ndarray:
    """The surface view of instructions: their word 1-3-grams (hashed to `n_features`), kept where at least
    `min_share` of `texts` hold them -- the words of their templates and layouts, not their content --
    L2-normalised (a text holding none is a zero row)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    hashed = HashingVectorizer(n_features=n_features, ngram_range=(1, 3), binary=True, norm=None, alternate_sign=False,
                               token_pattern=r"\S+").transform(texts).toarray()
    hashed[:, (hashed > 0).mean(axis=0) < min_share] = 0
    norms = np.linalg.norm(hashed, axis=1, keepdims=True)
    return hashed / np.where(norms == 0, 1, norms)


def answer_gap(answers: np.ndarray, a: np.ndarray, b: np.ndarray, spread: float) -> float:
    """How far apart the mean answers of rows `a` and `b` lie, in units of what sampling alone gives: the
    squared distance of the two means over `spread` x (1/|a| + 1/|b|), `spread` being the within-part
    variance (summed over dimensions). About 1 for two parts drawn alike, at any size."""
    gap = answers[a].mean(axis=0) - answers[b].mean(axis=0)
    return float(gap @ gap / (spread * (1 / len(a) + 1 / len(b))))


def _join_alike(answers: np.ndarray, parts: list[np.ndarray]) -> list[np.ndarray]:
    """`parts` (row-index arrays of one sub-cluster) joined, closest answers first, until every two left lie
    more than ANSWER_GAP apart (`answer_gap`); then each part under MIN_SPLIT_SHARE of the sub-cluster joins
    the part whose answers are closest to its own."""
    n = sum(len(p) for p in parts)
    spread = sum(float(((answers[p] - answers[p].mean(axis=0)) ** 2).sum()) for p in parts) / max(1, n - len(parts))
    if spread <= 0:  # every part's answers identical within: nothing to tell them apart by
        return [np.concatenate(parts)]

    def join(keep: int, gone: int) -> None:
        parts[keep] = np.concatenate([parts[keep], parts[gone]])
        del parts[gone]

    while len(parts) > 1:
        gap, a, b = min((answer_gap(answers, parts[a], parts[b], spread), a, b)
                        for a, b in itertools.combinations(range(len(parts)), 2))
        if gap > ANSWER_GAP:
            break
        join(a, b)
    while len(parts) > 1 and min(map(len, parts)) < MIN_SPLIT_SHARE * n:
        small = min(range(len(parts)), key=lambda i: len(parts[i]))
        nearest_part = min((i for i in range(len(parts)) if i != small),
                           key=lambda i: answer_gap(answers, parts[small], parts[i], spread))
        join(nearest_part, small)
    return parts


def _split_by_answers(answers: np.ndarray, texts: list[str], labels: np.ndarray, seed: int) -> np.ndarray:
    split = np.array(labels, dtype=np.int64, copy=True)
    next_label = int(split.max()) + 1
    for j in range(next_label):
        members = np.flatnonzero(labels == j)
        if len(members) < TEMPLATE_PARTS * MIN_PART:
            continue
        # up to TEMPLATE_PARTS: a sub-cluster with fewer distinct templates gets fewer parts, as expected
        _, part = _kmeans(template_view([texts[i] for i in members]), TEMPLATE_PARTS, seed, "a sub-cluster's templates", warn=False)
        parts = _join_alike(answers, [members[part == p] for p in np.unique(part)])
        for rows in sorted(parts, key=lambda p: p.min())[1:]:  # the part holding the first example keeps the label
            split[rows] = next_label
            next_label += 1
    return split


@_one_blas_thread
def split_by_answers(answers, texts: list[str], labels, seed: int = 0) -> np.ndarray:
    """A client's sub-clusters (`labels`, 0..k-1, of rows with these `answers` embeddings and instruction
    `texts`) split where their templates answer differently; new sub-clusters get labels k, k+1, ...

    Why: two tasks that ask different things of inputs laid out the same way (a sentence from facts, and one
    fact looked up) fall into one sub-cluster by their instructions, and where every client holds both (the
    `all` scenario) no server step can part them. Their templates can: each sub-cluster is cut into up to
    TEMPLATE_PARTS parts by the words its instructions repeat (`template_view`: asks and layouts, not
    content), and the parts are joined back while their answers are alike (`answer_gap` <= ANSWER_GAP) and
    wherever a part would be under MIN_SPLIT_SHARE of its sub-cluster (one client's odd content, which no
    other client's parts would join). One task's templates answer alike and rejoin; parts that stay apart
    but are one task (content that shapes the answer) are joined again later by the server, as any other
    parts of a task (`cooccurring`) or by their nearness. Measured in docs/benchmark.md.
    """
    answers = _points(answers, "answer embeddings")
    labels = np.asarray(labels, dtype=np.int64)
    if len(answers) != len(labels) or len(texts) != len(labels):
        raise FedrouterError(f"{len(answers)} answers, {len(texts)} instructions and {len(labels)} labels do not match")
    return _split_by_answers(answers, texts, labels, seed)


@_one_blas_thread
def cluster_global(local_centroids, n_global: int | Auto, seed: int = 0, k_range=range(1, 13)):
    """The server's step: K-Means over every client's local centroids -> (global centroids, curve or None).

    Same rules as `cluster_local`: no centroids -> FedrouterError; K clipped to the distinct centroids.
    """
    _check_k(n_global, "n_global")
    x = _points(local_centroids, "local centroids")
    if len(x) == 0:
        raise FedrouterError("nothing to cluster: no local centroids were given")
    curve = None
    if n_global == AUTO:
        n_global, curve = _choose_k(x, k_range, seed, "the local centroids")
    centroids, _ = _kmeans(x, int(n_global), seed, "the local centroids")
    return centroids, curve


# --- clustering clients by their LoRA weights (FedCluster, FedLEASE) -------------------------------------

def cosine_distance_matrix(blocks: list) -> np.ndarray:
    """(n, n) mean over blocks of 1 - cos(row i, row j); each block is (n, d_b), e.g. one per module.

    An all-zero row has no direction: its distance to every other row is taken as 1 (orthogonal).
    """
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


def _first_seen_order(labels: np.ndarray) -> np.ndarray:
    """Relabel so cluster ids appear in order 0, 1, 2, ... along the clients (stable, readable ids)."""
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(label), len(mapping)) for label in labels])


def agglomerative(distance: np.ndarray, n_clusters: int) -> np.ndarray:
    """Average-linkage agglomerative clustering on a precomputed distance matrix; K clipped to the points."""
    from sklearn.cluster import AgglomerativeClustering

    n = distance.shape[0]
    k = _positive_k(n_clusters, "the number of client clusters")
    if k > n:
        log.warning("asked for %d client clusters but there are %d clients; using %d", k, n, n)
        k = n
    if k == 1 or n == 1:
        return np.zeros(n, dtype=int)
    labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distance)
    return _first_seen_order(labels)


def agglomerative_auto(distance: np.ndarray, k_values) -> tuple[int, np.ndarray, dict[int, float]]:
    """Agglomerative clustering with K chosen by the best silhouette score (precomputed distances).

    Silhouette needs 2 <= K <= n - 1; with fewer than 3 clients, or no K in range, every client goes in
    one cluster (with a warning) and the curve is empty.
    """
    from sklearn.metrics import silhouette_score

    n = distance.shape[0]
    ks = [k for k in _k_values(k_values) if 2 <= k <= n - 1]
    if not ks:
        log.warning("cannot choose the number of client clusters by silhouette with %d clients; using 1", n)
        return 1, np.zeros(n, dtype=int), {}
    curve, labelings = {}, {}
    for k in ks:
        labelings[k] = agglomerative(distance, k)
        curve[k] = float(silhouette_score(distance, labelings[k], metric="precomputed")) if len(set(labelings[k])) > 1 else -1.0
    best = max(ks, key=lambda k: (curve[k], -k))
    return best, labelings[best], curve
