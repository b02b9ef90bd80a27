"""FedRouter ("Task-Centric Personalized Federated Fine-Tuning of Language Models").

Each client embeds its training examples once (the instructions, or instruction and answer side by side:
`example_features`), splits them into sub-clusters (K-Means, K by silhouette against a null reference) and
sends their centroids and sizes -- never a task label. The server clusters all sub-centroids (K-Means:
prototypes), merges prototypes that co-occur across clients in the same proportions into one global
cluster (the parts of one task), and keeps one LoRA adapter per global cluster. Then (``assign``
"example", the default) it sends each cluster's centre, every client puts each training example in the
cluster of its nearest centre and replies how many went where; clusters that got no example are dropped
and clusters that now co-occur joined. With "sub-cluster" an example goes where its sub-cluster went (one
exchange, the paper's form). A client's local clusters are the global clusters holding its examples (a
single-task client has one). Last (``global_router`` "discriminant", the default), each client sends, for
its training instructions' embeddings under the final clusters, a sum and a count per cluster and one
scatter matrix; the server makes of them the discriminant router: each cluster's mean and a whitening map
(the inverse square root of the clusters' pooled covariance) -- what pooling everyone's inputs would give.
In round t a client trains on its local cluster ``(t + offset) mod n_local`` (its offset spreads each
cluster's clients over the rounds: `balanced_offsets`) from that global cluster's adapter; the
server averages the returned adapters per global cluster, weighted by examples (a cluster nobody trained
keeps its adapter). At evaluation a router picks each input's adapter: on a client's own test set by
default the nearest cluster among its own (``local``), or among all (``global``) -- the nearest mean
after whitening, or with ``global_router`` "prototype" the nearest prototype's instruction part (the
paper's) -- or a classifier fit on its training instructions and the clusters its examples were put in
(``learned``); test-time generalization and serving use ``global``.

Variants: ``fedrouter-star`` trains every local cluster's adapter every round (adapter-level budget);
``fedrouter-oracle`` clusters by the true task labels and routes by them (an upper reference).

Options (``method_options``): embedder ("minilm", measured best on the benchmarks (docs/benchmark.md);
"base" = the base model's mean-pooled last hidden state; or a Hugging Face encoder id/path), cluster_on
("instruction+output@server", the default: a client splits its data by instructions and sends each part's
instruction and answer means, so the server tells apart tasks that share an input format; "instruction":
instruction means only; "instruction+output": answers in the client's split too, which splits a task by
its answer kinds -- measured in docs/benchmark.md, see `core.cluster.split_dims`), answer_split (true, the
default: with "instruction+output@server" a client's sub-cluster is split where its templates answer
differently, which parts two tasks that share an input format on every client; see
`core.cluster.split_by_answers`), n_local and n_global
(an int or "auto" = chosen by silhouette over k_min..k_max, K = 1 included; see `core.cluster`), assign
("example" or "sub-cluster", see above and `core.cluster`), router (for the clients' own test sets:
"local", "global" or "learned", see `ROUTERS`), global_router ("discriminant" or "prototype": how inputs
are compared with clusters, see above; "prototype" under DP centroids, as the moments would be a release
the accountant does not cover), round_robin ("balanced", the default, or "by-client": where each client's
turn through its clusters starts, see `balanced_offsets`), mixed_batch (true: one generate call serves rows
routed to different adapters; false: generate adapter by adapter).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from fedrouter.core.cluster import (
    ASSIGN,
    AUTO,
    CLUSTER_ON,
    DEFAULT_ASSIGN,
    DEFAULT_CLUSTER_ON,
    DEFAULT_GLOBAL_ROUTER,
    DISCRIMINANT,
    EXAMPLE,
    GLOBAL_ROUTERS,
    PROTOTYPE,
    SUB_CLUSTER,
    GlobalStep,
    adjusted_rand,
    cluster_local,
    cluster_centres,
    cluster_moments,
    clustering_accuracy,
    discriminant,
    example_features,
    label_means,
    learned_route,
    linear_router,
    majority_cluster,
    nearest_held,
    regroup_by_examples,
    regroup_summary,
    route,
    route_linear,
    server_step,
    split_dims,
)
from fedrouter.errors import FedrouterError
from fedrouter.core.data import UNLABELLED
from fedrouter.core.privacy import noisy_centroids
from fedrouter.methods.base import ClientPart, Message, ServerPart
from fedrouter.methods.common import pack_under, require, unpack_under

OPTIONS = {"embedder": "minilm", "cluster_on": DEFAULT_CLUSTER_ON, "assign": DEFAULT_ASSIGN, "n_local": "auto", "n_global": "auto",
           "k_min": 1, "k_max": 12, "router": "local", "global_router": DEFAULT_GLOBAL_ROUTER, "mixed_batch": False,
           "round_robin": "balanced", "answer_split": True}
# own test sets: the nearest cluster (as global_router measures it) among this client's ("local"), among
# all ("global"), or a classifier fit on this client's training instructions and their clusters ("learned":
# `learned_route`; level with "local" under the discriminant router, docs/benchmark.md)
ROUTERS = ("local", "global", "learned")
# where each client's round robin starts: offsets that spread every cluster's clients evenly over the rounds
# (`balanced_offsets`), or the client's id ("by-client", as before 2026-12-03)
ROUND_ROBINS = ("balanced", "by-client")
LOOSE = {"n_local", "n_global"}  # "auto" or a positive integer: check_options decides


def check_options(method: str, opts: dict) -> None:
    for key in ("n_local", "n_global"):
        value = opts[key]
        require(value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1), method,
                f"{key} must be a positive integer or 'auto', got {value!r}")
    require(opts["router"] in ROUTERS, method, f"router must be one of {', '.join(map(repr, ROUTERS))}, got {opts['router']!r}")
    require(1 <= opts["k_min"] <= opts["k_max"], method, "k_min and k_max must satisfy 1 <= k_min <= k_max")
    require(opts["cluster_on"] in CLUSTER_ON, method,
            f"cluster_on must be one of {', '.join(map(repr, CLUSTER_ON))}, got {opts['cluster_on']!r}")
    require(opts["assign"] in ASSIGN, method, f"assign must be one of {', '.join(map(repr, ASSIGN))}, got {opts['assign']!r}")
    require(opts["global_router"] in GLOBAL_ROUTERS, method,
            f"global_router must be one of {', '.join(map(repr, GLOBAL_ROUTERS))}, got {opts['global_router']!r}")
    require(opts["round_robin"] in ROUND_ROBINS, method,
            f"round_robin must be one of {', '.join(map(repr, ROUND_ROBINS))}, got {opts['round_robin']!r}")
    require(isinstance(opts["answer_split"], bool), method, f"answer_split must be true or false, got {opts['answer_split']!r}")


def turn(n_local: int, offset: int, round_idx: int) -> int:
    """The local cluster a client with `n_local` clusters trains in round `round_idx`, its round robin
    starting at `offset`: what `Server.jobs` schedules and `balanced_offsets` spreads."""
    return (round_idx + offset) % n_local


def balanced_offsets(client_clusters: dict[int, list[int]], rounds: int, max_sweeps: int = 20) -> dict[int, int]:
    """Where each client's round robin starts: client c trains its local cluster (t + offset_c) mod n_c in
    round t, and these offsets spread each global cluster's clients evenly over the rounds.

    Why: a cluster's adapter moves once per round in which any of its clients trains it. If all of them
    train it in the same rounds, it moves in half the rounds (two local clusters each) on an average of more
    clients; spread, it moves every round. At 10 rounds in `dual` (seed 0) ROUGE-1 followed the spread:
    0.40 to 0.55 over offsets the paper leaves arbitrary (docs/benchmark.md, "The round robin").

    Minimises the sum over clusters g and rounds t < `rounds` of n(g, t)^2, n(g, t) being the clients that
    train g in round t, by coordinate descent from the offsets "by-client" (offset_c = c): one client at a
    time takes the offset of least cost, keeping its own on a tie, until no client moves. Deterministic."""
    horizon = range(max(1, rounds))
    offsets = {cid: cid % len(held) for cid, held in client_clusters.items() if held}

    def trained(cid: int, offset: int) -> list[tuple[int, int]]:  # (cluster, round) pairs with this offset
        held = client_clusters[cid]
        return [(held[turn(len(held), offset, t)], t) for t in horizon]

    load = Counter(pair for cid, offset in offsets.items() for pair in trained(cid, offset))
    for _ in range(max_sweeps):
        moved = False
        for cid in sorted(offsets):
            n = len(client_clusters[cid])
            if n < 2:
                continue
            load.subtract(trained(cid, offsets[cid]))
            # adding one client to a (cluster, round) holding k raises the sum of squares by 2k + 1
            cost = [sum(2 * load[pair] + 1 for pair in trained(cid, offset)) for offset in range(n)]
            best = min(range(n), key=lambda offset: (cost[offset], offset != offsets[cid]))
            moved |= best != offsets[cid]
            offsets[cid] = best
            load.update(trained(cid, best))
        if not moved:
            break
    return offsets


def k_range(opts: dict) -> range:
    return range(opts["k_min"], opts["k_max"] + 1)


def example_counts(reply: Message, key: str, n: int, cid: int) -> np.ndarray:
    """A client's count of training examples per sub-cluster or per centre (`key` in its reply), checked:
    `n` non-negative integers, not all zero -- a reply is input to check, not trust."""
    value = reply.config.get(key)
    if not (isinstance(value, list) and len(value) == n and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                                for v in value) and sum(value) > 0):
        raise FedrouterError(f"client {cid} sent {key} {value!r}: not {n} example counts")
    return np.asarray(value, dtype=np.int64)


def _finite_matrix(value, shape: tuple, what: str) -> np.ndarray:
    """A tensor from a peer as a float64 array of `shape` with finite values, or one clear error."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or not bool(torch.isfinite(value).all()):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise FedrouterError(f"{what} is {got}, not a finite {shape} matrix")
    return value.double().numpy()


