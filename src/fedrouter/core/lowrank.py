"""LoRA algebra on adapter state dicts: the dense update an adapter applies, and rank-wise stacking.

An adapter state dict holds, per adapted module `m`, "m.lora_A.weight" (r x in) and "m.lora_B.weight"
(out x r); the module's weight becomes W + scaling * B @ A with scaling = alpha / r.
"""

from __future__ import annotations

import torch

Adapter = dict[str, torch.Tensor]
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def modules(adapter: Adapter) -> list[str]:
    """The adapted modules' names, sorted; every module must have both an A and a B."""
    names = sorted(k[: -len(A_SUFFIX)] for k in adapter if k.endswith(A_SUFFIX))
    if len(names) * 2 != len(adapter) or any(m + B_SUFFIX not in adapter for m in names):
        raise ValueError("an adapter must hold exactly one lora_A and one lora_B per module")
    return names


def rank(adapter: Adapter) -> int:
    return adapter[modules(adapter)[0] + A_SUFFIX].shape[0]


def dense_update(adapter: Adapter, scaling: float) -> dict[str, torch.Tensor]:
    """{module: scaling * B @ A}: what the adapter adds to each module's weight."""
    return {m: scaling * (adapter[m + B_SUFFIX].double() @ adapter[m + A_SUFFIX].double()) for m in modules(adapter)}


def add_updates(*updates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module-wise sum of dense updates (modules missing from one update count as zero)."""
    out: dict[str, torch.Tensor] = {}
    for update in updates:
        for m, delta in update.items():
            out[m] = out[m] + delta if m in out else delta.clone()
    return out


def concat(adapters: list[Adapter], coefficients: list[float]) -> Adapter:
    """One adapter of rank sum(r_k) whose B @ A equals sum_k c_k * B_k @ A_k, for any real c_k (negative
    ones too: FedEx-LoRA's residual subtracts the averaged product). The A blocks are scaled by c_k (in
    float64, then stored in the inputs' dtype) and stacked along the rank (rows); the B blocks are
    concatenated along the rank (columns). Ranks may differ between adapters; the modules must not.
    """
    if not adapters or len(adapters) != len(coefficients):
        raise ValueError("need one coefficient per adapter, and at least one adapter")
    names = modules(adapters[0])
    if any(modules(a) != names for a in adapters[1:]):
        raise ValueError("adapters to stack adapt different modules")
    out: Adapter = {}
    for m in names:
        out[m + A_SUFFIX] = torch.cat(
            [a[m + A_SUFFIX].double() * c for a, c in zip(adapters, coefficients)], dim=0
        ).to(adapters[0][m + A_SUFFIX].dtype)
        out[m + B_SUFFIX] = torch.cat([a[m + B_SUFFIX] for a in adapters], dim=1)
    return out


def stack(adapters: list[Adapter], weights: list[float], scalings: list[float]) -> Adapter:
    """FLoRA's stacking: one adapter of rank sum(r_k) whose B @ A equals sum_k p_k * s_k * B_k @ A_k.

    p_k = weights[k] / sum(weights), s_k = scalings[k] (the client's alpha / r_k); see `concat`. The
    result keeps the inputs' dtype.
    """
    if not adapters or len(adapters) != len(weights) or len(adapters) != len(scalings):
        raise ValueError("need one weight and one scaling per adapter, and at least one adapter")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    return concat(adapters, [w / total * s for w, s in zip(weights, scalings)])
