"""Weighted averaging of adapter state dicts -- the one FedAvg step every averaging method calls -- and the
robust alternatives; and what a client changed (`change`, `update_norm`), which both the round loop's
screening and differential privacy's clipping measure."""

from __future__ import annotations

import math

import torch

Tensors = dict[str, torch.Tensor]


def _is_change_of(t: torch.Tensor, reference: Tensors, name: str) -> bool:
    return name in reference and tuple(reference[name].shape) == tuple(t.shape)


def change(upload: Tensors, reference: Tensors) -> Tensors:
    """What a client changed: upload - reference for each tensor that went both ways (same name, same
    shape); a tensor without one counts its whole value as the change."""
    return {k: t - reference[k] if _is_change_of(t, reference, k) else t for k, t in upload.items()}


def unchange(changed: Tensors, reference: Tensors) -> Tensors:
    """The inverse of `change`: reference + change where the tensor went both ways."""
    return {k: reference[k] + t if _is_change_of(t, reference, k) else t for k, t in changed.items()}


def update_norm(upload: Tensors, reference: Tensors | None = None) -> float:
    """The L2 norm, over all tensors together and in float64, of `upload` -- or, given the `reference` it
    was made from, of what changed (as `change` counts it, the difference taken in float64)."""
    reference = reference or {}
    total = 0.0
    for name, t in upload.items():
        delta = t.double() - reference[name].double() if _is_change_of(t, reference, name) else t.double()
        total += float((delta**2).sum())
    return math.sqrt(total)


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_k w_k * state_k / sum_k w_k, key by key. All states must share keys and shapes."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError("states to average have different keys")
    out = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, w in zip(states, weights):
            if state[key].shape != acc.shape:
                raise ValueError(f"tensor {key} has different shapes across states")
            acc += state[key].to(torch.float64) * (w / total)
        out[key] = acc.to(states[0][key].dtype)
    return out


def average_per_cluster(states: dict[int, dict[str, torch.Tensor]], weights: dict[int, float],
                        cluster_of: dict[int, int], average=weighted_average) -> dict[int, dict[str, torch.Tensor]]:
    """{cluster: `average` (the weighted mean, by default) of its members' states}, clients keyed alike in
    all three dicts. Clusters with no member among `states` are absent from the result (their adapter does
    not change)."""
    members: dict[int, list[int]] = {}
    for cid in sorted(states):
        members.setdefault(cluster_of[cid], []).append(cid)
    return {k: average([states[c] for c in cids], [weights[c] for c in cids]) for k, cids in sorted(members.items())}


def _stacked(states: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    shapes = {tuple(s[key].shape) for s in states}
    if len(shapes) != 1:
        raise ValueError(f"tensor {key} has different shapes across states")
    return torch.stack([s[key].to(torch.float64) for s in states])


def coordinate_median(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (unweighted; the mean of the two middle values for an even count)."""
    if not states or any(set(s) != set(states[0]) for s in states):
        raise ValueError("need at least one state, all with the same keys")
    return {k: _stacked(states, k).quantile(0.5, dim=0).to(states[0][k].dtype) for k in states[0]}


def trimmed_mean(states: list[dict[str, torch.Tensor]], trim: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the floor(trim * n) smallest and largest values (unweighted)."""
    if not states or any(set(s) != set(states[0]) for s in states):
        raise ValueError("need at least one state, all with the same keys")
    if not 0 <= trim < 0.5:
        raise ValueError("trim must be in [0, 0.5)")
    cut = int(trim * len(states))
    out = {}
    for k in states[0]:
        values = _stacked(states, k).sort(dim=0).values
        out[k] = values[cut : len(states) - cut].mean(dim=0).to(states[0][k].dtype)
    return out
