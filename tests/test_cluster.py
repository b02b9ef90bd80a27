"""core.cluster on small hand-made arrays: K-Means, nearest, clustering accuracy, silhouette, routing, pipeline."""

import numpy as np
import pytest

from fedrouter.core.cluster import (
    adjusted_rand,
    choose_k,
    clustering_accuracy,
    kmeans,
    local_then_global,
    nearest,
    route,
    silhouette_curve,
)

CENTRES = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
OFFSETS = np.array([[0.0, 0.0], [0.3, 0.0], [0.0, 0.3], [-0.3, 0.0], [0.0, -0.3]])


def _blobs(centres=CENTRES, shift=0.0):
    """Five points around each centre; labels 0, 1, 2 by centre."""
    x = np.concatenate([c + OFFSETS + shift for c in centres])
    y = np.repeat(np.arange(len(centres)), len(OFFSETS))
    return x, y


def test_kmeans_recovers_three_blobs():
    x, y = _blobs()
    centroids, labels = kmeans(x, 3, seed=0)
    assert centroids.shape == (3, 2)
    # each blob is exactly one cluster, and its centroid is the blob's centre (offsets cancel)
    for blob in range(3):
        assert len(set(labels[y == blob])) == 1
        np.testing.assert_allclose(centroids[labels[y == blob][0]], CENTRES[blob], atol=1e-9)
    assert len(set(labels)) == 3
    assert clustering_accuracy(y, labels) == 1.0


def test_kmeans_clips_k_to_distinct_points():
    x = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    centroids, labels = kmeans(x, 5, seed=0)
    assert centroids.shape == (2, 2)
    assert labels[0] == labels[1] != labels[2] == labels[3]


def test_nearest_hand_computed():
    centroids = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    x = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [2.5, 2.5], [-5.0, -5.0]])
    # [2.5, 2.5]: squared distances 12.5, 8.5, 6.5 -> centroid 2
    assert nearest(x, centroids).tolist() == [0, 1, 2, 2, 0]
    assert nearest(np.array([[2.0, 0.0]]), centroids).tolist() == [0]  # a tie goes to the lower index


def test_clustering_accuracy_permuted_and_partial():
    true = ["a", "a", "b", "b", "c", "c"]
    assert clustering_accuracy(true, [2, 2, 0, 0, 1, 1]) == 1.0
    # clusters 0 -> a (2 of 3), 1 -> b (2 of 2), c unmatched: 4 of 6 right
    assert clustering_accuracy(true, [0, 0, 1, 1, 0, 1]) == pytest.approx(4 / 6)
    # more clusters than tasks: the best one-to-one matching leaves one cluster unmatched
    assert clustering_accuracy(["a", "a", "a", "b"], [0, 1, 1, 2]) == pytest.approx(3 / 4)
    assert adjusted_rand(true, [2, 2, 0, 0, 1, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        clustering_accuracy(["a"], [0, 1])


def test_choose_k_picks_three_on_three_blobs():
    x, _ = _blobs()
    best, curve = choose_k(x, range(2, 8), seed=0)
    assert best == 3
    assert set(curve) == set(range(2, 8))
    assert max(curve, key=curve.get) == 3
    # k >= number of points is skipped
    assert set(silhouette_curve(x[:4], [2, 3, 4, 5], seed=0)) == {2, 3}
    assert choose_k(np.zeros((3, 2)), [2, 3], seed=0) == (1, {})


def test_route_local_mode_stays_within_allowed():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = np.array([[0.1, 0.1], [9.0, 1.0], [1.0, 9.0], [9.0, 9.0], [6.0, 0.0]])
    assert route(x, centroids).tolist() == [0, 1, 2, 3, 1]
    allowed = [2, 3]
    local = route(x, centroids, allowed)
    assert set(local.tolist()) <= set(allowed)
    # nearest allowed: [0.1, 0.1] -> 2 (d^2 98.02 vs 196.02); [9, 1] -> 3 (82 vs 162); [6, 0] -> 3 (116 vs 136)
    assert local.tolist() == [2, 3, 2, 3, 3]
    rng = np.random.default_rng(0)
    assert set(route(rng.normal(size=(200, 2)) * 10, centroids, [1]).tolist()) == {1}
    with pytest.raises(ValueError):
        route(x, centroids, [])


def test_local_then_global_maps_same_blob_to_same_global_cluster():
    x0, y0 = _blobs()
    x1, y1 = _blobs(shift=0.2)  # client 1: the same three blobs, slightly moved, listed in another order
    order = np.array([10, 0, 5, 11, 1, 6, 12, 2, 7, 13, 3, 8, 14, 4, 9])
    x1, y1 = x1[order], y1[order]
    result = local_then_global({0: x0, 1: x1}, n_local=3, n_global="auto", seed=0, k_range=range(2, 6))
    assert result.n_global == 3
    assert result.n_local == {0: 3, 1: 3}
    assert set(result.global_silhouette) == {2, 3, 4, 5}
    g0, g1 = result.global_labels(0), result.global_labels(1)
    for blob in range(3):
        (a,), (b,) = set(g0[y0 == blob]), set(g1[y1 == blob])
        assert a == b
    assert len(set(g0)) == 3
    assert result.allowed(0).tolist() == [0, 1, 2]

    # per-client n_local and silhouette-chosen n_local
    result = local_then_global({0: x0, 1: x1}, n_local={0: 3, 1: "auto"}, n_global=3, seed=0, k_range=range(2, 6))
    assert result.n_local == {0: 3, 1: 3}
    assert set(result.local_silhouette) == {1} and result.global_silhouette is None
    with pytest.raises(ValueError):
        local_then_global({0: x0}, n_local=0, n_global=3)
    with pytest.raises(ValueError):
        local_then_global({0: x0, 1: x1}, n_local={0: 3}, n_global=3)
