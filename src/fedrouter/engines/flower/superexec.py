"""The `flower-superexec` that `fedrouter flower supernode` starts: Flower's own (flwr 1.42.0's
`flower_superexec` entry point, same arguments), whose ClientApp processes are forked from a process
that has already imported Flower, instead of started afresh.

Why: in subprocess isolation a SuperNode's SuperExec starts a new `flwr-clientapp` process for every
message (`subprocess.Popen(["flwr-clientapp", ...])` in flwr's `SubprocessExecutor.launch`), and that
process spends 1.2-1.8 s of CPU here importing Flower (fastapi, sqlalchemy, alembic, grpc, numpy...)
before it asks for its message -- with 8 nodes on 2 cores, 8 such starts share the cores every round.

What this does: before anything else runs (no thread yet), this process imports what `flwr-clientapp`
imports and forks a *fork server*; in this module only, the name `subprocess` of flwr's
`subprocess_executor` module is replaced by a stand-in whose `Popen` hands a `flwr-clientapp` command line
to the fork server over a private pipe (any other command goes to the real `subprocess.Popen`). The fork
server forks a child per command line, which runs Flower's own `flwr_clientapp()` entry point with that
argv: the same code, the same arguments (token, runtime address, parent pid), one process per message as
before -- only the imports are already done. The fork server does nothing else, and ends when this
process does (its pipe closes).

Refused (one line, exit 2), like `fedrouter flower supernode`, on any flwr but the pinned release or when
the replaced names are not as expected.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import struct
import subprocess
import sys
import types

from fedrouter.errors import FedrouterError

CLIENTAPP_COMMAND = "flwr-clientapp"
_LENGTH = struct.Struct(">I")


def _read_exact(fd: int, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _run_clientapp(argv: list[str], quiet: bool) -> int:
    """In a forked child: Flower's own `flwr-clientapp` entry point with this argv; returns its exit code."""
    if quiet:  # what SubprocessExecutor does with suppress_output: stdout and stderr to /dev/null
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    sys.argv = [CLIENTAPP_COMMAND, *argv[1:]]
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    try:
        flwr_clientapp()
    except SystemExit as exc:  # flwr_exit ends the process with sys.exit(code)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:  # noqa: BLE001 -- shown, then the exit code a crash has
        import traceback

        traceback.print_exc()
        return 1
    return 0


def serve_forks(fd: int) -> None:
    """The fork server's loop: read (length, JSON {"argv": [...], "quiet": bool}) from `fd`, fork a child
    that runs it; end when the pipe closes. Children are reaped by the kernel (SIGCHLD ignored)."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the SuperNode, which ends the SuperExec, which closes the pipe
    while True:
        head = _read_exact(fd, _LENGTH.size)
        body = _read_exact(fd, _LENGTH.unpack(head)[0]) if head else None
        if body is None:
            os._exit(0)
        request = json.loads(body)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:  # the child: a ClientApp process
            code = 1
            try:
                os.close(fd)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                code = _run_clientapp([str(a) for a in request["argv"]], bool(request.get("quiet")))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)


class ForkingSubprocess(types.SimpleNamespace):
    """Stands in for the `subprocess` module inside flwr's subprocess_executor module only: `Popen` of a
    `flwr-clientapp` command line goes to the fork server; everything else is the real module's."""

    def __init__(self, fd: int):
        super().__init__(fd=fd)

    def Popen(self, args, *rest, **kwargs):  # noqa: N802 -- the name it stands in for
        if isinstance(args, list | tuple) and args and args[0] == CLIENTAPP_COMMAND and not rest:
            body = json.dumps({"argv": list(args), "quiet": kwargs.get("stdout") is subprocess.DEVNULL}).encode()
            try:
                os.write(self.fd, _LENGTH.pack(len(body)) + body)  # small (< PIPE_BUF): one atomic write
                return None  # launch() keeps nothing of it
            except OSError as exc:  # the fork server is gone: start the process as Flower would
                print(f"fedrouter: the ClientApp fork server is gone ({exc}); starting {CLIENTAPP_COMMAND} afresh",
                      file=sys.stderr, flush=True)
        return subprocess.Popen(args, *rest, **kwargs)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def main(argv: list[str]) -> int:
    """`python -m fedrouter.engines.flower.superexec ARGS...`: flower-superexec ARGS, forking ClientApps."""
    from fedrouter.engines.flower.supernode import DEFAULT_POLL_S, SUPEREXEC_POLL_ENV, check_flower, shorten_pull_backoff

    check_flower()
    executor = importlib.import_module("flwr.supercore.superexec.executor.subprocess_executor")
    constant = importlib.import_module("flwr.supercore.constant")
    cli = importlib.import_module("flwr.supercore.cli.flower_superexec")
    importlib.import_module("flwr.supernode.cli.flwr_clientapp")  # what every ClientApp process imports, once
    importlib.import_module("fedrouter.engines.flower.client_app")  # (fedrouter's ClientApp: torch-free, cheap)
    if getattr(executor, "subprocess", None) is not subprocess or not callable(getattr(cli, "flower_superexec", None)) \
            or constant.TASK_TYPE_TO_COMMAND.get(constant.TaskType.CLIENT_APP) != CLIENTAPP_COMMAND:
        raise FedrouterError("flwr's SuperExec is not as fedrouter expects (subprocess_executor.subprocess, "
                             "flower_superexec, the flwr-clientapp command): run fedrouter flower supernode --fresh-clientapps")
    # A forked ClientApp asks its SuperNode for the message at once, often before the node has all of its
    # objects: its first retry then comes after the poll interval, not Flower's 1 s.
    shorten_pull_backoff(float(os.environ.get(SUPEREXEC_POLL_ENV) or DEFAULT_POLL_S))  # the node's --poll-interval
    read_fd, write_fd = os.pipe()
    if os.fork() == 0:  # the fork server (this process has no thread yet)
        try:
            os.close(write_fd)
            serve_forks(read_fd)
        finally:
            os._exit(1)
    os.close(read_fd)
    executor.subprocess = ForkingSubprocess(write_fd)
    sys.argv = ["flower-superexec", *argv]
    cli.flower_superexec()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except FedrouterError as exc:
        print(f"fedrouter: error: {exc}", file=sys.stderr)
        sys.exit(2)
