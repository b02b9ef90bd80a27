"""`fedrouter flower supernode`: Flower's own SuperNode with its sleeps shortened, on the pinned flwr only.
(The TLS deployment test in test_flower_deploy.py runs its SuperNodes with this command.)"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the flower extra is not installed")

from fedrouter import cli  # noqa: E402
from fedrouter.engines.flower import patches  # noqa: E402

SCI = importlib.import_module("flwr.supernode.start_client_internal")
CLI = importlib.import_module("flwr.supernode.cli.flower_supernode")
PULLS = importlib.import_module("flwr.supercore.inflatable.inflatable_utils")


@pytest.fixture
def restored(monkeypatch):
    """Whatever a test patches in Flower's modules (and the SuperExec's variable) is put back after it."""
    monkeypatch.setattr(SCI, "time", SCI.time)
    monkeypatch.setattr(SCI, "subprocess", SCI.subprocess)
    for name in patches.PULL_FUNCTIONS:
        monkeypatch.setitem(getattr(PULLS, name).__kwdefaults__, "initial_backoff", 1)
    monkeypatch.setattr(CLI, "flower_supernode", CLI.flower_supernode)
    monkeypatch.delenv(patches.SUPEREXEC_POLL_ENV, raising=False)
    return monkeypatch


def test_the_pinned_release_is_the_extra_s():
    assert f'"flwr[simulation]=={patches.FLWR_VERSION}"' in (Path(__file__).parents[1] / "pyproject.toml").read_text()


def test_the_stock_module_has_the_sleeps_replaced():
    assert patches.sleeps_in(SCI) == patches.STOCK_SLEEPS == (0.5, 0.5, 3)


def test_the_patched_module_sleeps_the_interval(restored):
    patches.apply("supernode", 0.05)
    assert isinstance(SCI.time, patches.ShortSleeps) and SCI.time.interval == 0.05
    start = time.monotonic()
    SCI.time.sleep(3)  # the idle pull's sleep, as start_client_internal calls it
    SCI.time.sleep(0.5)  # the reply poll's
    assert time.monotonic() - start < 0.5
    assert SCI.time.monotonic() > 0 and SCI.time.time() > 0  # everything else is the real module's
    assert time.sleep is not SCI.time.sleep  # nothing outside that module changed
    # a message object not there yet is asked for again after the interval, not Flower's 1 s
    assert all(getattr(PULLS, name).__kwdefaults__["initial_backoff"] == 0.05 for name in patches.PULL_FUNCTIONS)
    # the SuperExec the node starts is fedrouter's (ClientApps forked), with Flower's arguments
    started = []
    restored.setattr(patches.subprocess, "Popen", lambda args, *a, **k: started.append(args))
    SCI.subprocess.Popen(["flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:1"])
    assert started == [[os.sys.executable, "-m", "fedrouter.engines.flower.superexec", "--insecure",
                        "--runtime-api-address", "127.0.0.1:1"]]
    patches.apply("supernode", 0.2, fork_clientapps=False)  # patching again sets the new interval; Flower's own SuperExec
    assert SCI.time.interval == 0.2 and SCI.subprocess is subprocess


def test_the_command_hands_flower_its_arguments_and_the_superexec_the_interval(restored):
    seen = {}

    def fake_supernode():
        seen.update(argv=list(os.sys.argv), env=os.environ.get(patches.SUPEREXEC_POLL_ENV), time=SCI.time)

    restored.setattr(CLI, "flower_supernode", fake_supernode)
    node_config = 'partition-id=0 num-partitions=2 worker="/tmp/x y/node.sock"'
    assert cli.main(["flower", "supernode", "--superlink", "127.0.0.1:9092", "--poll-interval", "0.05", "--insecure",
                     "--node-config", node_config]) == 0
    assert seen["argv"] == ["flower-supernode", "--superlink", "127.0.0.1:9092", "--insecure", "--node-config", node_config]
    assert seen["env"] == "0.05" and seen["time"].interval == 0.05
    restored.delenv(patches.SUPEREXEC_POLL_ENV)
    assert cli.main(["flower", "supernode", "--insecure"]) == 0  # the default interval
    assert seen["argv"] == ["flower-supernode", "--insecure"] and seen["time"].interval == patches.DEFAULT_POLL_S
    assert seen["env"] == f"{patches.DEFAULT_POLL_S:g}"


def _one_line_refusal(capsys, argv, pattern):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(pattern, err), err


def test_another_flower_release_is_refused_in_one_line(restored, capsys):
    started = []
    restored.setattr(CLI, "flower_supernode", lambda: started.append(1))
    real_version = importlib.metadata.version
    restored.setattr(importlib.metadata, "version", lambda name: "1.43.0" if name == "flwr" else real_version(name))
    _one_line_refusal(capsys, ["flower", "supernode", "--insecure"], r"^fedrouter: error: .*flwr 1\.42\.0.*flwr is 1\.43\.0")
    assert not started and SCI.time is time  # nothing was patched, nothing started


def test_a_changed_supernode_module_or_a_bad_interval_is_refused(restored, capsys):
    started = []
    restored.setattr(CLI, "flower_supernode", lambda: started.append(1))
    for argv, pattern in [(["--poll-interval", "0"], r"\(0, 3\]"), (["--poll-interval", "x"], "number of seconds"),
                          (["--insecure", "--poll-interval"], "needs a number")]:
        _one_line_refusal(capsys, ["flower", "supernode", *argv], pattern)
    restored.setattr(patches, "STOCK_SLEEPS", (0.5, 3))  # as if Flower had changed its sleeps
    _one_line_refusal(capsys, ["flower", "supernode", "--insecure"], r"not as fedrouter expects.*run flower-supernode itself")
    assert not started and SCI.time is time


def test_the_superexec_forks_clientapps_with_their_argv_and_starts_anything_else(tmp_path):
    # What `fedrouter flower supernode` makes its SuperExec do: a `flwr-clientapp` command line goes to the
    # fork server, whose child runs Flower's own flwr_clientapp() with that argv (here --help: it prints
    # Flower's usage and exits); any other command line is the real subprocess.Popen's.
    import subprocess
    import sys

    script = tmp_path / "fork.py"
    script.write_text("""
