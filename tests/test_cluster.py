"""core.cluster on small hand-made arrays: K-Means, nearest, clustering accuracy, silhouette, routing, pipeline."""

import logging

import numpy as np
import pytest

from fedrouter.core.cluster import (
    GlobalStep,
    adjusted_rand,
    choose_k,
    cluster_centres,
    cluster_local,
    cooccurring,
    clustering_accuracy,
    kmeans,
    learned_route,
    local_then_global,
    nearest,
    nearest_held,
    regroup_by_examples,
    regroup_summary,
    route,
    silhouette_curve,
    split_by_answers,
    split_dims,
    task_features,
    template_view,
)
from fedrouter.errors import FedrouterError

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
    with pytest.raises(FedrouterError):  # bad user input: one FedrouterError line (not a ValueError)
        route(x, centroids, [])


def test_local_then_global_maps_same_blob_to_same_global_cluster():
    x0, y0 = _blobs()
    x1, y1 = _blobs(shift=0.2)  # client 1: the same three blobs, slightly moved, listed in another order
    order = np.array([10, 0, 5, 11, 1, 6, 12, 2, 7, 13, 3, 8, 14, 4, 9])
    x1, y1 = x1[order], y1[order]
    result = local_then_global({0: x0, 1: x1}, n_local=3, n_global="auto", seed=0, k_range=range(2, 6))
    assert result.n_global == 3
    assert {c: result.n_local(c) for c in (0, 1)} == {0: 3, 1: 3}
    assert set(result.step.silhouette) == {2, 3, 4, 5}
    g0, g1 = result.global_labels(0), result.global_labels(1)
    for blob in range(3):
        (a,), (b,) = set(g0[y0 == blob]), set(g1[y1 == blob])
        assert a == b
    assert len(set(g0)) == 3
    assert result.allowed(0).tolist() == [0, 1, 2]

    # per-client n_local and silhouette-chosen n_local
    result = local_then_global({0: x0, 1: x1}, n_local={0: 3, 1: "auto"}, n_global=3, seed=0, k_range=range(2, 6))
    assert {c: result.n_local(c) for c in (0, 1)} == {0: 3, 1: 3}
    assert set(result.sub_silhouette) == {1} and result.step.silhouette is None
    with pytest.raises(FedrouterError):  # _check_k: a bad K is the user's input
        local_then_global({0: x0}, n_local=0, n_global=3)
    with pytest.raises(ValueError):
        local_then_global({0: x0, 1: x1}, n_local={0: 3}, n_global=3)


# -- bad input: a clear FedrouterError, or K clipped with a warning; never a crash inside scikit-learn ------

LOGGER = "fedrouter.core.cluster"


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_k_above_examples_is_clipped_with_a_warning(caplog):
    from fedrouter.core.cluster import cluster_global, cluster_local

    x = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        centroids, labels, curve = cluster_local(x, 5)
    assert centroids.shape == (3, 2) and sorted(labels.tolist()) == [0, 1, 2] and curve is None
    (message,) = _warnings(caplog)
    assert "requested K=5" in message and "using K=3" in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        global_centroids, curve = cluster_global(x, 4)
    assert global_centroids.shape == (3, 2) and curve is None
    (message,) = _warnings(caplog)
    assert "requested K=4" in message and "using K=3" in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        centroids, _ = kmeans(x, 7)
    assert len(centroids) == 3
    assert any("requested K=7" in m and "using K=3" in m for m in _warnings(caplog))


def test_choose_k_range_above_distinct_points_falls_back_with_a_warning(caplog):
    # 6 examples, 3 distinct points: no K in 4..6 can be scored -> K = distinct points, empty curve
    x = np.repeat(np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]]), 2, axis=0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        k, curve = choose_k(x, [4, 5, 6])
    assert (k, curve) == (3, {})
    (message,) = _warnings(caplog)
    assert "falling back to K=3" in message


def test_single_example_client(caplog):
    from fedrouter.core.cluster import cluster_local

    x = np.array([[1.5, -2.0, 3.0]])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        centroids, labels, curve = cluster_local(x, 3)
    np.testing.assert_allclose(centroids, x)
    assert labels.tolist() == [0] and curve is None
    assert any("requested K=3" in m and "using K=1" in m for m in _warnings(caplog))

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        centroids, labels, curve = cluster_local(x, "auto", k_range=range(2, 9))
    np.testing.assert_allclose(centroids, x)
    assert labels.tolist() == [0] and curve == {}
    assert any("silhouette" in m and "K=1" in m for m in _warnings(caplog))

    # two distinct points (even with many examples): no silhouette, K = 2
    two = np.array([[0.0, 0.0], [0.0, 0.0], [4.0, 4.0], [4.0, 4.0], [4.0, 4.0]])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        centroids, labels, curve = cluster_local(two, "auto")
    assert len(centroids) == 2 and curve == {}
    assert labels[0] == labels[1] != labels[2] == labels[3] == labels[4]
    assert any("K=2" in m for m in _warnings(caplog))

    # through the pipeline: the single-example client gets one local cluster
    x0, _ = _blobs()
    result = local_then_global({0: x0, 1: x[:, :2]}, n_local="auto", n_global=3, seed=0, k_range=range(2, 6))
    assert {c: result.n_local(c) for c in (0, 1)} == {0: 3, 1: 1}
    assert result.sub_silhouette[1] == {} and result.local_labels(1).tolist() == [0]


