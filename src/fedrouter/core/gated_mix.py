"""A trained LoRA adapter and a frozen partner adapter mixed token by token by a learned softmax gate.

In every LoRA layer m of the model, with x the layer's input at one token:

    y = base(x) + w_1 * s_1 * B_1 A_1 drop(x) + w_2 * s_2 * B_2 A_2 x,      (w_1, w_2) = softmax(G_m x)

Adapter 1 is the one in the layer's peft slot (trained as usual, with its dropout); adapter 2, the
partner, is a constant that no gradient reaches; G_m (2 x in_features, no bias) is the layer's gate,
trained together with adapter 1 or held. With a fixed `weight` in place of a gate, (w_1, w_2) =
(weight, 1 - weight) at every token. It is a mixture of two LoRA experts whose gate reads each token.

`GatedMix.attached(model, slot)` puts the mix on a peft model for a block (training or generation) with
hooks, leaving peft's forward as it is: a pre-hook on the layer computes the weights from x, a hook on
the slot's lora_B scales adapter 1's output by w_1 (peft's scaling comes after and commutes), and a hook
on the layer adds the partner's term. The partner draws no dropout mask, so training with it draws the
random numbers training adapter 1 alone would (dropout regularises what is trained; the partner is not).
Every row and token is weighted by its own x, so generation with a KV cache means the same model as
training: a cached key was computed with its own token's weights.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fedrouter.core import lowrank

Adapter = dict[str, torch.Tensor]


def even_gate(adapter: Adapter) -> dict[str, torch.Tensor]:
    """A gate for every module `adapter` adapts that mixes evenly (all weights zero: w_1 = w_2 = 1/2 at
    every token), so a first round starts from neither adapter's side and draws nothing at random."""
    return {m: torch.zeros(2, adapter[m + lowrank.A_SUFFIX].shape[1]) for m in lowrank.modules(adapter)}


def mix_weights(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(..., 2): softmax(gate @ x) at every token of x (..., in_features), in float32."""
    return torch.softmax(F.linear(x.float(), gate.float()), dim=-1)


class GatedMix:
    """The partner adapter, its LoRA scaling, and either a gate (module -> (2, in_features)) or a fixed
    weight of the trained adapter; `learn_gate` trains the gate with the adapter while attached."""

    def __init__(self, partner: Adapter, partner_scaling: float, gate: dict[str, torch.Tensor] | None = None,
                 weight: float | None = None, learn_gate: bool = True):
        if (gate is None) == (weight is None):
            raise ValueError("a gated mix takes a gate or a fixed weight, exactly one of them")
        if weight is not None and not 0.0 <= weight <= 1.0:
            raise ValueError(f"the trained adapter's fixed weight must be in [0, 1], got {weight}")
        if gate is not None and set(gate) != set(lowrank.modules(partner)):
            raise ValueError("the gate must have one matrix per module the partner adapts")
        self.partner, self.partner_scaling = partner, float(partner_scaling)
        self.gate = None if gate is None else {m: g.detach().float().clone() for m, g in gate.items()}
        self.weight = weight
        self.learn_gate = learn_gate and gate is not None

    def state(self) -> dict[str, torch.Tensor]:
        """What identifies the mix beside adapter 1 (for memoising answers): partner, gate, weight."""
        fixed = torch.tensor([-1.0 if self.weight is None else self.weight, self.partner_scaling])
        return {**{f"partner.{k}": v for k, v in self.partner.items()},
                **{f"gate.{k}": v for k, v in (self.gate or {}).items()}, "fixed": fixed}

    @contextlib.contextmanager
    def attached(self, model, slot: str = "default"):
        """Within the block, `model` (peft, adapter 1 in `slot`) computes the mix in every layer the partner
        adapts. Yields the gate's live tensors to optimise (none when the gate is held or fixed); when they
        are trained, `self.gate` holds their values once the block ends."""
        device = next(model.parameters()).device
        live = {m: g.to(device).clone().requires_grad_(self.learn_gate) for m, g in (self.gate or {}).items()}
        fixed = None if self.weight is None else torch.tensor([self.weight, 1.0 - self.weight], device=device)
        handles = []
        try:
            for m in lowrank.modules(self.partner):
                layer = model.get_submodule(m)
                if slot not in layer.lora_B:
                    raise ValueError(f"{m} has no LoRA slot {slot!r}")
                # detached: the partner stays a constant even when handed tensors that track gradients
                a2 = self.partner[m + lowrank.A_SUFFIX].detach().to(device)
                b2 = self.partner[m + lowrank.B_SUFFIX].detach().to(device)
                hooks = _layer_hooks(live.get(m), fixed, a2, b2, self.partner_scaling)
                handles += [layer.register_forward_pre_hook(hooks[0]), layer.lora_B[slot].register_forward_hook(hooks[1]),
                            layer.register_forward_hook(hooks[2])]
            yield list(live.values()) if self.learn_gate else []
        finally:
            for handle in handles:
                handle.remove()
        if self.learn_gate:
            self.gate = {m: g.detach().cpu().clone() for m, g in live.items()}


def _layer_hooks(gate, fixed, a2, b2, s2):
    current: dict[str, torch.Tensor] = {}  # this layer's weights for the forward under way

    def weigh(module, args):
        current["w"] = fixed if gate is None else mix_weights(args[0], gate)

    def scale_own(module, args, output):
        return output * current["w"][..., :1].to(output.dtype)

    def add_partner(module, args, output):
        x = args[0].to(a2.dtype)
        partner = F.linear(F.linear(x, a2), b2) * s2
        return (output + current["w"][..., 1:] * partner).to(output.dtype)

    return weigh, scale_own, add_partner