import os, subprocess, sys, time
from fedrouter.engines.flower import patches, superexec
read_fd, write_fd = os.pipe()
server = os.fork()
if server == 0:
    os.close(write_fd)
    superexec.run_fork_server(read_fd)
os.close(read_fd)
stand_in = patches.ForkingSubprocess(write_fd)
assert stand_in.Popen(["flwr-clientapp", "--help"]) is None
assert stand_in.Popen(["flwr-clientapp", "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) is None
proc = stand_in.Popen([sys.executable, "-c", "print('real popen')"])
assert isinstance(proc, subprocess.Popen) and proc.wait() == 0
assert stand_in.PIPE is subprocess.PIPE  # the rest is the real module's
time.sleep(5)  # the forked children print meanwhile
os.close(write_fd)  # as when the SuperExec ends: the fork server ends too
assert os.waitpid(server, 0)[1] == 0
""")
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        code = subprocess.run([sys.executable, str(script)], stdout=sink, stderr=subprocess.STDOUT, timeout=120).returncode
    text = out.read_text()
    assert code == 0, text
    assert text.count("Run a Flower ClientApp") == 1, text  # the quiet one printed nothing
    assert "real popen" in text


def test_what_a_clientapp_process_imports_has_no_torch():
    # The ClientApp module (and the SuperExec that pre-imports it for its forked ClientApps) stays torch-free:
    # with a worker, a ClientApp process only forwards the message.
    import subprocess
    import sys

    heavy = ("torch", "transformers", "peft", "fedrouter.engines.flower.node", "fedrouter.world")
    code = ("import sys, fedrouter.engines.flower.client_app, fedrouter.engines.flower.superexec; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_flower_patch_lives_in_the_patches_module():
    # Only engines/flower/patches.py replaces names inside Flower's modules (an assignment to an attribute
    # of a module it imported by name) or reads its sources; the processes call patches.apply(kind).
    import ast

    root = Path(__file__).parents[1] / "src" / "fedrouter"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "patches.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("flwr.") and (
                    "start_client_internal" in node.value or "executor" in node.value or "inflatable" in node.value):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}: {node.value}")
            if isinstance(node, ast.Attribute) and node.attr == "__kwdefaults__":
                offenders.append(f"{path.relative_to(root)}:{node.lineno}: __kwdefaults__")
    assert offenders == []
    with pytest.raises(ValueError, match="unknown kind"):
        patches.apply("client")
    text = (root / "engines" / "flower" / "patches.py").read_text()
    assert text.count(" l.") >= 6 and "1.41" not in text  # each patch names the flwr 1.42.0 line it stands in for
