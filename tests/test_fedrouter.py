"""The FedRouter package on small, planted data: its features, a client's split, the server's step and
phases, the round robin, per-cluster averaging, the router (one function), DP's refusals, bad messages."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from fedrouter.core import statefile
from fedrouter.errors import FedrouterError
from fedrouter.methods import options_for
from fedrouter.methods.base import ClientContext, Message, MethodSetup
from fedrouter.methods.common import pack_under
from fedrouter.methods.fedrouter import Client, OracleServer, Server, StarServer
from fedrouter.methods.fedrouter import thresholds
from fedrouter.methods.fedrouter.features import MASK, answer_form, edges, task_features, template_texts
from fedrouter.methods.fedrouter.router import cluster_moments, discriminant, linear_scores, route
from fedrouter.methods.fedrouter.schedule import balanced_offsets
from fedrouter.methods.fedrouter.server import Phase

INIT = {"a": torch.zeros(2, 2), "b": torch.zeros(2)}


def setup_reply(centroids, tasks=None, spreads=None):
    """What a client sends at setup (nothing label-derived; the router compares every dimension)."""
    arrays = {"centroids": torch.tensor(centroids, dtype=torch.float32)}
    if spreads is not None:
        arrays["spreads"] = torch.tensor(spreads, dtype=torch.float32)
    config = {"sizes": [10] * len(centroids), "silhouette": None, "router_dims": len(centroids[0])}
    if tasks is not None:
        config["local_tasks"] = tasks
    return Message(arrays, config)


def make_server(cls=Server, **options):
    opts = options_for("fedrouter", {"n_global": 2, "assign": "sub-cluster", "global_router": "prototype", **options})
    return cls(MethodSetup(seed=0, rounds=4, options=opts), dict(INIT), [0, 1])


def two_blob_server(cls=Server):
    server = make_server(cls)
    # client 0: local clusters near (0,0) and (10,10); client 1: near (10,10) and (0,0)
    server.aggregate_setup({0: setup_reply([[0, 0], [10, 10]]), 1: setup_reply([[10.2, 10], [0.1, 0]])})
    return server


def vector(text: str, d: int = 8) -> np.ndarray:
    """A fixed pseudo-random unit vector per text (a stand-in embedder)."""
    v = np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)).normal(size=d)
    return v / np.linalg.norm(v)


class PlantedWorkbench:
    """A client's examples, embedded by `vectors` where given (a text -> vector map) and by `vector` otherwise."""

    def __init__(self, train, vectors=None, test=None):
        self.train, self.test, self.vectors = train, test or train[:4], vectors or {}
        self.routed = None

    def examples(self, split):
        return {"train": self.train, "test": self.test, "general": self.test}[split]

    def embed(self, texts, spec):
        return np.stack([self.vectors.get(t, vector(t)) for t in texts]).astype(np.float32)

    def evaluate_routed(self, adapters, routes, split, mixed):
        self.routed = routes
        return {}


def set_up(server, client, contexts):
    """The round loop's setup exchange (`RoundLoop.setup`) without an engine."""
    while messages := server.configure_setup(sorted(contexts)):
        server.aggregate_setup({cid: client.setup(msg, contexts[cid]) for cid, msg in messages.items()})


# --- features -----------------------------------------------------------------------------------------

def test_the_template_view_masks_the_words_rare_on_this_client():
    texts = [f"Summarize this dialogue: Ann{i} said hello{i} there{i}." for i in range(40)]  # each name in 1 of 40 < 3 %
    masked = template_texts(texts)
    assert masked[0] == f"summarize this dialogue : {MASK} said {MASK} ." and len(set(masked)) == 1
    assert template_texts(["alpha beta", "alpha gamma"])[0] == "alpha beta"  # at 2 texts every word is held by half


def test_edges_keep_both_ends_of_a_long_instruction():
    long = " ".join(f"w{i}" for i in range(100))
    kept = edges(long).split()
    assert kept[:3] == ["w0", "w1", "w2"] and kept[-1] == "w99" and "…" in kept and len(kept) == 2 * 24 + 1
    assert edges("short ask") == "short ask"


