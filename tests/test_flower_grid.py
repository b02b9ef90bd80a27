"""The Flower engine's server loop and ClientApp, exchanged through a Grid stand-in that hands every real
Flower message to the real ClientApp in this process (each node with its own Context, random node ids).
Fast enough to run every method: the same results as in-process, bit for bit; nodes found by the
partition they report; failures and silent nodes dropped from the round and counted."""

from __future__ import annotations

import json
import random
import shutil
import time
import uuid
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed")

from flwr.app import ConfigRecord, Context, Error, Message as FlowerMessage, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from conftest import assert_same_run  # noqa: E402

from fedrouter.config import load_config  # noqa: E402
from fedrouter import rundir  # noqa: E402
from fedrouter.engines.flower import node as flower_node, server as flower  # noqa: E402
from fedrouter.engines.flower_client import client_app  # noqa: E402
from fedrouter.engines.flower.worker_wire import NODE  # noqa: E402
from fedrouter.engines.flower.wire import to_records  # noqa: E402
from fedrouter.errors import FedrouterError  # noqa: E402
from fedrouter.methods.base import Message  # noqa: E402
from fedrouter.experiment import run_experiment  # noqa: E402
from fedrouter.methods import METHODS  # noqa: E402



class ServerCrashed(Exception):
    pass


class LocalGrid:
    """Delivers each message to `flower.client_app` with the destination node's own Context, as soon as it
    is pushed; its reply waits to be pulled, as on a SuperLink. A ClientApp that raises becomes an error
    reply, as on a SuperNode; nodes in `silent` never answer."""

    def __init__(self, node_configs: list[dict], silent_rounds: dict[int, set[str]] | None = None, seed: int = 3,
                 crash_in_round: int | None = None, restart_in_round: dict[int, int] | None = None):
        rng = random.Random(seed)
        self.contexts = {rng.getrandbits(63): Context(run_id=1, node_id=0, node_config=c, state=RecordDict(), run_config={})
                         for c in node_configs}
        self.silent = silent_rounds or {}  # node index -> message groups (rounds) it does not answer
        # the server dies after its first message of this round's training has been served
        self.crash_in_round = crash_in_round
        # node index -> round: the node restarts before that round's training (its memory is gone)
        self.restart = dict(restart_in_round or {})
        self.replies: dict[str, FlowerMessage] = {}  # message id -> the reply to it, not pulled yet
        self.pushed: list[FlowerMessage] = []  # every message pushed, in order

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        raise AssertionError("the server pushes and pulls itself (Flower's send_and_receive waits 3 s between pulls)")

    def push_messages(self, messages):
        index = {node: i for i, node in enumerate(self.contexts)}
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do
            ids.append(msg.metadata.message_id)
            self.pushed.append(msg)
            node = msg.metadata.dst_node_id
            if msg.metadata.group_id in self.silent.get(index[node], set()):
                continue
            if msg.metadata.message_type == "train" and self.restart.get(index[node]) == int(msg.metadata.group_id):
                del self.restart[index[node]]
                self.contexts[node].state = RecordDict()
                flower_node._RUNS.clear()  # a new process: nothing cached either
                flower_node._CONFIGS.clear()
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as exc:
                reply = FlowerMessage(Error(code=2, reason=f"<class '{type(exc).__module__}.{type(exc).__name__}'>:<'{exc}'>"), reply_to=msg)
            assert reply.metadata.src_node_id == node  # reply_to addresses it from the node it went to
            assert reply.metadata.reply_to_message_id == msg.metadata.message_id
            self.replies[msg.metadata.message_id] = reply
            if msg.metadata.message_type == "train" and int(msg.metadata.group_id) == self.crash_in_round:
                raise ServerCrashed(f"the server died in round {self.crash_in_round}")
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


@pytest.fixture(autouse=True)
def _nodes_keep_their_files_in_the_run_directory(tmp_path, monkeypatch):
    # As in Flower's simulation: every node's folder for a run is <tmp_path>/<run name>, the run directory.
    monkeypatch.setenv(flower_node.NODE_DIR_ENV, str(tmp_path))


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower's Message needs the identity its runtime sets for the process; this test is that runtime.
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _partitions(n: int, order=None) -> list[dict]:
    return [{"partition-id": p, "num-partitions": n} for p in (order or range(n))]


