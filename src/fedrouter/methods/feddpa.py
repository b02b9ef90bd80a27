"""FedDPA-T (Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models", NeurIPS 2024).

Each client holds a global adapter G (averaged across clients, FedIT-style) and a local adapter L that
never leaves it. Each round: L is trained with G frozen, the model being W + mix * G + (1 - mix) * L
(mix = 0.5, the reference code's local weight); then G is trained alone and uploaded for averaging.

Inference weights the two adapters per test input x (instance-wise dynamic weighting): with s(x) the
mean cosine similarity between x's representation and those of `instances` of the client's training
inputs (last hidden state, mean-pooled, with L active), L gets weight w(x) = local_scale * s(x) and G
gets lambda(x) = 1 - w(x). The more x looks like the client's own data, the more its local adapter
answers. The weights enter every decoding step of x's own generation (per-row scaling of each
adapter's LoRA output), not after the answers are produced.

Options: mix (0.5), instances (5: a seeded sample of the client's training inputs), local_scale (0.5,
the reference's "half"), plus FedIT's server optimizer options for G.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch

from fedrouter.core import lowrank
from fedrouter.methods import fedit
from fedrouter.methods.base import ClientPart, Message
from fedrouter.methods.common import fit_reply, require

OPTIONS = {**fedit.OPTIONS, "mix": 0.5, "instances": 5, "local_scale": 0.5}


def check_options(method: str, opts: dict) -> None:
    fedit.check_options(method, opts)
    require(0 < opts["mix"] < 1 and opts["instances"] >= 1 and opts["local_scale"] >= 0, method,
            "mix must be in (0, 1), instances a positive integer, local_scale >= 0")


def global_weights(test_vectors: np.ndarray, local_vectors: np.ndarray, local_scale: float) -> np.ndarray:
    """lambda per test row: 1 - local_scale * mean_j cos(test_i, local_j), clipped to [0, 1]."""
    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    similarity = (unit(test_vectors) @ unit(local_vectors).T).mean(axis=1)
    return np.clip(1.0 - local_scale * similarity, 0.0, 1.0)


def scale_b(adapter: dict, factor: float) -> dict:
    """The adapter with every B multiplied by `factor` (its update B @ A scales by the same factor)."""
    return {k: v * factor if ".lora_B." in k else v for k, v in adapter.items()}


class Server(fedit.Server):
    # its partner adapter is added to the base weights: a quantized base cannot hold it
    FACTS = replace(fedit.Server.FACTS, adapters="1 global + {n_clients} private adapters", writes_base_weights=True)

    def report(self, evaluations, truth=None):
        """The global adapter's mean weight lambda on the clients' own tasks and on every task."""
        return {"feddpa_lambda": {split: float(np.mean([r["lambda"]["mean"] for r in reports.values()]))
                                  for split, reports in evaluations.items()}}


class Client(ClientPart):
    def fit(self, msg, ctx):
        wb, mix = ctx.workbench, self.options["mix"]
        global_adapter, round_idx = msg.arrays, msg.config["round"]
        local = ctx.state.get("local") or wb.initial_adapter()
        # Local phase: the slot holds (1 - mix) * L so that the trained model is W + mix*G + (1-mix)*L
        # exactly, with mix*G frozen in the base; L is recovered by undoing the factor.
        frozen_global = lowrank.dense_update(global_adapter, wb.lora_scaling() * mix)
        trained, _ = wb.train(scale_b(local, 1 - mix), round_idx, base_update=frozen_global)
        ctx.state["local"] = scale_b(trained, 1 / (1 - mix))
        # Global phase: G alone, uploaded.
        adapter, stats = wb.train(global_adapter, round_idx)
        return fit_reply(adapter, stats, wb.n_train)

    def weights(self, ctx, split: str) -> torch.Tensor:
        """(examples, 2): per test input, [lambda for G, 1 - lambda for L]."""
        wb = ctx.workbench
        examples, train = wb.examples(split), wb.examples("train")
        rng = random.Random(f"feddpa:{self.method_setup.seed}:{ctx.client_id}")
        reference = rng.sample(train, min(self.options["instances"], len(train)))
        local = ctx.state.get("local") or wb.initial_adapter()  # the representation with L active
        lam = global_weights(wb.embed([e["instruction"] for e in examples], adapter=local),
                             wb.embed([e["instruction"] for e in reference], adapter=local), self.options["local_scale"])
        ctx.state.setdefault("lambda", {})[split] = lam.tolist()
        return torch.tensor(np.stack([lam, 1 - lam], axis=1))

    def evaluate(self, msg, ctx):
        split = msg.config.get("split", "test")
        local = ctx.state.get("local") or ctx.workbench.initial_adapter()
        report = ctx.workbench.evaluate_weighted([msg.arrays, local], self.weights(ctx, split), split)
        lam = ctx.state["lambda"][split]
        report["lambda"] = {"mean": float(np.mean(lam)), "min": float(np.min(lam)), "max": float(np.max(lam))}
        return Message(config=report)

    def adapters(self, ctx):
        return {"local": ctx.state["local"]} if "local" in ctx.state else {}
