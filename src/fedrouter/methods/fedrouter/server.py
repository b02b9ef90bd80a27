"""FedRouter's server part: the setup exchanges (explicit phases), the round robin, averaging per cluster."""

from __future__ import annotations

import logging
from dataclasses import replace
from enum import Enum

import numpy as np
import torch

from fedrouter.errors import FedrouterError
from fedrouter.methods.base import Message, ServerPart
from fedrouter.methods.common import counts_from, finite_array, pack_under, unpack_under
from fedrouter.methods.facts import MethodFacts
from fedrouter.methods.fedrouter.options import EXAMPLE
from fedrouter.methods.fedrouter.router import DISCRIMINANT, PROTOTYPE, discriminant, linear_scores
from fedrouter.methods.fedrouter.schedule import balanced_offsets, turn
from fedrouter.methods.fedrouter.scoring import SPLITS, truth_scores
from fedrouter.methods.fedrouter.server_step import Clusters, centres, regroup, server_step

log = logging.getLogger(__name__)


class Phase(str, Enum):
    """The setup exchanges in order: sub-cluster summaries in (SPLIT); with assign "example", centres out and
    each client's counts per cluster in (ASSIGN); with the discriminant router, the clusters' moments in
    (MOMENTS); then training (DONE). A str, so that a checkpoint stores it as text."""

    SPLIT, ASSIGN, MOMENTS, DONE = "split", "assign", "moments", "done"


def job_reference(sent: Message) -> dict:
    """Upload "j<job>/<name>" is the trained change of the sent "g<cluster>/<name>" (for clipping updates)."""
    return {f"j{j}/{name}": t for j, (_, g) in enumerate(sent.config["jobs"])
            for name, t in unpack_under(sent.arrays, f"g{g}").items()}


def adapters_kept(options: dict, n_clients: int) -> str:
    chosen = options["n_global"] if options["n_global"] != "auto" else f"chosen, 1..{options['k_max']}"
    return f"1 per global task cluster ({chosen})"


