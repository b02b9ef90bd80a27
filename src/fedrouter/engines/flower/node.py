"""What runs on a Flower node (SuperNode) for fedrouter: one message for this node's client at a time.

`handle_message` rebuilds the client from the run's config (JSON: sent once, at hello, kept in Flower's
`context.state` and in this process, and called by its hash in every message) and from the private state
the server expects it to be in (kept in Flower's `context.state`, and in the
node's own checkpoint files, `engines.flower.node_store`, for when that memory is gone), runs the method's
client part, and keeps the new state. The base model, the data and their encoding are built once per
process and reused by every message that process serves. It is called by the thin ClientApp
(`engines.flower.client_app`) or, when the node config names one, by a long-lived `run_worker` the
ClientApp forwards to (Flower starts a fresh ClientApp process for every message).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import stat
import sys
from multiprocessing.connection import Listener
from pathlib import Path

from flwr.app import ConfigRecord, MessageType, RecordDict
from pydantic import ValidationError

from fedrouter.atomic import create_exclusive
from fedrouter.config import Config, cpu_threads
from fedrouter.core.train import time_budget
from fedrouter.engines.flower.node_store import NodeStateLost, NodeStore
from fedrouter.engines.flower.wire import (PARTS, STATE, from_records, join_parts, split_parts, state_bytes,
                                           state_from_bytes, to_records)
from fedrouter.engines.flower.worker_wire import (HELLO, NODE, RESUME, RUN, SAVE, SETUP, RunConfigUnknownError,
                                                  WorkerProtocolError, config_hash, recv_header, recv_records, send_parts)
from fedrouter.engines.protocol import InjectedFailure
from fedrouter.errors import FedrouterError
from fedrouter.methods.base import ClientContext, Message
from fedrouter.rundir import plain_name, save_adapters
from fedrouter.threads import set_threads
from fedrouter.world import World, client_part

log = logging.getLogger(__name__)

# Where a node keeps its runs' files when its node config has no `out-dir` (the simulation runtime sets it
# to the run directory's parent, so that a simulated node's files land in the run directory itself).
NODE_DIR_ENV = "FEDROUTER_NODE_DIR"


def run_folder(node_config: dict, run) -> Path:
    """This node's folder for the run: <out-dir>/<run name>, with out-dir from the node's own config
    (`--node-config out-dir=...`), else $FEDROUTER_NODE_DIR, else ./runs. The server only names the run
    (a plain name, checked): it never chooses a path on the node."""
    base = node_config.get("out-dir") or os.environ.get(NODE_DIR_ENV) or "runs"
    return Path(str(base)).resolve() / plain_name(run["run"], "the run name the server sent")


class NodeRun:
    """What one process builds once per run config: the run's world (shared model, data) and the method's
    client part; each client's workbench made once, with its batch-stream position when new."""

    def __init__(self, cfg: Config):
        set_threads(cpu_threads(cfg), cfg.threads)  # a simulation's Ray actors get one each through $OMP_NUM_THREADS
        self.cfg = cfg
        self.world = World(cfg, progress=False)
        self.client = client_part(cfg)
        self.workbenches: dict[int, tuple] = {}

    def workbench(self, cid: int):
        """Client `cid`'s workbench (data encoded once per process) and its stream state when new."""
        if cid not in self.workbenches:
            wb = self.world.workbench(cid)
            self.workbenches[cid] = (wb, wb.stream_state())
        return self.workbenches[cid]


_RUNS: dict[str, NodeRun] = {}
_CONFIGS: dict[str, str] = {}  # run config hash -> the config's text, in this process (a worker, a simulation actor)
CONFIG = "fedrouter-config"  # the key of the run's config in Flower's context.state


