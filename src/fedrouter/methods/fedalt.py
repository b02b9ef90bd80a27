"""FedALT (Bian et al., "FedALT: Federated Fine-Tuning through Adaptive Local Training with Rest-of-World
LoRA", arXiv 2503.11880, AAAI 2026).

Each client k keeps an individual LoRA L_k that it goes on training round after round -- it is never
replaced by an aggregate -- and uploads after each round. The server keeps every client's latest upload
and sends client k its rest-of-the-world (RoW) adapter: the plain mean of the OTHER clients' latest
individual adapters, their A and B matrices averaged separately (as the authors' code does). Locally
the model is, in every LoRA layer and at every token x,

    W x + w_ind(x) * L_k(x) + w_row(x) * RoW_k(x),    (w_ind, w_row) = softmax(G x)

with RoW_k frozen and the mixer G (2 x in_features per layer, no bias, private) trained together with
L_k: the paper's adaptive mixer, a two-expert mixture-of-experts gate read per token from each layer's
input (`core.gated_mix`). Evaluation uses the same mix, with the RoW of the latest uploads.

Where it departs from the paper, and why:
- A RoW needs others' uploads: before any other client has uploaded, RoW_k is the run's initial adapter
  (B = 0, so it adds nothing); with client sampling, the others' latest uploads may be from earlier
  rounds, and a client the server has never heard from gets the mean of every upload (the paper has every
  client in every round, where this is its rule exactly).
- The mixer starts from an even mix (G = 0: w_ind = w_row = 1/2) rather than the code's random
  initialisation: nothing random to draw, and the first round leans to neither side.
- The partner (RoW) term takes no LoRA dropout: dropout regularises what is trained.

Options: mixer = "learned" (the paper's) or a number in (0, 1): the individual adapter's fixed weight
(w_ind = mixer, w_row = 1 - mixer at every token, nothing learned: the paper's fixed-mix ablation).

Differential privacy is refused: each round releases one mean per client, of different subsets of the same
uploads, and the server keeps each client's adapter across rounds rather than publishing one model a round;
DP-FedAvg's accountant (one noised mean of clipped round updates a round) counts neither.
"""

from __future__ import annotations

from fedrouter.core.gated_mix import GatedMix, even_gate
from fedrouter.methods.base import ClientPart, Message, MethodFacts, ServerPart
from fedrouter.methods.common import fit_reply, mean_fit_metrics, require

OPTIONS = {"mixer": "learned"}
LOOSE = {"mixer"}  # "learned" or a number


def check_options(method: str, opts: dict) -> None:
    mixer = opts["mixer"]
    fixed = isinstance(mixer, (int, float)) and not isinstance(mixer, bool) and 0 < mixer < 1
    require(mixer == "learned" or fixed, method,
            f"mixer must be \"learned\" or the individual adapter's fixed weight in (0, 1), got {mixer!r}")


class Server(ServerPart):
    FACTS = MethodFacts(
        adapters="{n_clients} individual adapters, each mixed with the others' mean by a private mixer",
        private_refusal="sends each client the mean of the other clients' adapters: one release per client a "
                        "round, of adapters the server keeps across rounds, which DP-FedAvg's accountant "
                        "(one noised mean a round) does not count")

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.initial_adapter = initial_adapter
        self.uploads: dict[int, dict] = {}  # each client's latest individual adapter

    def rest_of_world(self, client_id: int) -> dict:
        """The plain mean of the other clients' latest uploads (the initial adapter while there are none)."""
        others = [self.uploads[cid] for cid in sorted(self.uploads) if cid != client_id]
        return self.average(others, [1.0] * len(others)) if others else dict(self.initial_adapter)

    def configure_fit(self, round_idx, client_ids):
        return {cid: Message(self.rest_of_world(cid), {"round": round_idx}) for cid in client_ids}

    def aggregate_fit(self, round_idx, replies):
        for cid, reply in replies.items():
            self.uploads[cid] = dict(reply.arrays)
        return mean_fit_metrics(replies)

    def configure_evaluate(self, client_ids):
        return {cid: Message(self.rest_of_world(cid)) for cid in client_ids}


class Client(ClientPart):
    def _mixer(self, rest_of_world: dict, ctx) -> GatedMix:
        scaling, mixer = ctx.workbench.lora_scaling(), self.options["mixer"]
        if mixer != "learned":
            return GatedMix(rest_of_world, scaling, weight=float(mixer))
        return GatedMix(rest_of_world, scaling, gate=ctx.state.get("mixer") or even_gate(rest_of_world))

    def _individual(self, ctx) -> dict:
        # a client not yet trained holds the run's initialisation (B = 0)
        return ctx.state.get("individual") or ctx.workbench.initial_adapter()

    def fit(self, msg, ctx):
        mixer = self._mixer(msg.arrays, ctx)
        ctx.state["individual"], stats = ctx.workbench.train(self._individual(ctx), msg.config["round"], mixer=mixer)
        if mixer.gate is not None:
            ctx.state["mixer"] = mixer.gate
        return fit_reply(ctx.state["individual"], stats, ctx.workbench.n_train)

    def evaluate(self, msg, ctx):
        split = msg.config.get("split", "test")
        return Message(config=ctx.workbench.evaluate(self._individual(ctx), split, mixer=self._mixer(msg.arrays, ctx)))

    def adapters(self, ctx):
        return {"individual": ctx.state["individual"]} if "individual" in ctx.state else {}