def job_reference(sent: Message) -> dict:
    """Upload "j<job>/<name>" is the trained change of the sent "g<cluster>/<name>" (for clipping updates)."""
    return {f"j{j}/{name}": t for j, (_, g) in enumerate(sent.config["jobs"])
            for name, t in unpack_under(sent.arrays, f"g{g}").items()}


class Server(ServerPart):
    train_all_local_clusters = False  # FedRouter: one local cluster per client per round (round robin)
    oracle = False

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.initial_adapter = initial_adapter
        self.cluster_adapters: dict[int, dict] = {}
        self.prototypes: np.ndarray | None = None  # (n_prototypes, d): what the router compares inputs with
        # (the instruction part of the server's K-Means centroids over the clients' task features)
        self.prototype_cluster: list[int] = []  # global cluster (adapter) of each prototype
        self.sub_to_global: dict[int, list[int]] = {}  # client -> global cluster of each of its sub-clusters
        # client -> global cluster of each label its examples carry (their sub-cluster, or after the
        # assignment exchange their nearest centre), and the global clusters holding its examples
        self.label_map: dict[int, list[int]] = {}
        self.client_clusters: dict[int, list[int]] = {}
        self.round_robin_offsets: dict[int, int] = {}  # where each client's round robin starts (`jobs`)
        self.setup_info: dict[int, dict] = {}
        self.global_silhouette = None
        self.merged: list[list[int]] = []
        self.setup_phase = "split"  # -> "assign" (assign "example") -> "moments" (global router "discriminant") -> "done"
        self.centres: np.ndarray | None = None  # the clusters' mean task features, sent for the assignment
        # the discriminant router (`core.cluster.discriminant`): each cluster's mean instruction embedding
        # and the whitening map inputs and means are compared through; None: the nearest prototype
        self.router_means: np.ndarray | None = None
        self.whiten: np.ndarray | None = None
        self.router_dims: int | None = None
        self.assignment: dict | None = None  # what the assignment changed: clusters before, emptied, joined

    # -- setup: sub-cluster centroids in, global clusters out; then (assign "example") centres out, counts
    # in; then (global router "discriminant") each client's clusters out, their moments in
    def configure_setup(self, client_ids):
        if self.setup_phase == "split":
            return {cid: Message(config={"oracle": self.oracle}) for cid in client_ids}
        if self.setup_phase == "assign":
            centres = torch.tensor(self.centres, dtype=torch.float32)
            return {cid: Message({"centres": centres}, {"phase": "assign"}) for cid in client_ids}
        if self.setup_phase == "moments":
            return {cid: Message(config={"phase": "moments", "mapping": self.label_map[cid],
                                         "n_clusters": len(self.cluster_adapters)}) for cid in client_ids}
        return {}

    def aggregate_setup(self, replies):
        if self.setup_phase == "assign":
            return self._aggregate_assign(replies)
        if self.setup_phase == "moments":
            return self._aggregate_moments(replies)
        clients = sorted(replies)
        centroids = {cid: replies[cid].arrays["centroids"].numpy() for cid in clients}
        self.router_dims = self._router_dims(replies, centroids)
        self.setup_info = {cid: replies[cid].config for cid in clients}
        self.setup_phase = self._phase_after_clustering()
        if self.oracle:  # one global cluster per true task; its centroid is the mean of that task's local ones
            tasks = sorted({t for cid in clients for t in replies[cid].config["local_tasks"]})
            stacked = {t: [] for t in tasks}
            for cid in clients:
                for t, c in zip(replies[cid].config["local_tasks"], centroids[cid]):
                    stacked[t].append(c)
            step = GlobalStep(np.stack([np.mean(stacked[t], axis=0) for t in tasks]), np.arange(len(tasks)),
                              {cid: np.array([tasks.index(t) for t in replies[cid].config["local_tasks"]]) for cid in clients},
                              None, [])
            self.oracle_task_cluster = {t: g for g, t in enumerate(tasks)}
        else:
            sizes = {cid: example_counts(replies[cid], "sizes", len(centroids[cid]), cid) for cid in clients}
            step = server_step(centroids, self.options["n_global"], self.settings.seed, k_range(self.options), sizes)
            if self.assign() == EXAMPLE:
                self.centres, self.setup_phase = cluster_centres(step, centroids, sizes), "assign"
        self._adopt(step, step.sub_to_global)
        self._hold({cid: sorted(set(m)) for cid, m in self.sub_to_global.items()})
        return {}

    def assign(self) -> str:
        """How examples get their cluster in this run: the `assign` option, but "sub-cluster" under DP
        centroids -- the assignment's counts would be a second release of the data that the accountant
        does not cover."""
        if self.oracle:
            return "true task"
        if self.settings.privacy.get("centroid_noise_multiplier") is not None:
            return SUB_CLUSTER
        return self.options["assign"]

    def _aggregate_assign(self, replies):
        """Each client's count of examples per centre in: clusters nobody's examples went to are dropped,
        clusters that now co-occur joined (n_global "auto"), the rest renumbered (`regroup_by_examples`)."""
        missing = sorted(set(self.sub_to_global) - set(replies))
        if missing:
            raise FedrouterError(f"client(s) {missing} did not answer the cluster assignment")
        held = {cid: example_counts(replies[cid], "held", len(self.centres), cid) for cid in sorted(replies)}
        step = GlobalStep(self.prototypes, np.asarray(self.prototype_cluster),
                          {cid: np.asarray(m) for cid, m in self.sub_to_global.items()}, self.global_silhouette, self.merged)
        step, remap = regroup_by_examples(step, held, merge=self.options["n_global"] == AUTO)
        self.assignment = regroup_summary(remap)
        self._adopt(step, {cid: remap for cid in held})
        self.setup_phase, self.centres = self._phase_after_clustering(), None
        self._hold({cid: sorted(set(remap[np.flatnonzero(counts)].tolist())) for cid, counts in held.items()})
        return {}

    def _hold(self, client_clusters: dict[int, list[int]]) -> None:
        """The global clusters each client holds examples of (its local clusters), and where its round robin
        starts among them -- once they are final: the assignment exchange, when one follows, changes them."""
        self.client_clusters = client_clusters
        if self.setup_phase != "assign":
            self.round_robin_offsets = (balanced_offsets(client_clusters, self.settings.rounds)
                                        if self.options["round_robin"] == "balanced" else {})

    def _phase_after_clustering(self) -> str:
        return "moments" if self.global_router() == DISCRIMINANT else "done"

    def global_router(self) -> str:
        """How this run's router compares inputs with clusters: the `global_router` option, but
        "prototype" under DP centroids -- the moments would be a release the accountant does not cover."""
        if self.settings.privacy.get("centroid_noise_multiplier") is not None:
            return PROTOTYPE
        return self.options["global_router"]

    def _aggregate_moments(self, replies):
        """Each client's `cluster_moments` in (checked: a reply is input to check, not trust); out the
        discriminant router -- cluster means and whitening map -- that pooling everyone's inputs would give."""
        missing = sorted(set(self.label_map) - set(replies))
        if missing:
            raise FedrouterError(f"client(s) {missing} did not send their clusters' moments")
        k, d = len(self.cluster_adapters), self.router_dims
        moments = []
        for cid in sorted(replies):
            arrays = replies[cid].arrays
            sums, scatter = (_finite_matrix(arrays.get(name), shape, f"client {cid}'s {name}")
                             for name, shape in (("sums", (k, d)), ("scatter", (d, d))))
            moments.append((sums, example_counts(replies[cid], "counts", k, cid), scatter))
        self.router_means, self.whiten = discriminant(moments)
        self.setup_phase = "done"
        return {}

    def _adopt(self, step: GlobalStep, label_map: dict) -> None:
        """Take the server step's choice as this server's state (fresh adapters, one per global cluster)."""
        self.prototypes = step.prototypes[:, :self.router_dims]
        self.prototype_cluster = np.asarray(step.prototype_cluster).tolist()
        self.sub_to_global = {cid: np.asarray(m).tolist() for cid, m in step.sub_to_global.items()}
        self.label_map = {cid: np.asarray(m).tolist() for cid, m in label_map.items()}
        self.global_silhouette, self.merged = step.silhouette, step.merged
        self.cluster_adapters = {g: dict(self.initial_adapter) for g in range(step.n_global)}

    @staticmethod
    def _router_dims(replies, centroids) -> int:
        """How many leading dimensions of the task features the router compares inputs with: every client
        must say the same, within its centroids' width (a client's reply is input to check, not trust)."""
        said = {cid: replies[cid].config.get("router_dims") for cid in replies}
        values = set(said.values())
        width = {c.shape[1] for c in centroids.values() if c.ndim == 2}
        if len(values) != 1 or len(width) != 1:
            raise FedrouterError(f"clients disagree on the embedding layout: router_dims {said}, centroid widths {sorted(width)}")
        dims = values.pop()
        if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= width.pop():
            raise FedrouterError(f"a client sent router_dims {dims!r}: not a width within its centroids'")
        return dims

    # -- training rounds -----------------------------------------------------------------------------
    def jobs(self, cid: int, round_idx: int) -> list[tuple[int, int]]:
        """(local cluster, global cluster) pairs that client `cid` trains in `round_idx`; its local clusters
        are the global clusters holding its examples, numbered in global cluster order.

        The round robin ``t mod n_local`` starts at client `cid`'s offset: local numbering is arbitrary in
        the paper, and numbering every client's clusters the same way (lowest global id first) would have
        all clients train their lowest cluster in the same rounds, leaving the other clusters untrained in
        those rounds (measured: 2 of 4 clusters per round in `dual`). The offsets are `balanced_offsets`
        (round_robin "balanced"), or the client's id ("by-client", and for a run checkpointed before them).
        """
        clusters = self.client_clusters[cid]
        offset = self.round_robin_offsets.get(cid, cid)
        local = range(len(clusters)) if self.train_all_local_clusters else [turn(len(clusters), offset, round_idx)]
        return [(l, clusters[l]) for l in local]

    def configure_fit(self, round_idx, client_ids):
        out = {}
        for cid in client_ids:
            jobs = self.jobs(cid, round_idx)
            arrays = {}
            for g in sorted({g for _, g in jobs}):
                arrays.update(pack_under(f"g{g}", self.cluster_adapters[g]))
            out[cid] = Message(arrays, {"round": round_idx, "jobs": [list(j) for j in jobs], "mapping": self.label_map[cid]})
        return out

    def upload_reference(self, client_id, sent):
        return job_reference(sent)

    def expected_upload(self, client_id, sent):
        """One trained adapter per job, under "j<job>/": the global cluster's adapter, trained."""
        return {f"j{j}/{name}": tuple(t.shape) for j, (_, g) in enumerate(sent.config["jobs"])
                for name, t in self.cluster_adapters[g].items()}

    def aggregate_fit(self, round_idx, replies):
        updates: dict[int, list[tuple[dict, int]]] = {}
        losses, tokens, examples = [], 0, 0
        for reply in replies.values():
            for j, ((_, g), n) in enumerate(zip(reply.config["jobs"], reply.config["job_examples"])):
                updates.setdefault(g, []).append((unpack_under(reply.arrays, f"j{j}"), n))
            losses += [(l, n) for l, n in zip(reply.config["job_losses"], reply.config["job_examples"])]
            tokens += reply.config["tokens"]
            examples += reply.config["n_examples"]
        for g, pairs in updates.items():
            self.cluster_adapters[g] = self.average([a for a, _ in pairs], [n for _, n in pairs])
        return {"train_loss": sum(l * n for l, n in losses) / max(1, sum(n for _, n in losses)), "tokens": tokens,
                "clients": len(replies), "clusters_updated": len(updates)}

    # -- evaluation ----------------------------------------------------------------------------------
    def configure_evaluate(self, client_ids):
        if self.whiten is not None:  # the discriminant router, as k linear scores (not the d x d map)
            weights, bias = linear_router(self.router_means, self.whiten)
            arrays = {"router_weights": torch.tensor(weights, dtype=torch.float32),
                      "router_bias": torch.tensor(bias, dtype=torch.float32)}
        else:
            arrays = {"centroids": torch.tensor(self.prototypes, dtype=torch.float32)}
        for g, adapter in self.cluster_adapters.items():
            arrays.update(pack_under(f"g{g}", adapter))
        config = {"router": self.options["router"], "owner": list(self.prototype_cluster)}
        if self.oracle:
            config["task_cluster"] = self.oracle_task_cluster
        return {cid: Message(dict(arrays), {**config, "allowed": self.client_clusters[cid], "mapping": self.label_map[cid]})
                for cid in client_ids}

    def adapters(self):
        return {f"cluster{g}": a for g, a in self.cluster_adapters.items()}

    def router(self):
        """For router/ (predict, serve): the clusters' means and the whitening map under the discriminant
        router, else the prototypes (with the cluster of each)."""
        if self.whiten is not None:
            centroids, owner = self.router_means, range(len(self.router_means))
        else:
            centroids, owner = self.prototypes, self.prototype_cluster
        return {"centroids": centroids, "adapters": [f"cluster{g}" for g in owner], "embedder": self.options["embedder"],
                "whiten": self.whiten}

    def report(self, evaluations, truth=None):
        """results.json's `clustering`: what the clustering chose, and -- where the true tasks are known --
        how well it matches them.

        The choice comes from the server's own state. The scores need task labels, which never travel:
        `truth` ({client: {"tasks", "clusters"}}: each training example's true task and global cluster)
        is handed over by an engine that holds the clients' data (a simulation); a deployment passes None,
        and so does data without labels: the scores are then null.
        """
        chosen = {
            "n_global": len(self.cluster_adapters),
            "n_prototypes": len(self.prototypes),
            "merged_prototypes": self.merged,
            "assign": self.assign(),
            "assignment": self.assignment,
            "n_local": {str(cid): len(m) for cid, m in self.client_clusters.items()},
            "n_sub": {str(cid): len(m) for cid, m in self.sub_to_global.items()},
            "local_to_global": {str(cid): m for cid, m in self.client_clusters.items()},
            "router_mode": {"own_test": self.options["router"], "generalization": "global",
                            "global_router": self.global_router()},
            "silhouette": {"global": self.global_silhouette,
                           "local": {str(cid): cfg["silhouette"] for cid, cfg in self.setup_info.items() if cfg.get("silhouette")}},
        }
        return {"clustering": {**chosen, **truth_scores(truth, evaluations)}}


