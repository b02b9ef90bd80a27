"""FedRouter's server logic on hand-made messages: schedule, per-cluster averaging, oracle grouping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedrouter.errors import FedrouterError
from fedrouter.methods.base import Message, MethodSetup
from fedrouter.methods.common import pack_under as _pack
from fedrouter.methods.common import unpack_under as _unpack
from fedrouter.methods import options_for
from fedrouter.methods.fedrouter import OracleServer, Server, StarServer, balanced_offsets

INIT = {"a": torch.zeros(2, 2), "b": torch.zeros(2)}


def setup_reply(centroids, tasks_per_local=None, n_local=None):
    # what a client sends: nothing label-derived (here the router compares every dimension)
    cfg = {"sizes": [10] * len(centroids), "silhouette": None, "router_dims": len(centroids[0])}
    if tasks_per_local is not None:
        cfg["local_tasks"] = tasks_per_local
    return Message({"centroids": torch.tensor(centroids, dtype=torch.float32)}, cfg)


def make_server(cls=Server, **options):
    return cls(MethodSetup(seed=0, rounds=4, options={"n_global": 2, **options}), dict(INIT), [0, 1])


def two_blob_server(cls=Server):
    server = make_server(cls)
    # client 0: local clusters near (0,0) and (10,10); client 1: near (10,10) and (0,0)
    server.aggregate_setup({0: setup_reply([[0, 0], [10, 10]]), 1: setup_reply([[10.2, 10], [0.1, 0]])})
    return server


def test_global_clusters_join_the_same_blob_across_clients():
    server = two_blob_server()
    assert len(server.prototypes) == 2
    m0, m1 = server.sub_to_global[0], server.sub_to_global[1]
    assert m0[0] == m1[1] and m0[1] == m1[0] and m0[0] != m0[1]
    assert all(torch.equal(a["a"], INIT["a"]) for a in server.cluster_adapters.values())


def test_round_robin_schedule_and_star_schedule():
    server = two_blob_server()
    clusters = sorted(set(server.sub_to_global[0]))  # local clusters are numbered in global cluster order
    assert server.jobs(0, 0) == [(0, clusters[0])]
    assert server.jobs(0, 1) == [(1, clusters[1])]
    assert server.jobs(0, 2) == server.jobs(0, 0)  # t mod n_local
    clusters1 = sorted(set(server.sub_to_global[1]))
    assert server.jobs(1, 0) == [(1, clusters1[1])]  # staggered by client: both clusters train every round
    star = two_blob_server(StarServer)
    assert [l for l, _ in star.jobs(1, 3)] == [0, 1]


# `dual` at 10 rounds, seed 0: clients 0 and 4 hold the same two clusters, and so do 1 and 5, 2 and 6, 3 and 7;
# starting each client's round robin at its id has both clients of a pair train the same cluster together
PAIRED = {0: [0, 1], 1: [0, 3], 2: [2, 3], 3: [1, 2], 4: [0, 1], 5: [0, 3], 6: [2, 3], 7: [1, 2]}


def trained_per_round(client_clusters, offsets, rounds):
    """{(cluster, round): how many clients train it} under round robin offsets."""
    counts = {}
    for cid, held in client_clusters.items():
        for t in range(rounds):
            key = (held[(t + offsets[cid]) % len(held)], t)
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_balanced_round_robin_has_every_cluster_trained_every_round_by_half_its_clients():
    by_client = trained_per_round(PAIRED, {cid: cid for cid in PAIRED}, 10)
    assert sorted(set(by_client.values())) == [2, 4]  # and so some (cluster, round) cells at 0: untrained
    assert len(by_client) < 4 * 10
    offsets = balanced_offsets(PAIRED, 10)
    balanced = trained_per_round(PAIRED, offsets, 10)
    assert len(balanced) == 4 * 10 and set(balanced.values()) == {2}  # each of 4 clusters, each round, 2 of its 4


def test_balanced_round_robin_keeps_offsets_that_are_already_balanced_and_one_cluster_clients_at_zero():
    spread = {0: [0, 3], 1: [1, 3], 2: [1, 2], 3: [0, 2], 4: [0, 3], 5: [1, 3], 6: [1, 2], 7: [0, 2]}
    assert balanced_offsets(spread, 10) == {cid: cid % 2 for cid in spread}
    mixed = {0: [0, 1, 2], 1: [0, 1], 2: [0], 3: [1, 2], 4: [0, 1, 2, 3], 5: [2, 3], 6: [5]}
    offsets = balanced_offsets(mixed, 12)
    assert offsets[2] == 0 and offsets[6] == 0 and all(0 <= offsets[c] < len(h) for c, h in mixed.items())

    def squares(o):
        return sum(n * n for n in trained_per_round(mixed, o, 12).values())
    assert squares(offsets) <= squares({cid: cid % len(h) for cid, h in mixed.items()})


@pytest.mark.parametrize("round_robin, offsets", [("balanced", balanced_offsets(PAIRED, 4)), ("by-client", {c: c for c in PAIRED})])
def test_the_schedule_follows_the_round_robin_option(round_robin, offsets):
    server = make_server(round_robin=round_robin)
    server._hold(PAIRED)
    for cid, held in PAIRED.items():
        for t in range(4):
            local = (t + offsets[cid]) % 2
            assert server.jobs(cid, t) == [(local, held[local])]
    with pytest.raises(FedrouterError, match="round_robin must be one of"):
        options_for("fedrouter", {"round_robin": "random"})


def test_a_checkpointed_server_resumes_the_same_round_robin():
    from fedrouter.core import statefile

    server = make_server()
    server._hold(PAIRED)
    resumed = make_server()
    resumed.load_state_dict(statefile.loads(statefile.dumps(server.state_dict())))
    assert resumed.round_robin_offsets == server.round_robin_offsets != {c: c % 2 for c in PAIRED}
    assert all(resumed.jobs(c, t) == server.jobs(c, t) for c in PAIRED for t in range(4))


def test_configure_fit_sends_only_the_adapters_of_the_scheduled_clusters():
    server = two_blob_server()
    msgs = server.configure_fit(0, [0])
    g = min(server.sub_to_global[0])
    assert msgs[0].config["jobs"] == [[0, g]] and msgs[0].config["mapping"] == server.sub_to_global[0]
    assert set(msgs[0].arrays) == {f"g{g}/a", f"g{g}/b"}


def test_aggregate_averages_per_cluster_by_examples_and_keeps_untouched_clusters():
    server = two_blob_server()
    g0 = server.sub_to_global[0][0]  # client 0 local 0 and client 1 local 1 share this cluster
    other = 1 - g0
    before_other = {k: v.clone() for k, v in server.cluster_adapters[other].items()}
    upd0 = {"a": torch.full((2, 2), 1.0), "b": torch.full((2,), 1.0)}
    upd1 = {"a": torch.full((2, 2), 4.0), "b": torch.full((2,), -2.0)}
    replies = {
        0: Message(_pack("j0", upd0), {"jobs": [[0, g0]], "job_examples": [10], "job_losses": [1.0], "n_examples": 10, "tokens": 5}),
        1: Message(_pack("j0", upd1), {"jobs": [[1, g0]], "job_examples": [30], "job_losses": [3.0], "n_examples": 30, "tokens": 7}),
    }
    metrics = server.aggregate_fit(0, replies)
    expected_a = (10 * 1.0 + 30 * 4.0) / 40
    expected_b = (10 * 1.0 + 30 * -2.0) / 40
    assert torch.allclose(server.cluster_adapters[g0]["a"], torch.full((2, 2), expected_a))
    assert torch.allclose(server.cluster_adapters[g0]["b"], torch.full((2,), expected_b))
    for k, v in before_other.items():
        assert torch.equal(server.cluster_adapters[other][k], v)
    assert metrics["train_loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)
    assert metrics["clusters_updated"] == 1 and metrics["tokens"] == 12


def test_oracle_groups_local_clusters_by_true_task():
    server = make_server(OracleServer)
    server.aggregate_setup({0: setup_reply([[0, 0], [2, 2]], ["a", "b"]), 1: setup_reply([[4, 4]], ["b"])})
    assert server.sub_to_global == {0: [0, 1], 1: [1]}
    assert np.allclose(server.prototypes, [[0, 0], [3, 3]])  # task b: mean of (2,2) and (4,4)
    assert server.configure_evaluate([1])[1].config["task_cluster"] == {"a": 0, "b": 1}


def test_pack_unpack_round_trip():
    adapter = {"x.lora_A.weight": torch.ones(1), "y": torch.zeros(2)}
    assert {k: v.tolist() for k, v in _unpack(_pack("g3", adapter), "g3").items()} == {k: v.tolist() for k, v in adapter.items()}
    assert _unpack(_pack("g3", adapter), "g30") == {}


@pytest.mark.parametrize("options", [{"n_local": 0}, {"n_global": "many"}, {"router": "nearest"}, {"typo": 1},
                                     {"cluster_on": "output"}])
def test_bad_options_are_one_line_errors(options):
    with pytest.raises(FedrouterError):
        options_for("fedrouter", options)


class _EmbeddingWorkbench:
    """Training examples with task labels, and fixed embeddings for them (two tasks, two far blobs; the
    answers' embeddings are a 3-d blob of their own)."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.train = [{"instruction": f"q{i}", "output": f"o{i}", "task": "secret-task-a" if i < 30 else "secret-task-b"}
                      for i in range(60)]
        self.vectors = np.concatenate([rng.normal(size=(30, 4)), 20 + rng.normal(size=(30, 4))]).astype(np.float32)
        self.answer_vectors = rng.normal(size=(60, 3)).astype(np.float32)

    def examples(self, split):
        return self.train

    def embed(self, texts, spec):
        return self.answer_vectors if texts[0].startswith("o") else self.vectors