@pytest.mark.parametrize("empty", [np.zeros((0, 4)), np.array([]), []])
def test_no_examples_is_a_clear_error(empty):
    from fedrouter.core.cluster import cluster_global, cluster_local

    for n_local in (2, "auto"):
        with pytest.raises(FedrouterError, match="nothing to cluster.*no training examples"):
            cluster_local(empty, n_local)
    with pytest.raises(FedrouterError, match="nothing to cluster"):
        cluster_global(empty, "auto")
    with pytest.raises(FedrouterError, match="nothing to cluster"):
        kmeans(empty, 2)
    with pytest.raises(FedrouterError, match="nothing to cluster"):
        choose_k(empty, [2, 3])
    x0, _ = _blobs()
    with pytest.raises(FedrouterError, match="client 7 has no training examples"):
        local_then_global({0: x0, 7: empty}, n_local=2, n_global=2)
    with pytest.raises(FedrouterError, match="nothing to cluster"):
        local_then_global({}, n_local=2, n_global=2)


def test_duplicate_embeddings_never_escape_a_convergence_warning(caplog):
    import warnings

    from fedrouter.core.cluster import cluster_local

    same = np.tile([[0.25, -1.0, 2.0]], (6, 1))
    near = np.array([[1.0, 1.0]] * 3 + [[np.nextafter(1.0, 2.0), 1.0]] * 3 + [[5.0, 5.0]] * 3)  # 3 "distinct" rows
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger=LOGGER):
        warnings.simplefilter("error")  # a ConvergenceWarning (or any warning) would fail the test
        centroids, labels, _ = cluster_local(same, 3)
        assert len(centroids) == 1 and labels.tolist() == [0] * 6
        np.testing.assert_allclose(centroids[0], same[0])
        assert any("requested K=3" in m and "using K=1" in m for m in _warnings(caplog))

        centroids, labels, curve = cluster_local(same, "auto")
        assert len(centroids) == 1 and curve == {}

        # fewer distinct rows than K
        centroids, labels, _ = cluster_local(np.repeat(CENTRES, 4, axis=0), 5)
        assert len(centroids) == 3 and len(set(labels.tolist())) == 3

        # rows np.unique tells apart but K-Means cannot: clusters compacted, labels 0..k'-1
        caplog.clear()
        centroids, labels = kmeans(near, 3)
        assert len(centroids) == len(set(labels.tolist())) == 2 and set(labels.tolist()) == {0, 1}
        assert any("using K=2" in m for m in _warnings(caplog))


def test_nan_or_inf_is_a_clear_error():
    from fedrouter.core.cluster import cluster_global, cluster_local

    x, _ = _blobs()
    bad = x.copy()
    bad[[1, 4, 7], 0] = [np.nan, np.inf, -np.inf]
    good_centroids = CENTRES.copy()
    bad_centroids = CENTRES.copy()
    bad_centroids[2, 1] = np.nan
    calls = [
        lambda: kmeans(bad, 3),
        lambda: choose_k(bad, [2, 3]),
        lambda: cluster_local(bad, 3),
        lambda: cluster_local(bad, "auto"),
        lambda: cluster_global(bad, 2),
        lambda: nearest(bad, good_centroids),
        lambda: route(bad, good_centroids),
        lambda: route(bad, good_centroids, [0, 1]),
    ]
    for call in calls:
        with pytest.raises(FedrouterError, match=r"contain NaN or Inf \(3 rows"):
            call()
    with pytest.raises(FedrouterError, match=r"embeddings contain NaN or Inf \(3 rows"):
        nearest(bad, good_centroids)
    with pytest.raises(FedrouterError, match=r"local centroids contain NaN or Inf"):
        cluster_global(bad, "auto")
    for call in (lambda: nearest(x, bad_centroids), lambda: route(x, bad_centroids),
                 lambda: route(x, bad_centroids, [0])):  # a bad row outside `allowed` still counts
        with pytest.raises(FedrouterError, match=r"centroids contain NaN or Inf \(1 row"):
            call()
    with pytest.raises(FedrouterError, match="client 1's embeddings contain NaN or Inf"):
        local_then_global({0: x, 1: bad}, n_local=3, n_global=3)


