"""The server's round loop, written once for every engine.

An engine supplies a `Transport` (`engines.protocol`): something that delivers one message per client to
the client parts and brings back their replies. The loop knows nothing about how (a function call
in-process, a Flower Grid across machines); it samples clients, screens their updates, counts the bytes
each way and records per-round metrics.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from typing import Callable

import torch

from fedrouter.core.aggregate import update_norm
from fedrouter.engines.protocol import Transport
from fedrouter.errors import FedrouterError
from fedrouter.methods.base import Message, ServerPart
from fedrouter.progress import phase, steps

log = logging.getLogger(__name__)


class Traffic:
    """Bytes sent to clients (down) and received from them (up), over the whole run, in all and per client
    (keyed by the client id as text, as results.json and the checkpoint hold them): clients of different
    ranks or roles send different amounts."""

    def __init__(self):
        self.down = 0
        self.up = 0
        self.by_client: dict[str, dict[str, int]] = {"down": {}, "up": {}}

    def count(self, sent: dict[int, Message], received: dict[int, Message]) -> None:
        down, up = self.by_client["down"], self.by_client["up"]
        for cid, message in sent.items():
            down[str(cid)] = down.get(str(cid), 0) + message.nbytes()
        for cid, message in received.items():
            up[str(cid)] = up.get(str(cid), 0) + message.nbytes()
        self.down, self.up = sum(down.values()), sum(up.values())

    def state(self) -> dict:
        return {"down": self.down, "up": self.up, "by_client": self.by_client}

    def restore(self, saved: dict) -> None:
        self.down, self.up = saved["down"], saved["up"]
        self.by_client = {way: dict(saved["by_client"][way]) for way in ("down", "up")}


def sample_clients(client_ids: list[int], fraction: float, rng: random.Random) -> list[int]:
    """A sorted random subset of max(1, round(fraction * n)) clients; all of them when fraction is 1."""
    if fraction >= 1:
        return list(client_ids)
    k = max(1, round(fraction * len(client_ids)))
    return sorted(rng.sample(list(client_ids), k))


def update_problem(arrays: dict, expected: dict[str, tuple[int, ...]] | None) -> str | None:
    """Why an uploaded set of tensors cannot be aggregated (NaN/Inf, not floating point, missing or extra
    tensors, wrong shapes), or None when it can."""
    for name, t in sorted(arrays.items()):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return f"{name} is not a floating-point tensor"
        if not bool(torch.isfinite(t).all()):
            return f"{name} holds NaN or Inf"
    if expected is None:
        return None
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing:
        return f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    if extra:
        return f"unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    for name, shape in sorted(expected.items()):
        if tuple(arrays[name].shape) != tuple(shape):
            return f"{name} has shape {tuple(arrays[name].shape)}, expected {tuple(shape)}"
    return None


def screen_updates(server: ServerPart, messages: dict[int, Message], replies: dict[int, Message],
                   norm_ratio: float = 0.0) -> tuple[dict[int, Message], list[dict]]:
    """The replies fit to aggregate, and one {"client", "reason"} per rejected reply (logged).

    A reply is rejected for what `update_problem` finds against the method's `expected_upload`, or, with
    norm_ratio > 0 and at least 3 replies, for an update norm above norm_ratio times the round's median.
    """
    kept, rejected = {}, []
    for cid, reply in sorted(replies.items()):
        if "failed" in reply.config:
            rejected.append({"client": cid, "reason": f"client failed: {reply.config['failed']}"})
            continue
        problem = update_problem(reply.arrays, server.expected_upload(cid, messages[cid]))
        if problem:
            rejected.append({"client": cid, "reason": problem})
        else:
            kept[cid] = reply
    with_arrays = [cid for cid in kept if kept[cid].arrays]
    if norm_ratio > 0 and len(with_arrays) >= 3:
        norms = {cid: update_norm(kept[cid].arrays, messages[cid].arrays) for cid in with_arrays}
        median = statistics.median(norms.values())
        for cid, norm in norms.items():
            if median > 0 and norm > norm_ratio * median:
                rejected.append({"client": cid, "reason": f"update norm {norm:.3g} > {norm_ratio:g} x the round's median {median:.3g}"})
                del kept[cid]
    for r in rejected:
        log.warning("client %s: update rejected: %s", r["client"], r["reason"])
    return kept, rejected


class RoundLoop:
    """The server's side of the rounds, written once for every engine: the one-time setup exchange, the
    training rounds (sampling, screening, aggregation, one record per round) and evaluations. It owns the
    client-sampling generator, the traffic counters and the round history, and gives them to a checkpoint
    (`state`) and takes them back (`restore`)."""

    def __init__(self, server: ServerPart, transport: Transport, client_ids: list[int], rounds: int,
                 client_fraction: float = 1.0, seed: int = 0, progress: bool = True, norm_ratio: float = 0.0,
                 min_updates: int = 1):
        self.server, self.transport, self.client_ids = server, transport, list(client_ids)
        self.rounds, self.client_fraction = rounds, client_fraction
        self.progress, self.norm_ratio, self.min_updates = progress, norm_ratio, min_updates
        self.sampling = random.Random(f"client-sampling:{seed}")
        self.traffic = Traffic()
        self.history: list[dict] = []
        self.answered = (0, 0)  # the last round's clients that replied without failing, and those asked

    def setup(self) -> dict:
        """The method's exchanges before training, if it has any: as long as the server has setup messages
        to send (FedRouter: centroids in, then its cluster assignment), they go out and the replies back."""
        report, exchange = {}, 0
        while messages := self.server.configure_setup(self.client_ids):
            exchange += 1
            phase(f"setup, exchange {exchange}: {len(messages)} clients", self.progress)
            replies = self.transport.setup(messages)
            self.traffic.count(messages, replies)
            report.update(self.server.aggregate_setup(replies))
        return report

    def evaluate(self, split: str, base: bool = False) -> dict[int, dict]:
        """Each client's evaluation report on `split` (its own "test" set, or the "general" all-task set);
        `base`: the untrained base model, answered by the engine itself and not counted as traffic."""
        messages = self.server.configure_evaluate(self.client_ids) if not base else {cid: Message() for cid in self.client_ids}
        for msg in messages.values():
            msg.config.update({"split": split, "base": base})
        replies = self.transport.evaluate(messages)
        if not base:
            self.traffic.count(messages, replies)
        return {cid: reply.config for cid, reply in replies.items()}

    def evaluate_splits(self, splits: list[str]) -> list[dict[int, dict]]:
        """Each client's reports on several splits, evaluated one after the other as `evaluate` would; a
        transport that carries several evaluations in one message (`evaluate_batches`) sends each client
        one message for all of them (a round trip less on Flower), with the same results."""
        batches = getattr(self.transport, "evaluate_batches", None)
        if batches is None:
            return [self.evaluate(split) for split in splits]
        sent = []
        for split in splits:  # the server's messages in the same order as one evaluation after the other
            messages = self.server.configure_evaluate(self.client_ids)
            for msg in messages.values():
                msg.config.update({"split": split, "base": False})
            sent.append(messages)
        received = batches(sent)
        for messages, replies in zip(sent, received, strict=True):
            self.traffic.count(messages, replies)
        return [{cid: reply.config for cid, reply in replies.items()} for replies in received]

    def run(self, on_round: Callable[[dict], None] | None = None) -> list[dict]:
        """The training rounds from where the history stands to `rounds`; each round's record is appended to
        the history and passed to `on_round`. Returns the whole history.

        Replies are screened before aggregation (`screen_updates`); a round left with fewer than
        `min_updates` acceptable replies keeps the server's state as it was and says so in its record. A
        round in which every client failed with an error (not an injected one) stops the run: that is a bug
        or a broken setup, not a flaky client."""
        start_round = len(self.history)
        bar = steps(range(start_round, self.rounds), "rounds", unit="round", initial=start_round, total=self.rounds,
                    enabled=self.progress)
        for round_idx in bar:
            record = self._round(round_idx)
            self.history.append(record)
            answered, asked = self.answered
            bar.set_postfix_str(f"loss {record.get('train_loss', float('nan')):.3f}, round {record['round_s']:.1f} s, "
                                f"{answered}/{asked} clients answered")
            if on_round is not None:
                on_round(record)
        return self.history

    def _round(self, round_idx: int) -> dict:
        start = time.perf_counter()
        server, traffic = self.server, self.traffic
        selected = sample_clients(self.client_ids, self.client_fraction, self.sampling)
        messages = server.configure_fit(round_idx, selected)
        replies = self.transport.fit(messages)
        traffic.count(messages, replies)
        kept, rejected = screen_updates(server, messages, replies, self.norm_ratio)
        failures = [r["failed"] for r in (m.config for m in replies.values()) if "failed" in r]
        if replies and len(failures) == len(replies) and not all(f.startswith(("InjectedFailure", "ClientTimeout")) for f in failures):
            raise FedrouterError(f"round {round_idx + 1}: every client failed; the first: {failures[0]}")
        self.answered = (len(replies) - len(failures), len(messages))
        if len(kept) >= max(1, self.min_updates):
            metrics = server.aggregate_fit(round_idx, kept)
        else:
            metrics = {"skipped": f"{len(kept)} acceptable update(s), fewer than {max(1, self.min_updates)}: "
                                  "the server state is unchanged"}
            log.warning("round %d: %s", round_idx + 1, metrics["skipped"])
        # The slowest client's own training time: round_s minus it is what the engine and server cost.
        slowest = max((float(r.config.get("train_s", 0.0)) for r in kept.values()), default=0.0)
        record = {"round": round_idx + 1, **metrics, "rejected": rejected, "bytes_down": traffic.down,
                  "bytes_up": traffic.up, "round_s": time.perf_counter() - start, "slowest_client_s": slowest}
        return record

    def state(self) -> dict:
        return {"sampling_rng": self.sampling.getstate(), "traffic": self.traffic.state(),
                "history": list(self.history)}

    def restore(self, saved: dict) -> None:
        self.sampling.setstate(saved["sampling_rng"])
        self.traffic.restore(saved["traffic"])
        self.history = list(saved["history"])
