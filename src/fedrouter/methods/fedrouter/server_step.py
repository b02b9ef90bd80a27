"""The server's step: every client's sub-cluster summaries in, global clusters (one per task) out.

1. K-Means over all sub-cluster means gives prototypes; with n_global "auto", K by their silhouette -- a
   mean alone in its cluster scored by how far two halves of its part would lie apart, not 0 (a client
   holding one task sends it as one part) -- the largest K within one standard error of the best (a merge
   needs evidence), K = 1 against a structureless reference as on the clients.
2. Prototypes that co-occur on the same clients in the same proportions are parts of one task.
3. Then (assign "example") each client puts each example in the cluster of its nearest centre (among
   those nearest to at least MIN_SHARE of its examples) and says how many went where; empty clusters go,
   clusters that now co-occur are joined (`regroup`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2_contingency

from fedrouter.core.cluster import AUTO, choose_k, kmeans, nearest, silhouette_of_parts
from fedrouter.errors import FedrouterError
from fedrouter.methods.fedrouter import thresholds as T  # read at call time: bench/lomo.py sweeps them


@dataclass
class Clusters:
    """Prototypes, the global cluster (one adapter each) of each, and each client's sub-clusters mapped to
    global clusters (-1: dropped)."""

    prototypes: np.ndarray  # (n_prototypes, d)
    owner: np.ndarray  # (n_prototypes,) global cluster of each prototype
    sub_to_global: dict[int, np.ndarray]
    silhouette: dict[int, float] | None  # the curve K was chosen by ("auto"), else None
    merged: list[list[int]]  # groups of prototypes merged into one cluster by co-occurrence

    @property
    def n_global(self) -> int:
        return int(self.owner.max()) + 1 if len(self.owner) else 0

    def regroup(self, groups: list[list[int]]) -> tuple["Clusters", np.ndarray]:
        """(the clustering where new cluster g joins the old clusters `groups[g]`, old -> new id map); an old
        cluster in no group is dropped with its prototypes (no input may go to an adapter nobody trains)."""
        remap = np.full(self.n_global, -1, dtype=np.int64)  # (the groups are the server's own: disjoint, non-empty)
        for g, members in enumerate(groups):
            remap[members] = g
        owner = remap[self.owner]
        kept = np.flatnonzero(owner >= 0)
        merged = [m for m in (np.flatnonzero(owner[kept] == g).tolist() for g in range(len(groups))) if len(m) > 1]
        return Clusters(self.prototypes[kept], owner[kept], {c: remap[m] for c, m in self.sub_to_global.items()},
                        self.silhouette, merged), remap


def cooccurring(counts: np.ndarray) -> list[list[int]]:
    """Groups of prototypes that are parts of one task, from `counts` (prototypes x clients), in order of
    their first member: two join (transitively) when they occur on exactly the same clients, at least two
    but not all, in proportions a chi-square test of homogeneity cannot tell apart (p > COOCCURRENCE_P) --
    a task's templates and sub-topics travel with it; on every client, nothing tells."""
    counts = np.asarray(counts, dtype=np.float64)
    parent = list(range(len(counts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    present = counts > 0
    for a in range(len(counts)):
        for b in range(a + 1, len(counts)):
            holders = present[a]
            if not np.array_equal(holders, present[b]) or holders.sum() < 2 or holders.all():
                continue
            if chi2_contingency(np.stack([counts[a, holders], counts[b, holders]]))[1] > T.COOCCURRENCE_P:
                parent[root(b)] = root(a)
    groups: dict[int, list[int]] = {}
    for i in range(len(counts)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def server_step(means: dict[int, np.ndarray], sizes: dict[int, np.ndarray], spreads: dict[int, np.ndarray] | None,
                n_global, k_max: int, seed: int) -> Clusters:
    """Steps 1 and 2 above, from every client's sub-cluster `means`, `sizes` and `spreads` (None under DP
    centroids: a lone part then scores 1)."""
    clients = sorted(means)

    def stack(parts) -> np.ndarray:
        return np.concatenate([np.asarray(parts[c], dtype=np.float64) for c in clients])

    stacked, weights = stack(means), stack(sizes)
    halves = np.zeros(len(stacked)) if spreads is None else 2 * np.sqrt(stack(spreads) / np.maximum(weights, 1))
    k, curve = n_global, None
    if n_global == AUTO:
        k, curve = choose_k(stacked, range(1, k_max + 1), seed, T.NULL_MARGIN, T.NULL_MIN_POINTS,
                            score=lambda x, labels: silhouette_of_parts(x, halves, labels), keep_apart=True)
    prototypes, labels = kmeans(stacked, k, seed)
    of_client = dict(zip(clients, np.split(labels, np.cumsum([len(means[c]) for c in clients])[:-1])))
    groups = [[p] for p in range(len(prototypes))]
    if n_global == AUTO:
        groups = cooccurring(np.stack([np.bincount(of_client[c], np.asarray(sizes[c], dtype=np.float64), len(prototypes))
                                       for c in clients], axis=1))
    owner = np.empty(len(prototypes), dtype=np.int64)
    for g, members in enumerate(groups):
        owner[members] = g
    return Clusters(prototypes, owner, {c: owner[m] for c, m in of_client.items()}, curve, [m for m in groups if len(m) > 1])


def centres(clusters: Clusters, means: dict[int, np.ndarray], sizes: dict[int, np.ndarray]) -> np.ndarray:
    """(n_global, d): each global cluster's mean over the examples put in it, from the sub-cluster means
    mapped to it, weighted by their sizes: what a client assigns its examples by."""
    d = next(iter(means.values())).shape[1]
    sums, counts = np.zeros((clusters.n_global, d)), np.zeros(clusters.n_global)
    for c, m in means.items():
        w = np.asarray(sizes[c], dtype=np.float64)
        np.add.at(sums, clusters.sub_to_global[c], w[:, None] * np.asarray(m, dtype=np.float64))
        np.add.at(counts, clusters.sub_to_global[c], w)
    if (counts <= 0).any():
        raise FedrouterError(f"global cluster(s) {np.flatnonzero(counts <= 0).tolist()} hold no examples")
    return sums / counts[:, None]


def nearest_held(x, centres_) -> np.ndarray:
    """A client's step: each example to the nearest of the `centres_`, among those nearest to at least
    MIN_SHARE of its examples (the cluster nearest to most always stays)."""
    first = nearest(x, centres_)
    counts = np.bincount(first, minlength=len(centres_))
    held = np.flatnonzero(counts >= max(T.MIN_SHARE * len(first), 1))
    if len(held) == 0:
        held = np.array([int(np.argmax(counts))])
    return held[nearest(x, np.asarray(centres_)[held])]


def regroup(clusters: Clusters, held: dict[int, np.ndarray], merge: bool) -> tuple[Clusters, np.ndarray, dict]:
    """(clustering, old -> new id map, {clusters_before, emptied, joined}) after the assignment, from each
    client's count of examples per cluster (`held`): empty clusters dropped and (`merge`) clusters that now
    co-occur joined -- half-and-half parts had hidden that one task's parts sit on the same clients."""
    counts = np.stack([np.asarray(held[c], dtype=np.float64) for c in sorted(held)], axis=1)
    groups = cooccurring(counts) if merge else [[g] for g in range(len(counts))]
    new, remap = clusters.regroup([g for g in groups if counts[g].sum() > 0])
    summary = {"clusters_before": len(remap), "emptied": np.flatnonzero(remap < 0).tolist(),
               "joined": [m for m in (np.flatnonzero(remap == g).tolist() for g in range(new.n_global)) if len(m) > 1]}
    return new, remap, summary