def _config_text(run, state) -> tuple[str, bool]:
    """The run's config the message calls by its hash: the one it carries (hello, or the server sending it
    again), else the one this node keeps (context.state, or this process); and whether `state` changed.
    A node that holds none (its SuperNode restarted, and no worker remembers it) says so, and the server
    sends the message again with the config."""
    digest = str(run["config_hash"])
    if "config" in run:
        text = str(run["config"])
        if config_hash(text) != digest:
            raise FedrouterError("the run config the server sent does not match its hash")
        _CONFIGS.clear()  # one run per process at a time
        _CONFIGS[digest] = text
    elif CONFIG in state and state[CONFIG]["hash"] == digest:
        return str(state[CONFIG]["json"]), False
    elif digest in _CONFIGS:
        text = _CONFIGS[digest]
    else:
        raise RunConfigUnknownError(f"this node does not hold the run config {digest[:12]} (its memory is gone)")
    if CONFIG in state and state[CONFIG]["hash"] == digest:
        return text, False
    state[CONFIG] = ConfigRecord({"hash": digest, "json": text})
    return text, True


def _node_run(config_text: str, node_config: dict) -> NodeRun:
    """The run's world on this node: its config is the server's, but for where files go -- the node's own
    `cache-dir` node config (else its default cache), never a path the server sent."""
    cache_dir = node_config.get("cache-dir")
    key = hashlib.sha256(f"{config_text}\n{cache_dir}".encode()).hexdigest()
    if key not in _RUNS:
        try:
            cfg = Config.model_validate(json.loads(config_text))
        except (ValueError, ValidationError) as exc:
            raise FedrouterError(f"the run config the server sent is not a valid config ({str(exc).splitlines()[0]})") from None
        _RUNS.clear()  # one run per process at a time: free the previous run's model
        _RUNS[key] = NodeRun(cfg.model_copy(update={"cache_dir": str(cache_dir) if cache_dir else None}))
    return _RUNS[key]


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


def handle_message(message_type: str, content: RecordDict, node_config: dict, state) -> tuple[RecordDict, bool]:
    """One message for this node's client: rebuild the client (the run's world, built once per process,
    plus the private state the server expects it to have: from `state`, Flower's context.state, or from
    the node's own checkpoint of it), let the method's client part act, keep the new state (in `state`,
    and in a checkpoint file when it changed), and return the reply's content and whether `state` changed
    (a state that did not is not written again). Raises what the client raises."""
    run = content[RUN]
    config_text, changed = _config_text(run, state)
    node_run = _node_run(config_text, node_config)
    cid = _partition(node_config, node_run.cfg.n_clients)
    if message_type == HELLO:  # discovery: the server does not know yet which client this node holds
        return to_records(_hello(node_run, cid)), changed
    if int(run["client"]) != cid:
        raise FedrouterError(f"the server addressed client {run['client']} but this node holds partition {cid}")
    if run.get("inject_failure"):
        raise InjectedFailure("injected failure")
    workbench, initial_streams = node_run.workbench(cid)
    store = _store(node_config, run, cid, node_run.cfg.checkpoint_keep)
    expected = int(run["state_seq"])
    blob, saved = _expected_state(state, expected, store, cid, {"state": {}, "streams": initial_streams})
    workbench.load_stream_state(saved["streams"])
    ctx = ClientContext(cid, workbench, saved["state"])
    # the node enforces the round's time budget itself: a slow client stops and reports, not the server waiting
    with time_budget(node_run.cfg.client_timeout_s if message_type == MessageType.TRAIN else None):
        reply = _WORK[message_type](from_records(content), ctx, node_run, run_folder(node_config, run))
    new_blob = state_bytes({"state": ctx.state, "streams": workbench.stream_state()})
    label = expected
    if new_blob != blob:  # the state after this exchange is a new one: checkpoint it under the exchange's number
        label = int(run["seq"])
        if store is not None:
            store.write(label, new_blob, keep_from=int(run["keep_from"]), keep={expected})
    if not (STATE in state and int(state[STATE]["seq"]) == label and state[STATE]["blob"] == new_blob):  # else: held already
        state[STATE] = ConfigRecord({"blob": new_blob, "seq": label})
        changed = True
    if store is not None and message_type == RESUME:
        store.drop_after(expected)  # what this node did past the server's checkpoint is undone
    if store is not None and message_type == SAVE:
        store.remove()  # the run is over
    return to_records(reply, {NODE: ConfigRecord({"state_seq": label})}), changed