class _PairWorkbench(_EmbeddingWorkbench):
    """Two tasks asking different things of one input format: one instruction blob, two templates each,
    answers in two far blobs."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        templates = ["facts : {} write a sentence .", "describe : {}", "{} what is the city ?", "look up the city : {}"]
        self.train = [{"instruction": templates[2 * (i >= 80) + i % 2].format(f"w{i} v{i}"), "output": f"o{i}",
                       "task": "a" if i < 80 else "b"} for i in range(160)]
        self.vectors = rng.normal(size=(160, 4)).astype(np.float32)
        self.answer_vectors = np.concatenate([rng.normal(size=(80, 3)), 6 + rng.normal(size=(80, 3))]).astype(np.float32)

    def embed(self, texts, spec):
        return self.answer_vectors if texts[0].startswith("o") else self.vectors


def test_the_client_splits_a_sub_cluster_by_its_templates_answers_as_fedrouter_clusters_does():
    from fedrouter.core.cluster import local_then_global, split_dims, task_features
    from fedrouter.methods.base import ClientContext
    from fedrouter.methods.fedrouter import Client

    def sent(answer_split):
        client = Client(MethodSetup(seed=0, rounds=2, options=options_for("fedrouter", {"answer_split": answer_split})))
        return client.setup(Message(config={"oracle": False}), ClientContext(0, _PairWorkbench())).arrays["centroids"].numpy()

    wb = _PairWorkbench()
    x = task_features(wb.vectors, wb.answer_vectors)
    offline = local_then_global({0: x}, "auto", "auto", seed=0, router_dims=4, local_dims=split_dims("instruction+output@server", 4),
                                client_texts={0: [e["instruction"] for e in wb.train]})
    labels = offline.sub_labels[0]
    assert labels[:80].tolist() == [0] * 80 and labels[80:].tolist() == [1] * 80  # the two tasks, by templates and answers
    assert np.allclose(sent(True), [x[labels == j].mean(axis=0) for j in range(2)], atol=1e-5)
    assert len(sent(False)) == 1  # one instruction blob: K-Means alone keeps the pair together
    with pytest.raises(FedrouterError, match="answer_split must be true or false"):
        options_for("fedrouter", {"answer_split": "yes"})


@pytest.mark.parametrize("cluster_on", ["instruction+output", "instruction+output@server"])
def test_the_setup_reply_carries_nothing_label_derived_and_the_server_clusters_without_labels(cluster_on):
    import json

    from fedrouter.methods.base import ClientContext
    from fedrouter.methods.fedrouter import Client
    from fedrouter.core.cluster import local_then_global, split_dims, task_features

    setup = MethodSetup(seed=0, rounds=2, options=options_for("fedrouter", {"cluster_on": cluster_on}))
    client = Client(setup)
    replies = {cid: client.setup(Message(config={"oracle": False}), ClientContext(cid, _EmbeddingWorkbench(cid)))
               for cid in (0, 1)}
    for reply in replies.values():
        assert set(reply.config) == {"sizes", "silhouette", "router_dims"}
        assert "secret-task" not in json.dumps(reply.config)
        # clustered on instruction and answer side by side; the router compares the first 4 dimensions
        assert reply.config["router_dims"] == 4 and reply.arrays["centroids"].shape[1] == 4 + 3
    server = Server(setup, dict(INIT), [0, 1])
    server.aggregate_setup(replies)
    # second exchange: the cluster centres out, each client's count of examples per centre back
    contexts = {cid: ClientContext(cid, _EmbeddingWorkbench(cid)) for cid in (0, 1)}
    for cid, ctx in contexts.items():
        client.setup(Message(config={"oracle": False}), ctx)
    assigning = server.configure_setup([0, 1])
    assert set(assigning[0].arrays) == {"centres"} and assigning[0].arrays["centres"].shape[1] == 4 + 3
    counts = {cid: client.setup(assigning[cid], ctx) for cid, ctx in contexts.items()}
    for reply in counts.values():
        assert set(reply.config) == {"held"} and not reply.arrays and "secret-task" not in json.dumps(reply.config)
    server.aggregate_setup(counts)
    # third exchange: each client's final clusters out, its moments back -- sums, counts and one scatter
    asking = server.configure_setup([0, 1])
    assert not asking[0].arrays and set(asking[0].config) == {"phase", "mapping", "n_clusters"}
    moments = {cid: client.setup(asking[cid], ctx) for cid, ctx in contexts.items()}
    for reply in moments.values():
        assert set(reply.config) == {"counts"} and set(reply.arrays) == {"sums", "scatter"}
        assert reply.arrays["scatter"].shape == (4, 4) and "secret-task" not in json.dumps(reply.config)
    server.aggregate_setup(moments)
    assert server.configure_setup([0, 1]) == {}  # setup is over
    # the method and `fedrouter clusters` (local_then_global) make the same assignment on the same data
    features = {cid: task_features(wb.vectors, wb.answer_vectors) for cid, wb in ((c, _EmbeddingWorkbench(c)) for c in (0, 1))}
    offline = local_then_global(features, "auto", "auto", seed=0, k_range=range(1, 13), router_dims=4,
                                local_dims=split_dims(cluster_on, 4),
                                client_texts={c: [e["instruction"] for e in _EmbeddingWorkbench(c).train] for c in (0, 1)})
    for cid in (0, 1):  # the sub-centroids sent are the sub-clusters' means over instruction and answer
        sent, labels = replies[cid].arrays["centroids"].numpy(), offline.sub_labels[cid]
        assert np.allclose(sent, [features[cid][labels == j].mean(axis=0) for j in range(len(sent))], atol=1e-5)
        fit = server.configure_fit(0, [cid])[cid]
        assert np.array_equal(np.asarray(fit.config["mapping"])[contexts[cid].state["labels"]], offline.global_labels(cid))
        assert server.client_clusters[cid] == offline.allowed(cid).tolist()
    assert server.sub_to_global == {cid: offline.step.sub_to_global[cid].tolist() for cid in (0, 1)}
    assert server.prototypes.shape == (len(offline.prototypes), 4)  # what the router and router.json hold
    assert np.allclose(server.prototypes, offline.router_centroids)
    assert np.allclose(offline.router_centroids, offline.prototypes[:, :4])
    means, whiten = offline.discriminant  # the discriminant router: the same from moments as from the data
    assert np.allclose(server.router_means, means, atol=1e-5) and np.allclose(server.whiten, whiten, rtol=1e-4, atol=1e-4)
    assert server.router()["whiten"] is server.whiten and len(server.router()["adapters"]) == offline.n_global
    # without labels (a deployment) the scores are null, the choice is still reported
    report = server.report({"test": {}, "general": {}}, truth=None)["clustering"]
    assert report["local_accuracy"] is None and report["accuracy"] is None and report["n_global"] == offline.n_global
    truth = {cid: {"tasks": [e["task"] for e in _EmbeddingWorkbench(cid).train],
                   "clusters": offline.global_labels(cid).tolist()} for cid in (0, 1)}
    assert server.report({"test": {}, "general": {}}, truth)["clustering"]["accuracy"] == 1.0


def test_data_without_task_labels_trains_and_reports_null_accuracy(tmp_path, tiny_overrides, tiny_model_dir):
    from fedrouter.config import load_config
    from fedrouter.core.synthetic import generate_examples
    from fedrouter.experiment import run_experiment

    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 40), ("test", 30)):
        rows = generate_examples("paraphrase", n, seed=split) + generate_examples("headline", n, seed=split)
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"instruction": r["instruction"], "output": r["output"]}) + "\n"
                                                      for r in rows))
    out = tmp_path / "run"
    cfg = load_config(None, {**tiny_overrides, "method": "fedrouter", "scenario": "all", "data": str(data),
                             "task_field": "none", "general_test_per_task": 10})
    run_experiment(cfg, out, progress=False)
    results = json.loads((out / "results.json").read_text())
    clustering = results["clustering"]
    assert clustering["accuracy"] is None and clustering["local_accuracy"] is None and clustering["task_to_cluster"] is None
    assert clustering["n_global"] >= 1 and results["tasks"] == ["unlabelled"]
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == tiny_overrides["rounds"] and all(r["tokens"] > 0 for r in rounds)  # it trained


def test_data_without_task_labels_needs_task_field_none(tmp_path):
    from fedrouter.core.data import load_jsonl

    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(FedrouterError, match="task_field 'none'"):  # a forgotten --task-field is not silently unlabelled
        load_jsonl(path)
    assert load_jsonl(path, "none") == [{"instruction": "a", "output": "b", "task": "unlabelled"}]


@pytest.mark.parametrize("said", [[4, 5], [4, "4"], [0, 0], [9, 9], [None, None]])
def test_a_client_sending_a_bad_router_width_is_refused(said):
    """`router_dims` comes from a client: the server checks it (the same everywhere, within the centroids)."""
    replies = {cid: Message({"centroids": torch.zeros(2, 7)}, {"sizes": [5, 5], "silhouette": None, "router_dims": d})
               for cid, d in enumerate(said)}
    with pytest.raises(FedrouterError, match="router_dims"):
        make_server().aggregate_setup(replies)


class _PlantedWorkbench(_EmbeddingWorkbench):
    """Given instruction and answer embeddings for `len(tasks)` training examples."""

    def __init__(self, tasks, vectors, answer_vectors):
        self.train = [{"instruction": f"q{i}", "output": f"o{i}", "task": t} for i, t in enumerate(tasks)]
        self.vectors, self.answer_vectors = vectors.astype(np.float32), answer_vectors.astype(np.float32)


def _set_up(server, client, contexts):
    """The engine's setup loop (`RoundLoop.setup`) without an engine."""
    while messages := server.configure_setup(sorted(contexts)):
        server.aggregate_setup({cid: client.setup(msg, contexts[cid]) for cid, msg in messages.items()})


