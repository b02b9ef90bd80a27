"""FedALT's defining properties: the rest-of-the-world adapter a client gets is the mean of the others'
uploads, and it stays frozen while the individual adapter and the mixer train (the mix itself, and its
weights summing to one per token: tests/test_gated_mix.py)."""

from __future__ import annotations

import pytest
import torch

from fedrouter.core.gated_mix import even_gate
from fedrouter.errors import FedrouterError
from fedrouter.methods import fedalt, options_for
from fedrouter.methods.base import ClientContext, Message, MethodSetup

A, B = "m.lora_A.weight", "m.lora_B.weight"


# --- the server: rest of the world --------------------------------------------------------------------------

def _reply(a: float, b: float, n: int) -> Message:
    return Message({A: torch.full((1, 2), a), B: torch.full((2, 1), b)},
                   {"n_examples": n, "loss": 1.0, "tokens": 1, "train_s": 0.0})


def test_each_client_gets_the_plain_mean_of_the_others_latest_uploads():
    initial = {A: torch.ones(1, 2), B: torch.zeros(2, 1)}
    server = fedalt.Server(MethodSetup(0, 3), initial, [0, 1, 2, 3])
    first = server.configure_fit(0, [0, 1, 2])
    assert all(torch.equal(m.arrays[A], initial[A]) and torch.equal(m.arrays[B], initial[B]) for m in first.values())
    # unequal example counts: the mean is the paper's plain one all the same
    server.aggregate_fit(0, {0: _reply(1.0, 10.0, 5), 1: _reply(2.0, 20.0, 50), 2: _reply(6.0, 60.0, 500)})
    sent = server.configure_fit(1, [0, 1, 2, 3])
    for cid, (a, b) in {0: (4.0, 40.0), 1: (3.5, 35.0), 2: (1.5, 15.0), 3: (3.0, 30.0)}.items():
        assert torch.allclose(sent[cid].arrays[A], torch.full((1, 2), a)), cid
        assert torch.allclose(sent[cid].arrays[B], torch.full((2, 1), b)), cid
    # a later round replaces what a client uploaded before; the others' older uploads stay
    server.aggregate_fit(1, {1: _reply(8.0, 80.0, 50)})
    assert torch.allclose(server.configure_fit(2, [0])[0].arrays[A], torch.full((1, 2), 7.0))  # (8 + 6) / 2
    assert torch.allclose(server.configure_evaluate([2])[2].arrays[A], torch.full((1, 2), 4.5))  # (1 + 8) / 2
    again = fedalt.Server(MethodSetup(0, 3), initial, [0, 1, 2, 3])
    again.load_state_dict(server.state_dict())
    assert torch.equal(again.configure_fit(2, [0])[0].arrays[A], server.configure_fit(2, [0])[0].arrays[A])


# --- options -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["learned", 0.25])
def test_the_mixer_is_learned_or_a_fixed_weight(value):
    assert options_for("fedalt", {"mixer": value})["mixer"] == value


@pytest.mark.parametrize("value", ["fixed", 0.0, 1.0, True, 1.5])
def test_a_mixer_no_one_could_mean_is_refused_in_one_line(value):
    with pytest.raises(FedrouterError, match="^fedalt: mixer must be") as refused:
        options_for("fedalt", {"mixer": value})
    assert "\n" not in str(refused.value)



# --- the client on the tiny model ---------------------------------------------------------------------------

@pytest.fixture
def tiny_workbench(tiny_model_dir):
    from fedrouter.core import synthetic
    from fedrouter.core.data import ClientData
    from fedrouter.core.model import LoraSettings, load_base
    from fedrouter.core.workbench import ClientWorkbench, SharedModel, TrainSettings

    model, tok = load_base(str(tiny_model_dir))
    shared = SharedModel(model, tok, LoraSettings(), TrainSettings(local_steps=2, batch_size=4, max_new_tokens=6))
    train = synthetic.generate_examples("headline", 8, seed="fedalt")
    test = synthetic.generate_examples("headline", 4, seed="fedalt-test")
    general = synthetic.generate_examples("paraphrase", 2, seed="g")
    return shared, ClientWorkbench(shared, ClientData(0, ["headline"], train, test), general, seed=0)


def test_fit_trains_the_individual_adapter_and_mixer_and_leaves_the_rest_of_the_world_as_sent(tiny_workbench):
    shared, wb = tiny_workbench
    g = torch.Generator().manual_seed(5)
    row = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in shared.initial_adapter.items()}
    sent = {k: v.clone() for k, v in row.items()}
    ctx, client = ClientContext(0, wb), fedalt.Client(MethodSetup(0, 2))
    reply = client.fit(Message(row, {"round": 0}), ctx)
    assert all(torch.equal(row[k], sent[k]) and row[k].grad is None for k in row)  # frozen: as sent, no gradient
    assert set(reply.arrays) == set(shared.initial_adapter)
    assert reply.arrays is ctx.state["individual"]  # the individual adapter goes up and stays
    assert any(not torch.equal(reply.arrays[k], shared.initial_adapter[k]) for k in reply.arrays)
    assert set(ctx.state["mixer"]) == set(even_gate(row)) and any(g.abs().sum() > 0 for g in ctx.state["mixer"].values())
    # the next round goes on from the individual adapter and mixer kept, not from what the server sends
    kept, gate = dict(ctx.state["individual"]), dict(ctx.state["mixer"])
    client.fit(Message(dict(shared.initial_adapter), {"round": 1}), ctx)
    assert all(not torch.equal(ctx.state["mixer"][m], gate[m]) for m in gate)
    assert any(not torch.equal(ctx.state["individual"][k], kept[k]) for k in kept)
    # evaluation answers with the mix: the RoW sent at evaluation changes the answers
    _, encoded = wb.splits["test"]
    individual = ctx.state["individual"]
    assert shared.predict(encoded, individual, client._mixer(row, ctx)) != shared.predict(encoded, individual)
    assert client.evaluate(Message(row, {"split": "test"}), ctx).config["n"] == len(encoded)
