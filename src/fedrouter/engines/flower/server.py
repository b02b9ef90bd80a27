"""The Flower engine's server side (flwr 1.42.0): the driver every engine shares (`engines.driver.drive`)
over a `FlowerTransport`, which turns each client's `Message` into a Flower message for that client's
node and brings the replies back. Nodes are found by asking each one for its partition id
(`query.hello`); node ids are never assumed. On the node, `engines.flower.node.handle_message` rebuilds the
client and runs the method's client part.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from pathlib import Path

from flwr.app import ConfigRecord, Message as FlowerMessage, MessageType
from flwr.serverapp import Grid

from fedrouter.config import Config
from fedrouter.core.train import ClientTimeout
from fedrouter.engines.driver import drive
from fedrouter.engines.flower.worker_wire import HELLO, NODE, RESUME, RUN, SAVE, SETUP, RunConfigUnknownError, config_hash
from fedrouter.engines.flower.node_store import NodeStateLost
from fedrouter.engines.flower.wire import from_records, join_parts, split_parts, to_records
from fedrouter.engines.protocol import FailurePlan, failure_reply
from fedrouter.errors import FedrouterError
from fedrouter.methods.base import Message
from fedrouter.rundir import plain_name
from fedrouter.world import build_shared, server_part

log = logging.getLogger(__name__)


# How often the server asks the SuperLink for replies while it waits for them (Flower's own
# `Grid.send_and_receive` asks every 3 s, which a round paid on average 1.5 s for).
PULL_INTERVAL_S = 0.2
# What a node's reply is waited for beyond its client's own time budget (client_timeout_s): at least this.
REPLY_MARGIN_S = 30.0


class MessageNotPushed(RuntimeError):
    """The SuperLink did not take a message (or a reply came from another node than the one addressed)."""


class FlowerTransport:
    """Delivers one message per client to that client's node through the Grid and collects the replies.

    A training reply that is an error (the ClientApp raised) or that did not come back within
    `timeout_s` becomes a failed reply: the round goes on with the others. Setup and evaluation need
    every client, so a missing or failed reply there stops the run with the client's reason."""

    def __init__(self, grid: Grid, node_of: dict[int, int], config_text: str, timeout_s: float | None,
                 inject_failures: float = 0.0, seed: int = 0, run_dir: Path | str = "",
                 pull_interval_s: float = PULL_INTERVAL_S, send_config: bool = False):
        self.grid, self.node_of, self.config_text, self.timeout_s = grid, node_of, config_text, timeout_s
        self.pull_interval_s, self.margin_s = pull_interval_s, REPLY_MARGIN_S
        # The config travels once, at hello (send_config: the discovery's transport); then by its hash.
        self.config_hash, self.send_config = config_hash(config_text), send_config
        # The same draws as the in-process engine's, so both fail the same clients in the same rounds.
        self.failures = FailurePlan(inject_failures, seed)
        self.round = 0
        # What the nodes' state checkpoints go by (see engines.flower.node_store): this run's id, the exchange
        # number, the exchange after which each client's state last changed as far as the server knows,
        # and the exchange number at each server checkpoint still kept (the nodes keep what resuming needs).
        self.run_id = uuid.uuid4().hex[:12]
        # Nodes keep this run's files in a folder of this name under their own out-dir (never a path from here).
        self.run_name = Path(run_dir).resolve().name if run_dir else "run"
        self.seq = 0
        self.state_seq = {cid: 0 for cid in node_of}
        self.checkpoint_seqs: list[int] = []

    @property
    def keep_from(self) -> int:
        """The exchange of the oldest server checkpoint kept: a node needs no state older than its newest at it."""
        return self.checkpoint_seqs[0] if self.checkpoint_seqs else 0

    def reply_wait_s(self) -> float | None:
        """How long to wait for a node's reply: nodes cut their own training off at timeout_s; the margin is
        for the message's trip and the ClientApp's start, so that only a node that is gone (or hung) is
        waited for in vain. None (no client timeout): wait as long as it takes."""
        if self.timeout_s is None:
            return None
        return self.timeout_s + max(self.margin_s, 0.5 * self.timeout_s)

    def _exchange(self, messages: dict[int, Message], message_type: str, flags: dict[int, dict] | None = None) -> dict[int, Message]:
        group = str(self.round)
        self.seq += 1

        def flower_message(cid: int, with_config: bool) -> FlowerMessage:
            run = ConfigRecord({"config_hash": self.config_hash, **({"config": self.config_text} if with_config else {}),
                                "client": cid, "run_id": self.run_id, "run": self.run_name, "seq": self.seq,
                                "state_seq": self.state_seq[cid], "keep_from": self.keep_from, **(flags or {}).get(cid, {})})
            return FlowerMessage(to_records(messages[cid], {RUN: run}), dst_node_id=self.node_of[cid],
                                 message_type=message_type, group_id=group)

        wait = self.reply_wait_s()
        answers, missing = self._deliver({cid: flower_message(cid, self.send_config) for cid in messages}, wait)
        # A node that no longer holds the run's config (it restarted) did nothing: the same message again, with it.
        lost = [cid for cid, reply in answers.items() if reply.has_error()
                and error_reason(reply).startswith(f"{RunConfigUnknownError.__name__}:")]
        if lost:
            log.warning("client(s) %s no longer hold the run config: sending it again", lost)
            again, again_missing = self._deliver({cid: flower_message(cid, True) for cid in lost}, wait)
            for cid in lost:
                del answers[cid]
            answers.update(again)
            missing.update(again_missing)
        replies: dict[int, Message] = {}
        for cid, reply in answers.items():
            if reply.has_error():  # reads like the in-process engine's failure: "ExceptionName: message"
                replies[cid] = Message(config={"failed": error_reason(reply)})
                continue
            replies[cid] = from_records(reply.content)
            if NODE in reply.content:  # the node's client state is now the one after this exchange (or unchanged)
                self.state_seq[cid] = int(reply.content[NODE]["state_seq"])
        for cid, reason in missing.items():
            replies[cid] = failure_reply(reason)
        return {cid: replies[cid] for cid in messages}

    def _deliver(self, outgoing: dict[int, FlowerMessage], wait: float | None) -> tuple[dict[int, FlowerMessage], dict[int, Exception]]:
        """Push one message per client, then pull the replies every `pull_interval_s` until every client has
        answered or `wait` seconds have passed since the push (Flower's `Grid.send_and_receive` asks every
        3 s). Replies are matched to the messages sent by the id they reply to; a reply to anything else is
        ignored. Returns the replies by client, and for each client without one the reason."""
        cids = list(outgoing)
        ids = list(self.grid.push_messages([outgoing[cid] for cid in cids]))
        if len(ids) != len(cids):  # a grid that leaves out what it did not take (the in-memory one): by the ids given
            taken = set(ids)
            ids = [outgoing[cid].metadata.message_id if outgoing[cid].metadata.message_id in taken else None for cid in cids]
        pending: dict[str, int] = {}
        missing: dict[int, Exception] = {}
        for cid, message_id in zip(cids, ids):
            if message_id:  # the deployment's grid gives None for a message it did not take
                pending[message_id] = cid
            else:
                missing[cid] = MessageNotPushed("the SuperLink did not take the message (see the ServerApp's log)")
        deadline = None if wait is None else time.monotonic() + wait
        answers: dict[int, FlowerMessage] = {}
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                cid = pending.pop(reply.metadata.reply_to_message_id, None)
                if cid is None:
                    continue
                node = self.node_of[cid]
                if not reply.has_error() and reply.metadata.src_node_id != node:
                    missing[cid] = MessageNotPushed(f"the reply came from node {reply.metadata.src_node_id}, not {node}")
                    continue
                answers[cid] = reply
            if not pending:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            time.sleep(self.pull_interval_s if left is None else min(self.pull_interval_s, left))
        for cid in pending.values():
            missing[cid] = ClientTimeout(f"no reply within {wait:g} s")
        return answers, missing

    def exchange_all(self, messages, message_type: str, what: str) -> dict[int, Message]:
        replies = self._exchange(messages, message_type)
        for cid, reply in sorted(replies.items()):
            if "failed" in reply.config:
                raise FedrouterError(f"client {cid} failed during {what}: {reply.config['failed']}")
        return replies

    def setup(self, messages):
        return self.exchange_all(messages, SETUP, "setup")

    def fit(self, messages):
        self.round += 1
        flags = {cid: {"inject_failure": True} for cid in messages if self.failures.fails()}
        replies = self._exchange(messages, MessageType.TRAIN, flags)
        for cid, reply in sorted(replies.items()):
            # a node that lost its client's state would fail every round from now on: not a flaky client
            if reply.config.get("failed", "").startswith(NodeStateLost.__name__):
                raise FedrouterError(f"client {cid}: {reply.config['failed']}")
        return replies

    def evaluate(self, messages):
        return self.exchange_all(messages, MessageType.EVALUATE, "evaluation")

    def evaluate_batches(self, batches: list[dict[int, Message]]) -> list[dict[int, Message]]:
        """Several evaluations one after the other (each a message per client), as one message per client:
        the node evaluates the parts in order, as it would the messages one by one."""
        if len(batches) == 1:
            return [self.evaluate(batches[0])]
        cids = list(batches[0])
        if any(list(batch) != cids for batch in batches):
            raise ValueError("every evaluation of a batch must go to the same clients")
        replies = self.evaluate({cid: join_parts([batch[cid] for batch in batches]) for cid in cids})
        parts = {cid: split_parts(reply) for cid, reply in replies.items()}
        if any(len(p) != len(batches) for p in parts.values()):
            raise FedrouterError("a node answered a batch of evaluations with another number of reports")
        return [{cid: parts[cid][i] for cid in cids} for i in range(len(batches))]


