"""What runs on a Flower node (SuperNode) for fedrouter: one message for this node's client at a time.

`serve_message` rebuilds the client from what every message carries -- the run's config (JSON) -- and
from the private state the server expects it to be in (kept in Flower's `context.state`, and in the
node's own checkpoint files, `engines.node_store`, for when that memory is gone), runs the method's
client part, and keeps the new state. The base model, the data and their encoding are built once per
process and reused by every message that process serves. It is called by the thin ClientApp
(`flower_client`) or, when the node config names one, by a long-lived `serve_worker` the ClientApp
forwards to (Flower 1.41 starts a fresh ClientApp process for every message).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from flwr.app import ConfigRecord, MessageType, RecordDict

from fedrouter.config import Config
from fedrouter.core.train import time_budget
from fedrouter.engines.flower_client import HELLO, NODE, RESUME, RUN, SAVE, SETUP
from fedrouter.engines.inprocess import InjectedFailure
from fedrouter.engines.node_store import NodeStateLost, NodeStore
from fedrouter.engines.wire import STATE, from_records, state_bytes, state_from_bytes, to_records
from fedrouter.errors import FedrouterError
from fedrouter.methods.base import ClientContext, Message

log = logging.getLogger(__name__)


class _World:
    """What one process builds once per run config: the shared model, the data, the method's client part."""

    def __init__(self, cfg: Config):
        import torch

        from fedrouter.experiment import build_data, build_shared, method_setup
        from fedrouter.methods import load_method

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.data = build_data(cfg)
        self.shared = build_shared(cfg, progress=False)
        self.general_encoded = self.shared.encode(self.data.general_test)
        self.client = load_method(cfg.method)[1](method_setup(cfg))
        self.workbenches: dict[int, tuple] = {}

    def workbench(self, cid: int):
        """Client `cid`'s workbench (data encoded once per process) and its stream state when new."""
        from fedrouter.core.workbench import ClientWorkbench

        if cid not in self.workbenches:
            data = next(c for c in self.data.clients if c.client_id == cid)
            wb = ClientWorkbench(self.shared, data, self.data.general_test, self.cfg.seed, self.general_encoded)
            self.workbenches[cid] = (wb, wb.stream_state())
        return self.workbenches[cid]


_WORLDS: dict[str, _World] = {}


def _world(config_text: str) -> _World:
    key = hashlib.sha256(config_text.encode()).hexdigest()
    if key not in _WORLDS:
        _WORLDS.clear()  # one run per process at a time: free the previous run's model
        _WORLDS[key] = _World(Config.model_validate(json.loads(config_text)))
    return _WORLDS[key]


def _partition(node_config: dict, n_clients: int) -> int:
    raw = node_config.get("partition-id")
    if raw is None:
        raise FedrouterError("this SuperNode has no partition-id: start it with --node-config \"partition-id=I num-partitions=N\"")
    try:
        cid = int(raw)
    except (TypeError, ValueError):
        raise FedrouterError(f"partition-id must be an integer, got {raw!r}") from None
    if not 0 <= cid < n_clients:
        raise FedrouterError(f"partition-id {cid} is outside 0..{n_clients - 1} (the run has {n_clients} clients)")
    return cid


def serve_message(message_type: str, content: RecordDict, node_config: dict, state) -> RecordDict:
    """One message for this node's client: rebuild the client (the run's world, built once per process,
    plus the private state the server expects it to have: from `state`, Flower's context.state, or from
    the node's own checkpoint of it), let the method's client part act, keep the new state (in `state`,
    and in a checkpoint file when it changed), and return the reply's content. Raises what the client raises."""
    run = content[RUN]
    world = _world(run["config"])
    cid = _partition(node_config, world.cfg.n_clients)
    if message_type == HELLO:  # discovery: the server does not know yet which client this node holds
        return to_records(_hello(world, cid))
    if int(run["client"]) != cid:
        raise FedrouterError(f"the server addressed client {run['client']} but this node holds partition {cid}")
    if run.get("inject_failure"):
        raise InjectedFailure("injected failure")
    workbench, initial_streams = world.workbench(cid)
    store = _store(node_config, run, cid, world.cfg.checkpoint_keep)
    expected = int(run["state_seq"])
    blob, saved = _expected_state(state, expected, store, cid, {"state": {}, "streams": initial_streams})
    workbench.load_stream_state(saved["streams"])
    ctx = ClientContext(cid, workbench, saved["state"])
    # the node enforces the round's time budget itself: a slow client stops and reports, not the server waiting
    with time_budget(world.cfg.client_timeout_s if message_type == MessageType.TRAIN else None):
        reply = _WORK[message_type](from_records(content), ctx, world, node_config)
    new_blob = state_bytes({"state": ctx.state, "streams": workbench.stream_state()})
    label = expected
    if new_blob != blob:  # the state after this exchange is a new one: checkpoint it under the exchange's number
        label = int(run["seq"])
        if store is not None:
            store.write(label, new_blob, keep_from=int(run["keep_from"]), keep={expected})
    state[STATE] = ConfigRecord({"blob": new_blob, "seq": label})
    if store is not None and message_type == RESUME:
        store.drop_after(expected)  # what this node did past the server's checkpoint is undone
    if store is not None and message_type == SAVE:
        store.remove()  # the run is over
    return to_records(reply, {NODE: ConfigRecord({"state_seq": label})})