def _serve(cfg, out: Path, grid) -> dict:
    torch.manual_seed(cfg.seed)
    return rundir.write_run(out, cfg.model_dump(), lambda: flower.run_on_grid(grid, cfg, out, progress=False, node_wait_s=5))


def _same(a: Path, b: Path) -> None:
    assert_same_run(a, b, also_ignore={"engine"})


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_the_inprocess_result_over_the_flower_loop(method, tmp_path, tiny_overrides, tiny_model_dir):
    options = {"flora": {"lora.client_ranks": [2, 4]}, "flexlora": {"lora.client_ranks": [2, 4]},
               # a global rank above lora.r (the seeded start, saved as factors), every client pruning every round
               "hetlora": {"lora.client_ranks": [2, 4, 16], "method_options": {"prune_threshold": 10.0}},
               "fedlease": {"method_options": {"warmup_rounds": 1}},
               "fedcluster": {"method_options": {"cluster_round": 1}}}.get(method, {})
    cfg = load_config(None, {**tiny_overrides, "method": method, "scenario": "dual", "n_clients": 3, **options})
    run_experiment(cfg, tmp_path / "inprocess", progress=False)
    # nodes listed in another order than their partitions: the server must go by what they report
    _serve(cfg, tmp_path / "flower", LocalGrid(_partitions(3, [2, 0, 1])))
    _same(tmp_path / "inprocess", tmp_path / "flower")


@pytest.mark.parametrize("method, privacy", [
    ("fedit", {"mode": "central", "noise_multiplier": 1.0, "clip": 0.1}),
    ("fedrouter", {"mode": "local", "noise_multiplier": 0.5, "clip": 0.1, "centroid_noise_multiplier": 1.0}),
])
def test_differential_privacy_gives_the_inprocess_numbers_on_flower(method, privacy, tmp_path, tiny_overrides, tiny_model_dir):
    # the same clipping, the same seeded noise (server-side, or drawn on each node), the same epsilon
    from conftest import FEDROUTER_DP_OPTIONS

    options = FEDROUTER_DP_OPTIONS if method == "fedrouter" else {}
    cfg = load_config(None, {**tiny_overrides, "method": method, "scenario": "dual", "n_clients": 3, "privacy": privacy,
                             "method_options": options})
    run_experiment(cfg, tmp_path / "inprocess", progress=False)
    _serve(cfg, tmp_path / "flower", LocalGrid(_partitions(3)))
    _same(tmp_path / "inprocess", tmp_path / "flower")
    assert json.loads((tmp_path / "flower" / "results.json").read_text())["privacy"]["epsilon"] > 0


def test_failures_and_silent_nodes_are_dropped_from_their_round_and_counted(tmp_path, tiny_overrides, tiny_model_dir,
                                                                           monkeypatch):
    cfg = load_config(None, {**tiny_overrides, "method": "fedit", "n_clients": 3, "rounds": 4, "inject_failures": 0.4,
                             "client_timeout_s": 60})
    run_experiment(cfg, tmp_path / "inprocess", progress=False)
    _serve(cfg, tmp_path / "flower", LocalGrid(_partitions(3)))
    _same(tmp_path / "inprocess", tmp_path / "flower")  # the same clients fail in the same rounds
    failures = json.loads((tmp_path / "flower" / "results.json").read_text())["client_failures_per_round"]
    assert sum(failures) > 0
    # a node that stays silent in round 2 is dropped from it once its time is up (2 s + a margin cut to 1 s)
    monkeypatch.setattr(flower, "REPLY_MARGIN_S", 0.5)
    quiet = load_config(None, {**tiny_overrides, "method": "fedit", "n_clients": 3, "rounds": 3, "client_timeout_s": 2})
    results = _serve(quiet, tmp_path / "silent", LocalGrid(_partitions(3), silent_rounds={1: {"2"}}))
    assert results["client_failures_per_round"] == [0, 1, 0]
    (rejected,) = results["rejected_updates"]
    assert rejected["round"] == 2 and rejected["client"] == 1 and "ClientTimeout" in rejected["reason"]