_DEPLOYED_REASON = re.compile(r"<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>", re.S)


def error_reason(reply: FlowerMessage) -> str:
    """'ExceptionName: message' from a Flower error reply: deployment sends "<class 'x.Y'>:<'msg'>",
    simulation a whole traceback whose last line is "x.Y: msg"."""
    reason = reply.error.reason or f"error code {reply.error.code}"
    match = _DEPLOYED_REASON.search(reason)
    if match:
        return f"{match.group(1)}: {match.group(2)}"
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        found = re.match(r"(?:[\w.]*\.)?(\w+(?:Error|Exception|Failure|Timeout)): (.*)", line)
        if found:
            return f"{found.group(1)}: {found.group(2)}"
    return lines[-1] if lines else reason


class FlowerClients:
    """The client side as a Flower run sees it: nodes behind a Grid, each reporting its partition."""

    engine = "flower"

    def __init__(self, transport: FlowerTransport, info: dict[int, dict], checkpoint_keep: int = 0):
        self.transport, self._info = transport, info
        self.ids = sorted(info)
        self.checkpoint_keep = checkpoint_keep

    def mark_checkpoint(self) -> None:
        """A server checkpoint is taken after the latest exchange: the nodes keep what resuming to any kept
        checkpoint needs (the transport sends the oldest kept one's exchange with every message)."""
        t = self.transport
        t.checkpoint_seqs = (t.checkpoint_seqs + [t.seq])[-max(1, self.checkpoint_keep):]

    def state(self) -> dict:
        """What a server checkpoint needs of the client side: the transport's counters and draws. The
        clients' private states stay on their nodes, which checkpoint them (engines.flower.node_store)."""
        t = self.transport
        return {"flower": {"run_id": t.run_id, "seq": t.seq, "round": t.round, "state_seq": dict(t.state_seq),
                           "failure_rng": t.failures.state(), "checkpoint_seqs": list(t.checkpoint_seqs)}}

    def restore(self, saved: dict) -> None:
        """Go back to a server checkpoint: the transport as it was, and every node back to its client's
        state at that point (each reloads it from its own files, or the run stops with the reason)."""
        t, flower = self.transport, saved["flower"]
        t.run_id, t.seq, t.round = flower["run_id"], flower["seq"], flower["round"]
        t.state_seq, t.checkpoint_seqs = dict(flower["state_seq"]), list(flower["checkpoint_seqs"])
        t.failures.restore(flower["failure_rng"])
        t.exchange_all({cid: Message() for cid in self.ids}, RESUME, "resuming")

    def info(self) -> dict[int, dict]:
        return self._info

    def save_adapters(self, run_dir: Path, shared) -> list[str]:
        """Each node saves its clients' private adapters itself (they never travel), in its own folder for
        this run (`flower_node.run_folder`: in a simulation, the run directory itself)."""
        replies = self.transport.exchange_all({cid: Message() for cid in self.ids}, SAVE, "saving its adapters")
        return [plain_name(name, f"client {cid}'s adapter") for cid in self.ids for name in replies[cid].config["saved"]]

    def embedding_map(self, seed: int) -> None:
        """No embedding map: it would need the clients' embeddings, which a federation does not share."""

    def training_truth(self) -> None:
        """No task labels: a federation never ships its clients' labels, so clustering scores are null."""


