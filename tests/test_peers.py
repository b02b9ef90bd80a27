"""FedCluster, IFCA, FedDPA-T, FLoRA, FedLEASE: their defining rules, exactly, on small tensors and the tiny base."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedrouter.core import lowrank
from fedrouter.core.client_clusters import agglomerative, agglomerative_auto, cosine_distance_matrix
from fedrouter.core.statefile import dumps, loads
from fedrouter.errors import FedrouterError
from fedrouter.methods import fedcluster, feddpa, fedlease, flora, ifca
from fedrouter.methods.base import ClientContext, Message, MethodSetup
from fedrouter.methods.common import merge_new, pack, unpack

A, B = "m.lora_A.weight", "m.lora_B.weight"


def reply(arrays, n=1, **config):
    return Message(arrays, {"n_examples": n, "loss": 1.0, "tokens": 1, **config})


# --- clustering helpers ------------------------------------------------------------------------------

def test_cosine_distance_matrix_exact_and_averaged_over_blocks():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    d = cosine_distance_matrix([x])
    assert np.allclose(d, [[0, 1, 2], [1, 0, 1], [2, 1, 0]])
    y = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])  # identical in this block: distance 0
    assert np.allclose(cosine_distance_matrix([x, y]), d / 2)
    with pytest.raises(FedrouterError):
        cosine_distance_matrix([np.array([[np.nan, 1.0]])])


def test_agglomerative_groups_similar_directions_and_auto_finds_k():
    rng = np.random.default_rng(0)
    directions = np.eye(3)[[0, 0, 1, 1, 2, 2, 0]]
    x = directions * 5 + rng.normal(scale=0.1, size=(7, 3))
    labels = agglomerative(cosine_distance_matrix([x]), 3)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 0]
    k, auto_labels, curve = agglomerative_auto(cosine_distance_matrix([x]), range(2, 6))
    assert k == 3 and auto_labels.tolist() == labels.tolist() and set(curve) == {2, 3, 4, 5}
    assert agglomerative_auto(cosine_distance_matrix([x[:2]]), range(2, 5))[0] == 1  # too few to score


# --- FedCluster ----------------------------------------------------------------------------------------

def test_fedcluster_groups_clients_whose_updates_are_similar_then_averages_within_groups():
    start = {A: torch.zeros(1, 4), B: torch.zeros(2, 1)}
    server = fedcluster.Server(MethodSetup(0, rounds=3, options={"cluster_round": 1, "n_clusters": 2}), start, [0, 1, 2, 3])
    up = lambda a, b: {A: torch.tensor([a]), B: torch.tensor(b)}
    replies = {0: reply(up([1.0, 0, 0, 0], [[1.0], [0.0]]), 1), 1: reply(up([0, 0, 1.0, 0], [[0.0], [1.0]]), 1),
               2: reply(up([2.0, 0.1, 0, 0], [[1.0], [0.1]]), 3), 3: reply(up([0, 0, 3.0, 0.1], [[0.0], [2.0]]), 1)}
    metrics = server.aggregate_fit(0, replies)
    assert metrics["n_clusters"] == 2
    assert server.cluster_of == {0: 0, 1: 1, 2: 0, 3: 1}
    assert torch.allclose(server.cluster_adapters[0][A], torch.tensor([[1.75, 0.075, 0, 0]]))  # (1*1 + 3*2)/4
    msgs = server.configure_fit(1, [0, 1])
    assert torch.equal(msgs[0].arrays[A], server.cluster_adapters[0][A])
    assert torch.equal(msgs[1].arrays[A], server.cluster_adapters[1][A])
    server.aggregate_fit(1, {1: reply(up([0, 0, 5.0, 0], [[0.0], [1.0]]), 1)})
    assert torch.equal(server.cluster_adapters[1][A], torch.tensor([[0, 0, 5.0, 0]]))
    assert torch.allclose(server.cluster_adapters[0][A], torch.tensor([[1.75, 0.075, 0, 0]]))  # untouched


def test_fedcluster_is_fedit_before_the_clustering_round():
    start = {A: torch.zeros(1, 2), B: torch.zeros(2, 1)}
    server = fedcluster.Server(MethodSetup(0, rounds=10, options={"cluster_round": 5}), start, [0, 1])
    server.aggregate_fit(0, {0: reply({A: torch.ones(1, 2), B: torch.ones(2, 1)}, 1),
                             1: reply({A: torch.zeros(1, 2), B: torch.zeros(2, 1)}, 1)})
    assert set(server.cluster_adapters) == {0}
    assert torch.allclose(server.configure_fit(1, [1])[1].arrays[A], torch.full((1, 2), 0.5))


# --- IFCA ----------------------------------------------------------------------------------------------

class LossWorkbench:
    """Loss of an adapter = distance of its A from the client's target; training adds 1 to A."""

    def __init__(self, target):
        self.target, self.n_train = target, 5
        self.trained_from = None

    def loss(self, adapter, n):
        return float((adapter[A] - self.target).abs().sum())

    def train(self, adapter, round_idx, **kw):
        self.trained_from = adapter
        return {A: adapter[A] + 1, B: adapter[B]}, SimpleNamespace(loss=0.5, tokens=2, seconds=0.0)