class Server(ServerPart):
    FACTS = MethodFacts(adapters=adapters_kept, folds_by_mean=True, releases_data_summaries=True, clustering_report=True)
    train_all_local_clusters = False  # one local cluster per client per round (fedrouter-star: all)
    oracle = False  # fedrouter-oracle: the clusters are the true tasks (an upper reference)

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.initial_adapter, self.phase = initial_adapter, Phase.SPLIT
        self.cluster_adapters: dict[int, dict] = {}
        self.router_dims: int | None = None  # the instruction part of the features: all the router sees
        self.prototypes: np.ndarray | None = None  # (n_prototypes, router_dims), each owned by a global cluster:
        self.prototype_cluster: list[int] = []
        self.sub_to_global: dict[int, list[int]] = {}  # client -> global cluster of each of its sub-clusters
        self.label_map: dict[int, list[int]] = {}  # client -> global cluster of each label its examples carry
        self.client_clusters: dict[int, list[int]] = {}  # client -> its local clusters (global ids, in order)
        self.round_robin_offsets: dict[int, int] = {}
        self.silhouette: dict = {"global": None, "local": {}}
        self.merged: list[list[int]] = []
        self.assignment: dict | None = None  # what the assignment exchange changed
        self.summaries: tuple | None = None  # (means, sizes) while the assignment exchange runs
        self.oracle_task_cluster: dict[str, int] = {}
        self.router_means: np.ndarray | None = None  # the discriminant router; None: the nearest prototype
        self.whiten: np.ndarray | None = None

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.phase = Phase(self.phase)

    # -- setup ---------------------------------------------------------------------------------------
    def configure_setup(self, client_ids):
        if self.phase == Phase.SPLIT:
            return {cid: Message(config={"oracle": self.oracle}) for cid in client_ids}
        if self.phase == Phase.ASSIGN:
            sent = torch.tensor(centres(self._clusters(), *self.summaries), dtype=torch.float32)
            return {cid: Message({"centres": sent}, {"phase": Phase.ASSIGN.value}) for cid in client_ids}
        if self.phase == Phase.MOMENTS:
            return {cid: Message(config={"phase": Phase.MOMENTS.value, "mapping": self.label_map[cid],
                                         "n_clusters": len(self.cluster_adapters)}) for cid in client_ids}
        return {}

    def aggregate_setup(self, replies):
        missing = sorted(set(self.client_ids) - set(replies))
        if missing:
            raise FedrouterError(f"client(s) {missing} did not answer FedRouter's setup ({self.phase.value})")
        {Phase.SPLIT: self._aggregate_split, Phase.ASSIGN: self._aggregate_assign,
         Phase.MOMENTS: self._aggregate_moments}[self.phase](replies)
        return {}

    def _aggregate_split(self, replies):
        clients = sorted(replies)
        self.router_dims = self._router_dims(replies)
        means = {c: finite_array(replies[c].arrays.get("centroids"), (None, None), f"client {c}'s centroids") for c in clients}
        if len({m.shape[1] for m in means.values()}) != 1:
            raise FedrouterError(f"clients sent centroids of widths {sorted({m.shape[1] for m in means.values()})}")
        sizes = {c: counts_from(replies[c], "sizes", len(means[c]), c) for c in clients}
        self.silhouette["local"] = {str(c): replies[c].config["silhouette"] for c in clients if replies[c].config.get("silhouette")}
        if self.oracle:
            clusters = self._oracle_clusters(replies, means)
        else:
            spreads = {c: finite_array(replies[c].arrays["spreads"], (len(means[c]),), f"client {c}'s spreads")
                       for c in clients} if all("spreads" in replies[c].arrays for c in clients) else None
            clusters = server_step(means, sizes, spreads, self.options["n_global"], self.options["k_max"], self.method_setup.seed)
        self._adopt(clusters, clusters.sub_to_global)
        if self.oracle or self.options["assign"] != EXAMPLE:
            self._hold({c: sorted(set(m)) for c, m in self.sub_to_global.items()})
        else:
            self.summaries, self.phase = (means, sizes), Phase.ASSIGN

    def _oracle_clusters(self, replies, means) -> Clusters:
        """One global cluster per true task, its prototype the mean of that task's local means."""
        tasks = sorted({t for r in replies.values() for t in r.config["local_tasks"]})
        self.oracle_task_cluster = {t: g for g, t in enumerate(tasks)}
        held = {t: [m for c, r in replies.items() for u, m in zip(r.config["local_tasks"], means[c]) if u == t] for t in tasks}
        return Clusters(np.stack([np.mean(held[t], axis=0) for t in tasks]), np.arange(len(tasks)),
                        {c: np.array([tasks.index(t) for t in r.config["local_tasks"]]) for c, r in replies.items()}, None, [])

    def _aggregate_assign(self, replies):
        """Each client's count of examples per cluster in: empty clusters dropped, co-occurring ones joined."""
        held = {c: counts_from(replies[c], "held", len(self.cluster_adapters), c) for c in sorted(replies)}
        clusters, remap, self.assignment = regroup(self._clusters(), held, merge=self.options["n_global"] == "auto")
        self._adopt(clusters, {c: remap.tolist() for c in held})
        self.summaries = None
        self._hold({c: sorted(set(remap[np.flatnonzero(counts)].tolist())) for c, counts in held.items()})

    def _aggregate_moments(self, replies):
        """Each client's cluster moments in; out the discriminant router -- or, where nothing varies within a
        cluster (one example each), the prototype router, with a warning."""
        k, d = len(self.cluster_adapters), self.router_dims
        moments = [(finite_array(replies[c].arrays.get("sums"), (k, d), f"client {c}'s sums"),
                    counts_from(replies[c], "counts", k, c),
                    finite_array(replies[c].arrays.get("scatter"), (d, d), f"client {c}'s scatter")) for c in sorted(replies)]
        router = discriminant(moments)
        if router is None:
            log.warning("FedRouter: no input varies within its cluster (too few examples); routing by nearest prototype")
        self.router_means, self.whiten = router or (None, None)
        self.phase = Phase.DONE

    def _hold(self, client_clusters: dict[int, list[int]]) -> None:
        """The final local clusters of each client, where its round robin starts, and the next phase."""
        self.client_clusters = client_clusters
        self.round_robin_offsets = balanced_offsets(client_clusters, self.method_setup.rounds)
        self.phase = Phase.MOMENTS if self.options["global_router"] == DISCRIMINANT else Phase.DONE

    def _clusters(self) -> Clusters:
        return Clusters(self.prototypes, np.asarray(self.prototype_cluster), {c: np.asarray(m) for c, m in self.sub_to_global.items()},
                        self.silhouette["global"], self.merged)

    def _adopt(self, clusters: Clusters, label_map: dict) -> None:
        """The clustering as this server's state, with fresh adapters, one per global cluster."""
        self.prototypes, self.prototype_cluster = clusters.prototypes[:, : self.router_dims], clusters.owner.tolist()
        self.sub_to_global = {c: np.asarray(m).tolist() for c, m in clusters.sub_to_global.items()}
        self.label_map = {c: np.asarray(m).tolist() for c, m in label_map.items()}
        self.silhouette["global"], self.merged = clusters.silhouette, clusters.merged
        self.cluster_adapters = {g: dict(self.initial_adapter) for g in range(clusters.n_global)}

    @staticmethod
    def _router_dims(replies) -> int:
        """The width of the instruction part: every client must say the same, within its centroids' width."""
        said = {c: r.config.get("router_dims") for c, r in replies.items()}
        dims = next(iter(said.values()))
        widths = {r.arrays["centroids"].shape[-1] for r in replies.values() if isinstance(r.arrays.get("centroids"), torch.Tensor)}
        if len(set(said.values())) != 1 or isinstance(dims, bool) or not isinstance(dims, int) or not widths or not 1 <= dims <= min(widths):
            raise FedrouterError(f"clients disagree on the embedding layout: router_dims {said}, centroid widths {sorted(widths)}")
        return dims

    # -- training rounds -----------------------------------------------------------------------------
    def jobs(self, cid: int, round_idx: int) -> list[tuple[int, int]]:
        """(local cluster, global cluster) pairs client `cid` trains in `round_idx`: one per round from its
        round-robin offset (all of them for fedrouter-star)."""
        clusters = self.client_clusters[cid]
        local = range(len(clusters)) if self.train_all_local_clusters else [turn(len(clusters), self.round_robin_offsets.get(cid, 0), round_idx)]
        return [(l, clusters[l]) for l in local]

    def configure_fit(self, round_idx, client_ids):
        out = {}
        for cid in client_ids:
            jobs = self.jobs(cid, round_idx)
            arrays = {name: t for g in sorted({g for _, g in jobs}) for name, t in pack_under(f"g{g}", self.cluster_adapters[g]).items()}
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
        losses, tokens = [], 0
        for reply in replies.values():
            for j, ((_, g), n) in enumerate(zip(reply.config["jobs"], reply.config["job_examples"])):
                updates.setdefault(g, []).append((unpack_under(reply.arrays, f"j{j}"), n))
            losses += list(zip(reply.config["job_losses"], reply.config["job_examples"]))
            tokens += reply.config["tokens"]
        for g, pairs in updates.items():
            self.cluster_adapters[g] = self.average([a for a, _ in pairs], [n for _, n in pairs])
        return {"train_loss": sum(l * n for l, n in losses) / max(1, sum(n for _, n in losses)), "tokens": tokens,
                "clients": len(replies), "clusters_updated": len(updates)}

    # -- the router, evaluation, the report ----------------------------------------------------------
    def _router_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(centroids, cluster of each, whitening map or None): the discriminant router's cluster means, else
        the prototypes."""
        if self.whiten is not None:
            return self.router_means, np.arange(len(self.router_means)), self.whiten
        return self.prototypes, np.asarray(self.prototype_cluster), None

    def configure_evaluate(self, client_ids):
        centroids, owner, whiten = self._router_rows()
        weights, bias = linear_scores(centroids, whiten)  # k linear scores travel, not the d x d map
        arrays = {"router_weights": torch.tensor(weights, dtype=torch.float32), "router_bias": torch.tensor(bias, dtype=torch.float32),
                  "router_owner": torch.tensor(owner, dtype=torch.float32)}
        for g, adapter in self.cluster_adapters.items():
            arrays.update(pack_under(f"g{g}", adapter))
        config = {"router": self.options["router"], "task_cluster": self.oracle_task_cluster if self.oracle else None}
        return {cid: Message(dict(arrays), {**config, "allowed": self.client_clusters[cid], "mapping": self.label_map[cid]})
                for cid in client_ids}

    def adapters(self):
        return {f"cluster{g}": a for g, a in self.cluster_adapters.items()}

    def router(self):
        """For the run directory (predict, serve): each router row's centroid and adapter, the whitening map."""
        centroids, owner, whiten = self._router_rows()
        return {"centroids": centroids, "adapters": [f"cluster{g}" for g in owner], "embedder": self.options["embedder"],
                "whiten": whiten}

    def report(self, evaluations, truth=None):
        """results.json's `clustering`: what the clustering chose, and where the true tasks are known (a
        simulation) how well it matches them (`scoring.truth_scores`)."""
        chosen = {
            "n_global": len(self.cluster_adapters), "n_prototypes": len(self.prototypes), "merged_prototypes": self.merged,
            "assign": "true task" if self.oracle else self.options["assign"], "assignment": self.assignment,
            "n_local": {str(c): len(m) for c, m in self.client_clusters.items()},
            "n_sub": {str(c): len(m) for c, m in self.sub_to_global.items()},
            "local_to_global": {str(c): m for c, m in self.client_clusters.items()},
            "router_mode": {"own_test": self.options["router"], "generalization": "global",
                            "global_router": DISCRIMINANT if self.whiten is not None else PROTOTYPE},
            "silhouette": self.silhouette,
        }
        routes = {split: {c: reply.get("route_counts", {}) for c, reply in evaluations.get(split, {}).items()} for split in SPLITS}
        return {"clustering": {**chosen, **truth_scores(truth, routes)}}


class StarServer(Server):
    train_all_local_clusters = True


class OracleServer(Server):
    FACTS = replace(Server.FACTS, private_refusal="sends each client's true task names to the server by design, an exact "
                    "release the accountant does not cover; use fedrouter or fedrouter-star")
    oracle = True