def _store(node_config: dict, run, cid: int, checkpoint_keep: int) -> NodeStore | None:
    """Where this node checkpoints its client's state (in its own run folder); none when checkpoints are off."""
    if not checkpoint_keep:
        return None
    return NodeStore.of(run_folder(node_config, run), run["run_id"], cid)


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


def _hello(node_run: NodeRun, cid: int) -> Message:
    workbench, _ = node_run.workbench(cid)
    return Message(config={"partition": cid, "tasks": workbench.tasks, "n_train": workbench.n_train,
                           "all_tasks": list(node_run.world.data.tasks)})


def _save(msg: Message, ctx: ClientContext, node_run: NodeRun, folder: Path) -> Message:
    """The client's private adapters, written in this node's run folder (they never travel)."""
    named = {f"client{ctx.client_id}-{name}": a for name, a in node_run.client.adapters(ctx).items()}
    return Message(config={"saved": save_adapters(folder, node_run.world.shared, named)})


def _evaluate(msg: Message, ctx: ClientContext, node_run: NodeRun, folder: Path) -> Message:
    if PARTS in msg.config:  # several evaluations in one message: one after the other, as one by one
        return join_parts([_evaluate(part, ctx, node_run, folder) for part in split_parts(msg)])
    if msg.config.get("base"):  # the untrained base: the engine's job, not the method's
        return Message(config=ctx.workbench.evaluate(None, msg.config.get("split", "test")))
    return node_run.client.evaluate(msg, ctx)


_WORK = {
    RESUME: lambda m, ctx, w, folder: Message(),  # loading the expected state is all a resume asks of a node
    SETUP: lambda m, ctx, w, folder: w.client.setup(m, ctx),
    MessageType.TRAIN: lambda m, ctx, w, folder: w.client.fit(m, ctx),
    MessageType.EVALUATE: _evaluate,
    SAVE: _save,
}


def _private_folder(folder: Path) -> None:
    """The worker's socket and key live in a folder only this user can enter."""
    if not folder.is_dir():
        raise FedrouterError(f"the socket's folder {folder} does not exist; create it for this user only: mkdir -m 700 {folder}")
    info = folder.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise FedrouterError(f"the socket's folder {folder} must belong to this user and be closed to others "
                             f"(mode {oct(info.st_mode & 0o777)}): chmod 700 {folder}, or use a folder of your own")


def _clear_stale(path: Path, kind: str, is_kind, private_mode: bool) -> None:
    """Remove a file an earlier worker of this user left at `path` when it ended without cleaning up (a
    crash, SIGKILL); refuse anything else found there. Called only under the worker lock, so no live
    worker owns it. `private_mode`: the file must also be closed to others (a key; a socket made before
    sockets were made 0600 is this user's too, in a folder only this user can enter)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not is_kind(info.st_mode) or info.st_uid != os.geteuid() or (private_mode and info.st_mode & 0o077):
        raise FedrouterError(f"{path} exists and is not a {kind} this user's worker left (owner {info.st_uid}, "
                             f"mode {oct(info.st_mode & 0o777)}): remove it, or choose another --socket")
    path.unlink()


def _listening(socket_path: Path) -> bool:
    """Whether a process accepts connections on `socket_path` (a worker that predates the lock file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket_path))
        except OSError:  # refused (a socket nobody listens on: a dead worker's), or not a socket at all
            return False
    return True


def _worker_lock(lock_path: Path, socket_path: Path) -> int:
    """An flock on `<socket>.lock`, held for the worker's life (the kernel drops it however the worker
    ends), with the worker's pid in it: a second worker on the same socket is refused naming the first."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "(starting)"
        os.close(fd)
        raise FedrouterError(f"a worker (pid {holder}) is already serving on {socket_path}; stop it first, or choose "
                             "another --socket") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _remove_if_ours(path: Path, ours: tuple[int, int] | None) -> None:
    """Unlink `path` only if it is still the very file this worker made (same device and inode)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if ours is not None and (info.st_dev, info.st_ino) == ours:
        path.unlink()


