"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020), on LoRA.

FedIT's rounds and averaging, with a proximal term in each client's loss that keeps its adapter near
the global one: loss + mu/2 * ||theta - theta_global||^2 over the adapter parameters. Option: mu (0.01),
plus FedIT's server optimizer options.
"""

from __future__ import annotations

from fedrouter.methods import fedit
from fedrouter.methods.common import fit_reply, require

OPTIONS = {**fedit.OPTIONS, "mu": 0.01}


def check_options(method: str, opts: dict) -> None:
    fedit.check_options(method, opts)
    require(opts["mu"] >= 0, method, f"mu must be a non-negative number, got {opts['mu']!r}")


Server = fedit.Server


def proximal_term(global_adapter: dict, mu: float):
    """regularizer(live parameters) = mu/2 * sum ||live - global||^2, the global copy held fixed."""
    anchor = {k: v.detach().clone() for k, v in global_adapter.items()}

    def term(live: dict):
        return 0.5 * mu * sum(((live[k] - anchor[k].to(live[k].device)) ** 2).sum() for k in anchor)

    return term


class Client(fedit.Client):
    def fit(self, msg, ctx):
        penalty = proximal_term(msg.arrays, self.options["mu"])
        adapter, stats = ctx.workbench.train(msg.arrays, msg.config["round"], penalty=penalty)
        return fit_reply(adapter, stats, ctx.workbench.n_train)