def test_dimension_mismatch_is_a_clear_error():
    x = np.zeros((2, 384))
    centroids = np.ones((3, 128))
    message = "embedding dimension 384 does not match the centroids' 128"
    with pytest.raises(FedrouterError, match=message):
        nearest(x, centroids)
    with pytest.raises(FedrouterError, match=message):
        route(x, centroids)
    with pytest.raises(FedrouterError, match=message):
        route(x, centroids, [0, 2])
    with pytest.raises(FedrouterError, match="2-d array"):
        nearest(np.zeros(128), centroids)  # one embedding not wrapped in a batch
    # no test inputs: nothing to route, not an error
    assert route(np.zeros((0, 128)), centroids, [1]).tolist() == []


def test_route_bad_allowed_is_a_clear_error():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.array([[1.0, 1.0]])
    with pytest.raises(FedrouterError, match="at least one allowed cluster"):
        route(x, centroids, [])
    with pytest.raises(FedrouterError, match=r"must lie in \[0, 3\), got \[3\]"):
        route(x, centroids, [0, 3])
    with pytest.raises(FedrouterError, match=r"must lie in \[0, 3\)"):
        route(x, centroids, [-1])
    with pytest.raises(FedrouterError, match="integer cluster ids"):
        route(x, centroids, [0.5])
    with pytest.raises(FedrouterError, match="list of cluster ids"):
        route(x, centroids, 2)
    assert route(x, centroids, np.array([2, 1])).tolist() == [1]


def test_bad_k_is_a_fedrouter_error():
    from fedrouter.core.cluster import cluster_global, cluster_local

    x, _ = _blobs()
    for bad in (0, -2, 2.5, True, "AUTO", None, np.array([2, 3])):
        with pytest.raises(FedrouterError, match="must be a positive integer or 'auto'"):
            cluster_local(x, bad)
        with pytest.raises(FedrouterError, match="n_global must be a positive integer or 'auto'"):
            cluster_global(x, bad)
    with pytest.raises(FedrouterError, match="n_local for client 1"):
        local_then_global({0: x, 1: x}, n_local={0: 2, 1: "3"}, n_global=2)
    with pytest.raises(FedrouterError, match="positive integer"):
        kmeans(x, 0)
    with pytest.raises(FedrouterError, match="empty"):
        choose_k(x, [])
    with pytest.raises(FedrouterError, match="integers"):
        cluster_local(x, "auto", k_range=[2, "three"])
    assert not issubclass(FedrouterError, ValueError)  # why the _check_k tests above expect FedrouterError


# --- issue 16: K = 1, tasks in several templates, no labels ----------------------------------------------

def _blob(center, n, rng, spread=1.0):
    return np.asarray(center, dtype=float) + spread * rng.normal(size=(n, len(center)))


def test_choose_k_says_one_on_one_blob_and_three_on_three():
    rng = np.random.default_rng(0)
    one = _blob(np.zeros(10), 300, rng) * np.linspace(1, 3, 10)  # one anisotropic Gaussian: no clusters
    k, curve = choose_k(one, range(1, 7))
    assert k == 1 and curve[1] > max(v for kk, v in curve.items() if kk > 1)  # no split clears the bar
    three = np.concatenate([_blob(8 * np.eye(10)[i], 100, rng) for i in range(3)])
    k, curve = choose_k(three, range(1, 7))
    assert k == 3 and curve[3] > curve[1]
    assert choose_k(one, range(2, 7))[0] >= 2  # without 1 in the range, the silhouette alone cannot say 1


def test_a_task_in_two_templates_is_one_cluster_by_co_occurrence():
    # Task A comes in two templates (blobs far apart, drawn 1:1 wherever A is); task B in one. A's
    # templates are as far from each other as from B, so geometry alone makes three clusters; they
    # appear on the same clients in the same proportions, so the server merges them into one.
    rng = np.random.default_rng(1)
    a1, a2, b = 10 * np.eye(6)[0], 10 * np.eye(6)[1], 10 * np.eye(6)[2]
    holds = {0: "A", 1: "A", 2: "B", 3: "B", 4: "AB", 5: "AB"}
    data, truth = {}, {}
    for c, tasks in holds.items():
        parts, labels = [], []
        if "A" in tasks:
            parts += [_blob(a1, 40, rng), _blob(a2, 40, rng)]
            labels += ["A"] * 80
        if "B" in tasks:
            parts.append(_blob(b, 60, rng))
            labels += ["B"] * 60
        data[c], truth[c] = np.concatenate(parts), labels
    result = local_then_global(data, "auto", "auto", seed=0, k_range=range(1, 7))
    assert len(result.prototypes) == 3 and result.n_global == 2 and len(result.step.merged) == 1
    for c in holds:
        assert result.n_local(c) == len(holds[c])  # a single-task client: one local cluster
        assert clustering_accuracy(truth[c], result.global_labels(c)) == 1.0
    # the router sends either template of A to A's adapter
    assert set(result.route(np.stack([a1, a2])).tolist()) == {result.global_labels(0)[0]}


