"""`fedrouter flower supernode ...`: Flower's own SuperNode (flwr's `flower-supernode`, same arguments),
with short polls.

Why: in flwr 1.42.0 a SuperNode that pulls and finds no message sleeps 3 s (`time.sleep(3)` in
`flwr/supernode/start_client_internal.py`), and it looks for its ClientApp's reply every 0.5 s
(`time.sleep(0.5)`, twice, same module). After pushing a reply a node pulls once at once, finds nothing
(the server has not seen the reply yet) and sleeps the 3 s: the server's next message waits nearly all
of them, every round (docs/dev/flower-1.42-notes.md). No Flower option changes either sleep.

What this does, and nothing more: in that one module, the name `time` is replaced by a stand-in whose
`sleep` sleeps at most `--poll-interval` seconds (every other attribute is the real `time` module's), and
`FLWR_SUPEREXEC_TASK_POLL_INTERVAL` (how often the node's `flower-superexec` child looks for a ClientApp
to start; Flower's default 1 s) is set to the same interval unless already set. And unless
`--fresh-clientapps` is given, that module's name `subprocess` is replaced by a stand-in that starts
`python -m fedrouter.engines.flower.superexec` (Flower's SuperExec, forking each message's ClientApp
process from one that has already imported Flower: see that module) where Flower starts
`flower-superexec`, with the same arguments. Flower's first retry for a message object that is not there
yet comes after the interval instead of 1 s (`shorten_pull_backoff`). Then Flower's own
`flower-supernode` entry point runs with the remaining arguments. Since this reaches into Flower's
internals, it runs only on the flwr release fedrouter pins (`FLWR_VERSION`) and only when that module
still has exactly the three sleeps named above and the names replaced are there; otherwise it refuses in
one line (exit 2) -- run `flower-supernode` itself then.

The cost: an idle node asks the SuperLink for messages every interval instead of every 3 s (one small
request each; not measured apart from the per-round figures in docs/benchmark.md, issue 18).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import os
import subprocess
import sys
import time
import types

from fedrouter.errors import FedrouterError

FLWR_VERSION = "1.42.0"  # the release pinned by the `flower` extra (pyproject.toml); the only one patched
DEFAULT_POLL_S = 0.1
MAX_POLL_S = 3.0
# The sleeps of flwr 1.42.0's start_client_internal module: the idle pull (3 s), the reply polls (0.5 s).
STOCK_SLEEPS = (0.5, 0.5, 3)
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_COMMAND = "flower-superexec"  # what the SuperNode starts in subprocess isolation


class ShortSleeps(types.SimpleNamespace):
    """Stands in for the `time` module inside flwr's start_client_internal module only: `sleep(s)` sleeps
    min(s, interval); every other attribute is the real `time` module's."""

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


STOCK_PULL_BACKOFF_S = 1  # flwr 1.42.0's PULL_INITIAL_BACKOFF: the first wait for an object not there yet
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
    utils = importlib.import_module("flwr.supercore.inflatable.inflatable_utils")
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


class SuperExecSubprocess(types.SimpleNamespace):
    """Stands in for the `subprocess` module inside flwr's start_client_internal module only: `Popen` of
    the `flower-superexec` command line starts fedrouter's (`fedrouter.engines.flower.superexec`: the same
    SuperExec, ClientApp processes forked rather than started afresh) with the same arguments; everything
    else is the real module's."""

    def Popen(self, args, *rest, **kwargs):  # noqa: N802 -- the name it stands in for
        if isinstance(args, list | tuple) and args and args[0] == SUPEREXEC_COMMAND:
            args = [sys.executable, "-m", "fedrouter.engines.flower.superexec", *args[1:]]
        return subprocess.Popen(args, *rest, **kwargs)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def patch(interval: float, fork_clientapps: bool = True) -> types.ModuleType:
    """Shorten the SuperNode's sleeps to `interval` seconds, and with `fork_clientapps` have it start
    fedrouter's SuperExec (see the module docstring); returns Flower's `flower_supernode` CLI module, whose
    `flower_supernode()` is the entry point to run."""
    if not 0 < interval <= MAX_POLL_S:
        raise FedrouterError(f"--poll-interval must be in (0, {MAX_POLL_S:g}] seconds, got {interval:g}")
    check_flower()
    # the modules themselves (flwr.supernode.cli re-exports the function under the module's name)
    sci = importlib.import_module("flwr.supernode.start_client_internal")
    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")

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


def main(argv: list[str]) -> int:
    """`fedrouter flower supernode [--poll-interval S] FLOWER-SUPERNODE-ARGS...`"""
    interval, rest = DEFAULT_POLL_S, list(argv)
    for i, arg in enumerate(rest):  # ours, wherever it is (flower-supernode has no option of that name)
        if arg == "--poll-interval" or arg.startswith("--poll-interval="):
            if arg == "--poll-interval" and i + 1 == len(rest):
                raise FedrouterError("--poll-interval needs a number of seconds")
            value = rest[i + 1] if arg == "--poll-interval" else arg.split("=", 1)[1]
            del rest[i:i + (2 if arg == "--poll-interval" else 1)]
            try:
                interval = float(value)
            except ValueError:
                raise FedrouterError(f"--poll-interval must be a number of seconds, got {value!r}") from None
            break
    fork_clientapps = "--fresh-clientapps" not in rest
    rest = [arg for arg in rest if arg != "--fresh-clientapps"]
    if "-h" in rest or "--help" in rest:
        print(f"fedrouter flower supernode [--poll-interval S] [--fresh-clientapps] ARGS: flwr {FLWR_VERSION}'s "
              f"flower-supernode with ARGS, its idle and reply polls and its SuperExec's task poll every S seconds "
              f"(default {DEFAULT_POLL_S:g}; Flower's: 3 s, 0.5 s, 1 s), and its ClientApp processes forked from one "
              "that has imported Flower (--fresh-clientapps: started afresh, as Flower does). flower-supernode's own "
              "help follows.\n")
    cli = patch(interval, fork_clientapps)
    os.environ.setdefault(SUPEREXEC_POLL_ENV, f"{interval:g}")  # the flower-superexec child inherits it
    sys.argv = ["flower-supernode", *rest]
    cli.flower_supernode()
    return 0
