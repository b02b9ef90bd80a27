"""core.cluster on small hand-made arrays: K-Means, K by silhouette against a null reference, the silhouette of
parts, nearest, clustering scores, and bad input as one line."""

import logging

import numpy as np
import pytest
from sklearn.metrics import silhouette_samples, silhouette_score

from fedrouter.core.cluster import choose_k, kmeans, nearest, null_reference, one_blas_thread, silhouette_of_parts
from fedrouter.core.metrics import clustering_accuracy, purity
from fedrouter.errors import FedrouterError

CENTRES = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
OFFSETS = np.array([[0.0, 0.0], [0.3, 0.0], [0.0, 0.3], [-0.3, 0.0], [0.0, -0.3]])


def _blobs(centres=CENTRES, offsets=OFFSETS):
    """Offsets around each centre; labels by centre."""
    return np.concatenate([c + offsets for c in centres]), np.repeat(np.arange(len(centres)), len(offsets))


def test_kmeans_recovers_three_blobs_and_their_exact_centres():
    x, y = _blobs()
    centroids, labels = kmeans(x, 3, seed=0)
    for blob in range(3):
        assert len(set(labels[y == blob])) == 1
        np.testing.assert_allclose(centroids[labels[y == blob][0]], CENTRES[blob], atol=1e-9)  # offsets cancel
    assert clustering_accuracy(y, labels) == 1.0


def test_weighted_kmeans_centres_are_weighted_means():
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    centroids, labels = kmeans(x, 2, seed=0, weights=np.array([3.0, 1.0, 1.0, 1.0]))
    assert sorted(np.round(centroids.ravel(), 9).tolist()) == [0.25, 10.5]


def test_kmeans_clips_k_to_distinct_points_with_a_warning(caplog):
    x = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    with caplog.at_level(logging.WARNING, logger="fedrouter.core.cluster"):
        centroids, labels = kmeans(x, 5, seed=0)
    assert centroids.shape == (2, 2) and labels[0] == labels[1] != labels[2] == labels[3]
    assert "requested K=5" in caplog.text and "using K=2" in caplog.text


def test_nearest_hand_computed_and_ties_to_the_lower_index():
    c = np.array([[0.0, 0.0], [2.0, 0.0]])
    assert nearest(np.array([[0.9, 5.0], [1.1, -3.0], [1.0, 0.0]]), c).tolist() == [0, 1, 0]


def test_clustering_accuracy_and_purity():
    true = ["a", "a", "b", "b", "c", "c"]
    assert clustering_accuracy(true, [5, 5, 7, 7, 9, 9]) == 1.0
    assert clustering_accuracy(true, [0, 0, 0, 0, 1, 1]) == pytest.approx(4 / 6)  # a merge: one of a, b is wrong
    assert purity(true, [0, 0, 0, 0, 1, 1]) == pytest.approx(4 / 6)
    split = [0, 1, 2, 2, 3, 3]  # a split in two: one-to-one counts half of a wrong, many-to-one nothing
    assert clustering_accuracy(true, split) == pytest.approx(5 / 6) and purity(true, split) == 1.0


def test_keep_apart_takes_the_largest_k_within_one_standard_error_of_the_best():
    # two blobs, one of them two sub-blobs nearly as far apart as the blobs: 2 and 3 score within noise
    rng = np.random.default_rng(2)
    centres = [np.array([0.0, 0.0]), np.array([0.0, 4.0]), np.array([20.0, 0.0])]
    x = np.concatenate([c + rng.normal(size=(30, 2)) for c in centres])
    k, curve = choose_k(x, range(2, 6), 0, 1.25, 20)
    kept, same = choose_k(x, range(2, 6), 0, 1.25, 20, keep_apart=True)
    samples = silhouette_samples(x, kmeans(x, k, 0)[1])
    assert samples.mean() == pytest.approx(curve[k]) and same == curve
    noise = samples.std(ddof=1) / np.sqrt(len(x))
    assert kept == max(j for j, s in curve.items() if s >= curve[k] - noise) and kept >= k


def test_choose_k_says_one_on_one_blob_and_three_on_three():
    rng = np.random.default_rng(0)
    one = rng.normal(size=(120, 5))
    assert choose_k(one, range(1, 7), 0, 1.25, 20)[0] == 1
    three = np.concatenate([rng.normal(size=(40, 5)) + 12 * np.eye(5)[i] for i in range(3)])
    k, curve = choose_k(three, range(1, 7), 0, 1.25, 20)
    assert k == 3 and set(curve) == set(range(1, 7)) and curve[3] == max(curve.values())
    # below min_points K = 1 is not offered; a range without 1 never says 1
    assert 1 not in choose_k(three, range(1, 7), 0, 1.25, 1000)[1]
    assert choose_k(one, range(2, 7), 0, 1.25, 20)[0] >= 2


def test_the_null_reference_has_the_points_mean_and_spread():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 3)) * [5.0, 1.0, 0.2] + [1.0, 2.0, 3.0]
    ref = null_reference(x, 0)
    np.testing.assert_allclose(ref.mean(axis=0), x.mean(axis=0), atol=0.2)
    np.testing.assert_allclose(np.sort(ref.std(axis=0)), np.sort(x.std(axis=0)), rtol=0.05)


def test_the_silhouette_of_parts_is_scikit_learns_without_singletons_and_scores_a_lone_part_by_its_halves():
    x, y = _blobs()
    lone = np.zeros(len(x))
    assert silhouette_of_parts(x, lone, y).mean() == pytest.approx(silhouette_score(x, y))
    # a part alone in its cluster: its distance to its own cluster is how far its halves would lie apart
    means = np.array([[0.0], [1.0], [10.0]])
    labels = np.array([0, 0, 1])
    halves = np.array([0.0, 0.0, 0.5])
    b = [10.0, 9.0, (10.0 + 9.0) / 2]
    a = [1.0, 1.0, 0.5]
    want = [(bi - ai) / max(ai, bi) for ai, bi in zip(a, b)]
    np.testing.assert_allclose(silhouette_of_parts(means, halves, labels), want)
    assert (silhouette_of_parts(means, halves, np.zeros(3, dtype=int)) == -1.0).all()  # one cluster has no silhouette


@pytest.mark.parametrize("bad, needle", [
    (np.array([[0.0, np.nan], [1.0, 1.0]]), "NaN or Inf"),
    (np.array([1.0, 2.0]), "2-d array"),
    (np.array([["a", "b"]]), "numbers"),
    (np.zeros((0, 0)), "no points"),
])
def test_bad_points_are_one_line(bad, needle):
    with pytest.raises(FedrouterError, match=needle):
        kmeans(bad, 2)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_a_k_that_is_not_a_positive_integer_is_one_line(k):
    with pytest.raises(FedrouterError, match="positive integer"):
        kmeans(np.eye(3), k)


def test_nearest_refuses_mismatched_dimensions_and_no_centroids():
    with pytest.raises(FedrouterError, match="does not match"):
        nearest(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(FedrouterError, match="no centroids"):
        nearest(np.zeros((2, 3)), np.zeros((0, 3)))


def test_clustering_runs_with_one_blas_thread(monkeypatch):
    from threadpoolctl import threadpool_info

    seen = []

    @one_blas_thread
    def probe():
        seen.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")

    probe()
    assert seen and set(seen) == {1}