def test_cooccurring_needs_same_clients_in_the_same_ratio_and_not_everywhere():
    counts = np.array([[10, 20, 0], [11, 19, 0], [10, 0, 20], [30, 2, 0]])  # prototypes x clients
    assert cooccurring(counts) == [[0, 1], [2], [3]]  # 3: same clients, other ratio; 2: other clients
    everywhere = np.array([[10, 10, 10], [10, 10, 10]])
    assert cooccurring(everywhere) == [[0], [1]]  # on every client: no evidence either way
    assert cooccurring(np.array([[5, 0], [6, 0]])) == [[0], [1]]  # one client: no evidence


def test_task_features_stack_instruction_then_answer():
    x, y = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[5.0], [6.0]])
    assert np.array_equal(task_features(x, y), [[1, 2, 5], [3, 4, 6]])
    assert np.array_equal(task_features(x), x)  # cluster_on "instruction": the instructions alone
    with pytest.raises(FedrouterError, match="3 output embeddings were given for 2 instructions"):
        task_features(x, np.zeros((3, 1)))


def test_tasks_sharing_an_input_format_are_told_apart_by_their_answers():
    # Tasks A and B ask different things of the same kind of input: their instruction embeddings are drawn
    # from one blob (only a small offset tells them apart), their answers from two far blobs. Clustered on
    # instructions they are one task; on instruction and answer, two -- and the router, which sees only
    # an instruction, compares it with the instruction part of each prototype.
    rng = np.random.default_rng(2)
    ask = 0.2 * np.eye(6)[0]  # what B's instruction adds to the shared input
    instr, answers, truth = {}, {}, {}
    for c in range(4):
        instr[c] = np.concatenate([_blob(np.zeros(6), 60, rng, 0.2), _blob(ask, 60, rng, 0.2)])
        answers[c] = np.concatenate([_blob(10 * np.eye(4)[0], 60, rng), _blob(10 * np.eye(4)[1], 60, rng)])
        truth[c] = ["A"] * 60 + ["B"] * 60
    on_instructions = local_then_global(instr, "auto", "auto", seed=0, k_range=range(1, 7))
    for c in instr:  # every client keeps its two tasks in one sub-cluster, and no instruction tells them apart
        assert len(on_instructions.sub_centroids[c]) == 1
        assert clustering_accuracy(truth[c], on_instructions.global_labels(c)) < 0.95
    both = local_then_global({c: task_features(instr[c], answers[c]) for c in instr}, "auto", "auto", seed=0,
                             k_range=range(1, 7), router_dims=6)
    assert both.n_global == 2 and both.router_centroids.shape[1] == 6
    for c in instr:
        assert clustering_accuracy(truth[c], both.global_labels(c)) == 1.0
    a_cluster, b_cluster = both.global_labels(0)[0], both.global_labels(0)[-1]
    assert both.route(np.stack([np.zeros(6), ask])).tolist() == [a_cluster, b_cluster]