def test_ifca_client_trains_the_lowest_loss_cluster_and_says_which():
    clusters = {k: {A: torch.full((1, 2), float(k)), B: torch.zeros(2, 1)} for k in range(3)}
    ctx = ClientContext(0, LossWorkbench(torch.full((1, 2), 2.2)))
    out = ifca.Client(MethodSetup(0, 1)).fit(Message(pack(clusters), {"round": 0}), ctx)
    assert out.config["cluster"] == 2
    assert out.config["cluster_losses"] == pytest.approx([4.4, 2.4, 0.4])
    assert torch.equal(ctx.workbench.trained_from[A], clusters[2][A])
    assert ifca.lowest_loss({0: 1.0, 1: 1.0, 2: 3.0}) == 0  # ties: lowest id


def test_ifca_server_sends_all_clusters_and_averages_per_choice():
    start = {A: torch.zeros(1, 2), B: torch.zeros(2, 1)}
    server = ifca.Server(MethodSetup(3, 1, {"k": 3}), start, [0, 1, 2])
    assert torch.equal(server.clusters[0][A], start[A])  # cluster 0 keeps the run's initialisation
    assert not torch.equal(server.clusters[1][A], server.clusters[2][A])  # the others start elsewhere
    assert all(server.clusters[k][B].abs().sum() > 0 for k in range(3))
    msg = server.configure_fit(0, [0])[0]
    assert len(msg.arrays) == 6 and msg.nbytes() == 3 * Message(start).nbytes()  # K adapters down
    before = server.clusters[1]
    server.aggregate_fit(0, {0: reply({A: torch.ones(1, 2), B: torch.ones(2, 1)}, 1, cluster=2),
                             1: reply({A: torch.full((1, 2), 3.0), B: torch.ones(2, 1)}, 3, cluster=2),
                             2: reply({A: torch.full((1, 2), 7.0), B: torch.ones(2, 1)}, 1, cluster=0)})
    assert torch.allclose(server.clusters[2][A], torch.full((1, 2), 2.5))
    assert torch.equal(server.clusters[0][A], torch.full((1, 2), 7.0))
    assert server.clusters[1] is before
    with pytest.raises(FedrouterError):
        server.aggregate_fit(1, {0: reply(dict(start), 1, cluster=5)})


# --- FLoRA ---------------------------------------------------------------------------------------------

def _lora(r, seed, d=4):
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(r, d, generator=g), "m.lora_B.weight": torch.randn(d, r, generator=g)}


