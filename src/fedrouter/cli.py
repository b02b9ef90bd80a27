"""The `fedrouter` command line: argparse, and a call into the experiment or the study per command.

Bad input of any kind ends in one line on stderr, ``fedrouter: error: ...``, and exit code 2. Each
command imports what it runs when it runs (torch and matplotlib cost seconds to import; `--help` and a
refused config should not pay for them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedrouter import cli_flower, cli_serving
from fedrouter.cli_serving import finite_float
from fedrouter.errors import FedrouterError
from fedrouter.methods import QUICK
from fedrouter.runtime import Interrupted, quiet_libraries
from fedrouter.runtime import stop_on_signals as signals_raise


DATA_HELP = ("'synthetic' or 'synthetic-hard' (embedded; -hard: 3 to 5 templates per task and two pairs of tasks "
             "sharing an input format) or a folder with train.jsonl and test.jsonl")

# flag -> config key; flags left unset do not override the config file
RUN_FLAGS = {
    "method": ("--method", str, "method name (fedit, local, ...)"),
    "scenario": ("--scenario", str, "single | dual | all | dirichlet"),
    "seed": ("--seed", int, "random seed"),
    "rounds": ("--rounds", int, "federated rounds"),
    "n_clients": ("--clients", int, "number of clients"),
    "client_fraction": ("--client-fraction", finite_float, "fraction of clients sampled per round"),
    "local_steps": ("--local-steps", int, "local training steps per round"),
    "batch_size": ("--batch-size", int, "training batch size"),
    "lr": ("--lr", finite_float, "learning rate (cosine-decayed over rounds)"),
    "model": ("--model", str, "'tiny' (embedded), a Hugging Face id, or a local model path"),
    "data": ("--data", str, DATA_HELP),
    "task_field": ("--task-field", str, "JSONL field holding the task label (e.g. category)"),
    "train_per_client": ("--train-per-client", int, "training examples per client"),
    "test_per_client": ("--test-per-client", int, "test examples per client"),
    "threads": ("--threads", int, "torch CPU threads (default: 1 for the tiny base, else the CPUs this process may use)"),
    "eval_every": ("--eval-every", int, "evaluate every N rounds (0: only at the end)"),
    "inject_failures": ("--inject-failures", finite_float, "each client fails a round with this probability (testing)"),
    "engine": ("--engine", str, "inprocess (default) | flower (Flower's simulation runtime; needs the flower extra)"),
    "device": ("--device", str, "auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps"),
    "dtype": ("--dtype", str, "auto (bf16 on a GPU that has it, else float32) | float32 | bfloat16 | float16"),
    "quantization": ("--quantization", str, "none | auto | 4bit | 8bit (bitsandbytes, CUDA only)"),
}
# --quick: the paper's grid shape at a size that runs in minutes on 2 cores
QUICK_OVERRIDES = {"rounds": 10, "train_per_client": 200, "test_per_client": 40, "general_test_per_task": 20}


# ------------------------------------------------------------------------------------------------ run

def _add_run(sub) -> None:
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
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (clients, tasks, examples, adapters, estimated memory) and load no model")


def _overrides(args) -> dict:
    from fedrouter.config import parse_sets  # start-up cost: torch (1 s), as each command's imports below

    out = {key: getattr(args, key) for key in RUN_FLAGS if getattr(args, key) is not None}
    out.update(parse_sets(args.sets))
    return out


def _cmd_run(args) -> int:
    from fedrouter.config import load_config, load_saved  # start-up cost: torch (1 s)
    from fedrouter.experiment import run_experiment
    from fedrouter.study.tables import format_summary

    if args.resume:
        if args.config or args.out or _overrides(args):
            raise FedrouterError("--resume continues a run with its own config.json: give no other config, flag or --out")
        cfg = load_saved(args.resume)
    else:
        cfg = load_config(args.config, _overrides(args))
    if args.dry_run:
        from fedrouter.plan import dry_run  # start-up cost: torch and the world (1.8 s)

        print(dry_run(cfg))
        return 0
    if args.quiet or not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging  # start-up cost: transformers (0.5 s after torch)

        hf_logging.disable_progress_bar()
    results = run_experiment(cfg, args.resume or args.out, progress=not args.quiet, resume=bool(args.resume))
    print(format_summary(results))
    print(f"run directory: {results['run_dir']}")
    return 0


# ------------------------------------------------------------------------------------------- clusters

def _add_clusters(sub) -> None:
    p = sub.add_parser(
        "clusters", help="run FedRouter's task discovery on a data set and score it against the true tasks",
        description="FedRouter's setup (the same code, options and privacy settings as a run) without training: "
                    "the clusters it finds, clustering accuracy against the true tasks, and router accuracy.")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--scenario", required=True, help="single | dual | all | dirichlet")
    p.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    p.add_argument("--method", default=None, help="fedrouter (default), fedrouter-star or fedrouter-oracle")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set method_options.n_global=6 (repeatable)")
    p.add_argument("--clients", dest="n_clients", type=int, default=None, help="number of clients (default as in run: 8)")
    p.add_argument("--task-field", default=None, help="JSONL field holding the task label (e.g. category)")
    p.add_argument("--train-per-client", type=int, default=None, help="training examples per client (default as in run)")
    p.add_argument("--test-per-client", type=int, default=None, help="test examples per client (default as in run)")
    p.add_argument("--seed", type=int, default=None, help="random seed (data split and K-Means)")
    p.add_argument("--model", default=None, help="base model for method_options.embedder=\"base\": 'tiny', an id, or a path")
    p.add_argument("--out", type=Path, default=Path("clusters.json"), help="JSON report (default: ./clusters.json)")


def _cmd_clusters(args) -> int:
    from fedrouter.config import load_config, parse_sets
    from fedrouter.runtime import quiet_libraries
    from fedrouter.study.clusters import cluster_data, format_summary, write_report

    quiet_libraries(progress_bars=sys.stderr.isatty())
    flags = {"data": args.data, "scenario": args.scenario, "method": args.method, "n_clients": args.n_clients,
             "task_field": args.task_field, "train_per_client": args.train_per_client, "test_per_client": args.test_per_client,
             "seed": args.seed, "model": args.model}
    cfg = load_config(args.config, {**parse_sets(args.sets), **{k: v for k, v in flags.items() if v is not None}})
    if args.out.is_dir():
        raise FedrouterError(f"--out {args.out} is a directory; give a file name")
    report = cluster_data(cfg)
    write_report(args.out, report)
    print(format_summary(report))
    print(f"report: {args.out}")
    return 0


# -------------------------------------------------------------------------------------------- compare

def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="run a grid of methods x scenarios x seeds and tabulate it",
                       description="Run methods x scenarios x seeds (resumable) and write summary.csv, "
                                   "summary.json and table.md in --out.")
    p.add_argument("--methods", help=f"comma-separated methods (default: {','.join(QUICK)})")
    p.add_argument("--scenarios", default="single,dual,all", help="comma-separated scenarios (default: single,dual,all)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds, 0..N-1 (default 3; 1 with --quick)")
    p.add_argument("--generalization", action="store_true",
                   help="also report training on single and testing on every task (adds single if missing)")
    p.add_argument("--quick", action="store_true",
                   help=f"a small grid for a first look: {', '.join(f'{k}={v}' for k, v in QUICK_OVERRIDES.items())}")
    p.add_argument("--jobs", type=int, default=None, help="cells run in parallel, one process each (default 1; 2 with --quick)")
    p.add_argument("--scale", metavar="N,N,...",
                   help="instead of the grid: a scaling sweep of the first method on the first scenario over these "
                        "numbers of clients (e.g. 4,8,16,32), written to scaling.json and a plot")
    p.add_argument("--config", type=Path, help="TOML config for every cell")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config key for every cell (method options: method_options.<method>.<key>=...)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="compare directory (default runs/compare)")


def _csv_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise FedrouterError(f"--{what} is empty")
    return list(dict.fromkeys(items))


def _cmd_compare(args) -> int:
    from fedrouter.config import parse_sets  # start-up cost: torch (1 s), as each command's imports below
    from fedrouter.study.compare import CompareSpec, run_compare, run_scaling
    from fedrouter.study.report import build_report  # start-up cost: matplotlib (0.7 s after torch)

    scenarios = _csv_list(args.scenarios, "scenarios")
    if args.generalization and "single" not in scenarios:
        scenarios.insert(0, "single")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    jobs = args.jobs if args.jobs is not None else (2 if args.quick else 1)
    if seeds < 1 or jobs < 1:
        raise FedrouterError("--seeds and --jobs must be positive")
    overrides = {**(QUICK_OVERRIDES if args.quick else {}), **parse_sets(args.sets)}
    methods = _csv_list(args.methods, "methods") if args.methods else list(QUICK)
    if args.scale:
        try:
            clients = [int(n) for n in _csv_list(args.scale, "scale")]
        except ValueError:
            raise FedrouterError(f"--scale expects numbers of clients such as 4,8,16,32, got {args.scale!r}") from None
        if any(n < 1 for n in clients):
            raise FedrouterError("--scale: numbers of clients must be positive")
        rows = run_scaling(methods[0], scenarios[0], clients, overrides, args.config, args.out, jobs)
        for row in rows:
            print(f"{row['n_clients']:>4} clients: ROUGE-1 {row['rouge1']:.3f}, {row['wall_s']:.0f} s")
        print(f"report: {build_report(args.out)}")
        return 0
    spec = CompareSpec(methods, scenarios, list(range(seeds)), overrides, args.config, jobs)
    run_compare(spec, args.out)
    print((args.out / "table.md").read_text())
    return 0


# --------------------------------------------------------------------------------------------- report

def _add_report(sub) -> None:
    p = sub.add_parser("report", help="rebuild tables and plots of a compare or run directory into report.html",
                       description="Rebuild the tables and plots of a compare (or run) directory and write one "
                                   "self-contained HTML page, report.html, beside them.")
    p.add_argument("directory", type=Path)


def _cmd_report(args) -> int:
    from fedrouter.study.report import build_report  # start-up cost: matplotlib (0.7 s after torch)

    print(f"report: {build_report(args.directory)}")
    return 0


# ----------------------------------------------------------------------------------------------- main

COMMANDS = {"run": (_add_run, _cmd_run), "clusters": (_add_clusters, _cmd_clusters),
            "predict": (cli_serving.add_predict, cli_serving.predict), "serve": (cli_serving.add_serve, cli_serving.serve),
            "compare": (_add_compare, _cmd_compare), "report": (_add_report, _cmd_report),
            "flower": (cli_flower.add_parser, cli_flower.run)}


# Commands whose work a signal should end cleanly (a run marks itself FAILED, a report leaves no half-written
# figures): SIGTERM and SIGINT raise Interrupted there. `serve` has its own handlers (uvicorn's drain), the
# flower commands theirs (the worker's cleanup, Flower's SuperNode).
STOPPABLE = ("run", "clusters", "predict", "compare", "report")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as every other error here: one `fedrouter: error: ...` line, exit 2 (not
    a dozen lines of usage first); `--help` still prints the usage."""

    def error(self, message: str):
        command = self.prog.removeprefix("fedrouter").strip()
        print(f"fedrouter: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["flower", "supernode"]:  # every other argument is flower-supernode's: argparse must not see them
        return _run_guarded(lambda: cli_flower.supernode(argv[2:]))
    parser = _Parser(prog="fedrouter", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    quiet_libraries()
    return _run_guarded(lambda: COMMANDS[args.command][1](args), stop_on_signals=args.command in STOPPABLE)


def _run_guarded(command, stop_on_signals: bool = False) -> int:
    try:
        if not stop_on_signals:
            return command()
        with signals_raise():
            return command()
    except Interrupted as exc:  # the run (if any) has marked itself FAILED on the way out
        print(f"fedrouter: {exc}", file=sys.stderr)
        return 128 + exc.signum
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