def test_partitions_must_be_held_once_each(tmp_path, tiny_overrides, tiny_model_dir):
    cfg = load_config(None, {**tiny_overrides, "method": "fedit", "n_clients": 2})
    with pytest.raises(FedrouterError, match="both hold partition 0"):
        _serve(cfg, tmp_path / "a", LocalGrid([{"partition-id": 0}, {"partition-id": 0}]))
    with pytest.raises(FedrouterError, match="only 1 of 2 SuperNodes connected"):
        _serve(cfg, tmp_path / "b", LocalGrid([{"partition-id": 0}]))
    with pytest.raises(FedrouterError, match="has no partition-id"):
        _serve(cfg, tmp_path / "c", LocalGrid([{"partition-id": 0}, {}]))
    with pytest.raises(FedrouterError, match="outside 0..1"):
        _serve(cfg, tmp_path / "d", LocalGrid([{"partition-id": 0}, {"partition-id": 5}]))
    for d in "abcd":  # a refused run is marked failed, never complete
        assert not (tmp_path / d / "results.json").exists()


def test_a_long_lived_worker_serves_every_message_with_the_same_results(tmp_path, tiny_overrides, tiny_model_dir):
    # `fedrouter flower worker`: the ClientApp forwards to it when the node config names its socket; the
    # world is built once in the worker, and the results equal the in-process run's.
    import subprocess
    import sys

    from fedrouter.testing import stop

    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="frw", dir="/tmp"))  # this user's only; Unix socket paths must be short
    socket_path = folder / "node.sock"
    worker = subprocess.Popen([sys.executable, "-m", "fedrouter.cli", "flower", "worker", "--socket", str(socket_path)],
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / "worker.log").open("w"))
    try:
        deadline = time.monotonic() + 120
        while not socket_path.with_name(socket_path.name + ".key").exists() or not socket_path.exists():
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.2)
        cfg = load_config(None, {**tiny_overrides, "method": "fedrouter", "scenario": "dual", "n_clients": 2,
                                 "inject_failures": 0.3, "rounds": 3})
        run_experiment(cfg, tmp_path / "inprocess", progress=False)
        nodes = [{"partition-id": p, "worker": str(socket_path)} for p in (1, 0)]
        _serve(cfg, tmp_path / "flower", LocalGrid(nodes))
        _same(tmp_path / "inprocess", tmp_path / "flower")
        assert worker.poll() is None  # still serving
    finally:
        stop(worker)
        shutil.rmtree(folder, ignore_errors=True)


def _crash_and_resume(cfg, out: Path, crash_in_round: int, damage=None) -> None:
    """Serve `cfg` until the server dies in round `crash_in_round`; optionally `damage(out)`; then resume
    it on a new federation (new node ids, empty node memories, new processes) as `flwr run ... resume=true` does."""
    with pytest.raises(ServerCrashed):
        _serve(cfg, out, LocalGrid(_partitions(cfg.n_clients), crash_in_round=crash_in_round))
    assert (out / "FAILED").exists() and not (out / "results.json").exists()
    if damage:
        damage(out)
    flower_node._RUNS.clear()
    (lock, saved), n = rundir.lock_for_resume(out, cfg.model_dump()), cfg.n_clients
    rundir.write_run(out, cfg.model_dump(), lambda: flower.run_on_grid(LocalGrid(_partitions(n, [*range(1, n), 0]), seed=11), cfg, out,
                                             progress=False, node_wait_s=5, saved=saved), resumed_under=lock)


@pytest.mark.slow
@pytest.mark.parametrize("method, extra, crash_in_round", [
    ("fedrouter", {}, 3),  # private state from setup (local clusters, embeddings)
    ("flora", {"eval_every": 1, "client_fraction": 0.67, "lora.client_ranks": [2, 4]}, 2),  # state changed by evaluation
    ("fedex", {"client_fraction": 0.67, "inject_failures": 0.3}, 3),  # residuals resent after a failure, caught up later
    ("local", {"inject_failures": 0.3}, 3),  # private adapters; failure draws
])
def test_a_crashed_server_resumes_to_the_uninterrupted_result(method, extra, crash_in_round, tmp_path, tiny_overrides, tiny_model_dir):
    cfg = load_config(None, {**tiny_overrides, "method": method, "scenario": "dual", "n_clients": 3, "rounds": 4, **extra})
    run_experiment(cfg, tmp_path / "inprocess", progress=False)
    out = tmp_path / "flower"
    _crash_and_resume(cfg, out, crash_in_round)
    _same(tmp_path / "inprocess", out)
    assert not (out / "checkpoints").exists()  # nor the nodes' state files: a finished run keeps none