def test_the_method_assigns_each_example_to_its_nearest_centre_as_fedrouter_clusters_does():
    # clients 0-1 hold task A, 2-3 task B, 4-5 both; A and B share an instruction format, answer apart
    from fedrouter.core.cluster import clustering_accuracy, local_then_global, split_dims, task_features
    from fedrouter.methods.base import ClientContext
    from fedrouter.methods.fedrouter import Client

    rng = np.random.default_rng(5)
    benches = {}
    for cid, tasks in enumerate(["A", "A", "B", "B", "AB", "AB"]):
        n = 120 // len(tasks)
        instr = [0.2 * np.eye(6)[0] * (t == "B") + 0.2 * rng.normal(size=(n, 6)) for t in tasks]
        answers = [10 * np.eye(4)["AB".index(t)] + rng.normal(size=(n, 4)) for t in tasks]
        benches[cid] = _PlantedWorkbench([t for t in tasks for _ in range(n)], np.concatenate(instr), np.concatenate(answers))
    setup = MethodSetup(seed=0, rounds=2, options=options_for("fedrouter", {}))
    server, client = Server(setup, dict(INIT), list(benches)), Client(setup)
    contexts = {cid: ClientContext(cid, wb) for cid, wb in benches.items()}
    _set_up(server, client, contexts)
    offline = local_then_global({cid: task_features(wb.vectors, wb.answer_vectors) for cid, wb in benches.items()},
                                "auto", "auto", seed=0, k_range=range(1, 13), router_dims=6,
                                local_dims=split_dims("instruction+output@server", 6))
    found = {cid: np.asarray(server.label_map[cid])[contexts[cid].state["labels"]] for cid in benches}
    for cid in benches:
        assert np.array_equal(found[cid], offline.global_labels(cid))
    tasks = [e["task"] for cid in sorted(benches) for e in benches[cid].train]
    assert clustering_accuracy(tasks, np.concatenate([found[c] for c in sorted(found)])) == 1.0
    assert len(server.cluster_adapters) == 2 and server.assignment["clusters_before"] == 3
    assert len(server.assignment["emptied"]) == 1 and server.assignment["joined"] == []
    assert [len(server.client_clusters[c]) for c in sorted(benches)] == [1, 1, 1, 1, 2, 2]
    assert len(server.prototypes) == len(server.prototype_cluster) and max(server.prototype_cluster) == 1
    report = server.report({"test": {}, "general": {}})["clustering"]
    assert report["n_global"] == 2 and report["assignment"] == server.assignment and report["n_local"]["4"] == 2