def wait_for_nodes(grid: Grid, n: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise FedrouterError(f"only {len(nodes)} of {n} SuperNodes connected after {wait_s:g} s")
        time.sleep(0.5)


def discover_partitions(grid: Grid, nodes: list[int], config_text: str, timeout_s: float | None,
                        pull_interval_s: float = PULL_INTERVAL_S) -> tuple[dict[int, int], dict[int, dict], list[str]]:
    """Ask every node which partition (client id) it holds: {client id: node id}, each client's info,
    and the data's task list. Every client 0..n-1 must be held by exactly one node."""
    probe = FlowerTransport(grid, {i: node for i, node in enumerate(nodes)}, config_text, timeout_s,
                            pull_interval_s=pull_interval_s, send_config=True)
    replies = probe.exchange_all({i: Message() for i in range(len(nodes))}, HELLO, "hello")
    node_of, info, tasks = {}, {}, []
    for i, reply in replies.items():
        cid = reply.config["partition"]
        if cid in node_of:
            raise FedrouterError(f"nodes {node_of[cid]} and {nodes[i]} both hold partition {cid}; give each SuperNode "
                                 "its own --node-config partition-id")
        node_of[cid] = nodes[i]
        info[cid] = {"tasks": reply.config["tasks"], "n_train": reply.config["n_train"]}
        tasks = reply.config["all_tasks"]
    # n_clients nodes or more, each in 0..n_clients-1 (the node checks) and none twice: all are there
    return node_of, info, tasks


def run_on_grid(grid: Grid, cfg: Config, run_dir: Path, progress: bool = True, node_wait_s: float = 120.0, shared=None,
          saved: dict | None = None, pull_interval_s: float = PULL_INTERVAL_S) -> dict:
    """A whole run from the ServerApp: find the nodes, then the shared server loop (`shared`: the base
    model with its LoRA slot, when the caller has it loaded already; `saved`: the server checkpoint to
    resume from; `pull_interval_s`: how often to ask the SuperLink for replies while waiting)."""
    config_text = json.dumps(cfg.model_dump())
    nodes = wait_for_nodes(grid, cfg.n_clients, node_wait_s)
    node_of, info, tasks = discover_partitions(grid, nodes, config_text, cfg.client_timeout_s or node_wait_s, pull_interval_s)
    shared = shared or build_shared(cfg, progress)  # the initial adapter; PEFT files of the server's adapters
    server = server_part(cfg, shared, sorted(node_of))
    transport = FlowerTransport(grid, node_of, config_text, cfg.client_timeout_s, cfg.inject_failures, cfg.seed, run_dir,
                                pull_interval_s)
    clients = FlowerClients(transport, info, cfg.checkpoint_keep)
    return drive(cfg, run_dir, tasks, shared, server, clients, progress, saved)


