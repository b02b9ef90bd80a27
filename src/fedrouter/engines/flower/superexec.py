"""The `flower-superexec` that `fedrouter flower supernode` starts: Flower's own (flwr 1.42.0's
`flower_superexec` entry point, same arguments), whose ClientApp processes are forked from a process
that has already imported Flower, instead of started afresh.

Why: in subprocess isolation a SuperNode's SuperExec starts a new `flwr-clientapp` process for every
message (`subprocess.Popen(["flwr-clientapp", ...])` in flwr's `SubprocessExecutor.launch`), and that
process spends 1.2-1.8 s of CPU here importing Flower (fastapi, sqlalchemy, alembic, grpc, numpy...)
before it asks for its message -- with 8 nodes on 2 cores, 8 such starts share the cores every round.

What this does: before anything else runs (no thread yet), this process imports what `flwr-clientapp`
imports and forks a *fork server*; then it applies the "superexec" patches (`patches.apply`: the name
`subprocess` of flwr's `subprocess_executor` module becomes a stand-in whose `Popen` hands a
`flwr-clientapp` command line to the fork server over a private pipe; any other command goes to the real
`subprocess.Popen`). The fork server forks a child per command line, which runs Flower's own
`flwr_clientapp()` entry point with that argv: the same code, the same arguments (token, runtime address, parent pid), one process per message as
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
import sys
import traceback

from fedrouter.engines.flower import patches
from fedrouter.errors import FedrouterError


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
    sys.argv = [patches.CLIENTAPP_COMMAND, *argv[1:]]
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # in a forked child, already imported by its parent

    try:
        flwr_clientapp()
    except SystemExit as exc:  # flwr_exit ends the process with sys.exit(code)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:  # noqa: BLE001 -- shown, then the exit code a crash has
        traceback.print_exc()
        return 1
    return 0


def run_fork_server(fd: int) -> None:
    """The fork server's loop: read (length, JSON {"argv": [...], "quiet": bool}) from `fd`, fork a child
    that runs it; end when the pipe closes. Children are reaped by the kernel (SIGCHLD ignored)."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the SuperNode, which ends the SuperExec, which closes the pipe
    while True:
        head = _read_exact(fd, patches.FORK_LENGTH.size)
        body = _read_exact(fd, patches.FORK_LENGTH.unpack(head)[0]) if head else None
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


def main(argv: list[str]) -> int:
    """`python -m fedrouter.engines.flower.superexec ARGS...`: flower-superexec ARGS, forking ClientApps."""
    patches.check_flower()  # before anything is imported or forked
    importlib.import_module("flwr.supernode.cli.flwr_clientapp")  # what every ClientApp process imports, once
    importlib.import_module("fedrouter.engines.flower.client_app")  # (fedrouter's ClientApp: torch-free, cheap)
    read_fd, write_fd = os.pipe()
    interval = float(os.environ.get(patches.SUPEREXEC_POLL_ENV) or patches.DEFAULT_POLL_S)  # the node's --poll-interval
    cli = patches.apply("superexec", interval, fork_fd=write_fd)  # refused here, before the fork, if Flower changed
    if os.fork() == 0:  # the fork server (this process has no thread yet)
        try:
            os.close(write_fd)
            run_fork_server(read_fd)
        finally:
            os._exit(1)
    os.close(read_fd)
    sys.argv = ["flower-superexec", *argv]
    cli.flower_superexec()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except FedrouterError as exc:
        print(f"fedrouter: error: {exc}", file=sys.stderr)
        sys.exit(2)