@pytest.mark.slow
def test_a_corrupt_server_checkpoint_sends_the_nodes_back_to_the_one_before(tmp_path, tiny_overrides, tiny_model_dir, caplog):
    cfg = load_config(None, {**tiny_overrides, "method": "local", "n_clients": 3, "rounds": 5, "checkpoint_keep": 3})
    run_experiment(cfg, tmp_path / "inprocess", progress=False)
    out = tmp_path / "flower"

    def truncate_newest(run_dir: Path) -> None:
        newest = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))[-1]
        assert newest.name == "round-00003.safetensors"
        newest.write_bytes(newest.read_bytes()[:100])

    _crash_and_resume(cfg, out, crash_in_round=4, damage=truncate_newest)
    assert "round-00003.safetensors is unreadable" in caplog.text  # so the nodes went back to their round-2 states
    _same(tmp_path / "inprocess", out)


@pytest.mark.slow
def test_a_restarted_node_reloads_its_clients_state_and_the_run_is_unchanged(tmp_path, tiny_overrides, tiny_model_dir):
    cfg = load_config(None, {**tiny_overrides, "method": "fedrouter", "scenario": "dual", "n_clients": 2, "rounds": 3})
    run_experiment(cfg, tmp_path / "inprocess", progress=False)
    _serve(cfg, tmp_path / "flower", LocalGrid(_partitions(2), restart_in_round={0: 2, 1: 3}))
    _same(tmp_path / "inprocess", tmp_path / "flower")


def test_a_restarted_node_that_lost_its_files_too_stops_the_run(tmp_path, tiny_overrides, tiny_model_dir):
    cfg = load_config(None, {**tiny_overrides, "method": "local", "n_clients": 2, "rounds": 3})
    grid = LocalGrid(_partitions(2), restart_in_round={1: 3})
    real_push = grid.push_messages

    def push_messages(messages):  # the restarted node comes back with an empty disk too
        messages = list(messages)
        if any(m.metadata.message_type == "train" and m.metadata.group_id == "3" for m in messages):
            shutil.rmtree(tmp_path / "flower" / "checkpoints" / "nodes", ignore_errors=True)
        return real_push(messages)

    grid.push_messages = push_messages
    with pytest.raises(FedrouterError, match=r"client 1: NodeStateLost: client 1's state after exchange \d+ is not on this node"):
        _serve(cfg, tmp_path / "flower", grid)


def test_a_node_without_its_saved_state_stops_the_resume_with_the_reason(tmp_path, tiny_overrides, tiny_model_dir):
    cfg = load_config(None, {**tiny_overrides, "method": "local", "n_clients": 2, "rounds": 3})

    def lose_client_1(run_dir: Path) -> None:
        (folder,) = (run_dir / "checkpoints" / "nodes").glob("*/client1")
        shutil.rmtree(folder)

    with pytest.raises(FedrouterError, match=r"client 1 failed during resuming: NodeStateLost: client 1's state after exchange \d+"):
        _crash_and_resume(cfg, tmp_path / "flower", crash_in_round=2, damage=lose_client_1)
    assert (tmp_path / "flower" / "FAILED").exists() and not (tmp_path / "flower" / "results.json").exists()

    def damage_client_0(run_dir: Path) -> None:
        for path in (run_dir / "checkpoints" / "nodes").glob("*/client0/state-*.state"):
            path.write_bytes(path.read_bytes()[:50])

    with pytest.raises(FedrouterError, match=r"client 0 failed during resuming: NodeStateLost: client 0's state file .* is unreadable"):
        _crash_and_resume(cfg, tmp_path / "flower2", crash_in_round=2, damage=damage_client_0)