def test_a_bad_assignment_message_or_reply_is_one_line():
    from fedrouter.methods.base import ClientContext
    from fedrouter.methods.fedrouter import Client

    setup = MethodSetup(seed=0, rounds=2, options=options_for("fedrouter", {}))
    client, ctx = Client(setup), ClientContext(0, _EmbeddingWorkbench(0))
    for centres in ({}, {"centres": torch.zeros(2, 5)}, {"centres": torch.zeros(0, 7)}):
        with pytest.raises(FedrouterError, match="cluster centres of shape"):
            client.setup(Message(centres, {"phase": "assign"}), ctx)
    client.setup(Message(config={"oracle": False}), ctx)
    with pytest.raises(FedrouterError, match="cluster mapping"):
        client.fit(Message(config={"round": 0, "jobs": [], "mapping": []}), ctx)
    server = make_server()
    server.aggregate_setup({0: setup_reply([[0, 0], [10, 10]]), 1: setup_reply([[10.2, 10], [0.1, 0]])})
    n = len(server.centres)
    for held in ([1] * (n + 1), [-1] + [5] * (n - 1), [0] * n, "all"):
        with pytest.raises(FedrouterError, match="client 1 sent held"):
            server.aggregate_setup({0: Message(config={"held": [3] * n}), 1: Message(config={"held": held})})
    with pytest.raises(FedrouterError, match=r"client\(s\) \[1\] did not answer"):
        server.aggregate_setup({0: Message(config={"held": [3] * n})})
    with pytest.raises(FedrouterError, match="client 0 sent sizes"):
        make_server().aggregate_setup({0: Message({"centroids": torch.zeros(2, 2)}, {"sizes": [1], "router_dims": 2})})