def truth_scores(truth: dict | None, evaluations: dict) -> dict:
    """Clustering and routing accuracy against the true tasks (all None without labels)."""
    if not truth or any(t in (None, UNLABELLED) for info in truth.values() for t in info["tasks"]):
        return {"accuracy": None, "local_accuracy": None, "local_ari": None, "per_client": None,
                "task_to_cluster": None, "router_accuracy": {"own_test": None, "generalization": None}}
    # A task's cluster: the global cluster most of its training examples were assigned to.
    task_votes: dict[str, Counter] = {}
    for info in truth.values():
        for task, cluster in zip(info["tasks"], info["clusters"]):
            task_votes.setdefault(task, Counter())[int(cluster)] += 1
    task_cluster = majority_cluster(task_votes)
    router = {}
    for split, replies in evaluations.items():
        hit = total = 0
        for reply in replies.values():
            for task, counts in reply.get("route_counts", {}).items():
                total += sum(counts.values())
                hit += counts.get(str(task_cluster.get(task)), 0)
        router[split] = hit / total if total else None
    per_client = {str(cid): {"accuracy": clustering_accuracy(info["tasks"], info["clusters"]),
                             "ari": adjusted_rand(info["tasks"], info["clusters"])} for cid, info in sorted(truth.items())}
    every = [(t, c) for info in truth.values() for t, c in zip(info["tasks"], info["clusters"])]
    return {"accuracy": clustering_accuracy([t for t, _ in every], [c for _, c in every]),
            "local_accuracy": float(np.mean([p["accuracy"] for p in per_client.values()])),
            "local_ari": float(np.mean([p["ari"] for p in per_client.values()])),
            "per_client": per_client, "task_to_cluster": task_cluster,
            "router_accuracy": {"own_test": router.get("test"), "generalization": router.get("general")}}