def test_flora_server_stacks_and_download_grows_with_clients():
    sizes = {}
    for n in (2, 4):
        server = flora.Server(MethodSetup(0, 2, client_ranks=(2, 4)), {}, list(range(n)))
        first = server.configure_fit(0, list(range(n)))
        assert [first[c].config["rank"] for c in range(n)] == [2, 4, 2, 4][:n]
        assert all(m.nbytes() == 0 for m in first.values())  # nothing merged yet
        replies = {c: reply(_lora([2, 4][c % 2], c), 1, scaling=16 / [2, 4][c % 2]) for c in range(n)}
        server.aggregate_fit(0, replies)
        assert server.stacked_ranks == [sum([2, 4][c % 2] for c in range(n))]
        sizes[n] = server.configure_fit(1, [0])[0].nbytes()
    assert sizes[4] == 2 * sizes[2]


def test_flora_client_merges_each_stacked_module_once(tiny_shared):
    shared, wb = tiny_shared
    ctx = ClientContext(0, wb)
    module = lowrank.stack([shared.initial_adapter], [1], [1.0])
    module = {k: (v + 0.01 if ".lora_B." in k else v) for k, v in module.items()}  # B != 0: a real update
    merge_new(ctx, pack({0: module}))
    merge_new(ctx, {})  # nothing new: nothing added
    merge_new(ctx, pack({0: module}))  # sent again (its reply was lost): merged already, skipped
    expected = lowrank.dense_update(module, 1.0)
    assert set(ctx.state["merged"]) == set(expected)
    assert all(torch.equal(ctx.state["merged"][m], expected[m]) for m in expected)


class FloraBench:
    """A fake workbench: training adds a client- and round-specific step to the fresh adapter; every training
    and evaluation records the base update it ran on."""

    n_train = 4

    def __init__(self, client_id):
        self.client_id, self.bases = client_id, []

    def lora_rank(self):
        return 2

    def lora_scaling(self, rank=None):
        return 8 / (rank or 2)

    def initial_adapter(self, rank=None):
        return _lora(rank or 2, 0)

    def train(self, adapter, round_idx, *, base_update=None, **_):
        self.bases.append(base_update)
        step = _lora(lowrank.rank(adapter), 100 + 10 * round_idx + self.client_id)
        return {k: v + step[k] for k, v in adapter.items()}, SimpleNamespace(loss=1.0, tokens=1, seconds=0.0)

    def evaluate(self, adapter, split="test", *, base_update=None):
        self.bases.append(base_update)
        return {}


def test_flora_client_whose_round_failed_gets_the_modules_again_and_merges_each_once():
    setup = MethodSetup(0, 4, client_ranks=(2, 4))
    server, part = flora.Server(setup, {}, [0, 1, 2]), flora.Client(setup)
    ctx = {c: ClientContext(c, FloraBench(c)) for c in range(3)}

    def round_(server, round_idx, lost=(), dropped=()):
        """`lost`: the message never reached the client (an injected failure, a timeout); `dropped`: it
        trained (and merged) but its reply was not accepted."""
        sent = server.configure_fit(round_idx, [0, 1, 2])
        replies = {c: part.fit(msg, ctx[c]) for c, msg in sent.items() if c not in lost}
        server.aggregate_fit(round_idx, {c: r for c, r in replies.items() if c not in dropped})
        return sent

    def same(update, expected):
        return set(update) == set(expected) and all(torch.equal(update[m], expected[m]) for m in expected)

    round_(server, 0)
    round_(server, 1, lost=[1])  # client 1 never merged round 0's module
    # killed and resumed here: what is still unconfirmed comes back from the checkpoint's bytes
    server, saved = flora.Server(setup, {}, [0, 1, 2]), server
    server.load_state_dict(loads(dumps(saved.state_dict())))
    sent = round_(server, 2, dropped=[2])  # client 2 merged modules 0-1, then its reply was dropped
    assert sorted(unpack(sent[1].arrays)) == [0, 1]  # sent again with the module of round 1
    for c in range(3):  # all trained round 2 on the same base, client 1 included
        assert same(ctx[c].workbench.bases[-1], ctx[0].workbench.bases[-1]) and ctx[0].workbench.bases[-1]
    evaluation = server.configure_evaluate([0, 1, 2])
    assert sorted(unpack(evaluation[2].arrays)) == [1, 2]  # its dropped round's module 1 again, skipped: merged
    for c, msg in evaluation.items():
        part.evaluate(msg, ctx[c])
        assert same(ctx[c].workbench.bases[-1], server.stacked.merged())  # every round's module, none twice
        assert ctx[c].state["merged_count"] == 3