def test_a_bad_moments_message_or_reply_is_one_line():
    from fedrouter.methods.base import ClientContext
    from fedrouter.methods.fedrouter import Client

    setup = MethodSetup(seed=0, rounds=2, options=options_for("fedrouter", {}))
    client, ctx = Client(setup), ClientContext(0, _EmbeddingWorkbench(0))
    client.setup(Message(config={"oracle": False}), ctx)
    n_labels = int(ctx.state["labels"].max()) + 1
    for k in (0, "2", True, n_labels - 1 if n_labels > 1 else 0):
        with pytest.raises(FedrouterError, match="the server sent n_clusters"):
            client.setup(Message(config={"phase": "moments", "mapping": list(range(n_labels)), "n_clusters": k}), ctx)
    server = Server(setup, dict(INIT), [0, 1])
    contexts = {cid: ClientContext(cid, _EmbeddingWorkbench(cid)) for cid in (0, 1)}
    while (messages := server.configure_setup([0, 1])) and server.setup_phase != "moments":
        server.aggregate_setup({cid: client.setup(msg, contexts[cid]) for cid, msg in messages.items()})
    good = {cid: client.setup(msg, contexts[cid]) for cid, msg in server.configure_setup([0, 1]).items()}
    k = len(server.cluster_adapters)
    bad_arrays = [{"sums": torch.zeros(k + 1, 4), "scatter": torch.eye(4)}, {"sums": torch.zeros(k, 4)},
                  {"sums": torch.zeros(k, 4), "scatter": torch.full((4, 4), float("nan"))}]
    for arrays in bad_arrays:
        with pytest.raises(FedrouterError, match="client 1's (sums|scatter) is"):
            server.aggregate_setup({0: good[0], 1: Message(arrays, good[1].config)})
    with pytest.raises(FedrouterError, match="client 1 sent counts"):
        server.aggregate_setup({0: good[0], 1: Message(good[1].arrays, {"counts": [-1] * k})})
    with pytest.raises(FedrouterError, match=r"client\(s\) \[1\] did not send"):
        server.aggregate_setup({0: good[0]})
    assert server.whiten is None and server.setup_phase == "moments"  # nothing half-adopted
    server.aggregate_setup(good)
    assert server.whiten.shape == (4, 4) and server.setup_phase == "done"


