"""The in-process engine: every client part runs in this process, against ONE shared base model.

Clients differ only in the adapter weights loaded before they work and in their private state dict, so
memory grows with adapters and data, not with the number of clients.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from fedrouter import rundir
from fedrouter.core.embed import project_2d
from fedrouter.core.train import ClientTimeout, time_budget
from fedrouter.engines.protocol import FailurePlan, InjectedFailure, failure_reply
from fedrouter.methods.base import ClientContext, ClientPart, Message
from fedrouter.progress import steps

__all__ = ["InProcessTransport", "InProcessClients", "InjectedFailure"]


class InProcessTransport:
    """Delivers messages by calling the client part. In training, a client that raises is reported as
    a failed reply (the round goes on with the others); `inject_failures` = p makes each client fail a
    round with probability p (seeded), to exercise that path; a client whose training runs past
    `client_timeout_s` is cut off at its next training step (or, if the time went elsewhere, its reply
    is treated as arriving too late); its update is dropped and what it did to its own state stays, as
    on a real slow machine."""

    def __init__(self, client_part: ClientPart, contexts: dict[int, ClientContext], progress: bool = True,
                 inject_failures: float = 0.0, seed: int = 0, client_timeout_s: float | None = None):
        self.client_part = client_part
        self.contexts = contexts
        self.progress = progress
        self.failures = FailurePlan(inject_failures, seed)
        self.client_timeout_s = client_timeout_s

    def _deliver(self, messages: dict[int, Message], handler, desc: str, log: bool = True) -> dict[int, Message]:
        """Each client's reply to its message. On a log, a line per client at most every few seconds: a setup or
        an evaluation of 8 clients takes minutes on a busy machine (`log=False` for training: the round's line)."""
        items = steps(messages.items(), desc, leave=False, enabled=self.progress, log=log)
        return {cid: handler(msg, self.contexts[cid]) for cid, msg in items}

    def setup(self, messages):
        return self._deliver(messages, self.client_part.setup, "clients setting up")

    def _fit_one(self, msg: Message, ctx: ClientContext) -> Message:
        try:
            if self.failures.fails():
                raise InjectedFailure("injected failure")
            start = time.perf_counter()
            with time_budget(self.client_timeout_s):  # training steps past the budget are cut off
                reply = self.client_part.fit(msg, ctx)
            took = time.perf_counter() - start
            if self.client_timeout_s is not None and took > self.client_timeout_s:
                raise ClientTimeout(f"took {took:.1f} s, over the {self.client_timeout_s:g} s budget")
            return reply
        except Exception as exc:  # a failing client is this round's loss, not the run's
            return failure_reply(exc)

    def fit(self, messages):
        return self._deliver(messages, self._fit_one, "clients training", log=False)

    def _evaluate_one(self, msg: Message, ctx: ClientContext) -> Message:
        if msg.config.get("base"):  # the untrained base: the engine's job, not the method's
            return Message(config=ctx.workbench.evaluate(None, msg.config.get("split", "test")))
        return self.client_part.evaluate(msg, ctx)

    def evaluate(self, messages):
        return self._deliver(messages, self._evaluate_one, "clients evaluating")


class InProcessClients:
    """The client side as the in-process engine holds it: every client's context in this process."""

    engine = "inprocess"

    def __init__(self, client: ClientPart, contexts: dict[int, ClientContext], progress: bool = True,
                 inject_failures: float = 0.0, seed: int = 0, client_timeout_s: float | None = None):
        self.client, self.contexts = client, contexts
        self.transport = InProcessTransport(client, contexts, progress, inject_failures, seed, client_timeout_s)
        self.ids = sorted(contexts)
        self._diagnostics: dict[int, dict] | None = None  # read once at the end of the run (_final_diagnostics)

    def info(self) -> dict[int, dict]:
        return {cid: {"tasks": ctx.workbench.tasks, "n_train": ctx.workbench.n_train} for cid, ctx in self.contexts.items()}

    def save_adapters(self, run_dir: Path, shared) -> list[str]:
        """The clients' private adapters, in PEFT format under adapters/client<id>-<name>/."""
        return rundir.save_adapters(run_dir, shared, {f"client{cid}-{name}": adapter for cid, ctx in sorted(self.contexts.items())
                                                      for name, adapter in self.client.adapters(ctx).items()})

    def embedding_map(self, seed: int, per_client: int = 150) -> list[dict] | None:
        """A 2-D PCA of (a sample of) the clients' training embeddings with true task and global cluster;
        only methods whose clients embed their data (FedRouter) have one."""
        rng = np.random.default_rng(seed)
        vectors, points = [], []
        for cid, diag in self._final_diagnostics().items():
            n = len(diag["tasks"])
            keep = np.sort(rng.choice(n, size=min(per_client, n), replace=False))
            vectors.append(np.asarray(diag["vectors"])[keep])
            points += [{"client": cid, "task": diag["tasks"][i], "cluster": int(diag["clusters"][i])} for i in keep]
        if not points:
            return None
        for point, (a, b) in zip(points, project_2d(np.concatenate(vectors), seed)):
            point["x"], point["y"] = float(a), float(b)
        return points

    def training_truth(self) -> dict[int, dict] | None:
        """True task and cluster of every training example, read in this process for the report only."""
        truth = {cid: {"tasks": diag["tasks"], "clusters": [int(c) for c in diag["clusters"]]}
                 for cid, diag in self._final_diagnostics().items()}
        return truth or None

    def _final_diagnostics(self) -> dict[int, dict]:
        """Each client's `diagnostics` (its training embeddings, true tasks and clusters), for the end-of-run
        reports: read once, as the embedding map and the training truth both need them and the clients'
        state no longer changes then (clients without any are left out)."""
        if self._diagnostics is None:
            self._diagnostics = {cid: diag for cid, ctx in sorted(self.contexts.items())
                                 if (diag := self.client.diagnostics(ctx))}
        return self._diagnostics

    def mark_checkpoint(self) -> None:
        """Nothing to do: every client's state is in this process, and goes into the checkpoint itself."""

    def state(self) -> dict:
        """Private states, stream positions, failure draws."""
        return {"client_states": {cid: ctx.state for cid, ctx in self.contexts.items()},
                "streams": {cid: ctx.workbench.stream_state() for cid, ctx in self.contexts.items()},
                "failure_rng": self.transport.failures.state()}

    def restore(self, saved: dict) -> None:
        for cid, ctx in self.contexts.items():
            ctx.state = saved["client_states"][cid]
            ctx.workbench.load_stream_state(saved["streams"][cid])
        self.transport.failures.restore(saved["failure_rng"])
