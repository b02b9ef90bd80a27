"""The `fedrouter` command line.

Bad input of any kind ends in one line on stderr, ``fedrouter: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from fedrouter.errors import FedrouterError

# flag -> config key; flags left unset do not override the config file
RUN_FLAGS = {
    "method": ("--method", str, "method name (fedit, local, ...)"),
    "scenario": ("--scenario", str, "single | dual | all | dirichlet"),
    "seed": ("--seed", int, "random seed"),
    "rounds": ("--rounds", int, "federated rounds"),
    "n_clients": ("--clients", int, "number of clients"),
    "client_fraction": ("--client-fraction", float, "fraction of clients sampled per round"),
    "local_steps": ("--local-steps", int, "local training steps per round"),
    "batch_size": ("--batch-size", int, "training batch size"),
    "lr": ("--lr", float, "learning rate (cosine-decayed over rounds)"),
    "model": ("--model", str, "'tiny' (embedded), a Hugging Face id, or a local model path"),
    "data": ("--data", str, "'synthetic' (embedded) or a folder with train.jsonl and test.jsonl"),
    "task_field": ("--task-field", str, "JSONL field holding the task label (e.g. category)"),
    "train_per_client": ("--train-per-client", int, "training examples per client"),
    "test_per_client": ("--test-per-client", int, "test examples per client"),
    "threads": ("--threads", int, "torch CPU threads"),
    "eval_every": ("--eval-every", int, "evaluate every N rounds (0: only at the end)"),
    "inject_failures": ("--inject-failures", float, "each client fails a round with this probability (testing)"),
    "engine": ("--engine", str, "inprocess (default) | flower (Flower's simulation runtime; needs the flower extra)"),
}


def _add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="run one federated fine-tuning experiment",
                       description="Run one experiment. With no arguments: FedRouter on the embedded benchmark, scenario dual.")
    p.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    for key, (flag, typ, help_text) in RUN_FLAGS.items():
        p.add_argument(flag, dest=key, type=typ, default=None, help=help_text)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key, e.g. --set lora.r=16 (repeatable)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<method>-<scenario>-seed<seed>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue an interrupted run from its newest checkpoint, with the run's own config")


def _overrides(args) -> dict:
    from fedrouter.config import parse_sets

    out = {key: getattr(args, key) for key in RUN_FLAGS if getattr(args, key) is not None}
    out.update(parse_sets(args.sets))
    return out


def _cmd_run(args) -> int:
    from fedrouter.config import load_config
    from fedrouter.experiment import format_summary, run_experiment
    from fedrouter.rundir import read_config

    if args.resume:
        if args.config or args.out or _overrides(args):
            raise FedrouterError("--resume continues a run with its own config.json: give no other config, flag or --out")
        cfg = load_config(None, read_config(args.resume))
    else:
        cfg = load_config(args.config, _overrides(args))
    if args.quiet or not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    results = run_experiment(cfg, args.resume or args.out, progress=not args.quiet, resume=bool(args.resume))
    print(format_summary(results))
    print(f"run directory: {results['run_dir']}")
    return 0


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    logging.basicConfig(level=logging.WARNING, format="fedrouter: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedrouter", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    from fedrouter import clusters, compare, flower_cli, predict, report

    clusters.add_parser(sub)
    predict.add_parser(sub)
    compare.add_parser(sub)
    report.add_parser(sub)
    flower_cli.add_parser(sub)
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        commands = {"run": _cmd_run, "clusters": clusters.run, "predict": predict.run, "compare": compare.run,
                    "report": report.run, "flower": flower_cli.run}
        return commands[args.command](args)
    except FedrouterError as exc:
        print(f"fedrouter: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's problem (a full disk, a missing permission): one line, not a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"fedrouter: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedrouter: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