def run_worker(socket_path: Path) -> None:
    """A long-lived process beside a SuperNode that does its clients' work, so that the base model and
    the data are loaded once, not once per message (Flower starts a fresh ClientApp process for
    every message). The SuperNode's ClientApp forwards each message here when its node config names
    this socket (`worker=<path>`); the key in `<path>.key` (created exclusively, mode 0600, in a folder
    only this user can enter) authenticates it. One worker per socket: it holds `<path>.lock` for its
    life, so a second one is refused without touching the first one's socket or key, and a worker that
    was killed leaves nothing that stops the next (its stale socket and key are recognised and replaced).
    The socket is made 0600; on the way out a worker removes only the socket and key it made. A
    malformed message is refused; the worker goes on."""
    socket_path = Path(socket_path).absolute()
    _private_folder(socket_path.parent)
    key_path = socket_path.with_name(socket_path.name + ".key")
    lock = _worker_lock(socket_path.with_name(socket_path.name + ".lock"), socket_path)
    made: dict[str, tuple[int, int] | None] = {"key": None, "socket": None}
    try:
        if _listening(socket_path):
            raise FedrouterError(f"a process is already serving on {socket_path}; stop it first, or choose another --socket")
        _clear_stale(key_path, "key file", stat.S_ISREG, private_mode=True)
        _clear_stale(socket_path, "socket", stat.S_ISSOCK, private_mode=False)
        key = secrets.token_bytes(32)
        create_exclusive(key_path, key, mode=0o600)
        info = os.lstat(key_path)
        made["key"] = (info.st_dev, info.st_ino)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped by pid: clean up below
        umask = os.umask(0o177)  # the socket file is born 0600 (bind takes its mode from the umask)
        try:
            listener = Listener(str(socket_path), family="AF_UNIX", authkey=key)
        finally:
            os.umask(umask)
        info = os.lstat(socket_path)
        made["socket"] = (info.st_dev, info.st_ino)
        log.warning("fedrouter worker listening on %s", socket_path)
        with listener:
            while True:
                try:
                    conn = listener.accept()
                except Exception as exc:  # a client with a wrong key, or one that hung up: keep serving
                    log.warning("fedrouter worker: refused a connection: %s", exc)
                    continue
                with conn:
                    _handle_connection(conn)
    finally:
        _remove_if_ours(key_path, made["key"])
        _remove_if_ours(socket_path, made["socket"])
        os.close(lock)


def _handle_connection(conn) -> None:
    """One forwarded message: read it (refusing a malformed one), handle it, send the reply and new state."""
    try:
        header = recv_header(conn)
        message_type, node_config = header.get("type"), header.get("node_config")
        if not isinstance(message_type, str) or not isinstance(node_config, dict) or not all(
                isinstance(v, (str, int, float, bool)) for v in node_config.values()):
            raise WorkerProtocolError("the header needs a string 'type' and a flat 'node_config' object")
        content, state = recv_records(conn, 2)
    except (EOFError, OSError):
        return  # the ClientApp hung up
    except WorkerProtocolError as exc:
        log.warning("fedrouter worker: refused a malformed message: %s", exc)
        _reply(conn, {"status": "error", "name": "WorkerProtocolError", "text": str(exc)})
        return
    try:
        reply, changed = handle_message(message_type, content, node_config, state)
        # the node's state goes back only when it changed (the ClientApp keeps the one it has otherwise)
        answer = ({"status": "ok", "state": changed}, reply, *([state] if changed else []))
    except Exception as exc:  # the ClientApp raises it again, so Flower reports an error reply
        answer = ({"status": "error", "name": type(exc).__name__, "text": str(exc)},)
    _reply(conn, *answer)


def _reply(conn, header: dict, *records) -> None:
    try:
        send_parts(conn, header, *records)
    except OSError as exc:  # the ClientApp is gone (its node stopped it): take the next one
        log.warning("fedrouter worker: could not reply: %s", exc)
