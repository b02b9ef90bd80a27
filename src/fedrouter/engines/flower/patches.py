"""Every change fedrouter makes to Flower's internals, in one place, for the one release it pins.

Each patch replaces a name inside one of Flower's modules, in the process that applies it only, and says
below which line of flwr 1.42.0's source it stands in for. A process applies the patches of its kind with
one call, `apply(kind)`:

- "supernode" (`fedrouter flower supernode`): `ShortSleeps` for the SuperNode's hard-coded waits,
  `SuperExecSubprocess` so that the node starts fedrouter's SuperExec, and the short first retry for a
  message object (`shorten_pull_backoff`);
- "superexec" (`python -m fedrouter.engines.flower.superexec`, which that SuperNode starts):
  `ForkingSubprocess`, so that ClientApp processes are forked from one that has imported Flower, and the
  short first retry;
- "serverapp" (fedrouter's ServerApp): the short first retry, where flwr is the pinned release (else,
  unlike the two above, nothing is changed and the run goes on).

Since this reaches into Flower's internals, "supernode" and "superexec" refuse (a FedrouterError: one line,
exit 2) any flwr but `FLWR_VERSION`, and a module whose replaced names or sleeps are not as written here.
Why each wait matters and what it costs: docs/dev/flower-1.42-notes.md and docs/benchmark.md ("Flower
overhead").
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import json
import os
import struct
import subprocess
import sys
import time
import types

from fedrouter.errors import FedrouterError

FLWR_VERSION = "1.42.0"  # the release pinned by the `flower` extra (pyproject.toml); the only one patched
KINDS = ("supernode", "superexec", "serverapp")
DEFAULT_POLL_S = 0.1  # `fedrouter flower supernode --poll-interval`'s default
MAX_POLL_S = 3.0
# How often a SuperNode's `flower-superexec` looks for a ClientApp to start (Flower's default 1 s): the node
# sets it for its SuperExec child, which reads it for its own first retry too.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"

SUPERNODE_LOOP = "flwr.supernode.start_client_internal"
SUPERNODE_CLI = "flwr.supernode.cli.flower_supernode"
PULLS = "flwr.supercore.inflatable.inflatable_utils"
EXECUTOR = "flwr.supercore.superexec.executor.subprocess_executor"
SUPEREXEC_CLI = "flwr.supercore.cli.flower_superexec"


def check_flower(installed: str | None = None) -> None:
    """Refuse (FedrouterError, one line) unless the installed flwr is the pinned release."""
    if installed is None:
        try:
            installed = importlib.metadata.version("flwr")
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
    if installed != FLWR_VERSION:
        raise FedrouterError(f"fedrouter flower supernode shortens the polls of flwr {FLWR_VERSION}'s SuperNode only, "
                             f"and flwr is {installed} here: install fedrouter[flower] or run flower-supernode itself")


# ----------------------------------------------------------------------------------------------- supernode

# The sleeps of flwr 1.42.0's start_client_internal module, which ShortSleeps shortens:
#   l.263  `time.sleep(3)`    -- no message pulled: "wait for a while" before pulling again
#   l.470  `time.sleep(0.5)`  -- waiting for the ClientApp's reply message
#   l.506  `time.sleep(0.5)`  -- waiting for a reply's object content
STOCK_SLEEPS = (0.5, 0.5, 3)


class ShortSleeps(types.SimpleNamespace):
    """Stands in for the `time` module inside flwr's start_client_internal module only (its `import time`,
    l.22): `sleep(s)` sleeps min(s, interval); every other attribute is the real `time` module's."""

    def __init__(self, interval: float):
        super().__init__(interval=interval)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.interval))

    def __getattr__(self, name: str):
        return getattr(time, name)


def sleeps_in(module: types.ModuleType) -> tuple[float, ...]:
    """The constant arguments of every `time.sleep(...)` call in the module's source, sorted (a call with a
    non-constant argument counts as -1, so that it never matches STOCK_SLEEPS)."""
    found = []
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "sleep"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "time"):
            arg = node.args[0] if node.args else None
            found.append(arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, int | float) else -1)
    return tuple(sorted(found))


