"""What methods declare about themselves (`MethodFacts`) and what reads it: the config's refusals, the
plan, and differential privacy's wrapper around a method's server part."""

from __future__ import annotations

import pytest
import torch

from fedrouter.config import load_config
from fedrouter.errors import FedrouterError
from fedrouter.methods import METHODS, facts_of, options_for
from fedrouter.methods import fedit
from fedrouter.methods.base import Message, MethodSetup, ServerPart
from fedrouter.methods.facts import MethodFacts
from fedrouter.methods.privacy import CentralPrivacy, LocalPrivacy, private_parts
from fedrouter.plan import adapters_kept

W = "x.lora_A.weight"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_its_facts_and_what_it_keeps(name):
    facts = facts_of(name)
    kept = facts.adapters_kept(options_for(name, {}), 8)
    assert kept and "{" not in kept and "?" not in kept
    assert adapters_kept(load_config(None, {"method": name})) == kept


def test_a_server_part_without_facts_is_named():
    class Nameless(ServerPart):
        pass

    assert getattr(Nameless, "FACTS", None) is None  # the base class declares the attribute, not a value


def test_the_config_reads_what_methods_declare():
    private = [name for name in METHODS if facts_of(name).folds_by_mean and not facts_of(name).private_refusal]
    assert "fedit" in private and "flora" not in private and "ifca" not in private
    with pytest.raises(FedrouterError, match=f"use one of {', '.join(private)}$"):
        load_config(None, {"method": "flora", "privacy": {"mode": "central"}})
    writes = sorted(name for name in METHODS if facts_of(name).writes_base_weights)
    assert writes == ["feddpa", "fedex", "flexlora", "flora", "hetlora"]
    for name in writes:
        with pytest.raises(FedrouterError, match="weights cannot hold"):
            load_config(None, {"method": name, "quantization": "8bit"})


def test_templates_and_functions_both_say_what_is_kept():
    assert MethodFacts(adapters="up to {k} of {n_clients}").adapters_kept({"k": 3}, 8) == "up to 3 of 8"
    assert MethodFacts(adapters=lambda options, n: f"{n * 2}").adapters_kept({}, 4) == "8"


def _server(cls=fedit.Server, clip=1.0, noise=0.0):
    inner = cls(MethodSetup(0, 2, dict(fedit.OPTIONS)), {W: torch.zeros(2)}, [0, 1, 2])
    return CentralPrivacy(inner, clip, noise, seed=0)


def test_central_dp_clips_each_change_and_takes_the_plain_mean():
    server = _server(clip=1.0)
    sent = server.configure_fit(0, [0, 1])
    assert set(sent) == {0, 1}
    replies = {0: Message({W: torch.tensor([3.0, 4.0])}, {"n_examples": 100, "loss": 1.0, "tokens": 1, "train_s": 0.0}),
               1: Message({W: torch.tensor([0.3, 0.4])}, {"n_examples": 1, "loss": 1.0, "tokens": 1, "train_s": 0.0})}
    metrics = server.aggregate_fit(0, replies)
    assert metrics["clipped_updates"] == 1  # the first change (norm 5) was over the clip, the second not
    # (0.6, 0.8) and (0.3, 0.4) averaged without their example weights
    assert torch.allclose(server.global_adapter[W], torch.tensor([0.45, 0.6]))
    state = server.state_dict()
    assert "dp_average" in state and "global_adapter" in state
    again = _server(clip=1.0)
    again.load_state_dict(state)
    assert torch.equal(again.global_adapter[W], server.global_adapter[W])


def test_central_dp_stops_a_method_that_folds_uploads_around_its_mean():
    from fedrouter.core.aggregate import weighted_average

    class Careless(fedit.Server):
        def aggregate_fit(self, round_idx, replies):  # the example-weighted mean, not self.average
            self.global_adapter = weighted_average([r.arrays for r in replies.values()],
                                                   [r.config["n_examples"] for r in replies.values()])
            return {}

    server = _server(Careless)
    server.configure_fit(0, [0])
    with pytest.raises(FedrouterError, match="aggregated without ServerPart.average"):
        server.aggregate_fit(0, {0: Message({W: torch.ones(2)}, {"n_examples": 1})})


def test_each_dp_mode_wraps_its_own_part_only():
    privacy = load_config(None, {"method": "fedit", "privacy": {"mode": "local"}}).privacy
    server, client = private_parts(object(), fedit.Client(MethodSetup(0, 1)), privacy, seed=0)
    assert not isinstance(server, CentralPrivacy) and isinstance(client, LocalPrivacy)
    privacy = load_config(None, {"method": "fedit", "privacy": {"mode": "central"}}).privacy
    server, client = private_parts(_server().inner, fedit.Client(MethodSetup(0, 1)), privacy, seed=0)
    assert isinstance(server, CentralPrivacy) and isinstance(client, fedit.Client)
