"""The gated mix (`core.gated_mix`): a trained adapter and a frozen partner adapter, mixed per token by a
softmax gate, compute exactly the forward they state; the partner gets no gradient, the gate and the
trained adapter do; the weights sum to one per token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedrouter.core.gated_mix import GatedMix, even_gate, mix_weights
from fedrouter.core.model import adapter_parameters, get_adapter_state, set_adapter_state


class _OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.proj(x)


@pytest.fixture
def one_layer():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_OneLayer(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    own = {k: torch.randn(v.shape, generator=g) for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, own)
    partner = {k: torch.randn(v.shape, generator=g) for k, v in own.items()}
    gate = {m: torch.randn(g_.shape, generator=g) for m, g_ in even_gate(own).items()}
    return model, own, partner, gate


def _pieces(adapter):
    return adapter["base_model.model.proj.lora_A.weight"], adapter["base_model.model.proj.lora_B.weight"]


def test_the_mix_adds_each_tokens_gated_pair_of_lora_outputs_to_the_base(one_layer):
    model, own, partner, gate = one_layer
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(2))  # 3 rows of 5 tokens
    base = x @ model.base_model.model.proj.base_layer.weight.T
    (a1, b1), (a2, b2), g = _pieces(own), _pieces(partner), gate["base_model.model.proj"]
    s1, s2 = 4 / 2, 0.7
    logits = x @ g.T
    w = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)  # softmax over the two, written out
    expected = base + w[..., :1] * (x @ a1.T @ b1.T) * s1 + w[..., 1:] * (x @ a2.T @ b2.T) * s2
    with torch.no_grad(), GatedMix(partner, s2, gate=gate).attached(model):
        mixed = model(x)
    assert torch.allclose(mixed, expected, atol=1e-5)
    assert not torch.allclose(w[0, 0], w[1, 1])  # the weights really differ from token to token
    with torch.no_grad():  # detached again: the plain adapter
        assert torch.allclose(model(x), base + (x @ a1.T @ b1.T) * s1, atol=1e-5)


def test_a_fixed_weight_mixes_every_token_alike(one_layer):
    model, own, partner, _ = one_layer
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    base = x @ model.base_model.model.proj.base_layer.weight.T
    (a1, b1), (a2, b2) = _pieces(own), _pieces(partner)
    with torch.no_grad(), GatedMix(partner, 2.0, weight=0.3).attached(model):
        mixed = model(x)
    assert torch.allclose(mixed, base + 0.3 * (x @ a1.T @ b1.T) * 2.0 + 0.7 * (x @ a2.T @ b2.T) * 2.0, atol=1e-5)


def test_the_partner_gets_no_gradient_and_the_gate_and_own_adapter_do(one_layer):
    model, own, partner, gate = one_layer
    partner = {k: v.clone().requires_grad_(True) for k, v in partner.items()}  # it would take one if let
    before = {k: v.detach().clone() for k, v in partner.items()}
    mix = GatedMix(partner, 2.0, gate=gate)
    with mix.attached(model) as live_gate:
        model(torch.randn(2, 3, 4)).pow(2).sum().backward()
        assert len(live_gate) == 1 and live_gate[0].grad is not None and live_gate[0].grad.abs().sum() > 0
        with torch.no_grad():  # a step, as the optimizer would take
            live_gate[0] -= 0.1 * live_gate[0].grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_parameters(model).values())
    assert all(v.grad is None and torch.equal(v, before[k]) for k, v in partner.items())
    (name, trained), = mix.gate.items()
    assert not torch.equal(trained, gate[name])  # the trained gate is what the mix holds afterwards
    held = GatedMix(partner, 2.0, gate=gate, learn_gate=False)
    with held.attached(model) as live_gate:
        assert live_gate == []
        model(torch.randn(2, 3, 4)).sum().backward()
    assert torch.equal(held.gate[name], gate[name])


def test_mixer_weights_sum_to_one_per_token():
    x = torch.tensor([[[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], [[3.0, 1.0, -1.0], [-0.5, 2.0, 4.0]]])
    gate = torch.tensor([[0.5, -1.0, 2.0], [-0.3, 0.2, 0.1]])
    w = mix_weights(x, gate)
    assert w.shape == (2, 2, 2) and torch.allclose(w.sum(-1), torch.ones(2, 2))
    assert (w > 0).all() and not torch.allclose(w[0, 0], w[1, 1])
    assert torch.allclose(w[0, 1], torch.tensor([0.5, 0.5]))  # x = 0: no preference
    assert torch.allclose(mix_weights(x, torch.zeros(2, 3)), torch.full((2, 2, 2), 0.5))  # the even start