def test_under_dp_centroids_there_is_no_second_release():
    # the assignment's counts would be a release the accountant does not cover: examples go by sub-cluster
    setup = MethodSetup(seed=0, rounds=4, options={"n_global": 2}, privacy={"centroid_noise_multiplier": 1.0, "centroid_clip": 1.0})
    server = Server(setup, dict(INIT), [0, 1])
    server.aggregate_setup({0: setup_reply([[0, 0], [10, 10]]), 1: setup_reply([[10.2, 10], [0.1, 0]])})
    assert server.configure_setup([0, 1]) == {} and server.assign() == "sub-cluster"
    assert server.global_router() == "prototype"  # nor the moments of the discriminant router
    assert server.report({"test": {}, "general": {}})["clustering"]["assign"] == "sub-cluster"
    assert two_blob_server().configure_setup([0, 1])[0].config == {"phase": "assign"}  # without DP: the exchange


def _shared_format_instructions(rng, n, task):
    """Instructions of two tasks on one input format: the input's content (z) moves every dimension, the ask
    (B's) adds a small offset to the first; only a direction that cancels the content tells them apart."""
    z = rng.normal(size=(n, 1))
    content = np.hstack([0.6 * z, 2 * z, z, -z, 0.5 * z, 1.5 * z])
    return content + 0.3 * np.eye(6)[0] * (task == "B") + 0.05 * rng.normal(size=(n, 6))


