"""Which task features FedRouter should cluster: the measurements behind the defaults (issue 16, item 2).

For each data set and scenario (seed 0, 8 clients, the data split of `fedrouter clusters`), every variant
below is clustered by FedRouter's own pipeline (`local_then_global`: K-Means per client with K by
silhouette against a null reference, K = 1 allowed; the server's prototypes merged by co-occurrence), and
the global K and global clustering accuracy are printed (true K: synthetic 4, synthetic-hard 6, flan8 8):

  minilm           all-MiniLM-L6-v2 on the instruction, mean pooling, L2 (the default)
  minilm-prompt    the same on the full prompt (the config's prompt template around the instruction)
  minilm-centred   each client's vectors minus the client's mean (removes a client's own offset)
  minilm-whitened  the local K-Means on the client's PCA-whitened vectors (30 components, 1/sigma); the
                   sub-centroids the server sees are means of the unwhitened vectors
  minilm+ngrams    MiniLM beside a surface view: word 1-3-grams hashed to 1,024, kept where >= 3 % of the
                   client's instructions hold them, L2, weight 0.5 (a template-sensitive second view)
  base-last-mean   the tiny base model's last hidden layer, mean over tokens (the "base" embedder)
  base-last-token  its last hidden layer at the last token (what a causal LM reads next from)
  base-mid-mean    its middle hidden layer, mean over tokens

With --diagnose, instead: whether the default features hold the tasks at all, and which clusterer finds
them. Per setting, on the MiniLM instruction vectors of all clients: 3-fold cross-validated logistic
regression on the true tasks, nearest true-task mean, the share of each example's 10 nearest neighbours
of its task; then, on client 0 with the true K given, the clustering accuracy of K-Means, spectral
clustering (10-NN graph), a diagonal Gaussian mixture and Ward linkage (scikit-learn).

With --answer-effects, instead: whether answers can tell a format-sharing pair from one task's own parts.
Per setting and seed, each client splits its data as FedRouter does by default (instructions, auto K);
each sub-cluster is cut into --parts instruction parts by K-Means on the surface view (`template_view`, the
words of its templates); then, between two parts of at least MIN_PART examples that are each >= PURE one
task, the answer effect (`answer_effect`: the squared distance of their mean MiniLM answer embeddings over
the within-part spread, less the sampling term, so alike parts score about 0). Printed: per task the
largest effect between two of its own parts, and per pair of tasks the smallest effect between a part of
each. A threshold on this effect can split the pairs and keep every task whole only if the pairs'
smallest effects lie above every task's largest, in every setting.

Usage: FEDROUTER_CACHE=/tmp/frcache python bench/task_features.py [--groups synthetic,hard,flan8]
       [--variants minilm,base-last-mean,...] [--diagnose]          (MiniLM embeddings are cached)
       FEDROUTER_CACHE=/tmp/frcache python bench/task_features.py --answer-effects [--seeds 0,1,2] [--parts 8]
Results go to docs/benchmark.md ("Task discovery without labels").
"""

import argparse
import itertools
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from fedrouter.config import load_config
from fedrouter.core import cluster
from fedrouter.runtime import quiet_libraries

torch.set_num_threads(2)
FLAN8 = Path(__file__).resolve().parents[1].parent / "shared/data/flan8"
SETTINGS = {
    "synthetic": [("synthetic", "single"), ("synthetic", "all")],
    "hard": [("synthetic-hard", "single"), ("synthetic-hard", "all")],
    "flan8": [(str(FLAN8), "all")],
}
VARIANTS = ["minilm", "minilm-prompt", "minilm-centred", "minilm-whitened", "minilm+ngrams",
            "base-last-mean", "base-last-token", "base-mid-mean"]


def whitened(x: np.ndarray, components: int = 30) -> np.ndarray:
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    m = min(components, len(s))
    return (centred @ vt[:m].T) / np.maximum(s[:m] / np.sqrt(max(1, len(x) - 1)), 1e-12)