def test_base_delta_is_applied_and_removed_exactly(tiny_shared):
    shared, _ = tiny_shared
    name = lowrank.modules(shared.initial_adapter)[0]
    weight = shared.model.get_submodule(name).base_layer.weight
    original = weight.detach().clone()
    delta = {name: torch.full_like(original, 0.25, dtype=torch.float64)}
    shared.use_base_delta(delta)
    assert torch.allclose(weight, original + 0.25)
    shared.use_base_delta(delta)  # unchanged: not added twice
    assert torch.allclose(weight, original + 0.25)
    shared.use_base_delta(None)
    assert torch.equal(weight, original)


def test_rank_slots_train_other_ranks(tiny_shared):
    shared, wb = tiny_shared
    slot = shared.slot_for_rank(4)
    assert slot == "rank4" and lowrank.rank(shared.initial_adapter_of(slot)) == 4
    adapter, _ = wb.train(wb.initial_adapter(rank=4), 0, steps=1)  # its rank picks the slot
    assert lowrank.rank(adapter) == 4
    assert any(not torch.equal(adapter[k], v) for k, v in shared.initial_adapter_of(slot).items())
    assert shared.slot_for_rank(shared.lora.r) == "default"


# --- FedDPA --------------------------------------------------------------------------------------------

def test_feddpa_global_weight_from_similarity():
    local = np.array([[1.0, 0.0], [1.0, 0.0]])
    test = np.array([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert np.allclose(feddpa.global_weights(test, local, 0.5), [0.5, 1.0, 1.0])  # 1 - 0.5 * cos, clipped
    assert np.allclose(feddpa.global_weights(test, local, 0.2), [0.8, 1.0, 1.0])


def test_weighted_prediction_applies_each_rows_weight(tiny_shared):
    """Rows weighted [1, 0] answer exactly as adapter G alone, rows [0, 1] as L alone, in the same batch."""
    shared, wb = tiny_shared
    g = torch.Generator().manual_seed(5)
    strong = lambda: {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in shared.initial_adapter.items()}
    G, L = strong(), strong()
    _, encoded = wb.splits["test"]
    alone_g, alone_l = shared.predict(encoded, G), shared.predict(encoded, L)
    assert alone_g != alone_l  # otherwise this test could not tell the weights apart
    rows = torch.tensor([[1.0, 0.0] if i % 2 == 0 else [0.0, 1.0] for i in range(len(encoded))])
    mixed = shared.predict_weighted(encoded, [G, L], rows)
    assert mixed == [alone_g[i] if i % 2 == 0 else alone_l[i] for i in range(len(encoded))]
    half = shared.predict_weighted(encoded, [G, L], torch.full((len(encoded), 2), 0.5))
    assert half != mixed  # the output changes with lambda
    assert shared.predict(encoded, G) == alone_g  # the default slot and its adapter are untouched


def test_feddpa_lambda_differs_between_test_inputs(tiny_shared):
    shared, wb = tiny_shared
    ctx = ClientContext(0, wb)
    client = feddpa.Client(MethodSetup(0, 1))
    global_adapter = {k: v.clone() for k, v in shared.initial_adapter.items()}
    fit = client.fit(Message(global_adapter, {"round": 0}), ctx)
    assert set(fit.arrays) == set(shared.initial_adapter) and "local" in ctx.state  # G up, L kept
    report = client.evaluate(Message(fit.arrays, {"split": "general"}), ctx)
    lam = ctx.state["lambda"]["general"]
    assert len(set(np.round(lam, 6))) > 1
    assert report.config["lambda"]["min"] < report.config["lambda"]["max"]


# --- FedLEASE ------------------------------------------------------------------------------------------

def test_fedlease_warms_up_locally_then_clusters_by_b():
    start = {A: torch.zeros(1, 2), B: torch.zeros(3, 1)}
    server = fedlease.Server(MethodSetup(0, 4, {"warmup_rounds": 2, "max_clusters": 3}), start, [0, 1, 2, 3, 4])
    first = server.configure_fit(0, [0, 1])
    assert first[0].nbytes() > 0 and first[0].config["upload"] is False
    assert server.configure_fit(1, [0])[0].nbytes() == 0 and server.configure_fit(1, [0])[0].config["upload"]
    bs = [[[1.0], [0.0], [0.0]], [[0.0], [1.0], [0.1]], [[2.0], [0.1], [0.0]], [[0.0], [3.0], [0.0]], [[0.0], [0.1], [4.0]]]
    replies = {c: reply({A: torch.full((1, 2), float(c)), B: torch.tensor(b)}, 1) for c, b in enumerate(bs)}
    metrics = server.aggregate_fit(1, replies)
    assert metrics["n_clusters"] == 3
    assert server.cluster_of == {0: 0, 1: 1, 2: 0, 3: 1, 4: 2}
    assert torch.allclose(server.cluster_adapters[0][A], torch.full((1, 2), 1.0))  # mean of clients 0 and 2
    assert server.configure_fit(2, [4])[4].config == {"round": 2}


def test_fedlease_b_distance_ignores_a():
    x = {A: torch.ones(1, 2), B: torch.tensor([[1.0], [0.0]])}
    y = {A: -torch.ones(1, 2), B: torch.tensor([[2.0], [0.0]])}
    assert np.allclose(fedlease.b_distance([x, y]), 0.0)


# --- a real tiny model, shared by the tests above ----------------------------------------------------------

@pytest.fixture
def tiny_shared(tiny_model_dir):
    from fedrouter.core import synthetic
    from fedrouter.core.data import ClientData
    from fedrouter.core.model import LoraSettings, load_base
    from fedrouter.core.workbench import ClientWorkbench, SharedModel, TrainSettings

    model, tok = load_base(str(tiny_model_dir))
    shared = SharedModel(model, tok, LoraSettings(), TrainSettings(local_steps=2, batch_size=4, max_new_tokens=6))
    train = synthetic.generate_examples("headline", 12, seed="peers")
    test = synthetic.generate_examples("summarize", 4, seed="peers-test") + synthetic.generate_examples("headline", 4, seed="peers-test")
    general = synthetic.generate_examples("paraphrase", 3, seed="g") + synthetic.generate_examples("data_to_text", 3, seed="g")
    return shared, ClientWorkbench(shared, ClientData(0, ["headline"], train, test), general, seed=0)


def test_pack_unpack_round_trip():
    adapters = {0: {A: torch.ones(1, 2)}, 3: {A: torch.zeros(1, 2), B: torch.ones(2, 1)}}
    back = unpack(pack(adapters))
    assert set(back) == {0, 3} and set(back[3]) == {A, B} and torch.equal(back[3][B], torch.ones(2, 1))


def test_feddpa_training_model_is_the_inference_mix(tiny_shared):
    """The local phase's model (mix*G frozen in the base, (1-mix)*L in the slot) answers exactly as the
    per-row weighted model with weights [mix, 1 - mix] does: training and inference mean the same thing."""
    shared, wb = tiny_shared
    g = torch.Generator().manual_seed(9)
    strong = lambda: {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in shared.initial_adapter.items()}
    G, L, mix = strong(), strong(), 0.3
    _, encoded = wb.splits["test"]
    shared.use_base_delta(lowrank.dense_update(G, shared.scaling(shared.lora.r) * mix))
    as_trained = shared.predict(encoded, feddpa.scale_b(L, 1 - mix))
    shared.use_base_delta(None)
    as_served = shared.predict_weighted(encoded, [G, L], torch.tensor([[mix, 1 - mix]] * len(encoded)))
    assert as_trained == as_served
    assert as_served != shared.predict(encoded, L)  # G's share matters
