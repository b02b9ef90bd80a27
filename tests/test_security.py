"""Nothing read back is unpickled, and a server cannot choose a path on a node.

Each attack carries a pickle payload that, if it were ever unpickled, would create a marker file: the
crafted checkpoint, node state file and worker message are refused with one line, and the marker never
appears. Run ids and run names from a server that are paths (`../`, absolute) are refused before any file
is touched. Key files are created exclusively with mode 0600; a planted one is refused."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import one_error_line

from fedrouter.cli import main
from fedrouter.core.statefile import UnreadableState


class Payload:
    """Unpickling this touches `marker`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def torch_pickle(marker: Path) -> bytes:
    """What `torch.save` of a crafted object writes (torch.load(weights_only=False) would run it)."""
    buffer = io.BytesIO()
    torch.save({"server": Payload(marker), "format": 2, "round": 1}, buffer)
    return buffer.getvalue()



def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys, caplog):
    from fedrouter import checkpoint
    from fedrouter.config import Config

    marker = tmp_path / "ran"
    run_dir = tmp_path / "handed-to-you"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(Config().model_dump()))
    for name in ("round-00002.safetensors", "round-00001.pt"):  # today's name, and the old pickle one
        (run_dir / "checkpoints" / name).write_bytes(torch_pickle(marker))
    (run_dir / "checkpoints" / "round-00001.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "no readable checkpoint" in one_error_line(capsys.readouterr().err)
    assert "round-00002.safetensors is unreadable" in caplog.text
    with pytest.raises(UnreadableState):
        checkpoint.read(run_dir / "checkpoints" / "round-00001.safetensors")
    assert not marker.exists()


def test_a_crafted_node_state_file_is_refused_and_runs_nothing(tmp_path):
    pytest.importorskip("flwr")
    from fedrouter.engines.flower import node as flower_node
    from fedrouter.engines.flower.node_store import NodeStateLost, NodeStore
    from fedrouter.engines.flower.wire import state_from_bytes

    marker = tmp_path / "ran"
    with pytest.raises(UnreadableState):
        state_from_bytes(torch_pickle(marker))
    store = NodeStore.of(tmp_path / "node", "0123456789ab", 0)
    store.write(4, torch_pickle(marker), keep_from=0, keep=set())  # planted where the node keeps state 4
    with pytest.raises(NodeStateLost, match=r"state-0000004.state is unreadable"):
        flower_node._expected_state({}, 4, store, 0, {"state": {}, "streams": {}})
    assert not marker.exists()


@pytest.mark.parametrize("run_id", ["../../victim", "/tmp/victim", "0123456789ab/../..", "", 5])
def test_a_run_id_that_is_a_path_is_refused(tmp_path, run_id):
    from fedrouter.engines.flower.node_store import NodeStore
    from fedrouter.errors import FedrouterError

    with pytest.raises(FedrouterError, match="not a run id"):
        NodeStore.of(tmp_path, run_id, 0)


@pytest.mark.parametrize("run_name", ["..", "../victim", "/tmp/victim", "a/b", ".hidden", ""])
def test_a_run_name_that_is_a_path_is_refused(tmp_path, run_name):
    pytest.importorskip("flwr")
    from fedrouter.engines.flower.node import run_folder
    from fedrouter.errors import FedrouterError

    with pytest.raises(FedrouterError, match="not a plain name"):
        run_folder({"out-dir": str(tmp_path)}, {"run": run_name})
    assert run_folder({"out-dir": str(tmp_path)}, {"run": "fedit-dual-seed0"}) == tmp_path.resolve() / "fedit-dual-seed0"


def test_a_save_message_with_a_crafted_run_id_deletes_nothing_outside_the_node(tmp_path, tiny_overrides, tiny_model_dir):
    # The attack of issue 13: a SAVE whose run id walks out of the node's folder made the node rmtree it.
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, RecordDict

    from fedrouter.config import load_config
    from fedrouter.engines.flower.worker_wire import RUN, SAVE, config_hash
    from fedrouter.engines.flower.node import handle_message
    from fedrouter.errors import FedrouterError

    victim = tmp_path / "victim"
    (victim / "client0").mkdir(parents=True)
    (victim / "client0" / "precious").write_text("keep me")
    cfg = load_config(None, {**tiny_overrides, "method": "local"})
    node = tmp_path / "node"
    text = json.dumps(cfg.model_dump())
    for run_id in ("../../../../victim", str(victim)):
        run = ConfigRecord({"config": text, "config_hash": config_hash(text), "client": 0, "run_id": run_id, "run": "r",
                            "seq": 1, "state_seq": 0, "keep_from": 0})
        with pytest.raises(FedrouterError, match="not a run id"):
            handle_message(SAVE, RecordDict({RUN: run}), {"partition-id": 0, "out-dir": str(node)}, RecordDict())
    assert (victim / "client0" / "precious").read_text() == "keep me"


def _start_worker(folder: Path, log: Path) -> tuple[subprocess.Popen, Path]:
    socket_path = folder / "node.sock"
    proc = subprocess.Popen([sys.executable, "-m", "fedrouter.cli", "flower", "worker", "--socket", str(socket_path)],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 120
    while "worker listening on" not in log.read_text():  # its own socket and key (not ones a killed worker left)
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return proc, socket_path


def test_a_worker_refuses_pickled_and_malformed_messages_and_keeps_serving(tmp_path):
    pytest.importorskip("flwr")
    from multiprocessing.connection import Client

    from fedrouter.testing import stop

    marker = tmp_path / "ran"
    folder = Path(tempfile.mkdtemp(prefix="frw", dir="/tmp"))
    proc, socket_path = _start_worker(folder, tmp_path / "worker.log")
    try:
        key_path = Path(str(socket_path) + ".key")
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        key = key_path.read_bytes()
        attacks = [
            [pickle.dumps(("train", Payload(marker), {}, Payload(marker)))],  # what `conn.recv()` used to unpickle
            [json.dumps({"type": "train", "node_config": {}}).encode(), pickle.dumps(Payload(marker)), b"x"],
            [b"\xff not json"],
            [json.dumps({"type": "train", "node_config": {"a": {"nested": 1}}}).encode()],
            [b"[" * 100_000 + b"]" * 100_000],  # deeper than the JSON parser goes (a RecursionError killed the worker)
        ]
        for parts in attacks:
            with Client(str(socket_path), family="AF_UNIX", authkey=key) as conn:
                try:
                    for part in parts:
                        conn.send_bytes(part)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the worker may refuse and hang up before the attacker's last part: its reply is queued
                reply = json.loads(conn.recv_bytes())
            assert reply["status"] == "error" and reply["name"] == "WorkerProtocolError", reply
            assert proc.poll() is None  # still serving
        from multiprocessing import AuthenticationError

        with pytest.raises(AuthenticationError):  # a wrong key is refused at the handshake
            Client(str(socket_path), family="AF_UNIX", authkey=b"wrong" * 6)
        assert proc.poll() is None
        assert not marker.exists()
    finally:
        stop(proc)
    assert not socket_path.exists() and not key_path.exists()  # stopped by pid: it cleaned up
    assert [p.name for p in folder.iterdir()] == ["node.sock.lock"]  # the lock's file stays (removing it would race)
    shutil.rmtree(folder)


def test_a_worker_refuses_a_planted_key_an_open_folder_and_a_missing_one(tmp_path, capsys):
    folder = Path(tempfile.mkdtemp(prefix="frw", dir="/tmp"))
    try:
        planted = folder / "node.sock.key"
        planted.write_bytes(b"the attacker reads what gets written here")
        planted.chmod(0o666)
        assert main(["flower", "worker", "--socket", str(folder / "node.sock")]) == 2
        assert "is not a key file this user's worker left" in one_error_line(capsys.readouterr().err)
        assert planted.read_bytes() == b"the attacker reads what gets written here"  # never written to
        planted.unlink()
        folder.chmod(0o755)  # others may enter
        assert main(["flower", "worker", "--socket", str(folder / "node.sock")]) == 2
        assert "closed to others" in one_error_line(capsys.readouterr().err)
        assert main(["flower", "worker", "--socket", str(folder / "missing" / "node.sock")]) == 2
        assert "does not exist" in one_error_line(capsys.readouterr().err)
        assert [p.name for p in folder.iterdir()] == ["node.sock.lock"]  # the worker lock's file only: nothing else made
    finally:
        folder.chmod(0o700)
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def test_one_worker_per_socket_and_a_killed_one_can_be_restarted(tmp_path):
    # issue 32: a second worker on the same socket deleted the live one's key; a SIGKILLed worker's own
    # socket (0755) was refused as foreign, so it could not be restarted.
    pytest.importorskip("flwr")
    from fedrouter.testing import kill_now, stop

    folder = Path(tempfile.mkdtemp(prefix="frw", dir="/tmp"))
    first, socket_path = _start_worker(folder, tmp_path / "first.log")
    key_path = Path(str(socket_path) + ".key")
    try:
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        key = key_path.read_bytes()
        second = subprocess.run([sys.executable, "-m", "fedrouter.cli", "flower", "worker", "--socket", str(socket_path)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"a worker (pid {first.pid}) is already serving on {socket_path}" in one_error_line(second.stderr)
        assert key_path.read_bytes() == key and socket_path.exists() and first.poll() is None  # untouched
        kill_now([first.pid])
        first.wait(timeout=60)
        assert socket_path.exists() and key_path.exists()  # left behind by the kill
        restarted, _ = _start_worker(folder, tmp_path / "restarted.log")
        try:
            assert key_path.read_bytes() != key  # its own new key, on its own new socket
            assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        finally:
            stop(restarted)
        assert not socket_path.exists() and not key_path.exists()  # it removed what it made
    finally:
        stop(first)
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def test_a_worker_removes_only_the_key_and_socket_it_made(tmp_path):
    pytest.importorskip("flwr")
    from fedrouter.engines.flower.node import _remove_if_ours

    made, placed = tmp_path / "made", tmp_path / "placed"
    made.write_bytes(b"the worker's")
    placed.write_bytes(b"someone else's")
    info = os.lstat(made)
    ours = (info.st_dev, info.st_ino)
    _remove_if_ours(placed, ours)  # not the file it made
    _remove_if_ours(placed, None)  # it made none
    assert placed.exists()
    _remove_if_ours(made, ours)
    assert not made.exists() and placed.exists()


def test_private_keys_are_never_readable_by_others(tmp_path):
    pytest.importorskip("cryptography")
    from fedrouter.engines.flower.keys import make_keys

    written = make_keys(tmp_path / "keys", ["127.0.0.1"], supernodes=2)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written}
    assert modes["ca.key"] == modes["server.key"] == modes["supernode-0"] == modes["supernode-1"] == 0o600
    assert modes["ca.crt"] == modes["supernode-0.pub"] == 0o644
    assert not list((tmp_path / "keys").glob(".*"))  # no temporary file left


def test_no_source_file_unpickles_what_it_reads():
    src = Path(__file__).resolve().parents[1] / "src"
    offenders = []
    for path in src.rglob("*.py"):
        text = path.read_text()
        for needle in ("weights_only=False", "pickle.load", ".recv()", "allow_pickle=True"):
            if needle in text:
                offenders.append(f"{path.relative_to(src)}: {needle}")
    assert not offenders
