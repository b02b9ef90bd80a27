"""FedRouter's client part: setup replies (summaries, assignment counts, moments), training its clusters'
adapters in turn, routing its inputs. Nothing label-derived leaves it (fedrouter-oracle aside)."""

from __future__ import annotations

import numpy as np
import torch

from fedrouter.core.privacy import noisy_centroids
from fedrouter.errors import FedrouterError
from fedrouter.methods.base import ClientPart, Message
from fedrouter.methods.common import pack_under, unpack_under
from fedrouter.methods.fedrouter.features import Features, task_features
from fedrouter.methods.fedrouter.local import split, summaries
from fedrouter.methods.fedrouter.router import cluster_moments, route
from fedrouter.methods.fedrouter.scoring import confusion
from fedrouter.methods.fedrouter.server import Phase, job_reference
from fedrouter.methods.fedrouter.server_step import nearest_held


class Client(ClientPart):
    def upload_reference(self, msg):
        return job_reference(msg)

    def features(self, ctx) -> Features:  # (the embeddings are cached on disk)
        return task_features(ctx.workbench.examples("train"), lambda texts: ctx.workbench.embed(texts, self.options["embedder"]))

    def instructions(self, ctx, split_name: str) -> np.ndarray:  # what the router routes by
        return ctx.workbench.embed([e["instruction"] for e in ctx.workbench.examples(split_name)], self.options["embedder"])

    def warm_cache(self, ctx) -> None:
        if self.options["embedder"] != "base":  # the base model is not there yet
            self.features(ctx), self.instructions(ctx, "test"), self.instructions(ctx, "general")

    def setup(self, msg, ctx):
        features = self.features(ctx)
        phase = msg.config.get("phase")
        if phase == Phase.ASSIGN.value:
            centres = msg.arrays.get("centres")
            if not isinstance(centres, torch.Tensor) or centres.ndim != 2 or centres.shape[1] != features.x.shape[1] or not len(centres):
                shape = tuple(centres.shape) if isinstance(centres, torch.Tensor) else None
                raise FedrouterError(f"the server sent cluster centres of shape {shape}, not (clusters, {features.x.shape[1]})")
            ctx.state["labels"] = labels = nearest_held(features.x, centres.double().numpy())
            return Message(config={"held": np.bincount(labels, minlength=len(centres)).tolist()})
        if phase == Phase.MOMENTS.value:
            clusters, k = self.clusters_of_examples(msg, ctx), msg.config.get("n_clusters")
            if isinstance(k, bool) or not isinstance(k, int) or k < 1 or int(clusters.max()) >= k:
                raise FedrouterError(f"the server sent n_clusters {k!r}, which does not cover its mapping {msg.config.get('mapping')!r}")
            sums, counts, scatter = cluster_moments(features.instruction, clusters, k)
            return Message({"sums": torch.tensor(sums, dtype=torch.float32), "scatter": torch.tensor(scatter, dtype=torch.float32)},
                           {"counts": counts.tolist()})
        return self._split(msg, ctx, features)

    def _split(self, msg, ctx, features: Features) -> Message:
        """Sub-cluster summaries (sizes, means, spreads) and the silhouette curve K was chosen by."""
        config, curve = {"router_dims": features.router_dims}, None
        if msg.config.get("oracle"):  # the reference variant clusters by the true tasks: labels by design
            tasks = [e["task"] for e in ctx.workbench.examples("train")]
            config["local_tasks"] = local_tasks = sorted(set(tasks))
            labels = np.array([local_tasks.index(t) for t in tasks])
        else:
            labels, curve = split(features, self.options["n_local"], self.options["k_max"], self.method_setup.seed)
        means, sizes, spreads = summaries(features.x, labels)
        arrays = {"spreads": torch.tensor(spreads, dtype=torch.float32)}
        privacy = self.method_setup.privacy
        if privacy.get("centroid_noise_multiplier") is not None:  # only the Gaussian mechanism's release
            rng = np.random.default_rng([self.method_setup.seed, ctx.client_id, 17])
            means, sizes = noisy_centroids(features.x, labels, len(means), privacy["centroid_clip"],
                                           privacy["centroid_noise_multiplier"], rng)
            arrays, curve = {}, None
        ctx.state["labels"] = labels
        config.update({"sizes": sizes.tolist(), "silhouette": {str(k): v for k, v in curve.items()} if curve else None})
        return Message({"centroids": torch.tensor(means, dtype=torch.float32), **arrays}, config)

    def fit(self, msg, ctx):
        cluster_of_example = self.clusters_of_examples(msg, ctx)
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

    def route(self, msg, ctx, split_name: str) -> np.ndarray:
        """The global cluster of each input of `split_name`: by the server's router among this client's clusters
        ("local", own tests) or all (generalization, "global"); fedrouter-oracle by the true task it knows."""
        examples, arrays = ctx.workbench.examples(split_name), msg.arrays
        local = split_name != "general" and msg.config.get("router", "local") == "local"
        if not all(isinstance(arrays.get(k), torch.Tensor) for k in ("router_weights", "router_bias", "router_owner")):
            raise FedrouterError("the server's evaluation message carries no router (router_weights, router_bias, router_owner)")
        routes = route(self.instructions(ctx, split_name), arrays["router_weights"].double().numpy(), arrays["router_bias"].double().numpy(),
                       arrays["router_owner"].round().long().numpy(), msg.config["allowed"] if local else None)
        oracle = msg.config.get("task_cluster")
        if oracle:  # oracle: the true task picks the adapter (the embedding where the task is unseen)
            routes = np.array([oracle.get(e["task"], g) for e, g in zip(examples, routes)])
        return routes

    def evaluate(self, msg, ctx):
        split_name = msg.config.get("split", "test")
        routes = self.route(msg, ctx, split_name)
        adapters = {str(g): unpack_under(msg.arrays, f"g{g}") for g in sorted(set(routes.tolist()))}
        report = ctx.workbench.evaluate_routed(adapters, [str(g) for g in routes], split_name, self.options["mixed_batch"])
        report["route_counts"] = confusion([e["task"] for e in ctx.workbench.examples(split_name)], routes)
        return Message(config=report)

    @staticmethod
    def clusters_of_examples(msg, ctx) -> np.ndarray:
        """Each training example's global cluster: the server's `mapping` of the labels given at setup."""
        mapping, labels = msg.config.get("mapping"), ctx.state.get("labels")
        if labels is None:
            raise FedrouterError("this client holds no cluster labels: it missed the method's setup")
        if not (isinstance(mapping, list) and all(isinstance(g, int) and not isinstance(g, bool) for g in mapping)
                and len(mapping) > int(np.max(labels, initial=-1)) and min((mapping[l] for l in set(labels.tolist())), default=0) >= 0):
            raise FedrouterError(f"the server's cluster mapping {mapping!r} does not cover this client's {int(np.max(labels)) + 1} labels")
        ctx.state["label_map"] = mapping
        return np.asarray(mapping, dtype=np.int64)[labels]

    def diagnostics(self, ctx):
        if "labels" not in ctx.state:
            return None
        train, mapping = ctx.workbench.examples("train"), ctx.state.get("label_map")
        return {"vectors": self.features(ctx).instruction, "tasks": [e.get("task") for e in train],
                "clusters": [mapping[l] if mapping else -1 for l in ctx.state["labels"]]}