def test_answers_at_the_server_tell_a_format_sharing_pair_apart_without_splitting_a_task_by_its_answers():
    # Tasks A and B share an input format (one instruction blob, a small offset apart); A answers yes or no
    # (two far answer blobs), B with a name (a third). Task C has an input of its own and answers like A.
    # Two clients hold each task. Answers everywhere: the clients of A and C split their task by answer
    # kind (which on flan8 the server then groups with another task's alike answers). Answers at the
    # server only: clients split by instruction (every task stays whole), the server tells A from B by
    # the sub-clusters' answer means, and the router still compares instructions alone.
    rng = np.random.default_rng(3)
    ask, other = 0.3 * np.eye(6)[0], 8 * np.eye(6)[1]
    yes, no, name = 10 * np.eye(4)[0], 10 * np.eye(4)[1], 10 * np.eye(4)[2]
    instr, answers, truth = {}, {}, {}
    for c, (task, centre, kinds) in enumerate([("A", np.zeros(6), (yes, no)), ("A", np.zeros(6), (yes, no)),
                                               ("B", ask, (name,)), ("B", ask, (name,)),
                                               ("C", other, (yes, no)), ("C", other, (yes, no))]):
        instr[c] = _blob(centre, 120, rng, 0.05)
        answers[c] = np.concatenate([_blob(kind, 120 // len(kinds), rng, 0.3) for kind in kinds])
        truth[c] = [task] * 120
    features = {c: task_features(instr[c], answers[c]) for c in instr}
    tasks = [t for c in sorted(truth) for t in truth[c]]

    def accuracy(result):
        return clustering_accuracy(tasks, np.concatenate([result.global_labels(c) for c in sorted(truth)]))

    everywhere = local_then_global(features, "auto", "auto", seed=0, k_range=range(1, 7), router_dims=6)
    assert [len(everywhere.sub_centroids[c]) for c in sorted(instr)] == [2, 2, 1, 1, 2, 2]
    at_server = local_then_global(features, "auto", "auto", seed=0, k_range=range(1, 7), router_dims=6,
                                  local_dims=split_dims("instruction+output@server", 6))
    assert [len(at_server.sub_centroids[c]) for c in sorted(instr)] == [1] * 6
    assert accuracy(at_server) == 1.0 and at_server.n_global == 3
    assert all(at_server.n_local(c) == 1 for c in instr)  # a single-task client keeps one local cluster
    a, b = at_server.global_labels(0)[0], at_server.global_labels(2)[0]
    assert at_server.route(np.stack([np.zeros(6), ask])).tolist() == [a, b]
    # the instructions alone cannot tell A from B
    assert accuracy(local_then_global(instr, "auto", "auto", seed=0, k_range=range(1, 7))) < 0.95


def test_a_client_splits_by_the_leading_dimensions_and_sends_means_over_all():
    rng = np.random.default_rng(4)
    x = np.hstack([np.concatenate([_blob(np.zeros(3), 40, rng), _blob(6 * np.ones(3), 40, rng)]),
                   rng.normal(size=(80, 2)) * 20])  # the last two dimensions: loud noise, no structure
    centroids, labels, _ = cluster_local(x, 2, dims=3)
    assert sorted(np.bincount(labels).tolist()) == [40, 40] and len(set(labels[:40])) == 1
    assert np.allclose(centroids, [x[labels == j].mean(axis=0) for j in range(2)])
    assert split_dims("instruction", 3) is None and split_dims("instruction+output", 3) is None
    with pytest.raises(FedrouterError, match="first 9 of 5 dimensions"):
        cluster_local(x, 2, dims=9)


def test_kmeans_and_silhouette_run_with_one_blas_thread(monkeypatch):
    # BLAS threads under scikit-learn's OpenMP threads oversubscribe the cores: 4x slower on 2 cores
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_info

    seen = []
    fit = KMeans.fit

    def spy(self, x, *args, **kwargs):
        seen.append(max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=1))
        return fit(self, x, *args, **kwargs)

    monkeypatch.setattr(KMeans, "fit", spy)
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 0.1, (30, 4)), rng.normal(3, 0.1, (30, 4))])
    k, _ = choose_k(x, range(1, 5))
    assert k == 2
    assert seen and set(seen) == {1}