def with_ngrams(texts: list[str], x: np.ndarray, weight: float = 0.5, min_share: float = 0.03) -> np.ndarray:
    return np.hstack([x, weight * cluster.template_view(texts, min_share)])


class TinyBase:
    """The tiny base's hidden states, read per layer and pooling (not cached: the model is small)."""

    def __init__(self, cfg):
        from fedrouter.core.model import load_base

        self.model, self.tokenizer = load_base(cfg.model, Path(cfg.cache_dir) if cfg.cache_dir else None, progress=False)

    @torch.no_grad()
    def __call__(self, texts: list[str], layer: int, pooling: str) -> np.ndarray:
        out = []
        for start in range(0, len(texts), 64):
            batch = self.tokenizer(texts[start : start + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = self.model(**batch, output_hidden_states=True).hidden_states[layer]
            mask = batch["attention_mask"]
            if pooling == "mean":
                pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            else:  # the last real token (padding is on the right)
                pooled = hidden[torch.arange(len(hidden)), mask.sum(1) - 1]
            out.append(pooled.float().numpy())
        return np.concatenate(out)


def features(variant: str, clients, embed, base, template: str) -> tuple[dict, dict | None]:
    """{client: vectors the server's sub-centroids are means of}, and {client: vectors the local K-Means
    runs on} where that differs (whitening)."""
    texts = {c.client_id: [e["instruction"] for e in c.train] for c in clients}
    if variant.startswith("base-"):
        layers = base.model.config.num_hidden_layers
        layer, pooling = {"base-last-mean": (layers, "mean"), "base-last-token": (layers, "token"),
                          "base-mid-mean": (max(1, layers // 2), "mean")}[variant]
        return {c: base(t, layer, pooling) for c, t in texts.items()}, None
    if variant == "minilm-prompt":
        return {c: embed([template.format(instruction=s) for s in t]) for c, t in texts.items()}, None
    x = {c: np.asarray(embed(t), dtype=np.float64) for c, t in texts.items()}
    if variant == "minilm-centred":
        return {c: v - v.mean(axis=0) for c, v in x.items()}, None
    if variant == "minilm-whitened":
        return x, {c: whitened(v) for c, v in x.items()}
    if variant == "minilm+ngrams":
        return {c: with_ngrams(texts[c], v) for c, v in x.items()}, None
    return x, None


def cluster_all(x: dict, local_view: dict | None, seed: int) -> tuple[int, dict]:
    """FedRouter's pipeline (as `local_then_global`), with the local K-Means on `local_view` when given."""
    if local_view is None:
        result = cluster.local_then_global(x, "auto", "auto", seed)
        return result.n_global, {c: result.global_labels(c) for c in x}
    centroids, labels = {}, {}
    for c in sorted(x):
        _, labels[c], _ = cluster.cluster_local(local_view[c], "auto", seed)
        centroids[c] = cluster.label_means(x[c], labels[c], labels[c].max() + 1)
    sizes = {c: np.bincount(labels[c]) for c in x}
    step = cluster.server_step(centroids, "auto", seed, range(1, 13), sizes)
    return step.n_global, {c: step.sub_to_global[c][labels[c]] for c in x}


def diagnose(label: str, x: dict, tasks: dict, seed: int) -> None:
    """The --diagnose lines for one setting (see the module docstring)."""
    from sklearn.cluster import AgglomerativeClustering, SpectralClustering
    from sklearn.linear_model import LogisticRegression
    from sklearn.mixture import GaussianMixture
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import NearestNeighbors

    points, truth = np.concatenate([x[c] for c in sorted(x)]), np.concatenate([tasks[c] for c in sorted(x)])
    names = sorted(set(truth))
    means = np.stack([points[truth == t].mean(axis=0) for t in names])
    nearest_mean = (np.asarray(names)[cluster.nearest(points, means)] == truth).mean()
    linear = cross_val_score(LogisticRegression(max_iter=2000), points, truth, cv=3).mean()
    _, neighbours = NearestNeighbors(n_neighbors=11).fit(points).kneighbors(points)
    purity = (truth[neighbours[:, 1:]] == truth[:, None]).mean()
    print(f"{label}  tasks in the features: logistic regression {linear:.3f}, nearest task mean {nearest_mean:.3f}, "
          f"10-NN purity {purity:.3f}", flush=True)
    first = min(x)
    own, own_tasks = x[first], tasks[first]
    k = len(set(own_tasks))
    with warnings.catch_warnings():  # a 10-NN graph of well-separated tasks is not connected: expected here
        warnings.simplefilter("ignore", UserWarning)
        found = {
            "K-Means": cluster.kmeans(own, k, seed)[1],
            "spectral": SpectralClustering(k, affinity="nearest_neighbors", n_neighbors=10, random_state=seed).fit_predict(own),
            "Gaussian mixture": GaussianMixture(k, covariance_type="diag", random_state=seed).fit_predict(own),
            "Ward": AgglomerativeClustering(k).fit_predict(own),
        }
    print(f"{label}  client {first}, true K {k} given: " + ", ".join(
        f"{name} {cluster.clustering_accuracy(list(own_tasks), list(labels)):.3f}" for name, labels in found.items()), flush=True)


# --answer-effects: instruction parts (--parts per sub-cluster), compared when they hold >= MIN_PART examples,
# >= PURE of them of one task (the labels only name what is compared)
EFFECT_SETTINGS = [("synthetic", "dual"), ("synthetic", "all"), ("synthetic-hard", "single"), ("synthetic-hard", "all"),
                   (str(FLAN8), "all")]
MIN_PART, PURE, TEMPLATE_SHARE = 8, 0.9, 0.05


def answer_effect(answers: np.ndarray, a: np.ndarray, b: np.ndarray, spread: float) -> float:
    """How far apart the answers of parts `a` and `b` (row indices) lie: the squared distance of their mean
    answer embeddings over the within-part spread, less what sampling alone gives (1/|a| + 1/|b|), so that
    two parts drawn alike score about 0 at any size (the method's `answer_gap` less 1, times that term)."""
    sampling = 1 / len(a) + 1 / len(b)
    return (cluster.answer_gap(answers, a, b, spread) - 1) * sampling


def template_parts(members: np.ndarray, texts: list[str], n_parts: int, seed: int) -> list[np.ndarray]:
    """`members` (row indices of one sub-cluster) cut into `n_parts` by K-Means on their surface view."""
    _, part = cluster.kmeans(cluster.template_view([texts[k] for k in members], TEMPLATE_SHARE), n_parts, seed)
    return [members[part == p] for p in range(part.max() + 1)]


def answer_effects(label: str, clients, embed, seed: int, n_parts: int) -> None:
    """The --answer-effects lines for one setting (see the module docstring)."""
    same, cross = {}, {}
    for client in clients:
        x, router_dims = cluster.example_features(client.train, embed, cluster.DEFAULT_CLUSTER_ON)
        answers, tasks = x[:, router_dims:], np.array([e["task"] for e in client.train])
        texts = [e["instruction"] for e in client.train]
        dims = cluster.split_dims(cluster.DEFAULT_CLUSTER_ON, router_dims)
        _, sub, _ = cluster.cluster_local(x, cluster.AUTO, seed, dims=dims)
        subclusters = [np.flatnonzero(sub == j) for j in range(sub.max() + 1)]
        for members in [m for m in subclusters if len(m) >= n_parts * MIN_PART]:
            parts = template_parts(members, texts, n_parts, seed)
            spread = sum(((answers[p] - answers[p].mean(axis=0)) ** 2).sum() for p in parts) / (len(members) - len(parts))
            kept = []
            for p in parts:
                names, counts = np.unique(tasks[p], return_counts=True)
                if len(p) >= MIN_PART and counts.max() >= PURE * len(p):
                    kept.append((p, str(names[counts.argmax()])))
            for (a, task_a), (b, task_b) in itertools.combinations(kept, 2):
                effect = answer_effect(answers, a, b, spread)
                if task_a == task_b:
                    same[task_a] = max(same.get(task_a, -np.inf), effect)
                else:
                    key = "/".join(sorted((task_a, task_b)))
                    cross[key] = min(cross.get(key, np.inf), effect)
    print(f"{label}  one task's parts, largest answer effect: "
          + (", ".join(f"{t} {v:.2f}" for t, v in sorted(same.items())) or "none compared"), flush=True)
    if cross:
        print(f"{label}  two tasks' parts, smallest answer effect: "
              + ", ".join(f"{t} {v:.2f}" for t, v in sorted(cross.items())), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default="synthetic,hard,flan8")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--diagnose", action="store_true", help="the separability diagnostics instead of the variants")
    ap.add_argument("--answer-effects", action="store_true",
                    help="how far apart the answers of instruction parts lie, within one task and across tasks")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (--answer-effects)")
    ap.add_argument("--parts", type=int, default=8, help="instruction parts per sub-cluster (--answer-effects only)")
    args = ap.parse_args()
    quiet_libraries(progress_bars=False)
    from fedrouter.study.clusters import embedding_function
    from fedrouter.world import build_data

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {VARIANTS}")

    def setting(data: str, scenario: str, seed: int):
        overrides = {"data": data, "scenario": scenario, "seed": seed}
        if os.environ.get("FEDROUTER_CACHE"):
            overrides["cache_dir"] = os.environ["FEDROUTER_CACHE"]
        cfg = load_config(None, overrides)
        return cfg, build_data(cfg).clients, embedding_function(cfg, "minilm")[0]

    flan8_absent = not (FLAN8 / "train.jsonl").exists()
    if args.answer_effects:
        with threadpool_limits(2):
            for seed in [int(s) for s in args.seeds.split(",") if s]:
                for data, scenario in EFFECT_SETTINGS:
                    if data == str(FLAN8) and flan8_absent:
                        print(f"flan8: skipped, {FLAN8} is absent")
                        continue
                    cfg, clients, embed = setting(data, scenario, seed)
                    label = f"{Path(data).name:<15} {scenario:<7} seed {seed}"
                    answer_effects(label, clients, embed, cfg.seed, args.parts)
        return
    base = None
    with threadpool_limits(2):
        for group in [g for g in args.groups.split(",") if g]:
            if group == "flan8" and flan8_absent:
                print(f"flan8: skipped, {FLAN8} is absent")
                continue
            for data, scenario in SETTINGS[group]:
                cfg, clients, embed = setting(data, scenario, 0)
                if base is None and any(v.startswith("base-") for v in variants):
                    base = TinyBase(cfg)
                tasks = [e["task"] for c in clients for e in c.train]
                if args.diagnose:
                    x = {c.client_id: np.asarray(embed([e["instruction"] for e in c.train]), dtype=np.float64) for c in clients}
                    diagnose(f"{Path(data).name:<15} {scenario:<7}", x,
                             {c.client_id: np.array([e["task"] for e in c.train]) for c in clients}, cfg.seed)
                    continue
                for variant in variants:
                    start = time.perf_counter()
                    x, local_view = features(variant, clients, embed, base, cfg.prompt_template)
                    k, labels = cluster_all(x, local_view, cfg.seed)
                    found = np.concatenate([labels[c.client_id] for c in clients])
                    print(f"{Path(data).name:<15} {scenario:<7} {variant:<16} K {k:>2}  global accuracy "
                          f"{cluster.clustering_accuracy(tasks, found):.3f}  {time.perf_counter() - start:5.1f} s", flush=True)


if __name__ == "__main__":
    main()
