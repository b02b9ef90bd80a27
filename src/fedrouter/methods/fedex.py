"""FedEx-LoRA (Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", ACL 2025; arXiv:2410.09432, 2024).

Averaging A and B separately (FedIT) is not the average of the clients' updates: mean(B) @ mean(A) differs
from mean(B @ A) by cross terms. FedEx-LoRA keeps FedIT's global adapter and folds the difference into the
frozen base weights. Each round the selected clients train the global adapter (Ā, B̄) from the same model;
the server averages their A and B (example-weighted, p_k) into the new Ā, B̄ and, per adapted module, forms
the residual

    R = sum_k p_k * s * B_k @ A_k  -  s * B̄ @ Ā        (s = alpha / r, the LoRA scaling)

which every client adds to its frozen base. The global model after the round, base + all residuals so far
+ s * B̄ @ Ā, is then exactly the example-weighted average of the clients' trained models.

Where this departs from the paper, and why:
- The residual travels factored, not dense. R is the product of one rank-(K+1)r adapter: the clients' A
  blocks scaled by p_k * s and -s * Ā stacked along the rank, their B blocks and B̄ side by side
  (`lowrank.concat`), so a round's residual costs (K+1) * r * (in + out) numbers per module instead of the
  paper's dense out x in matrix: less whenever (K+1) * r * (in + out) < in * out (8 clients of rank 8 on a
  2048 x 2048 projection: 14x less). A client merges it as the same dense out x in update the paper adds.
- Weights p_k are the clients' example counts (FedIT's FedAvg), where the paper averages uniformly; the
  residual uses the same p_k, so the aggregation stays exact.
- Clients may be sampled. A client gets every residual it has not merged when it next trains or
  evaluates (`common.CatchUp`, as FLoRA's stacked modules), so every selected client trains on the same
  base. One that failed or was rejected in a round gets that round's residuals again; residuals are
  numbered, and a client merges each number once.
- No server optimizer or robust aggregation: either breaks the exactness the method exists for.

Traffic: up, the trained adapter (as FedIT); down, the global adapter plus the unmerged residuals' factors,
which grow with the clients per round and the rounds a client missed. The server keeps every round's
residual factors, as FLoRA keeps its stacked modules.

Differential privacy: refused. DP-FedAvg's noised mean could replace the averages of A and B, but the
residual is made from every client's exact product B_k @ A_k and released unnoised; it cannot be derived
from the noised means alone (those determine B̄ @ Ā, not the mean of the products).

The run saves `merged_update.safetensors` with FLoRA's meaning: the model after the last round is base +
that dense update (all residuals plus s * B̄ @ Ā).
"""

from __future__ import annotations

import math

import torch

from fedrouter.core import lowrank
from fedrouter.errors import FedrouterError
from fedrouter.methods.base import ClientPart, Message, MethodFacts, ServerPart
from fedrouter.methods.common import CatchUp, fit_reply, mean_fit_metrics, merge_new, pack_under, unpack_under

OPTIONS: dict = {}  # the paper has no knob; the mean must be the plain one for the aggregation to be exact

GLOBAL, RESIDUALS = "global", "residual"  # the two parts of a download


def residual(uploads: list[dict], weights: list[float], scaling: float, averaged: dict) -> dict:
    """The residual as a rank-(K+1)r adapter: its B @ A is sum_k p_k * s * B_k @ A_k - s * B̄ @ Ā, with
    p_k = weights[k] / sum(weights) (the weights `averaged` was made with)."""
    total = float(sum(weights))
    return lowrank.concat([*uploads, averaged], [w / total * scaling for w in weights] + [-scaling])


def scaling_of(replies: dict[int, Message]) -> float:
    """The LoRA scaling the round's clients trained with (one rank: one scaling), checked."""
    values = [replies[c].config.get("scaling") for c in sorted(replies)]  # a list: a peer may send anything
    value = values[0]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or any(v != value for v in values):
        raise FedrouterError(f"fedex: clients sent LoRA scalings {values!r}, not one positive number")
    return float(value)


class Server(ServerPart):
    # A and B are averaged, but the residual made from every exact product is released too (see the docstring)
    FACTS = MethodFacts(adapters="a merged dense update", writes_base_weights=True,
                        private_refusal="releases each round's residual, made from every client's exact B @ A and "
                        "not noised, which the accountant does not cover; use fedit")

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.global_adapter = dict(initial_adapter)
        self.initial_shapes = {name: tuple(t.shape) for name, t in initial_adapter.items()}
        self.residuals = CatchUp()  # each aggregated round's residual factors, merged by every client once
        self.scaling: float | None = None

    def _download(self, unmerged: dict) -> Message:
        """The global adapter and the residuals a client has not been sent yet."""
        return Message({**pack_under(GLOBAL, self.global_adapter), **pack_under(RESIDUALS, unmerged)})

    def configure_fit(self, round_idx, client_ids):
        messages = {cid: self._download(unmerged) for cid, unmerged in self.residuals.for_training(client_ids).items()}
        for msg in messages.values():
            msg.config["round"] = round_idx
        return messages

    def expected_upload(self, client_id, sent):
        return dict(self.initial_shapes)  # the trained global adapter

    def upload_reference(self, client_id, sent):
        return unpack_under(sent.arrays, GLOBAL)

    def aggregate_fit(self, round_idx, replies):
        ids = sorted(replies)
        uploads, weights = [replies[c].arrays for c in ids], [replies[c].config["n_examples"] for c in ids]
        self.scaling = scaling_of(replies)
        averaged = self.average(uploads, weights)
        this_round = residual(uploads, weights, self.scaling, averaged)
        self.residuals.add(this_round)
        self.residuals.confirm(ids)
        self.global_adapter = averaged
        # how far FedIT's mean of A and B alone would have been from the mean of the clients' models
        norm = math.sqrt(sum(float(d.square().sum()) for d in lowrank.dense_update(this_round, 1.0).values()))
        return {**mean_fit_metrics(replies), "residual_norm": norm}

    def configure_evaluate(self, client_ids):
        return {cid: self._download(unmerged) for cid, unmerged in self.residuals.for_evaluation(client_ids).items()}

    def merged_update(self) -> dict[str, torch.Tensor]:
        """What the clients' bases absorbed: the sum of every round's residual (module -> dense delta W)."""
        return self.residuals.merged()

    def tensor_files(self):
        """The model after the last round: base + this update (the residuals and s * B̄ @ Ā), FLoRA's file."""
        final = lowrank.add_updates(self.merged_update(), lowrank.dense_update(self.global_adapter, self.scaling or 0.0))
        return {"merged_update.safetensors": {name: delta.float().contiguous() for name, delta in final.items()}}


class Client(ClientPart):
    def _merge(self, msg, ctx) -> tuple[dict, dict | None]:
        """(global adapter, this client's base update) after adding the residuals it has not merged yet."""
        return unpack_under(msg.arrays, GLOBAL), merge_new(ctx, unpack_under(msg.arrays, RESIDUALS))

    def fit(self, msg, ctx):
        adapter, merged = self._merge(msg, ctx)
        wb = ctx.workbench
        trained, stats = wb.train(adapter, msg.config["round"], base_update=merged)
        reply = fit_reply(trained, stats, wb.n_train)
        reply.config["scaling"] = wb.lora_scaling()
        return reply

    def evaluate(self, msg, ctx):
        adapter, merged = self._merge(msg, ctx)
        return Message(config=ctx.workbench.evaluate(adapter, msg.config.get("split", "test"), base_update=merged))