SUPEREXEC_COMMAND = "flower-superexec"  # what the SuperNode starts in subprocess isolation


class SuperExecSubprocess(types.SimpleNamespace):
    """Stands in for the `subprocess` module inside flwr's start_client_internal module only, for its
    l.222 `subprocess.Popen(command)` of a `flower-superexec` command line: that starts fedrouter's
    (`python -m fedrouter.engines.flower.superexec`: the same SuperExec, ClientApp processes forked rather
    than started afresh) with the same arguments; everything else is the real module's."""

    def Popen(self, args, *rest, **kwargs):  # noqa: N802 -- the name it stands in for
        if isinstance(args, list | tuple) and args and args[0] == SUPEREXEC_COMMAND:
            args = [sys.executable, "-m", "fedrouter.engines.flower.superexec", *args[1:]]
        return subprocess.Popen(args, *rest, **kwargs)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def _patch_supernode(interval: float, fork_clientapps: bool) -> types.ModuleType:
    if not 0 < interval <= MAX_POLL_S:
        raise FedrouterError(f"--poll-interval must be in (0, {MAX_POLL_S:g}] seconds, got {interval:g}")
    check_flower()
    # the modules themselves (flwr.supernode.cli re-exports the function under the module's name)
    sci = importlib.import_module(SUPERNODE_LOOP)
    cli = importlib.import_module(SUPERNODE_CLI)
    current = getattr(sci, "time", None)
    if not (current is time or isinstance(current, ShortSleeps)) or not callable(getattr(sci, "start_client_internal", None)) \
            or not callable(getattr(cli, "flower_supernode", None)) or sleeps_in(sci) != STOCK_SLEEPS:
        raise FedrouterError(f"flwr {FLWR_VERSION}'s SuperNode is not as fedrouter expects (start_client_internal's sleeps "
                             f"{sleeps_in(sci)}, expected {STOCK_SLEEPS}; the entry point flower_supernode): "
                             "run flower-supernode itself")
    if fork_clientapps and not (sci.subprocess is subprocess or isinstance(sci.subprocess, SuperExecSubprocess)):
        raise FedrouterError(f"flwr {FLWR_VERSION}'s SuperNode is not as fedrouter expects (start_client_internal.subprocess): "
                             "run fedrouter flower supernode --fresh-clientapps")
    sci.time = ShortSleeps(interval)
    shorten_pull_backoff(interval)
    sci.subprocess = SuperExecSubprocess() if fork_clientapps else subprocess
    return cli


# ------------------------------------------------------------------------------------------- pull backoff

STOCK_PULL_BACKOFF_S = 1  # flwr 1.42.0's PULL_INITIAL_BACKOFF (supercore/constant.py l.48)
# The functions whose keyword default `initial_backoff: float = PULL_INITIAL_BACKOFF` (inflatable_utils
# l.208 and l.423) shorten_pull_backoff replaces.
PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")


def shorten_pull_backoff(seconds: float, strict: bool = True) -> bool:
    """In this process, Flower's first retry for a message object that is not there yet comes after
    `seconds` instead of 1 s (then doubling, capped at 10 s, as before; the same number of tries and time
    limit). Why: a SuperNode stores a message before pulling its objects from the SuperLink (so its
    SuperExec starts the ClientApp before they are all there), a server registers a message before pushing
    its objects, and a node registers its reply before pushing the reply's objects; whoever looks every
    0.1-0.2 s often asks for objects a moment too early, and then waits a whole second. Returns whether it
    did; when flwr is not the pinned release or the defaults are not where expected, raises FedrouterError
    (strict) or changes nothing (not strict)."""
    try:
        check_flower()
    except FedrouterError:
        if strict:
            raise
        return False
    utils = importlib.import_module(PULLS)
    for name in PULL_FUNCTIONS:  # (the stock 1, or what an earlier call set)
        defaults = getattr(getattr(utils, name, None), "__kwdefaults__", None) or {}
        if not isinstance(defaults.get("initial_backoff"), int | float):
            if strict:
                raise FedrouterError(f"flwr {FLWR_VERSION}'s {name} is not as fedrouter expects (no initial_backoff "
                                     "default): run flower-supernode itself")
            return False
    for name in PULL_FUNCTIONS:
        getattr(utils, name).__kwdefaults__["initial_backoff"] = seconds
    return True