class Client(ClientPart):
    def upload_reference(self, msg):
        return job_reference(msg)

    def _embed(self, ctx, examples: list[dict]) -> np.ndarray:
        return ctx.workbench.embed([e["instruction"] for e in examples], self.options["embedder"])

    def setup(self, msg, ctx):
        train = ctx.workbench.examples("train")
        x, router_dims = example_features(train, lambda texts: ctx.workbench.embed(texts, self.options["embedder"]),
                                          self.options["cluster_on"])
        if msg.config.get("phase") == "assign":
            return self._assign(msg, ctx, x)
        if msg.config.get("phase") == "moments":
            return self._moments(msg, ctx, x[:, :router_dims])
        curve, config = None, {"router_dims": router_dims}
        if msg.config.get("oracle"):  # the reference variant clusters by the true tasks: labels by design
            tasks = [e["task"] for e in train]
            config["local_tasks"] = local_tasks = sorted(set(tasks))
            labels = np.array([local_tasks.index(t) for t in tasks])
            centroids = label_means(x, labels, len(local_tasks))
        else:  # nothing label-derived leaves the client: centroids, sizes and the silhouette curve
            texts = [e["instruction"] for e in train] if self.options["answer_split"] else None
            centroids, labels, curve = cluster_local(x, self.options["n_local"], self.settings.seed, k_range(self.options),
                                                     split_dims(self.options["cluster_on"], router_dims), texts)
        sizes = np.bincount(labels, minlength=len(centroids))
        privacy = self.settings.privacy
        if privacy.get("centroid_noise_multiplier") is not None:  # released through the Gaussian mechanism
            rng = np.random.default_rng([self.settings.seed, ctx.client_id, 17])
            centroids, sizes = noisy_centroids(x, labels, len(centroids), privacy["centroid_clip"],
                                               privacy["centroid_noise_multiplier"], rng)
        ctx.state["labels"] = labels  # (the embeddings are cached on disk: diagnostics reads them back)
        config.update({"sizes": sizes.tolist(), "silhouette": curve})
        return Message({"centroids": torch.tensor(centroids, dtype=torch.float32)}, config)

    @staticmethod
    def _assign(msg, ctx, x: np.ndarray) -> Message:
        """Each training example to its nearest cluster centre (`nearest_held`); the reply is how many
        went to each centre."""
        centres = msg.arrays.get("centres")
        if centres is None or centres.ndim != 2 or centres.shape[1] != x.shape[1] or len(centres) == 0:
            shape = None if centres is None else tuple(centres.shape)
            raise FedrouterError(f"the server sent cluster centres of shape {shape}, not (clusters, {x.shape[1]})")
        ctx.state["labels"] = labels = nearest_held(x, centres.double().numpy())
        return Message(config={"held": np.bincount(labels, minlength=len(centres)).tolist()})

    def _moments(self, msg, ctx, x: np.ndarray) -> Message:
        """This client's `cluster_moments` of its training instructions' embeddings `x` under the server's
        final clusters: per cluster a sum and a count, and one scatter matrix -- no example, no label."""
        clusters, k = self._clusters_of_examples(msg, ctx), msg.config.get("n_clusters")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k or int(clusters.max()) >= k or int(clusters.min()) < 0:
            raise FedrouterError(f"the server sent n_clusters {k!r}, which does not cover its mapping {msg.config.get('mapping')!r}")
        sums, counts, scatter = cluster_moments(x, clusters, k)
        return Message({"sums": torch.tensor(sums, dtype=torch.float32), "scatter": torch.tensor(scatter, dtype=torch.float32)},
                       {"counts": counts.tolist()})

    def fit(self, msg, ctx):
        cluster_of_example = self._clusters_of_examples(msg, ctx)
        arrays, job_examples, job_losses, tokens, seconds = {}, [], [], 0, 0.0
        for j, (l, g) in enumerate(msg.config["jobs"]):
            indices = np.flatnonzero(cluster_of_example == g).tolist()
            adapter, stats = ctx.workbench.train(unpack_under(msg.arrays, f"g{g}"), msg.config["round"], subset=(f"local{l}", indices))
            arrays.update(pack_under(f"j{j}", adapter))
            job_examples.append(len(indices))
            job_losses.append(stats.loss)
            tokens += stats.tokens
            seconds += stats.seconds
        return Message(arrays, {"jobs": msg.config["jobs"], "job_examples": job_examples, "job_losses": job_losses,
                                "n_examples": sum(job_examples), "tokens": tokens, "train_s": seconds})

    def evaluate(self, msg, ctx):
        split = msg.config.get("split", "test")
        examples = ctx.workbench.examples(split)
        mode = "global" if split == "general" else msg.config.get("router", "local")
        # (kept for diagnostics too; a client set up elsewhere evaluates all the same, but for "learned")
        own = self._clusters_of_examples(msg, ctx) if "labels" in ctx.state or mode == "learned" else None
        x = self._embed(ctx, examples)
        allowed = msg.config["allowed"] if mode == "local" else None
        if mode == "learned":
            routes = learned_route(self._embed(ctx, ctx.workbench.examples("train")), own, x)
        elif "router_weights" in msg.arrays:  # the discriminant router
            routes = route_linear(x, msg.arrays["router_weights"].double().numpy(),
                                  msg.arrays.get("router_bias", torch.zeros(0)).double().numpy(), allowed)
        else:
            routes = route(x, msg.arrays["centroids"].numpy(), allowed, msg.config["owner"])
        if "task_cluster" in msg.config:  # oracle: the true task picks the adapter (embedding if unseen)
            routes = np.array([msg.config["task_cluster"].get(e["task"], g) for e, g in zip(examples, routes)])
        adapters = {str(g): unpack_under(msg.arrays, f"g{g}") for g in sorted(set(routes.tolist()))}
        report = ctx.workbench.evaluate_routed(adapters, [str(g) for g in routes], split, self.options["mixed_batch"])
        counts: dict[str, Counter] = {}
        for e, g in zip(examples, routes):
            counts.setdefault(e["task"], Counter())[str(g)] += 1
        report["route_counts"] = {t: dict(c) for t, c in counts.items()}
        return Message(config=report)

    @staticmethod
    def _clusters_of_examples(msg, ctx) -> np.ndarray:
        """The global cluster of each training example: the server's `mapping` of the labels this client
        gave its examples at setup (kept in its state, with the mapping, for diagnostics)."""
        mapping, labels = msg.config.get("mapping"), ctx.state.get("labels")
        if labels is None:
            raise FedrouterError("this client holds no cluster labels: it missed the method's setup")
        if not (isinstance(mapping, list) and all(isinstance(g, int) and not isinstance(g, bool) for g in mapping)
                and len(mapping) > int(np.max(labels, initial=-1))):
            raise FedrouterError(f"the server's cluster mapping {mapping!r} does not cover this client's {int(np.max(labels)) + 1} labels")
        ctx.state["label_map"] = mapping
        return np.asarray(mapping, dtype=np.int64)[labels]

    def diagnostics(self, ctx):
        if "labels" not in ctx.state:
            return None
        train = ctx.workbench.examples("train")
        mapping = ctx.state.get("label_map")
        return {"vectors": self._embed(ctx, train), "tasks": [e.get("task") for e in train],
                "clusters": [mapping[l] if mapping else -1 for l in ctx.state["labels"]]}


class StarServer(Server):
    train_all_local_clusters = True


class OracleServer(Server):
    oracle = True