def test_each_example_goes_to_its_nearest_centre_so_a_client_holding_a_format_sharing_pair_is_split():
    # Tasks A and B share an input format (one instruction blob, a small offset apart) and answer far apart.
    # Clients 0-1 hold A, 2-3 hold B, 4-5 hold both: the last split by instruction into one half-and-half
    # sub-cluster, which the server makes a third cluster of its own (the synthetic-hard `dual` miss). With
    # each example assigned to the nearest cluster centre by instruction and answer, the mixed clients'
    # examples go to A's and B's clusters, the third is left empty and dropped.
    rng = np.random.default_rng(5)
    ask, a_answer, b_answer = 0.2 * np.eye(6)[0], 10 * np.eye(4)[0], 10 * np.eye(4)[1]
    features, truth = {}, {}
    for c, tasks in enumerate(["A", "A", "B", "B", "AB", "AB"]):
        parts = [task_features(_blob(np.zeros(6) if t == "A" else ask, 120 // len(tasks), rng, 0.2),
                               _blob(a_answer if t == "A" else b_answer, 120 // len(tasks), rng)) for t in tasks]
        features[c], truth[c] = np.concatenate(parts), [t for t in tasks for _ in range(120 // len(tasks))]
    tasks = [t for c in sorted(truth) for t in truth[c]]

    def run(assign):
        result = local_then_global(features, "auto", "auto", seed=0, k_range=range(1, 7), router_dims=6,
                                   local_dims=split_dims("instruction+output@server", 6), assign=assign)
        return result, clustering_accuracy(tasks, np.concatenate([result.global_labels(c) for c in sorted(truth)]))

    by_sub_cluster, accuracy = run("sub-cluster")
    assert [len(by_sub_cluster.sub_centroids[c]) for c in (4, 5)] == [1, 1]
    assert by_sub_cluster.n_global == 3 and accuracy == pytest.approx(2 / 3)
    by_example, accuracy = run("example")
    assert by_example.n_global == 2 and accuracy == 1.0
    assert [by_example.n_local(c) for c in range(6)] == [1, 1, 1, 1, 2, 2]
    assert len(by_example.prototypes) == len(by_sub_cluster.prototypes) - 1  # the empty cluster's prototype went
    assert set(by_example.step.sub_to_global[4].tolist()) == {-1}  # the mixed sub-clusters' cluster was dropped
    assert by_example.assignment["clusters_before"] == 3 and len(by_example.assignment["emptied"]) == 1
    assert by_sub_cluster.assignment is None
    with pytest.raises(FedrouterError, match="assign must be one of"):
        local_then_global(features, "auto", "auto", assign="nearest")


def test_cluster_centres_nearest_held_and_keep_on_small_arrays():
    step = GlobalStep(prototypes=np.array([[0.0, 0.0], [4.0, 0.0], [5.0, 0.0]]), prototype_cluster=np.array([0, 1, 1]),
                      sub_to_global={0: np.array([0, 1]), 1: np.array([1])}, silhouette=None, merged=[[1, 2]])
    subs = {0: np.array([[0.0, 0.0], [4.0, 2.0]]), 1: np.array([[6.0, 0.0]])}
    # a cluster's centre: its sub-centroids' mean weighted by their sizes (the mean of their examples)
    centres = cluster_centres(step, subs, {0: np.array([5, 1]), 1: np.array([3])})
    assert np.allclose(centres, [[0.0, 0.0], [(4 * 1 + 6 * 3) / 4, 2 / 4]])
    # 1 of 30 rows is nearest to centre 1: under the 5 % share it goes to its nearest held centre, 0
    x = np.array([[0.1, 0.0]] * 29 + [[5.0, 0.5]])
    assert nearest_held(x, centres).tolist() == [0] * 30
    assert nearest_held(x, centres, min_share=0.0).tolist() == [0] * 29 + [1]
    kept, remap = step.regroup([[1]])  # cluster 0 dropped
    assert remap.tolist() == [-1, 0] and kept.n_global == 1
    assert kept.prototypes.tolist() == [[4.0, 0.0], [5.0, 0.0]] and kept.merged == [[0, 1]]
    assert kept.sub_to_global[0].tolist() == [-1, 0] and kept.sub_to_global[1].tolist() == [0]
    joined, remap = step.regroup([[1, 0]])
    assert remap.tolist() == [0, 0] and joined.prototype_cluster.tolist() == [0, 0, 0] and joined.merged == [[0, 1, 2]]
    for groups in ([[2]], [[0], [0, 1]], [[]], []):
        with pytest.raises(FedrouterError, match="cluster groups|no global cluster"):
            step.regroup(groups)


def test_after_the_assignment_empty_clusters_go_and_co_occurring_ones_join():
    step = GlobalStep(prototypes=np.eye(4), prototype_cluster=np.arange(4), sub_to_global={}, silhouette=None, merged=[])
    # clusters 0 and 1 sit on clients 0-2 in the same proportions (one task's two parts); 2 on clients 0 and 3;
    # nothing went to 3
    held = {0: np.array([50, 25, 10, 0]), 1: np.array([40, 20, 0, 0]), 2: np.array([60, 30, 0, 0]), 3: np.array([0, 0, 30, 0])}
    joined, remap = regroup_by_examples(step, held, merge=True)
    assert remap.tolist() == [0, 0, 1, -1] and joined.n_global == 2 and joined.merged == [[0, 1]]
    assert regroup_summary(remap) == {"clusters_before": 4, "emptied": [3], "joined": [[0, 1]]}
    kept, remap = regroup_by_examples(step, held, merge=False)  # a K the user fixed: only the empty one goes
    assert remap.tolist() == [0, 1, 2, -1] and kept.merged == []


def test_the_learned_router_on_small_arrays():
    train = np.array([[0.0, 0.0], [0.1, 0.0], [1.0, 0.0], [1.1, 0.0]])
    assert learned_route(train, [3, 3, 7, 7], np.array([[0.05, 0.0], [1.05, 0.0]])).tolist() == [3, 7]
    assert learned_route(train, [2, 2, 2, 2], np.zeros((3, 2))).tolist() == [2, 2, 2]  # one cluster: no choice
    with pytest.raises(FedrouterError, match="3 clusters were given for 4"):
        learned_route(train, [1, 2, 3], train)
    with pytest.raises(FedrouterError, match="dimension 3 does not match"):
        learned_route(train, [0, 0, 1, 1], np.zeros((1, 3)))


# ---------------------------------------------------------------------------------- discriminant router

def _three_clusters_on_four_clients(rng, n_per=20):
    """Three clusters whose members spread much along a shared content direction and little along the
    direction that tells them apart; each client holds two of them, with its own content offset."""
    means = np.array([[0.0, 0, 0, 0], [0.0, 0.6, 0, 0], [0.0, 0, 0.6, 0]])
    content = np.array([1.0, 1.0, 1.0, 0.5])
    held = {0: (0, 1), 1: (1, 2), 2: (0, 2), 3: (0, 1)}
    x, y = {}, {}
    for c, ks in held.items():
        labels = np.repeat(ks, n_per)
        z = rng.normal(size=(len(labels), 1))
        x[c] = means[labels] + (z + 0.5 * c) * content + 0.1 * rng.normal(size=(len(labels), 4))
        y[c] = labels
    return x, y


def test_the_discriminant_from_client_moments_is_what_pooling_the_data_gives():
    from sklearn.covariance import shrunk_covariance

    from fedrouter.core.cluster import cluster_moments, discriminant

    x, y = _three_clusters_on_four_clients(np.random.default_rng(0))
    means, whiten = discriminant([cluster_moments(x[c], y[c], 3) for c in sorted(x)], shrinkage=0.1)
    pooled_x, pooled_y = np.concatenate(list(x.values())), np.concatenate(list(y.values()))
    central = np.stack([pooled_x[pooled_y == k].mean(0) for k in range(3)])
    centred = pooled_x - central[pooled_y]
    covariance = shrunk_covariance(centred.T @ centred / (len(pooled_x) - 3), 0.1)
    assert np.allclose(means, central)
    # whiten is the inverse square root of the pooled within-cluster covariance, shrunk
    assert np.allclose(whiten, whiten.T) and np.allclose(whiten @ covariance @ whiten, np.eye(4), atol=1e-9)


def test_the_discriminant_router_routes_as_sklearns_lda_with_equal_priors_and_beats_the_euclidean_one():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from fedrouter.core.cluster import cluster_moments, discriminant, linear_router, route, route_linear, whitened

    rng = np.random.default_rng(1)
    x, y = _three_clusters_on_four_clients(rng)
    means, whiten = discriminant([cluster_moments(x[c], y[c], 3) for c in sorted(x)], shrinkage=0.1)
    test_x, test_y = _three_clusters_on_four_clients(rng)
    test_x, test_y = np.concatenate(list(test_x.values())), np.concatenate(list(test_y.values()))
    ours = route(whitened(test_x, whiten), whitened(means, whiten))  # the nearest mean after whitening
    # ... is what the k linear scores sent to the clients pick
    assert np.array_equal(route_linear(test_x, *linear_router(means, whiten)), ours)
    # each cluster holds the same number of examples, so scikit-learn's average of class covariances is the
    # pooled one up to a scale, which shrinkage and the argmin do not see
    pooled_x, pooled_y = np.concatenate(list(x.values())), np.concatenate(list(y.values()))
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.1, priors=[1 / 3] * 3).fit(pooled_x, pooled_y)
    assert np.array_equal(ours, lda.predict(test_x))
    assert np.mean(ours == test_y) > 0.95 > 0.8 > np.mean(route(test_x, means) == test_y)
    # local mode: only the allowed clusters compete, and among them the nearest mean still wins
    local = route_linear(test_x, *linear_router(means, whiten), allowed=[0, 2])
    assert np.array_equal(local, np.array([0, 2])[route(whitened(test_x, whiten), whitened(means[[0, 2]], whiten))])


def test_the_discriminant_refuses_what_it_cannot_use():
    from fedrouter.core.cluster import cluster_moments, discriminant, route_linear, whitened

    x, y = _three_clusters_on_four_clients(np.random.default_rng(2))
    with pytest.raises(FedrouterError, match=r"no client reported examples of cluster\(s\) \[3\]"):
        discriminant([cluster_moments(x[c], y[c], 4) for c in sorted(x)])
    with pytest.raises(FedrouterError, match="cluster ids in 0..1"):
        cluster_moments(x[1], y[1], 2)  # client 1 holds clusters 1 and 2
    with pytest.raises(FedrouterError, match="no spread within clusters"):
        discriminant([cluster_moments(np.ones((4, 3)), [0, 0, 1, 1], 2)])
    with pytest.raises(FedrouterError, match=r"whitening matrix is \(3, 3\), not \(4, 4\)"):
        whitened(x[0], np.eye(3))
    with pytest.raises(FedrouterError, match="not one finite bias per cluster"):
        route_linear(x[0], np.zeros((2, 4)), [0.0])
    with pytest.raises(FedrouterError, match="allowed cluster ids must lie in"):
        route_linear(x[0], np.zeros((2, 4)), [0.0, 1.0], allowed=[2])


def _written(templates: list[str], n: int, rng) -> list[str]:
    """n instructions, each one of `templates` (in turn) around content words no other instruction repeats."""
    return [templates[i % len(templates)].format(input=" ".join(f"w{rng.integers(10**9)}" for _ in range(3)))
            for i in range(n)]


PAIR_A = ["facts : {input} write a sentence .", "describe the data : {input}"]
PAIR_B = ["{input} what is the city ?", "look up the city : {input}"]
ALONE = ["summarize : {input}", "{input} what was decided ?", "{input} who will do it ?"]


def test_the_template_view_keeps_the_words_instructions_repeat_and_drops_their_content():
    texts = _written(["ask : {input}"], 30, np.random.default_rng(0))
    view = template_view(texts, min_share=0.2)  # (at 5 %, 2 of 30: a hashing collision of content words may pass)
    assert np.allclose(view, view[0]) and np.isclose(np.linalg.norm(view[0]), 1.0)  # content words dropped
    assert not template_view(["a b c", "d e f"], min_share=0.6).any()  # nothing repeated: zero rows


def test_a_sub_cluster_is_split_where_its_templates_answer_differently_and_nowhere_else():
    # Sub-cluster 0 holds two tasks asking different things of one input format (A: a sentence, B: a city),
    # two templates each; sub-cluster 1 one task in three templates, all answering alike, and 20 examples
    # (14 %, under MIN_SPLIT_SHARE) of a fourth template that answer otherwise: one client's oddity.
    rng = np.random.default_rng(5)
    e = np.eye(4)
    texts = (_written(PAIR_A, 80, rng) + _written(PAIR_B, 80, rng) + _written(ALONE, 120, rng)
             + _written(["note : {input}"], 20, rng))
    answers = np.concatenate([_blob(3 * e[0], 80, rng), _blob(3 * e[1], 80, rng), _blob(3 * e[2], 120, rng),
                              _blob(3 * e[3], 20, rng)])
    labels = np.repeat([0, 1], [160, 140])
    split = split_by_answers(answers, texts, labels, seed=0)
    assert split[:80].tolist() == [0] * 80 and split[80:160].tolist() == [2] * 80  # A keeps the label, B is new
    assert set(split[160:].tolist()) == {1}  # the templates answer alike; the odd 14 % rejoin
    every_third = np.arange(0, 150, 3)  # under TEMPLATE_PARTS x MIN_PART = 64 examples a sub-cluster is left whole
    assert split_by_answers(answers[every_third], [texts[i] for i in every_third], np.zeros(50, int)).tolist() == [0] * 50
    with pytest.raises(FedrouterError, match="do not match"):
        split_by_answers(answers, texts[:-1], labels)


def test_a_format_sharing_pair_on_every_client_is_parted_by_its_templates_answers():
    # The `all` case: three clients hold A, B (one input format: one instruction blob) and C, in equal
    # shares. Each client's instructions put A and B in one sub-cluster, so neither the server nor each
    # example's answer (no client holds A alone: no pure centre) can part them; the templates can.
    rng = np.random.default_rng(6)
    e6, e4 = np.eye(6), np.eye(4)
    features, texts, truth = {}, {}, {}
    for c in range(3):
        instr = np.concatenate([_blob(np.zeros(6), 160, rng, 0.1), _blob(5 * e6[1], 120, rng, 0.1)])
        answers = np.concatenate([_blob(3 * e4[k], n, rng, 0.5) for k, n in ((0, 80), (1, 80), (2, 120))])
        features[c] = task_features(instr, answers)
        texts[c] = _written(PAIR_A, 80, rng) + _written(PAIR_B, 80, rng) + _written(ALONE, 120, rng)
        truth[c] = ["A"] * 80 + ["B"] * 80 + ["C"] * 120
    tasks = [t for c in range(3) for t in truth[c]]
    options = dict(seed=0, k_range=range(1, 7), router_dims=6, local_dims=split_dims("instruction+output@server", 6))
    parted = local_then_global(features, "auto", "auto", client_texts=texts, **options)
    whole = local_then_global(features, "auto", "auto", **options)
    assert parted.n_global == 3 and whole.n_global == 2
    assert clustering_accuracy(tasks, np.concatenate([parted.global_labels(c) for c in range(3)])) == 1.0
    assert clustering_accuracy(tasks, np.concatenate([whole.global_labels(c) for c in range(3)])) < 0.8
    with pytest.raises(FedrouterError, match="79 instructions were given for 280 embeddings"):
        cluster_local(features[0], "auto", dims=6, texts=texts[0][:79])