# ----------------------------------------------------------------------------------------------- superexec

CLIENTAPP_COMMAND = "flwr-clientapp"
FORK_LENGTH = struct.Struct(">I")  # a request to the fork server: its length, then {"argv", "quiet"} as JSON


class ForkingSubprocess(types.SimpleNamespace):
    """Stands in for the `subprocess` module inside flwr's subprocess_executor module only, for its
    `SubprocessExecutor.launch` l.76 `subprocess.Popen(args, stdout=DEVNULL, stderr=DEVNULL)` and l.83
    `subprocess.Popen(args)` of a `flwr-clientapp` command line: that goes to the fork server over the pipe
    `fd` (which forks a child running Flower's own `flwr_clientapp()` with that argv); everything else is
    the real module's."""

    def __init__(self, fd: int):
        super().__init__(fd=fd)

    def Popen(self, args, *rest, **kwargs):  # noqa: N802 -- the name it stands in for
        if isinstance(args, list | tuple) and args and args[0] == CLIENTAPP_COMMAND and not rest:
            body = json.dumps({"argv": list(args), "quiet": kwargs.get("stdout") is subprocess.DEVNULL}).encode()
            try:
                os.write(self.fd, FORK_LENGTH.pack(len(body)) + body)  # small (< PIPE_BUF): one atomic write
                return None  # launch() keeps nothing of it
            except OSError as exc:  # the fork server is gone: start the process as Flower would
                print(f"fedrouter: the ClientApp fork server is gone ({exc}); starting {CLIENTAPP_COMMAND} afresh",
                      file=sys.stderr, flush=True)
        return subprocess.Popen(args, *rest, **kwargs)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def _patch_superexec(interval: float, fork_fd: int) -> types.ModuleType:
    check_flower()
    executor = importlib.import_module(EXECUTOR)
    constant = importlib.import_module("flwr.supercore.constant")
    cli = importlib.import_module(SUPEREXEC_CLI)
    if getattr(executor, "subprocess", None) is not subprocess or not callable(getattr(cli, "flower_superexec", None)) \
            or constant.TASK_TYPE_TO_COMMAND.get(constant.TaskType.CLIENT_APP) != CLIENTAPP_COMMAND:
        raise FedrouterError("flwr's SuperExec is not as fedrouter expects (subprocess_executor.subprocess, "
                             "flower_superexec, the flwr-clientapp command): run fedrouter flower supernode --fresh-clientapps")
    # A forked ClientApp asks its SuperNode for the message at once, often before the node has all of its
    # objects: its first retry then comes after the poll interval, not Flower's 1 s.
    shorten_pull_backoff(interval)
    executor.subprocess = ForkingSubprocess(fork_fd)
    return cli


# -------------------------------------------------------------------------------------------------- apply

def apply(kind: str, interval: float = DEFAULT_POLL_S, *, fork_clientapps: bool = True, fork_fd: int | None = None):
    """Apply the patches of a process of `kind` (see the module docstring), with waits of `interval` s.
    "supernode" returns Flower's `flower_supernode` CLI module and "superexec" its `flower_superexec` one,
    whose entry points the caller runs; "serverapp" returns whether it changed anything."""
    if kind == "supernode":
        return _patch_supernode(interval, fork_clientapps)
    if kind == "superexec":
        if fork_fd is None:
            raise ValueError("the superexec patches need the fork server's pipe (fork_fd)")
        return _patch_superexec(interval, fork_fd)
    if kind == "serverapp":
        return shorten_pull_backoff(interval, strict=False)
    raise ValueError(f"unknown kind of Flower process {kind!r}; one of {', '.join(KINDS)}")
