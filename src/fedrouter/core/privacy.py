"""Differential privacy for federated updates and for data summaries. Knows nothing of federation rounds
beyond what it is told.

- `clip`: an update (a dict of tensors: what a client changed) scaled to L2 norm at most `clip`,
  jointly over all its tensors.
- `DPAverage`: the DP-FedAvg aggregate of McMahan et al. (2018), fixed clipping: the plain mean of the
  (clipped) uploads, plus Gaussian noise of std `noise_multiplier * clip / n` on every coordinate, from a
  seeded generator whose state a checkpoint keeps.
- `noisy_centroids`: a client's per-cluster means released through the Gaussian mechanism: every
  embedding clipped to norm `clip`, per-cluster sums noised with std `noise_multiplier * clip`, counts with
  std `noise_multiplier` (one example moves one sum by at most `clip` and one count by 1).
- `Accountant`: the privacy spent, by Google's `dp_accounting` (an RDP accountant), never a hand-written
  formula: a Gaussian mechanism per round, amplified by sampling a fixed number of clients out of all
  when not every client takes part, composed over rounds; plus the centroid release, once. Neighbouring
  datasets differ by replacing one client (one example, for the centroids): replacing a clipped update
  moves the sum by at most 2 * clip, so noise of std z * clip is a Gaussian mechanism of multiplier z / 2;
  replacing an example moves two sums by at most clip each and two counts by 1 (sensitivity 2 after
  scaling sums by 1 / clip), so the centroid release has multiplier z_c / 2.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from fedrouter.core.aggregate import Tensors, change, unchange, update_norm


def clip(update: Tensors, bound: float) -> Tensors:
    """`update` scaled by min(1, bound / ||update||): its L2 norm, over all tensors together, is <= bound
    (never above it: if rounding to the tensors' dtype lands a hair over, the factor shrinks by ulps)."""
    norm = update_norm(update)
    if norm <= bound or norm == 0:
        return dict(update)
    factor = bound / norm
    for _ in range(16):
        clipped = {k: (t.double() * factor).to(t.dtype) for k, t in update.items()}
        if update_norm(clipped) <= bound:
            break
        factor *= 1 - 2**-22
    return clipped


def clip_upload(upload: Tensors, reference: Tensors, bound: float) -> Tensors:
    """The upload with its change from `reference` (what the client was sent) clipped to `bound`; tensors
    without a reference count their whole value as the change."""
    return unchange(clip(change(upload, reference), bound), reference)


def gaussian_like(tensors: Tensors, std: float, generator: torch.Generator) -> Tensors:
    """Independent N(0, std^2) per coordinate, shaped like `tensors` (keys in sorted order: deterministic)."""
    return {k: torch.randn(tensors[k].shape, generator=generator, dtype=torch.float64).to(tensors[k].dtype) * std
            for k in sorted(tensors)}


def privatize_upload(upload: Tensors, reference: Tensors, bound: float, noise_multiplier: float,
                     generator: torch.Generator) -> Tensors:
    """Local DP: the upload with its change clipped to `bound` and N(0, (noise_multiplier * bound)^2) added
    to every coordinate, before it leaves the client."""
    clipped = clip_upload(upload, reference, bound)
    noise = gaussian_like(clipped, noise_multiplier * bound, generator)
    return {k: clipped[k] + noise[k] for k in upload}


def client_generator(seed: int, client_id: int, round_idx: int) -> torch.Generator:
    """The noise generator of one client's upload in one round: the same draws on every engine and after
    a resume, with no state to keep."""
    return torch.Generator().manual_seed(seed * 1_000_003 + client_id * 10_007 + round_idx * 101 + 7)


class DPAverage:
    """The mean of n uploads plus N(0, (noise_multiplier * clip / n)^2) per coordinate. The uploads must
    already be clipped (each client's change has norm <= clip), so one client moves the mean by at most
    clip / n: the Gaussian mechanism at that sensitivity. Example weights are not used: with them one
    client's influence would be unbounded."""

    def __init__(self, clip_norm: float, noise_multiplier: float, seed: int):
        self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
        self.generator = torch.Generator().manual_seed(seed * 7_919 + 17)

    def __call__(self, states: list[Tensors], weights=None) -> Tensors:
        n = len(states)
        mean = {k: sum(s[k].double() for s in states) / n for k in states[0]}
        noise = gaussian_like(mean, self.noise_multiplier * self.clip_norm / n, self.generator)
        return {k: (mean[k] + noise[k].double()).to(states[0][k].dtype) for k in states[0]}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def noisy_centroids(x: np.ndarray, labels: np.ndarray, k: int, clip_norm: float, noise_multiplier: float,
                    generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(k, d) centroids from noisy per-cluster sums and counts of clipped embeddings, and those counts as
    whole numbers (a count that the noise pushes below 1 counts as 1): the sizes to release with them,
    never the exact ones."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    clipped = x * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
    sums = np.stack([clipped[labels == j].sum(axis=0) for j in range(k)])
    counts = np.array([(labels == j).sum() for j in range(k)], dtype=np.float64)
    sums += generator.normal(0.0, noise_multiplier * clip_norm, size=sums.shape)
    counts = np.maximum(counts + generator.normal(0.0, noise_multiplier, size=counts.shape), 1.0)
    return sums / counts[:, None], np.rint(counts).astype(np.int64)


class Accountant:
    """ε for the configured δ after r rounds of the Gaussian mechanism (noise std z * clip on the sum,
    sensitivity 2 * clip under replace-one), each round sampling `sampled` of `population` clients without
    replacement (no amplification when all take part), and, if given, one centroid release at noise
    multiplier `centroid_z` (see the module docstring)."""

    def __init__(self, noise_multiplier: float, delta: float, population: int, sampled: int,
                 centroid_noise_multiplier: float | None = None):
        self.z, self.delta, self.population, self.sampled = noise_multiplier, delta, population, sampled
        self.centroid_z = centroid_noise_multiplier
        logging.getLogger("absl").setLevel(logging.ERROR)  # the accountant's per-order convergence notes

    def epsilon(self, rounds: int) -> float:
        import dp_accounting  # start-up cost: dp_accounting (0.8 s), under DP only
        from dp_accounting import rdp

        if self.z <= 0 and rounds > 0:
            return math.inf
        accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        gaussian = dp_accounting.GaussianDpEvent(self.z / 2)
        event = gaussian if self.sampled >= self.population else dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.sampled, gaussian)
        if rounds:
            accountant.compose(event, rounds)
        if self.centroid_z is not None:
            if self.centroid_z <= 0:
                return math.inf
            accountant.compose(dp_accounting.GaussianDpEvent(self.centroid_z / 2))
        return float(accountant.get_epsilon(self.delta))