def test_the_learned_and_discriminant_routers_tell_a_format_sharing_pair_apart_where_the_prototypes_do_not():
    # clients 0-1 hold task A, 2-3 task B, 4-5 both; A and B share an input format, answer apart
    from fedrouter.methods.base import ClientContext
    from fedrouter.methods.fedrouter import Client

    rng = np.random.default_rng(5)
    benches = {}
    for cid, tasks in enumerate(["A", "A", "B", "B", "AB", "AB"]):
        n = 120 // len(tasks)
        instr = [_shared_format_instructions(rng, n, t) for t in tasks]
        answers = [10 * np.eye(4)["AB".index(t)] + rng.normal(size=(n, 4)) for t in tasks]
        benches[cid] = _PlantedWorkbench([t for t in tasks for _ in range(n)], np.concatenate(instr), np.concatenate(answers))
        benches[cid].evaluate_routed = lambda adapters, routes, split, mixed: {}
    accuracy = {}
    for router, global_router in (("local", "prototype"), ("global", "prototype"), ("learned", "discriminant"),
                                  ("local", "discriminant"), ("global", "discriminant")):
        setup = MethodSetup(seed=0, rounds=2, options=options_for("fedrouter", {"router": router, "global_router": global_router}))
        server, client = Server(setup, dict(INIT), list(benches)), Client(setup)
        contexts = {cid: ClientContext(cid, wb) for cid, wb in benches.items()}
        _set_up(server, client, contexts)
        sent = server.configure_evaluate([4, 5])
        routing = {name: tuple(t.shape) for name, t in sent[4].arrays.items() if not name.startswith("g")}
        k = len(server.cluster_adapters)  # the discriminant router travels as k linear scores, not a d x d map
        assert routing == ({"router_weights": (k, 6), "router_bias": (k,)} if global_router == "discriminant"
                           else {"centroids": (len(server.prototypes), 6)})
        hits = total = 0
        for cid in (4, 5):  # each task's inputs should reach the cluster its training examples are in
            sent[cid].config["split"] = "test"
            counts = client.evaluate(sent[cid], contexts[cid]).config["route_counts"]
            clusters = np.asarray(server.label_map[cid])[contexts[cid].state["labels"]]
            for task, routed in counts.items():
                home = str(np.bincount(clusters[[e["task"] == task for e in benches[cid].train]]).argmax())
                hits, total = hits + routed.get(home, 0), total + sum(routed.values())
        accuracy[router, global_router] = hits / total
    for prototype in (("local", "prototype"), ("global", "prototype")):
        assert accuracy[prototype] < 0.85
    for better in (("learned", "discriminant"), ("local", "discriminant"), ("global", "discriminant")):
        assert accuracy[better] >= 0.95
