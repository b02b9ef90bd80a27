"""Method parts and the round loop with hand-built messages and fake workbenches: no model needed."""

import json
import random
from dataclasses import dataclass

import pytest
import torch

from fedrouter.engines.inprocess import InProcessTransport
from fedrouter.engines.loop import RoundLoop, Traffic, sample_clients
from fedrouter.methods import METHODS, load_method
from fedrouter.methods import fedit, local
from fedrouter.methods.base import ClientContext, Message, MethodSetup
from fedrouter.methods.common import mean_fit_metrics

SETUP = MethodSetup(seed=0, rounds=1)


def _initial():
    return {"x.lora_A.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "x.lora_B.weight": torch.zeros(2, 2)}


def _reply(a_value, b_value, n, loss=1.0, tokens=10):
    return Message(
        arrays={"x.lora_A.weight": torch.full((2, 2), float(a_value)), "x.lora_B.weight": torch.tensor(b_value)},
        config={"n_examples": n, "loss": loss, "tokens": tokens, "train_s": 0.1},
    )


@dataclass
class FakeStats:
    loss: float = 0.75
    tokens: int = 123
    seconds: float = 0.5
    steps: int = 2


class FakeWorkbench:
    """Records what it was asked to train from; returns a fixed adapter."""

    def __init__(self, result, n_train=16, initial=None):
        self.result = result
        self.n_train = n_train
        self.calls = []
        self._initial = initial if initial is not None else _initial()

    def initial_adapter(self, rank=None):
        return self._initial

    def train(self, adapter, round_idx, steps=None, **capabilities):
        self.calls.append((adapter, round_idx))
        return self.result, FakeStats()

    def evaluate(self, adapter, split="test"):
        return {"adapter": adapter, "split": split}


def _assert_same_arrays(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- registry


def test_registry_loads_both_methods():
    assert {"fedit", "local"} <= set(METHODS)
    assert load_method("fedit") == (fedit.Server, fedit.Client)
    assert load_method("local") == (local.Server, local.Client)


# ---------------------------------------------------------------- FedIT


def test_fedit_aggregate_is_example_weighted_mean():
    server = fedit.Server(SETUP, _initial(), [0, 1, 2])
    replies = {
        0: _reply(1.0, [[1.0, 0.0], [0.0, 0.0]], n=1, loss=2.0, tokens=5),
        1: _reply(5.0, [[0.0, 4.0], [0.0, 0.0]], n=3, loss=1.0, tokens=7),
        2: _reply(9.0, [[0.0, 0.0], [8.0, 0.0]], n=4, loss=0.5, tokens=11),
    }
    metrics = server.aggregate_fit(0, replies)
    # weights 1/8, 3/8, 4/8: A = (1 + 15 + 36) / 8 = 6.5; B by hand entry by entry
    expected_a = torch.full((2, 2), 6.5)
    expected_b = torch.tensor([[1 / 8, 12 / 8], [32 / 8, 0.0]])
    assert torch.allclose(server.global_adapter["x.lora_A.weight"], expected_a, rtol=0, atol=1e-7)
    assert torch.allclose(server.global_adapter["x.lora_B.weight"], expected_b, rtol=0, atol=1e-7)
    assert metrics["train_loss"] == pytest.approx((2.0 * 1 + 1.0 * 3 + 0.5 * 4) / 8)
    assert metrics["tokens"] == 23
    assert metrics["clients"] == 3
    assert set(server.adapters()) == {"global"}
    _assert_same_arrays(server.adapters()["global"], server.global_adapter)


def test_fedit_configure_fit_sends_same_global_to_everyone():
    init = _initial()
    server = fedit.Server(SETUP, init, [0, 1, 2])
    msgs = server.configure_fit(0, [0, 2])
    assert set(msgs) == {0, 2}
    for m in msgs.values():
        _assert_same_arrays(m.arrays, init)
        assert m.config["round"] == 0
    assert msgs[0].arrays is not msgs[2].arrays  # each client gets its own dict
    # after aggregation, the next round sends the new global adapter
    server.aggregate_fit(0, {0: _reply(2.0, [[1.0, 1.0], [1.0, 1.0]], n=2), 2: _reply(4.0, [[3.0, 3.0], [3.0, 3.0]], n=2)})
    msgs = server.configure_fit(1, [0, 1, 2])
    for m in msgs.values():
        _assert_same_arrays(m.arrays, {"x.lora_A.weight": torch.full((2, 2), 3.0), "x.lora_B.weight": torch.full((2, 2), 2.0)})
        assert m.config["round"] == 1
    for m in server.configure_evaluate([0, 1]).values():
        _assert_same_arrays(m.arrays, server.global_adapter)


def test_fedit_client_trains_from_message_and_uploads():
    trained = {"x.lora_A.weight": torch.ones(2, 2), "x.lora_B.weight": torch.full((2, 2), 0.5)}
    wb = FakeWorkbench(trained, n_train=16)
    client = fedit.Client(SETUP)
    msg = Message(_initial(), {"round": 3})
    reply = client.fit(msg, ClientContext(0, wb))
    assert len(wb.calls) == 1
    assert wb.calls[0][0] is msg.arrays and wb.calls[0][1] == 3
    _assert_same_arrays(reply.arrays, trained)
    assert reply.config == {"n_examples": 16, "loss": 0.75, "tokens": 123, "train_s": 0.5}
    assert reply.nbytes() == 2 * 4 * 4


# ---------------------------------------------------------------- Local


def test_local_server_sends_initial_only_on_first_round():
    init = _initial()
    server = local.Server(SETUP, init, [0, 1, 2])
    r0 = server.configure_fit(0, [0, 1])
    for cid in (0, 1):
        _assert_same_arrays(r0[cid].arrays, init)
        assert r0[cid].config["round"] == 0
    r1 = server.configure_fit(1, [0, 1, 2])
    assert r1[0].arrays == {} and r1[1].arrays == {}
    _assert_same_arrays(r1[2].arrays, init)  # client 2's first round
    assert all(m.config["round"] == 1 for m in r1.values())
    r2 = server.configure_fit(2, [0, 1, 2])
    assert all(m.arrays == {} and m.nbytes() == 0 for m in r2.values())
    assert server.adapters() == {}


def test_local_client_never_uploads_and_keeps_its_adapter():
    trained = {"x.lora_A.weight": torch.full((2, 2), 7.0), "x.lora_B.weight": torch.full((2, 2), -1.0)}
    wb = FakeWorkbench(trained, n_train=9)
    client = local.Client(SETUP)
    ctx = ClientContext(0, wb)
    init_msg = Message(_initial(), {"round": 0})
    reply = client.fit(init_msg, ctx)
    assert reply.arrays == {} and reply.nbytes() == 0
    assert reply.config == {"n_examples": 9, "loss": 0.75, "tokens": 123, "train_s": 0.5}
    assert wb.calls[0][0] is init_msg.arrays
    assert ctx.state["adapter"] is trained

    reply = client.fit(Message({}, {"round": 1}), ctx)  # later rounds: train from its own adapter
    assert reply.arrays == {}
    assert wb.calls[1][0] is trained and wb.calls[1][1] == 1
    assert client.adapters(ctx) == {"local": trained}
    assert client.eval_adapter(Message(), ctx) is trained
    report = client.evaluate(Message(config={"split": "general"}), ctx)
    assert report.config["adapter"] is trained and report.config["split"] == "general"
    # the untrained base is evaluated by the engine, with no adapter at all
    base = InProcessTransport(client, {0: ctx}, progress=False).evaluate({0: Message(config={"base": True})})
    assert base[0].config["adapter"] is None


def test_local_client_never_trained_evaluates_initial_adapter():
    init = _initial()
    wb = FakeWorkbench({}, initial=init)
    client = local.Client(SETUP)
    ctx = ClientContext(5, wb)
    assert client.eval_adapter(Message(), ctx) is init
    assert client.adapters(ctx) == {}


def test_mean_fit_metrics():
    replies = {0: _reply(0, [[0.0] * 2] * 2, n=2, loss=3.0, tokens=4), 1: _reply(0, [[0.0] * 2] * 2, n=6, loss=1.0, tokens=6)}
    assert mean_fit_metrics(replies) == {"train_loss": pytest.approx(1.5), "tokens": 10, "clients": 2}


# ---------------------------------------------------------------- engines/loop.py


def test_sample_clients_all_when_fraction_one():
    ids = [3, 1, 2]
    assert sample_clients(ids, 1.0, random.Random(0)) == [3, 1, 2]


@pytest.mark.parametrize("n,fraction,k", [(10, 0.3, 3), (8, 0.5, 4), (10, 0.01, 1), (5, 0.8, 4), (4, 0.9, 4)])
def test_sample_clients_sizes(n, fraction, k):
    ids = list(range(100, 100 + n))
    chosen = sample_clients(ids, fraction, random.Random(1))
    assert len(chosen) == k
    assert len(set(chosen)) == k
    assert set(chosen) <= set(ids)
    assert chosen == sorted(chosen)


def test_sample_clients_seeded():
    ids = list(range(20))
    rng_a, rng_b, rng_c = random.Random("s"), random.Random("s"), random.Random("t")
    a = [sample_clients(ids, 0.25, rng_a) for _ in range(5)]
    b = [sample_clients(ids, 0.25, rng_b) for _ in range(5)]
    c = [sample_clients(ids, 0.25, rng_c) for _ in range(5)]
    assert a == b
    assert a != c
    assert len({tuple(x) for x in a}) > 1  # rounds draw different subsets


def test_message_nbytes_counts_float32():
    m = Message({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float64), "c": torch.zeros(0)})
    assert m.nbytes() == (12 + 5 + 0) * 4
    assert Message().nbytes() == 0


def test_traffic_counts_both_directions_cumulatively():
    t = Traffic()
    sent = {0: Message({"a": torch.zeros(2, 3)}), 1: Message({"a": torch.zeros(2, 3), "b": torch.zeros(1)})}
    received = {0: Message({"a": torch.zeros(5)}), 1: Message()}
    t.count(sent, received)
    assert t.down == (6 + 7) * 4
    assert t.up == 5 * 4
    t.count({0: Message({"z": torch.zeros(10)})}, {})
    assert t.down == (6 + 7 + 10) * 4
    assert t.up == 20
    # per client too, and through a checkpoint's JSON and back
    assert t.by_client == {"down": {"0": (6 + 10) * 4, "1": 7 * 4}, "up": {"0": 20, "1": 0}}
    again = Traffic()
    again.restore(json.loads(json.dumps(t.state())))
    assert (again.down, again.up, again.by_client) == (t.down, t.up, t.by_client)


class EchoClient:
    """A client part that uploads the adapter it was sent, plus one, weighted by its id + 1."""

    def fit(self, msg, ctx):
        return Message({k: v + 1 for k, v in msg.arrays.items()},
                       {"n_examples": ctx.client_id + 1, "loss": float(ctx.client_id), "tokens": 1, "train_s": 0.0})

    def evaluate(self, msg, ctx):
        return Message(config={"split": msg.config["split"], "base": msg.config["base"], "n_arrays": len(msg.arrays)})


class BaseOnlyWorkbench:
    """The engine evaluates the untrained base itself: what its workbench reports for adapter None."""

    def evaluate(self, adapter, split="test"):
        return {"split": split, "base": adapter is None, "n_arrays": 0}


def test_run_rounds_with_fedit_counts_traffic_and_records_rounds():
    init = {"w": torch.zeros(2, 2)}
    server = fedit.Server(MethodSetup(seed=0, rounds=3), init, [0, 1])
    contexts = {cid: ClientContext(cid, workbench=BaseOnlyWorkbench()) for cid in (0, 1)}
    transport = InProcessTransport(EchoClient(), contexts, progress=False)
    loop = RoundLoop(server, transport, [0, 1], rounds=3, client_fraction=1.0, seed=0, progress=False)
    traffic = loop.traffic
    seen = []
    history = loop.run(on_round=seen.append)
    assert [h["round"] for h in history] == [1, 2, 3]
    assert seen == history
    # each round every client gets 4 floats down and sends 4 floats up
    assert [h["bytes_down"] for h in history] == [32, 64, 96]
    assert [h["bytes_up"] for h in history] == [32, 64, 96]
    assert traffic.down == 96 and traffic.up == 96
    # each round adds one to every entry (all clients echo global + 1)
    assert torch.equal(server.global_adapter["w"], torch.full((2, 2), 3.0))
    # loss weighted by n_examples (1 and 2): (0 * 1 + 1 * 2) / 3
    assert history[0]["train_loss"] == pytest.approx(2 / 3)

    reports = loop.evaluate("general")
    assert reports == {0: {"split": "general", "base": False, "n_arrays": 1}, 1: {"split": "general", "base": False, "n_arrays": 1}}
    assert traffic.down == 96 + 32
    base = loop.evaluate("test", base=True)
    assert base[0] == {"split": "test", "base": True, "n_arrays": 0}  # the base needs no adapter


def test_run_rounds_client_fraction_selects_subsets():
    server = fedit.Server(MethodSetup(seed=0, rounds=4), {"w": torch.zeros(1)}, list(range(6)))
    contexts = {cid: ClientContext(cid, workbench=None) for cid in range(6)}
    transport = InProcessTransport(EchoClient(), contexts, progress=False)
    history = RoundLoop(server, transport, list(range(6)), rounds=4, client_fraction=0.5, seed=3, progress=False).run()
    assert all(h["clients"] == 3 for h in history)
    assert history[-1]["bytes_up"] == 4 * 3 * 4