def test_the_answer_form_bins_length_copying_and_recurrence():
    form = answer_form(["is it red ? the car", "is it red ? the sky", "rewrite : the car is red"], ["yes", "yes", "the car is red"])
    assert form.shape == (3, 19)
    np.testing.assert_allclose(np.linalg.norm(form, axis=1), 1.0)
    length, copied, recur = form[:, :9], form[:, 9:14], form[:, 14:]
    assert length[0].argmax() == 1 and length[2].argmax() == 2  # log2(1 + 1 word) = 1, log2(1 + 4) = 2.3
    assert copied[0].argmax() == 0 and copied[2].argmax() == 4  # "yes" copies nothing, the rewrite everything
    assert recur[0].argmax() == 3 and recur[2].argmax() == 0  # log 2 / log 3 = 0.63: a recurring label; once: 0


def test_task_features_are_four_unit_views_side_by_side():
    train = [{"instruction": f"ask {i} about {i % 3}", "output": "yes" if i % 2 else "no", "task": "t"} for i in range(12)]
    features = task_features(train, lambda texts: np.stack([vector(t) for t in texts]))
    d = features.router_dims
    assert d == 8 and features.split_dims == 16 and features.x.shape == (12, 3 * 8 + 19)
    for block in (slice(0, 8), slice(8, 16), slice(16, 24), slice(24, None)):
        np.testing.assert_allclose(np.linalg.norm(features.x[:, block], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(features.instruction, np.stack([vector(e["instruction"]) for e in train]), rtol=1e-5)
    with pytest.raises(FedrouterError, match="no training examples"):
        task_features([], lambda texts: np.zeros((0, 8)))


# --- a client's split: two tasks on one input format, told apart by their templates' answers -------------

def _shared_inputs(n=160, answers_differ=True):
    """Tasks a and b ask different things (two templates each) of the same inputs; a answers a sentence,
    b one word from a small set. Instruction embeddings are one blob (the input outweighs the ask)."""
    asks = ["facts : {} write a sentence .", "describe : {}", "{} what is the city ?", "look up the city : {}"]
    train, vectors = [], {}
    rng = np.random.default_rng(0)
    near = rng.normal(size=8)
    for j, ask in enumerate(asks):  # the template view's embeddings: alike (one input format), the asks a nudge
        vectors[template_texts([ask.format(f"w{i} v{i}") for i in range(40)])[0]] = near + 0.05 * rng.normal(size=8)
    for i in range(n):
        task = "a" if i < n // 2 else "b"
        text = asks[2 * (task == "b") + i % 2].format(f"w{i} v{i}")
        out = ["paris", "rome", "oslo"][i % 3] if task == "b" and answers_differ else f"the {i} is nice and calm ."
        train.append({"instruction": text, "output": out, "task": task})
        vectors[text] = rng.normal(size=8)
    return train, vectors


@pytest.fixture
def one_instruction_cluster(monkeypatch):
    """The planted instruction view is structureless noise, which the default NULL_MARGIN (1.0: a split need
    only beat noise) splits about half the time; at 1.25 it stays one cluster, so these tests see the
    template parts alone. How K is chosen is tested in test_cluster.py."""
    monkeypatch.setattr(thresholds, "NULL_MARGIN", 1.25)


@pytest.mark.usefixtures("one_instruction_cluster")
def test_a_client_splits_two_tasks_on_one_input_format_by_their_templates_answers():
    setup = MethodSetup(seed=0, rounds=2, options=options_for("fedrouter", {}))
    train, vectors = _shared_inputs()
    ctx = ClientContext(0, PlantedWorkbench(train, vectors))
    reply = Client(setup).setup(Message(config={"oracle": False}), ctx)
    labels = ctx.state["labels"]
    assert len(reply.arrays["centroids"]) == 2 and set(labels[:80]) != set(labels[80:])
    assert len(set(labels[:80])) == 1 and len(set(labels[80:])) == 1
    assert reply.config["sizes"] == [80, 80] and reply.arrays["spreads"].shape == (2,)
    # the same templates with answers alike: one task's templates, joined back
    train, vectors = _shared_inputs(answers_differ=False)
    ctx = ClientContext(0, PlantedWorkbench(train, vectors))
    assert len(Client(setup).setup(Message(config={"oracle": False}), ctx).arrays["centroids"]) == 1


@pytest.mark.usefixtures("one_instruction_cluster")
def test_the_setup_reply_carries_nothing_label_derived_and_its_means_are_the_sub_clusters():
    setup = MethodSetup(seed=0, rounds=2, options=options_for("fedrouter", {}))
    train, vectors = _shared_inputs()
    train = [dict(e, task="secret-" + e["task"]) for e in train]
    ctx = ClientContext(0, PlantedWorkbench(train, vectors))
    reply = Client(setup).setup(Message(config={"oracle": False}), ctx)
    assert set(reply.config) == {"sizes", "silhouette", "router_dims"} and set(reply.arrays) == {"centroids", "spreads"}
    assert "secret" not in json.dumps(reply.config)
    x = task_features(train, lambda texts: ctx.workbench.embed(texts, "minilm")).x
    labels = ctx.state["labels"]
    np.testing.assert_allclose(reply.arrays["centroids"].numpy(), [x[labels == j].mean(axis=0) for j in range(2)], atol=1e-5)
    spreads = [((x[labels == j] - x[labels == j].mean(axis=0)) ** 2).sum(axis=1).mean() for j in range(2)]
    np.testing.assert_allclose(reply.arrays["spreads"].numpy(), spreads, rtol=1e-4)


# --- the server -----------------------------------------------------------------------------------------

def test_global_clusters_join_the_same_blob_across_clients():
    server = two_blob_server()
    m0, m1 = server.sub_to_global[0], server.sub_to_global[1]
    assert m0[0] == m1[1] and m0[1] == m1[0] and m0[0] != m0[1] and len(server.prototypes) == 2
    assert all(torch.equal(a["a"], INIT["a"]) for a in server.cluster_adapters.values())
    assert server.phase == Phase.DONE and server.configure_setup([0, 1]) == {}


def test_a_whole_task_sent_as_one_part_is_not_merged_into_its_neighbour():
    # four clients, one task each, one part each; two tasks lie nearer each other than the rest. Scored as
    # singletons (0) the two near ones would be merged; scored by their halves they stay apart.
    means = {0: [[0.0, 0.0]], 1: [[4.0, 0.0]], 2: [[20.0, 0.0]], 3: [[20.0, 20.0]]}
    server = Server(MethodSetup(0, 4, options_for("fedrouter", {"assign": "sub-cluster", "global_router": "prototype"})),
                    dict(INIT), [0, 1, 2, 3])
    server.aggregate_setup({c: setup_reply(m, spreads=[0.01]) for c, m in means.items()})
    assert len(server.cluster_adapters) == 4 and len({tuple(m) for m in server.sub_to_global.values()}) == 4


def test_each_example_goes_to_its_nearest_centre_and_empty_clusters_go():
    # clients 0-1 hold task A, 2-3 task B, 4-5 both, on one input format: the assignment exchange parts
    # what half-and-half parts hid, and drops a cluster no example went to
    rng = np.random.default_rng(5)
    setup = MethodSetup(seed=0, rounds=2, options=options_for("fedrouter", {}))
    contexts = {}
    for cid, tasks in enumerate(["A", "A", "B", "B", "AB", "AB"]):
        train, vectors = [], {}
        for i in range(120):
            task = tasks[i % len(tasks)]
            text, out = f"q{i}x{cid} {task}", (f"answer {i} is long and full of words" if task == "A" else "yes")
            train.append({"instruction": text, "output": out, "task": task})
            vectors[text] = rng.normal(size=8)
        contexts[cid] = ClientContext(cid, PlantedWorkbench(train, vectors))
    server, client = Server(setup, dict(INIT), sorted(contexts)), Client(setup)
    set_up(server, client, contexts)
    assert len(server.cluster_adapters) == 2 and [len(server.client_clusters[c]) for c in range(6)] == [1, 1, 1, 1, 2, 2]
    truth = {c: {"tasks": [e["task"] for e in ctx.workbench.train],
                 "clusters": np.asarray(server.label_map[c])[ctx.state["labels"]].tolist()} for c, ctx in contexts.items()}
    report = server.report({"test": {}, "general": {}}, truth)["clustering"]
    assert report["accuracy"] == 1.0 and report["purity"] == 1.0 and report["n_global"] == 2
    assert report["assign"] == "example" and report["assignment"]["clusters_before"] >= 2
    assert server.report({"test": {}, "general": {}}, None)["clustering"]["accuracy"] is None  # a deployment: no labels


def test_setup_phases_survive_a_checkpoint():
    server = make_server(assign="example")
    server.aggregate_setup({0: setup_reply([[0, 0], [10, 10]]), 1: setup_reply([[10.2, 10], [0.1, 0]])})
    assert server.phase == Phase.ASSIGN
    resumed = make_server(assign="example")
    resumed.load_state_dict(statefile.loads(statefile.dumps(server.state_dict())))
    assert resumed.phase is Phase.ASSIGN
    sent = resumed.configure_setup([0, 1])
    assert sent[0].config == {"phase": "assign"} and sent[0].arrays["centres"].shape == (2, 2)


# `dual` at 10 rounds: clients 0 and 4 hold the same two clusters, and so do 1 and 5, 2 and 6, 3 and 7
PAIRED = {0: [0, 1], 1: [0, 3], 2: [2, 3], 3: [1, 2], 4: [0, 1], 5: [0, 3], 6: [2, 3], 7: [1, 2]}


def trained_per_round(client_clusters, offsets, rounds):
    counts = {}
    for cid, held in client_clusters.items():
        for t in range(rounds):
            key = (held[(t + offsets[cid]) % len(held)], t)
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_balanced_round_robin_has_every_cluster_trained_every_round_by_half_its_clients():
    by_client = trained_per_round(PAIRED, {cid: cid for cid in PAIRED}, 10)
    assert len(by_client) < 4 * 10  # some (cluster, round) cells untrained
    balanced = trained_per_round(PAIRED, balanced_offsets(PAIRED, 10), 10)
    assert len(balanced) == 4 * 10 and set(balanced.values()) == {2}


def test_the_schedule_star_and_a_checkpointed_round_robin():
    server = make_server()
    server._hold(PAIRED)
    offsets = balanced_offsets(PAIRED, 4)
    for cid, held in PAIRED.items():
        for t in range(4):
            local = (t + offsets[cid]) % 2
            assert server.jobs(cid, t) == [(local, held[local])]
    resumed = make_server()
    resumed.load_state_dict(statefile.loads(statefile.dumps(server.state_dict())))
    assert all(resumed.jobs(c, t) == server.jobs(c, t) for c in PAIRED for t in range(4))
    star = make_server(StarServer)
    star._hold(PAIRED)
    assert [l for l, _ in star.jobs(1, 3)] == [0, 1]


def test_configure_fit_sends_only_the_scheduled_adapters_and_aggregate_averages_by_examples():
    server = two_blob_server()
    msgs = server.configure_fit(0, [0])
    g = min(server.sub_to_global[0])
    assert msgs[0].config["jobs"] == [[0, g]] and set(msgs[0].arrays) == {f"g{g}/a", f"g{g}/b"}
    g0, other = server.sub_to_global[0][0], server.sub_to_global[0][1]
    before = {k: v.clone() for k, v in server.cluster_adapters[other].items()}
    replies = {
        0: Message(pack_under("j0", {"a": torch.full((2, 2), 1.0), "b": torch.full((2,), 1.0)}),
                   {"jobs": [[0, g0]], "job_examples": [10], "job_losses": [1.0], "n_examples": 10, "tokens": 5}),
        1: Message(pack_under("j0", {"a": torch.full((2, 2), 4.0), "b": torch.full((2,), -2.0)}),
                   {"jobs": [[1, g0]], "job_examples": [30], "job_losses": [3.0], "n_examples": 30, "tokens": 7}),
    }
    metrics = server.aggregate_fit(0, replies)
    assert torch.allclose(server.cluster_adapters[g0]["a"], torch.full((2, 2), (10 * 1.0 + 30 * 4.0) / 40))
    assert torch.allclose(server.cluster_adapters[g0]["b"], torch.full((2,), (10 * 1.0 - 30 * 2.0) / 40))
    assert all(torch.equal(server.cluster_adapters[other][k], v) for k, v in before.items())
    assert metrics["train_loss"] == pytest.approx(2.5) and metrics["clusters_updated"] == 1 and metrics["tokens"] == 12


def test_oracle_groups_local_clusters_by_true_task():
    server = make_server(OracleServer)
    server.aggregate_setup({0: setup_reply([[0, 0], [2, 2]], ["a", "b"]), 1: setup_reply([[4, 4]], ["b"])})
    assert server.sub_to_global == {0: [0, 1], 1: [1]}
    assert np.allclose(server.prototypes, [[0, 0], [3, 3]])  # task b: mean of (2,2) and (4,4)
    assert server.configure_evaluate([1])[1].config["task_cluster"] == {"a": 0, "b": 1}


# --- the router: one function ----------------------------------------------------------------------------

def test_the_discriminant_from_client_moments_is_pooled_lda_and_routes_by_one_function():
    from sklearn.covariance import shrunk_covariance
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    rng = np.random.default_rng(3)
    z = rng.normal(size=(300, 1))
    x = np.hstack([z, 2 * z, -z]) + 0.05 * rng.normal(size=(300, 3))
    y = (np.arange(300) % 2).astype(int)
    x[:, 0] += 0.3 * y  # the ask: a small shift along a direction the content does not move
    parts = [cluster_moments(x[i::3], y[i::3], 2) for i in range(3)]  # three clients
    means, whiten = discriminant(parts)
    central = np.stack([x[y == k].mean(axis=0) for k in range(2)])
    centred = x - central[y]
    covariance = shrunk_covariance(centred.T @ centred / (len(x) - 2), 0.1)  # what pooling every client's data gives
    np.testing.assert_allclose(means, central)
    np.testing.assert_allclose(whiten @ covariance @ whiten, np.eye(3), atol=1e-9)
    # equal cluster sizes: scikit-learn's average of class covariances is the pooled one, its LDA the same rule
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.1, priors=[0.5, 0.5]).fit(x, y)
    routed = route(x, *linear_scores(means, whiten))
    assert np.array_equal(routed, lda.predict(x)) and (routed == y).mean() > 0.95
    assert (route(x, *linear_scores(means)) == y).mean() < 0.8  # the Euclidean nearest mean is fooled by content
    # local mode: only the allowed clusters; several rows may belong to one cluster
    assert set(route(x, *linear_scores(means, whiten), allowed=[1]).tolist()) == {1}
    assert route(np.array([[0.0, 0.0], [9.0, 9.0]]), *linear_scores(np.array([[0.0, 0.0], [1.0, 1.0], [10.0, 10.0]])),
                 owner=[4, 4, 7]).tolist() == [4, 7]


def test_the_discriminant_gives_way_to_prototypes_where_nothing_varies_within_a_cluster():
    one_each = [cluster_moments(np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([0, 1]), 2)]
    assert discriminant(one_each) is None
    with pytest.raises(FedrouterError, match="no client reported examples of cluster"):
        discriminant([cluster_moments(np.zeros((2, 2)), np.array([0, 0]), 2)])


@pytest.mark.parametrize("weights, bias, owner, allowed, needle", [
    (np.zeros((2, 3)), np.zeros(3), None, None, "bias"),
    (np.zeros((2, 3)), np.array([0.0, np.inf]), None, None, "bias"),
    (np.zeros((2, 4)), np.zeros(2), None, None, "dimension"),
    (np.zeros((2, 3)), np.zeros(2), None, [5], "allowed clusters"),
])
def test_a_bad_router_is_one_line(weights, bias, owner, allowed, needle):
    with pytest.raises(FedrouterError, match=needle):
        route(np.zeros((1, 3)), weights, bias, owner, allowed)


def test_evaluation_routes_own_tests_among_own_clusters_and_all_tasks_among_all():
    server = two_blob_server()
    train = [{"instruction": f"q{i}", "output": "o", "task": "t"} for i in range(4)]
    test = [{"instruction": "near 10", "output": "o", "task": "t"}]
    wb = PlantedWorkbench(train, {"near 10": np.array([10.0, 10.0])}, test)
    ctx = ClientContext(0, wb, {"labels": np.array([0, 0, 0, 0])})
    client = Client(MethodSetup(0, 2, options_for("fedrouter", {"global_router": "prototype"})))
    msg = server.configure_evaluate([0])[0]
    home, far = server.sub_to_global[0][0], server.sub_to_global[0][1]
    msg.config["allowed"] = [home]
    assert client.route(msg, ctx, "test").tolist() == [home]  # local: its own cluster only
    assert client.route(msg, ctx, "general").tolist() == [far]  # all tasks: the nearest of all


# --- options, DP and bad messages -------------------------------------------------------------------------

@pytest.mark.parametrize("options, needle", [({"n_local": 0}, "n_local"), ({"n_global": "many"}, "n_global"),
                                             ({"router": "learned"}, "router"), ({"assign": "task"}, "assign"),
                                             ({"global_router": "lda"}, "global_router"), ({"k_max": 0}, "k_max"),
                                             ({"cluster_on": "output"}, "unknown"), ({"round_robin": "by-client"}, "unknown")])
def test_bad_options_are_one_line(options, needle):
    with pytest.raises(FedrouterError, match=needle):
        options_for("fedrouter", options)
    assert len(options_for("fedrouter", {})) <= 8


@pytest.mark.parametrize("options, needle", [({}, "n_local must be a number"), ({"n_local": 2}, "assign"),
                                             ({"n_local": 2, "assign": "sub-cluster"}, "global_router")])
def test_under_dp_centroids_only_the_noisy_release_is_allowed(options, needle):
    privacy = {"centroid_noise_multiplier": 1.0, "centroid_clip": 1.0}
    with pytest.raises(FedrouterError, match=needle):
        options_for("fedrouter", options, privacy)
    fine = options_for("fedrouter", {"n_local": 2, "assign": "sub-cluster", "global_router": "prototype"}, privacy)
    setup = MethodSetup(seed=0, rounds=2, options=fine, privacy=privacy)
    train, vectors = _shared_inputs()
    reply = Client(setup).setup(Message(config={"oracle": False}), ClientContext(0, PlantedWorkbench(train, vectors)))
    assert set(reply.arrays) == {"centroids"} and reply.config["silhouette"] is None  # no spreads, no curve
    assert len(reply.arrays["centroids"]) == 2


@pytest.mark.parametrize("said", [[4, 5], [4, "4"], [0, 0], [9, 9], [None, None]])
def test_a_client_sending_a_bad_router_width_is_refused(said):
    replies = {cid: Message({"centroids": torch.zeros(2, 7)}, {"sizes": [5, 5], "silhouette": None, "router_dims": d})
               for cid, d in enumerate(said)}
    with pytest.raises(FedrouterError, match="router_dims"):
        make_server().aggregate_setup(replies)


def test_bad_setup_messages_and_replies_are_one_line_and_adopt_nothing():
    setup = MethodSetup(seed=0, rounds=2, options=options_for("fedrouter", {}))
    train, vectors = _shared_inputs()
    client, ctx = Client(setup), ClientContext(0, PlantedWorkbench(train, vectors))
    for centres in ({}, {"centres": torch.zeros(2, 5)}, {"centres": torch.zeros(0, 43)}):
        with pytest.raises(FedrouterError, match="cluster centres of shape"):
            client.setup(Message(centres, {"phase": "assign"}), ctx)
    with pytest.raises(FedrouterError, match="holds no cluster labels"):
        client.fit(Message(config={"round": 0, "jobs": [], "mapping": [0]}), ctx)
    client.setup(Message(config={"oracle": False}), ctx)
    with pytest.raises(FedrouterError, match="cluster mapping"):
        client.fit(Message(config={"round": 0, "jobs": [], "mapping": []}), ctx)
    mapping = list(range(int(ctx.state["labels"].max()) + 1))
    for k in (0, "2", True):
        with pytest.raises(FedrouterError, match="the server sent n_clusters"):
            client.setup(Message(config={"phase": "moments", "mapping": mapping, "n_clusters": k}), ctx)
    server = make_server(assign="example")
    server.aggregate_setup({0: setup_reply([[0, 0], [10, 10]]), 1: setup_reply([[10.2, 10], [0.1, 0]])})
    for held in ([1, 1, 1], [-1, 5], [0, 0], "all"):
        with pytest.raises(FedrouterError, match="client 1 sent held"):
            server.aggregate_setup({0: Message(config={"held": [3, 3]}), 1: Message(config={"held": held})})
    with pytest.raises(FedrouterError, match=r"client\(s\) \[1\] did not answer"):
        server.aggregate_setup({0: Message(config={"held": [3, 3]})})
    assert server.phase == Phase.ASSIGN  # nothing half-adopted
    with pytest.raises(FedrouterError, match="client 0 sent sizes"):
        make_server().aggregate_setup({0: Message({"centroids": torch.zeros(2, 2)}, {"sizes": [1], "router_dims": 2}),
                                       1: setup_reply([[0, 0]])})
    with pytest.raises(FedrouterError, match="client 0's centroids"):
        make_server().aggregate_setup({0: Message({"centroids": torch.full((1, 2), float("nan"))}, {"sizes": [1], "router_dims": 2}),
                                       1: setup_reply([[0, 0]])})
