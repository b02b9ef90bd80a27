"""`fedrouter flower ...`: the command line of what a Flower deployment needs besides fedrouter itself.

- `fedrouter flower app DIR` writes the Flower app (a pyproject.toml naming fedrouter's ServerApp and
  ClientApp) that `flwr run DIR <connection>` packages and runs;
- `fedrouter flower worker --socket PATH` runs the long-lived process a SuperNode's ClientApp forwards
  its messages to (`--node-config '... worker="PATH"'`), so the model is loaded once per node;
- `fedrouter flower supernode [--poll-interval S] ARGS...` runs Flower's own `flower-supernode ARGS...`
  with its 3-s idle poll and 0.5-s reply polls shortened to S (see fedrouter.engines.flower.supernode);
  `fedrouter.cli.main` hands it its arguments untouched, before argparse sees them;
- `fedrouter flower keys DIR --hosts ... --supernodes N` writes a self-signed CA, the SuperLink's TLS
  certificate and SuperNode authentication keys (see fedrouter.engines.flower.keys).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fedrouter.errors import FedrouterError


def add_parser(sub) -> None:
    p = sub.add_parser("flower", help="write the Flower app or the keys of a secure deployment",
                       description="Helpers for running fedrouter on Flower across machines (see the README).")
    what = p.add_subparsers(dest="flower_command", required=True)
    app = what.add_parser("app", help="write the Flower app folder that `flwr run DIR <connection>` runs")
    app.add_argument("dir", type=Path)
    worker = what.add_parser("worker", help="serve a SuperNode's clients from one long-lived process (model loaded once)")
    worker.add_argument("--socket", type=Path, required=True,
                        help="Unix socket to listen on, in a folder only you can enter (mkdir -m 700); give the "
                             "SuperNode --node-config '... worker=\"PATH\"'")
    # listed for --help only: `fedrouter.cli.main` sends `fedrouter flower supernode ...` to supernode() itself
    what.add_parser("supernode", help="run Flower's flower-supernode (same arguments) with short polls "
                                      "(--poll-interval S, default 0.1; Flower's idle poll is 3 s)")
    keys = what.add_parser("keys", help="write a self-signed CA, the SuperLink's TLS certificate and SuperNode keys")
    keys.add_argument("dir", type=Path)
    keys.add_argument("--hosts", default="127.0.0.1,localhost",
                      help="comma-separated host names / IP addresses the SuperLink is reached at (default: 127.0.0.1,localhost)")
    keys.add_argument("--supernodes", type=int, default=0, help="SuperNode authentication key pairs to write (default 0)")
    keys.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default 365)")


def supernode(argv: list[str]) -> int:
    """`fedrouter flower supernode [--poll-interval S] ARGS...`: flower-supernode ARGS with short polls."""
    with _needs_flower("supernode"):
        from fedrouter.engines.flower.supernode import main  # optional extra: flower

        return main(argv)


@contextlib.contextmanager
def _needs_flower(command: str):
    """Without the flower extra (flwr, and the cryptography it brings), one line that says what to install
    instead of a ModuleNotFoundError traceback -- whenever the import happens, even halfway through."""
    try:
        yield
    except ImportError as exc:
        missing = (exc.name or "a module").split(".")[0]  # the distribution to install, not its submodule
        raise FedrouterError(f"fedrouter flower {command} needs the flower extra ({missing} is missing): "
                             "pip install 'fedrouter[flower]'") from None


def run(args) -> int:
    with _needs_flower(args.flower_command):
        if args.flower_command == "app":
            from fedrouter.engines.flower.app import write_app  # optional extra: flower

            path = write_app(args.dir)
            print(f"wrote {path}; run it with: flwr run {args.dir} <connection> --run-config 'set=\"method=fedit\"'")
            return 0
        if args.flower_command == "worker":
            from fedrouter.engines.flower.node import run_worker  # optional extra: flower

            run_worker(args.socket)
            return 0
        from fedrouter.engines.flower.keys import make_keys  # optional extra: flower

        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        for path in make_keys(args.dir, hosts, args.supernodes, args.days):
            print(path)
        return 0