class SlowGrid:
    """A SuperLink whose nodes answer `delay_s` after the push: node `errors` with an error, nodes in `silent`
    never; every pull also returns a reply to a message this server never sent."""

    def __init__(self, nodes: list[int], delay_s: float, silent=(), errors=()):
        self.nodes, self.delay_s, self.silent, self.errors = nodes, delay_s, set(silent), set(errors)
        self.ready: dict[str, tuple[float, FlowerMessage]] = {}
        self.pulls = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        raise AssertionError("the server pushes and pulls itself")

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.errors:
                reply = FlowerMessage(Error(code=2, reason="<class 'builtins.RuntimeError'>:<'boom'>"), reply_to=msg)
            else:
                reply = FlowerMessage(to_records(Message(config={"train_s": 0.0}), {NODE: ConfigRecord({"state_seq": 0})}),
                                      reply_to=msg)
            self.ready[msg.metadata.message_id] = (time.monotonic() + self.delay_s, reply)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        now, out = time.monotonic(), []
        for i in list(message_ids):
            if i in self.ready and self.ready[i][0] <= now:
                out.append(self.ready.pop(i)[1])
        stray = FlowerMessage(RecordDict(), dst_node_id=self.nodes[0], message_type="train")
        stray.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return out + [FlowerMessage(RecordDict(), reply_to=stray)]  # a reply to something else: ignored


def _transport(grid, timeout_s=None):
    return flower.FlowerTransport(grid, {cid: node for cid, node in enumerate(grid.nodes)}, "{}", timeout_s)


def test_a_reply_is_picked_up_within_the_pull_interval_not_flowers_3_s():
    grid = SlowGrid([11, 22], delay_s=0.4)
    transport = _transport(grid)
    assert transport.pull_interval_s == flower.PULL_INTERVAL_S == 0.2
    start = time.monotonic()
    replies = transport.fit({0: Message(), 1: Message()})
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 1.0, elapsed  # Grid.send_and_receive would have slept 3 s after its first pull
    assert all("failed" not in r.config for r in replies.values()) and set(replies) == {0, 1}
    assert grid.pulls >= 2
    # the interval is the transport's to choose
    grid, start = SlowGrid([11], delay_s=0.3), time.monotonic()
    fast = _transport(grid)
    fast.pull_interval_s = 0.05
    fast.fit({0: Message()})
    assert time.monotonic() - start < 0.5 and grid.pulls >= 5


def test_a_silent_node_is_dropped_at_its_timeout_and_an_error_reply_counts_as_a_failure():
    grid = SlowGrid([11, 22, 33], delay_s=0.1, silent=[22], errors=[33])
    transport = _transport(grid, timeout_s=0.3)
    transport.margin_s = 0.2  # wait = timeout_s + max(margin, timeout_s / 2) = 0.5 s
    start = time.monotonic()
    replies = transport.fit({0: Message(), 1: Message(), 2: Message()})
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 1.2, elapsed
    assert "failed" not in replies[0].config
    assert replies[1].config["failed"] == "ClientTimeout: no reply within 0.5 s"
    assert replies[2].config["failed"] == "RuntimeError: boom"


def test_a_node_that_lost_the_run_config_gets_it_again_and_the_config_travels_once(tmp_path, tiny_overrides, tiny_model_dir):
    # hello carries the config; later messages call it by its hash; a restarted node (memory and process
    # gone) says it does not hold it and gets the same message again with it (test_a_restarted_node_...)
    cfg = load_config(None, {**tiny_overrides, "method": "fedit", "n_clients": 2, "rounds": 3})
    grid = LocalGrid(_partitions(2), restart_in_round={0: 2})
    _serve(cfg, tmp_path / "flower", grid)
    with_config = [(m.metadata.message_type, m.metadata.group_id, m.metadata.dst_node_id) for m in grid.pushed
                   if "config" in m.content["run"]]
    node0 = list(grid.contexts)[0]
    assert sorted(with_config) == sorted([("query.hello", "0", n) for n in grid.contexts] + [("train", "2", node0)])


@pytest.mark.parametrize("run_config, needle", [
    ({"node-wait-s": float("nan")}, "node-wait-s must be in (0, 86400]"),
    ({"node-wait-s": float("inf")}, "node-wait-s must be in (0, 86400]"),
    ({"pull-interval-s": float("nan")}, "pull-interval-s must be in (0, 60]"),
])
def test_the_server_apps_waits_must_be_finite(run_config, needle, tmp_path):
    # issue 32: NaN/inf refused for every number a user gives; a NaN wait would wait for the nodes forever
    from fedrouter.engines.flower.app import _main

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"out": str(tmp_path / "r"), **run_config})
    with pytest.raises(FedrouterError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _main(None, context)
    assert not (tmp_path / "r").exists()
