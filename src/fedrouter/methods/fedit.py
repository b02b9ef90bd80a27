"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024).

FedAvg on LoRA: every round each selected client trains the global adapter on its data and uploads it;
the server replaces the global adapter with the example-weighted average of the uploaded A and B matrices.

Options (shared by every averaging method): aggregation = mean (example-weighted) | median
(coordinate-wise) | trimmed_mean (coordinate-wise, dropping `trim` = 0.1 of the values at each end),
the robust ones unweighted; server_opt = fedavg | fedavgm | fedadam | fedyogi (Reddi et al. 2021, see
core/server_opt.py), server_lr (default per optimizer), beta1 (0.9), beta2 (0.99), tau (1e-3).
"""

from __future__ import annotations

from fedrouter.core.aggregate import coordinate_median, trimmed_mean, weighted_average
from fedrouter.core.server_opt import DEFAULT_LR, KINDS, ServerOptimizer
from fedrouter.methods.base import ClientPart, Message, MethodFacts, ServerPart
from fedrouter.methods.common import fit_reply, mean_fit_metrics, require

OPTIONS = {"aggregation": "mean", "trim": 0.1,
           "server_opt": "fedavg", "server_lr": None, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
AGGREGATIONS = ("mean", "median", "trimmed_mean")


def aggregate(opts: dict, states: list[dict], weights: list[float], average=weighted_average) -> dict:
    """The clients' uploads folded into one adapter, as the `aggregation` option says."""
    if opts["aggregation"] == "median":
        return coordinate_median(states)
    if opts["aggregation"] == "trimmed_mean":
        return trimmed_mean(states, opts["trim"])
    return average(states, weights)


def check_options(method: str, opts: dict) -> None:
    """The averaging options every FedIT-style method shares."""
    require(opts["aggregation"] in AGGREGATIONS, method,
            f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {opts['aggregation']!r}")
    require(0 <= opts["trim"] < 0.5, method, f"trim must be in [0, 0.5), got {opts['trim']!r}")
    require(opts["server_opt"] in KINDS, method, f"server_opt must be one of {', '.join(KINDS)}, got {opts['server_opt']!r}")
    lr = opts["server_lr"]
    require(lr is None or (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0), method,
            f"server_lr must be a positive number, got {lr!r}")
    for key in ("beta1", "beta2"):
        require(0 <= opts[key] < 1, method, f"{key} must be in [0, 1), got {opts[key]!r}")
    require(opts["tau"] > 0, method, f"tau must be positive, got {opts['tau']!r}")


def server_optimizer(opts: dict) -> ServerOptimizer:
    """The server optimizer the (checked) options name."""
    kind = opts["server_opt"]
    lr = DEFAULT_LR[kind] if opts["server_lr"] is None else opts["server_lr"]
    return ServerOptimizer(kind, float(lr), opts["beta1"], opts["beta2"], opts["tau"])


class Server(ServerPart):
    """Sends the travelling part of the global adapter and replaces it by the clients' example-weighted
    average, through the configured server optimizer. FedIT: all of it travels; FedSA-LoRA and FFA-LoRA
    override `travelling` (A only, B only)."""

    FACTS = MethodFacts(adapters="1 global adapter", folds_by_mean=True)

    def travelling(self, adapter: dict) -> dict:
        return adapter

    def __init__(self, setup, initial_adapter, client_ids):
        super().__init__(setup, initial_adapter, client_ids)
        self.optimizer = server_optimizer(self.options)
        self.initial_adapter = initial_adapter
        self.global_adapter = self.travelling(initial_adapter)

    def configure_fit(self, round_idx, client_ids):
        return {cid: Message(dict(self.global_adapter), {"round": round_idx}) for cid in client_ids}

    def aggregate_fit(self, round_idx, replies):
        average = aggregate(self.options, [r.arrays for r in replies.values()],
                            [r.config["n_examples"] for r in replies.values()], self.average)
        self.global_adapter = self.optimizer.step(self.global_adapter, average)
        return mean_fit_metrics(replies)

    def configure_evaluate(self, client_ids):
        return {cid: Message(dict(self.global_adapter)) for cid in client_ids}

    def adapters(self):
        # what never travels stays at the run's initialisation (FFA's frozen A)
        return {"global": {**self.initial_adapter, **self.global_adapter}}


class Client(ClientPart):
    def fit(self, msg, ctx):
        adapter, stats = ctx.workbench.train(msg.arrays, msg.config["round"])
        return fit_reply(adapter, stats, ctx.workbench.n_train)

    def eval_adapter(self, msg, ctx):
        return msg.arrays
