"""`fedrouter flower supernode ...`: Flower's own SuperNode (flwr's `flower-supernode`, same arguments),
with short polls.

Why: in flwr 1.42.0 a SuperNode that pulls and finds no message sleeps 3 s, and it looks for its
ClientApp's reply every 0.5 s. After pushing a reply a node pulls once at once, finds nothing (the server
has not seen the reply yet) and sleeps the 3 s: the server's next message waits nearly all of them, every
round (docs/dev/flower-1.42-notes.md). No Flower option changes either sleep.

What this does, and nothing more: it applies the "supernode" patches (`patches.apply`: those waits become
`--poll-interval` seconds, Flower's first retry for a message object not yet there too, and, unless
`--fresh-clientapps` is given, the node starts fedrouter's SuperExec, which forks each message's ClientApp
process from one that has already imported Flower), sets `FLWR_SUPEREXEC_TASK_POLL_INTERVAL` (how often
the node's SuperExec looks for a ClientApp to start; Flower's default 1 s) to the same interval unless
already set, and runs Flower's own `flower-supernode` entry point with the remaining arguments. On any flwr
but the pinned release, or a changed module, it refuses in one line (exit 2) -- run `flower-supernode`
itself then.

The cost: an idle node asks the SuperLink for messages every interval instead of every 3 s (one small
request each; docs/benchmark.md, "Flower overhead").
"""

from __future__ import annotations

import os
import sys

from fedrouter.engines.flower import patches
from fedrouter.errors import FedrouterError


def main(argv: list[str]) -> int:
    """`fedrouter flower supernode [--poll-interval S] FLOWER-SUPERNODE-ARGS...`"""
    interval, rest = patches.DEFAULT_POLL_S, list(argv)
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
        print(f"fedrouter flower supernode [--poll-interval S] [--fresh-clientapps] ARGS: flwr {patches.FLWR_VERSION}'s "
              f"flower-supernode with ARGS, its idle and reply polls and its SuperExec's task poll every S seconds "
              f"(default {patches.DEFAULT_POLL_S:g}; Flower's: 3 s, 0.5 s, 1 s), and its ClientApp processes forked from "
              "one that has imported Flower (--fresh-clientapps: started afresh, as Flower does). flower-supernode's own "
              "help follows.\n")
    cli = patches.apply("supernode", interval, fork_clientapps=fork_clientapps)
    os.environ.setdefault(patches.SUPEREXEC_POLL_ENV, f"{interval:g}")  # the flower-superexec child inherits it
    sys.argv = ["flower-supernode", *rest]
    cli.flower_supernode()
    return 0
