"""Test and benchmark harness (not used by fedrouter itself).

A whole Flower deployment on this machine (loopback): the commands the README documents, run for a
test or a benchmark -- a SuperLink (TLS with SuperNode authentication, or insecure), N SuperNodes holding
partitions 0..N-1, and `flwr run` of fedrouter's app. Every process is started here and stopped by its
pid, with its children; nothing is stopped by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedrouter.checkpoint import path_of
from fedrouter.engines.flower.app import write_app
from fedrouter.engines.flower.keys import make_keys
from fedrouter.errors import FedrouterError

BIN = Path(sys.executable).parent
CONNECTION = "fedrouter-loopback"


# How often a SuperNode's (and the SuperLink's) `flower-superexec` looks for a task to start a ClientApp
# (ServerApp) process for: Flower's default is 1 s, which a message waits for half of on average.
SUPEREXEC_POLL_S = "0.2"
POLL_S = 0.1  # the SuperNodes' polls, `fedrouter flower supernode --poll-interval` (see LoopbackFederation)


def flower_env(home: Path) -> dict[str, str]:
    """The environment for Flower processes: a private FLWR_HOME and Ray directory, no telemetry, no
    update check, no run-time dependency installation (it would pull a CUDA torch), and a shorter
    SuperExec task poll (FLWR_SUPEREXEC_TASK_POLL_INTERVAL, unless already set)."""
    home.mkdir(parents=True, exist_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    # The SuperLink and SuperNodes start Flower's other commands (flower-superexec, flwr-serverapp,
    # flwr-clientapp) by name: this environment's bin directory must be on PATH even when not activated.
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_S)}


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_now(pids) -> None:
    """SIGKILL each pid (one already gone is skipped)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop `proc` and everything below it, by pid: SIGTERM, then SIGKILL for whatever is left."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    kill_now([*pids, *descendants(proc.pid)])
    proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackFederation:
    """`with LoopbackFederation(dir, n) as fed: fed.run(sets, run_dir)` -- see the module docstring."""

    def __init__(self, workdir: Path, supernodes: int, tls: bool = True, workers: list[int] | None = None,
                 poll_interval_s: float | None = POLL_S, fork_clientapps: bool = True):
        """`workers`: the SuperNodes (by partition) that get a long-lived `fedrouter flower worker`;
        the others do the work in Flower's per-message ClientApp process. `poll_interval_s`: the SuperNodes
        are `fedrouter flower supernode --poll-interval S` (their SuperExec polls every S too); None: the
        stock `flower-supernode` (3-s idle poll; its SuperExec every FLWR_SUPEREXEC_TASK_POLL_INTERVAL).
        `fork_clientapps=False`: `fedrouter flower supernode --fresh-clientapps` (a fresh ClientApp process
        per message, as Flower starts it)."""
        self.workdir, self.n, self.tls, self.workers = Path(workdir), supernodes, tls, set(workers or [])
        self.poll_interval_s, self.fork_clientapps = poll_interval_s, fork_clientapps
        self.env = flower_env(self.workdir / "flwr-home")
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.keys = self.workdir / "keys"
        if tls:
            make_keys(self.keys, ["127.0.0.1", "localhost"], supernodes)
        self.app = self.workdir / "app"
        write_app(self.app)
        self.port = free_port()
        connection = f'address = "127.0.0.1:{self.port}"\n' + (
            f'root-certificates = "{self.keys / "ca.crt"}"\n' if tls else "insecure = true\n")
        (self.workdir / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n{connection}')
        self.procs: list[subprocess.Popen] = []
        self._worker_folders: list[Path] = []

    def _start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        out = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(cmd, env=env or self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.procs.append(proc)
        return proc

    def log_tail(self, chars: int = 1500) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-chars:]}" for p in sorted(self.logs.glob("*.log")))

    def __enter__(self) -> "LoopbackFederation":
        try:
            self._start_all()
        except BaseException:
            self.close()
            raise
        return self

    def _start_all(self) -> None:
        k = self.keys
        security = (["--ssl-ca-certfile", str(k / "ca.crt"), "--ssl-certfile", str(k / "server.pem"),
                     "--ssl-keyfile", str(k / "server.key"), "--enable-supernode-auth"] if self.tls else ["--insecure"])
        superlink = self._start("superlink", [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                                              *security, "--disable-runtime-dependency-installation"])
        self._wait_for_port(superlink)
        for i in range(self.n):
            if self.tls:  # only registered SuperNode keys may connect
                reg = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(k / f"supernode-{i}.pub"), CONNECTION],
                                     env=self.env, capture_output=True, text=True, timeout=120, cwd=self.workdir)
                if reg.returncode != 0:
                    raise FedrouterError(f"flwr supernode register failed: {(reg.stdout + reg.stderr).strip()[-500:]}")
            node_security = (["--root-certificates", str(k / "ca.crt"), "--auth-supernode-private-key", str(k / f"supernode-{i}")]
                             if self.tls else ["--insecure"])
            # each node keeps its files (checkpoints, private adapters) in a folder of its own
            node_config = f'partition-id={i} num-partitions={self.n} out-dir="{self.node_dir(i)}"'
            if i in self.workers:
                node_config += f' worker="{self._start_worker(i)}"'  # a string value: quoted
            args = ["--superlink", f"127.0.0.1:{self.port}", *node_security, "--port", str(free_port()), "--node-config", node_config]
            if self.poll_interval_s is None:  # Flower's own
                self._start(f"supernode{i}", [str(BIN / "flower-supernode"), *args])
            else:  # its SuperExec then polls at the same interval (the variable would override it)
                env = {k: v for k, v in self.env.items() if k != "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"}
                self._start(f"supernode{i}", [sys.executable, "-m", "fedrouter.cli", "flower", "supernode",
                                              "--poll-interval", f"{self.poll_interval_s:g}",
                                              *([] if self.fork_clientapps else ["--fresh-clientapps"]), *args], env=env)

    def node_dir(self, i: int) -> Path:
        """Node i's own folder (its `out-dir`): its files for a run are in <node_dir>/<run name>/."""
        return self.workdir / f"node{i}"

    def _start_worker(self, i: int) -> Path:
        # in a folder only this user can enter (the worker refuses any other); Unix socket paths must stay short
        folder = Path(tempfile.mkdtemp(prefix=f"frw{i}-", dir="/tmp"))
        self._worker_folders.append(folder)
        path = folder / "node.sock"
        key = path.with_name(path.name + ".key")
        proc = self._start(f"worker{i}", [sys.executable, "-m", "fedrouter.cli", "flower", "worker", "--socket", str(path)])
        deadline = time.monotonic() + 120
        while not (path.exists() and key.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise FedrouterError(f"the worker of node {i} did not start:\n{self.log_tail()}")
            time.sleep(0.2)
        return path

    def _wait_for_port(self, proc: subprocess.Popen, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FedrouterError(f"the SuperLink exited:\n{self.log_tail()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise FedrouterError(f"the SuperLink does not listen on {self.port} after {timeout_s} s")

    def run(self, sets: dict, run_dir: Path, timeout_s: float = 900, kill_after_round: int | None = None) -> Path:
        """`flwr run` the app with these config overrides (None: resume the unfinished run in `run_dir`);
        wait for the run directory to be finished -- or, with `kill_after_round`, SIGKILL the ServerApp
        once that round's checkpoint is written, as a crash of the server side would."""
        out = f'out="{Path(run_dir).resolve()}" node-wait-s=120'
        run_config = f'{out} resume=true' if sets is None else f'set="{" ".join(f"{k}={v}" for k, v in sets.items())}" {out}'
        flwr = self._start("flwr-run", [str(BIN / "flwr"), "run", str(self.app), CONNECTION, "--run-config", run_config, "--stream"])
        deadline = time.monotonic() + timeout_s
        checkpoint = path_of(run_dir, kill_after_round or 0)
        while not (run_dir / "results.json").exists() and not (run_dir / "FAILED").exists():
            if time.monotonic() > deadline:
                raise FedrouterError(f"no result after {timeout_s} s:\n{self.log_tail()}")
            if kill_after_round and checkpoint.exists():
                self._kill_serverapps()
                stop(flwr)
                return run_dir
            time.sleep(0.05 if kill_after_round else 0.5)
        if (run_dir / "FAILED").exists():
            raise FedrouterError(f"the run failed: {(run_dir / 'FAILED').read_text().strip()}\n{self.log_tail()}")
        if kill_after_round:
            raise FedrouterError(f"the run finished before round {kill_after_round}'s checkpoint could be caught")
        try:
            flwr.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass  # the result is written; close() stops it
        return run_dir

    def _kill_serverapps(self) -> None:
        """SIGKILL the ServerApp process(es) the SuperLink started (found among its descendants by their
        command line, killed by pid)."""
        serverapps = []
        for pid in descendants(self.procs[0].pid):
            try:
                if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    serverapps.append(pid)
            except OSError:  # gone already
                pass
        kill_now(serverapps)

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        for folder in self._worker_folders:
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(self.env["RAY_TMPDIR"], ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()