def _store(node_config: dict, run, cid: int, checkpoint_keep: int) -> NodeStore | None:
    """Where this node checkpoints its client's state: under its `out-dir` node config if it has one, else
    under the run directory's path (the same machine's, in a simulation); none when checkpoints are off."""
    if not checkpoint_keep:
        return None
    base = node_config.get("out-dir") or run["dir"]
    return NodeStore.of(Path(base), str(run["run_id"]), cid) if base else None


def _expected_state(state, expected: int, store: NodeStore | None, cid: int, initial: dict) -> tuple[bytes, dict]:
    """The client state after exchange `expected` (0: the initial state): its bytes, and it decoded."""
    if STATE in state and int(state[STATE]["seq"]) == expected:
        blob = state[STATE]["blob"]
        return blob, state_from_bytes(blob)
    if expected == 0:
        blob = state_bytes(initial)
        return blob, state_from_bytes(blob)  # a copy: the cached initial stream position stays untouched
    if store is None:
        raise NodeStateLost(f"client {cid}'s state after exchange {expected} is not in this node's memory and "
                            "node checkpoints are off (checkpoint_keep = 0)")
    blob = store.read(expected, cid)
    try:  # written whole (renamed into place), so only a damaged disk makes this fail: say which file
        return blob, state_from_bytes(blob)
    except Exception as exc:
        raise NodeStateLost(f"client {cid}'s state file {store.path(expected)} is unreadable ({type(exc).__name__}: {exc})") from None


def _hello(world: _World, cid: int) -> Message:
    workbench, _ = world.workbench(cid)
    return Message(config={"partition": cid, "tasks": workbench.tasks, "n_train": workbench.n_train,
                           "all_tasks": list(world.data.tasks)})


def _save(msg: Message, ctx: ClientContext, world: _World, node_config: dict) -> Message:
    """The client's private adapters, written on this node (they never travel)."""
    from fedrouter.experiment import save_peft

    out = Path(node_config.get("out-dir") or msg.config["dir"])
    named = {f"client{ctx.client_id}-{name}": a for name, a in world.client.adapters(ctx).items()}
    return Message(config={"saved": save_peft(out, world.shared, named)})


_WORK = {
    RESUME: lambda m, ctx, w, nc: Message(),  # loading the expected state is all a resume asks of a node
    SETUP: lambda m, ctx, w, nc: w.client.setup(m, ctx),
    MessageType.TRAIN: lambda m, ctx, w, nc: w.client.fit(m, ctx),
    MessageType.EVALUATE: lambda m, ctx, w, nc: w.client.evaluate(m, ctx),
    SAVE: _save,
}


def serve_worker(socket_path: Path) -> None:
    """A long-lived process beside a SuperNode that does its clients' work, so that the base model and
    the data are loaded once, not once per message (Flower 1.41 starts a fresh ClientApp process for
    every message). The SuperNode's ClientApp forwards each message here when its node config names
    this socket (`worker=<path>`); the key in `<path>.key` (readable by this user only) authenticates it."""
    import secrets
    from multiprocessing.connection import Listener

    socket_path = Path(socket_path)
    socket_path.unlink(missing_ok=True)
    key = secrets.token_bytes(32)
    key_path = socket_path.with_name(socket_path.name + ".key")
    key_path.touch(mode=0o600)
    key_path.write_bytes(key)
    log.warning("fedrouter worker listening on %s", socket_path)
    with Listener(str(socket_path), family="AF_UNIX", authkey=key) as listener:
        while True:
            try:
                conn = listener.accept()
            except Exception as exc:  # a client with a wrong key, or one that hung up: keep serving
                log.warning("fedrouter worker: refused a connection: %s", exc)
                continue
            with conn:
                try:
                    message_type, content, node_config, state = conn.recv()
                except (EOFError, OSError):
                    continue
                try:
                    answer = ("ok", (serve_message(message_type, content, node_config, state), state))
                except Exception as exc:  # the ClientApp raises it again, so Flower reports an error reply
                    answer = ("error", (type(exc).__name__, str(exc)))
                try:
                    conn.send(answer)
                except OSError as exc:  # the ClientApp is gone (its node stopped it): serve the next one
                    log.warning("fedrouter worker: could not reply: %s", exc)
