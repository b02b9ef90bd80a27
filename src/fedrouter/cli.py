"""The `fedrouter` command line: argparse, and a call into the experiment or the study per command.

Bad input of any kind ends in one line on stderr, ``fedrouter: error: ...``, and exit code 2. Each
command imports what it runs when it runs (torch and matplotlib cost seconds to import; `--help` and a
refused config should not pay for them).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fedrouter import cli_flower
from fedrouter.errors import FedrouterError


def finite_float(text: str) -> float:
    """An argparse type: a finite number (float() alone takes 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


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
    "threads": ("--threads", int, "torch CPU threads"),
    "eval_every": ("--eval-every", int, "evaluate every N rounds (0: only at the end)"),
    "inject_failures": ("--inject-failures", finite_float, "each client fails a round with this probability (testing)"),
    "engine": ("--engine", str, "inprocess (default) | flower (Flower's simulation runtime; needs the flower extra)"),
    "device": ("--device", str, "auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps"),
    "dtype": ("--dtype", str, "auto (bf16 on a GPU that has it, else float32) | float32 | bfloat16 | float16"),
    "quantization": ("--quantization", str, "none | auto | 4bit | 8bit (bitsandbytes, CUDA only)"),
}
QUICK_METHODS = ("fedrouter", "fedit", "local")
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
    from fedrouter.config import parse_sets

    out = {key: getattr(args, key) for key in RUN_FLAGS if getattr(args, key) is not None}
    out.update(parse_sets(args.sets))
    return out


def _cmd_run(args) -> int:
    from fedrouter.config import load_config, load_saved
    from fedrouter.experiment import run_experiment
    from fedrouter.study.tables import format_summary

    if args.resume:
        if args.config or args.out or _overrides(args):
            raise FedrouterError("--resume continues a run with its own config.json: give no other config, flag or --out")
        cfg = load_saved(args.resume)
    else:
        cfg = load_config(args.config, _overrides(args))
    if args.dry_run:
        from fedrouter.plan import dry_run

        print(dry_run(cfg))
        return 0
    if args.quiet or not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    results = run_experiment(cfg, args.resume or args.out, progress=not args.quiet, resume=bool(args.resume))
    print(format_summary(results))
    print(f"run directory: {results['run_dir']}")
    return 0


# -------------------------------------------------------------------------------------------- predict

def _add_base_flags(p) -> None:
    """--model and --cache-dir of the commands that load a finished run: this machine chooses them."""
    p.add_argument("--model", default=None,
                   help="the base model the run was trained on: a Hugging Face id or a local path (default: "
                        "$FEDROUTER_MODEL, else the run's own when it is 'tiny'); refused when it is not the run's base")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the tiny base is built and kept (default: $FEDROUTER_CACHE or ~/.cache/fedrouter; "
                        "never the run's own cache_dir)")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="answer prompts with a finished run's adapters and router")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--file", type=Path, help="JSONL with an 'instruction' field per line")
    p.add_argument("--out", type=Path, help="also write {prompt, adapter, distance, answer} lines here (JSONL)")
    _add_base_flags(p)


def _cmd_predict(args) -> int:
    from fedrouter.study.predict import predict, read_prompts, write_answers

    if args.out is not None and (args.out.is_dir() or not args.out.parent.is_dir()):
        raise FedrouterError(f"--out {args.out}: give a file in an existing folder")
    rows = predict(args.run_dir, read_prompts(args.prompt, args.file), args.model, args.cache_dir)
    for row in rows:
        where = row["adapter"] + (f" (distance {row['distance']:.3f})" if row["distance"] is not None else "")
        print(f"[{where}] {row['prompt']}\n  -> {row['answer']}")
    if args.out:
        write_answers(args.out, rows)
    return 0


# ---------------------------------------------------------------------------------------------- serve

def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a finished run's router and adapters as an OpenAI-compatible HTTP API",
        description="Serve a finished run as an OpenAI-compatible HTTP API (GET /v1/models, POST /v1/completions and "
                    "/v1/chat/completions, streaming; GET /health, /metrics): the model named after the run routes each "
                    "prompt to an adapter; an adapter's own name bypasses the router. Concurrent requests are "
                    "generated together in one mixed-adapter batch. Needs the serve extra (pip install 'fedrouter[serve]'). "
                    "Ctrl-C or SIGTERM finishes the requests in flight, then exits.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", type=Path, default=None,
                     help="require 'Authorization: Bearer KEY' on every path but /health, KEY being this file's content "
                          "(default: $FEDROUTER_API_KEY if set)")
    key.add_argument("--api-key", default=None,
                     help="the key itself (visible to every user of this machine in the process list: prefer --api-key-file)")
    p.add_argument("--allow-origin", dest="allow_origins", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://example.org; * for any) call the API, with CORS headers "
                        "(repeatable; default: requests with an Origin header are refused)")
    p.add_argument("--max-batch", type=int, default=64, help="most requests generated together in one batch (default 64)")
    p.add_argument("--max-wait-ms", type=finite_float, default=20.0,
                   help="how long an idle server waits for more requests to batch with the first (default 20; at most 10000)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (default 1 MiB; larger: 413)")
    p.add_argument("--body-timeout-s", type=finite_float, default=30.0,
                   help="the most a request's body may take to arrive (default 30; slower: 408)")
    p.add_argument("--shutdown-timeout-s", type=int, default=30,
                   help="on SIGTERM or Ctrl-C, the most it waits for the requests in flight (default 30)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="no line per request on stderr")
    _add_base_flags(p)


def _api_key(args) -> str | None:
    """The key from --api-key-file (a regular file, its content without surrounding whitespace), --api-key
    (with a warning: argv is world-readable) or $FEDROUTER_API_KEY; None: no key."""
    import os

    from fedrouter.atomic import read_regular_text

    if args.api_key_file is not None:
        try:
            key = read_regular_text(args.api_key_file).strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise FedrouterError(f"--api-key-file {args.api_key_file}: cannot read it ({exc.strerror or exc})"
                                 if isinstance(exc, OSError) else f"--api-key-file {args.api_key_file}: not text") from None
        if not key:
            raise FedrouterError(f"--api-key-file {args.api_key_file} is empty")
        if os.stat(args.api_key_file).st_mode & 0o077:
            print(f"fedrouter: warning: --api-key-file {args.api_key_file} is readable by other users (chmod 600 it)",
                  file=sys.stderr)
        return key
    if args.api_key is not None:
        print("fedrouter: warning: --api-key puts the key in the command line, which every user of this machine can "
              "read (ps, /proc); use --api-key-file or $FEDROUTER_API_KEY", file=sys.stderr)
        return args.api_key or None
    return os.environ.get("FEDROUTER_API_KEY") or None


def _cmd_serve(args) -> int:
    from fedrouter.runtime import set_threads
    from fedrouter.study.serve import serve

    if args.threads is not None and args.threads < 1:
        raise FedrouterError(f"--threads must be positive, got {args.threads}")
    api_key = _api_key(args)
    set_threads(args.threads)
    return serve(args.run_dir, args.host, args.port, api_key, args.max_batch, args.max_wait_ms, args.max_body_bytes,
                 access_log=args.access_log, model=args.model, cache_dir=args.cache_dir,
                 allow_origins=tuple(args.allow_origins), body_timeout_s=args.body_timeout_s,
                 shutdown_timeout_s=args.shutdown_timeout_s)


# ------------------------------------------------------------------------------------------- clusters

def _add_clusters(sub) -> None:
    from fedrouter.core.cluster import ASSIGN, CLUSTER_ON, DEFAULT_ASSIGN, DEFAULT_CLUSTER_ON, DEFAULT_GLOBAL_ROUTER, GLOBAL_ROUTERS

    p = sub.add_parser(
        "clusters", help="cluster clients' data as FedRouter does and score it against the true tasks",
        description="FedRouter's local and global clustering and its router on a data set, without training: "
                    "clustering accuracy against the true tasks and router accuracy in global and local mode.")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--scenario", required=True, help="single | dual | all | dirichlet")
    p.add_argument("--embedder", default="minilm",
                   help="'minilm' (all-MiniLM-L6-v2; FedRouter's default, chosen by measurement), 'base' (mean "
                        "last hidden state of --model; the paper's), or a Hugging Face encoder id or path")
    p.add_argument("--cluster-on", default=DEFAULT_CLUSTER_ON, choices=CLUSTER_ON,
                   help="what is clustered: 'instruction+output@server' (default): clients split by "
                        "instructions, the server groups their sub-clusters by instruction and answer means; "
                        "'instruction': the instructions alone, everywhere; 'instruction+output': each "
                        "instruction's embedding followed by its answer's, everywhere (it splits a task by its "
                        "answer kinds and joins tasks that share answers such as yes/no)")
    p.add_argument("--assign", default=DEFAULT_ASSIGN, choices=ASSIGN,
                   help="how a training example gets its global cluster: 'example' (default): on its own, the "
                        "nearest cluster centre by instruction and answer; 'sub-cluster': where the server put "
                        "its client's sub-cluster (the paper's form)")
    p.add_argument("--global-router", default=DEFAULT_GLOBAL_ROUTER, choices=GLOBAL_ROUTERS,
                   help="how the router compares an input with the clusters: 'discriminant' (default): the nearest "
                        "cluster mean after whitening by the clusters' pooled covariance; 'prototype': the nearest "
                        "prototype (the paper's)")
    p.add_argument("--answer-split", default="on", choices=("on", "off"),
                   help="'on' (default): with --cluster-on instruction+output@server, each client's sub-cluster is "
                        "split where its templates answer differently (two tasks asking different things of one "
                        "input format); 'off': sub-clusters stay as K-Means made them")
    p.add_argument("--n-local", default="auto",
                   help="sub-clusters per client: K, 'auto' (silhouette against a null reference), or one K per client, comma-separated")
    p.add_argument("--n-global", default="auto", help="global clusters: K or 'auto' (silhouette)")
    p.add_argument("--k-min", default="1", help="smallest K the silhouette search tries (default 1: a split must beat a structureless reference)")
    p.add_argument("--k-max", default="12", help="largest K the silhouette search tries (default 12)")
    p.add_argument("--clients", dest="n_clients", type=int, default=None, help="number of clients (default as in run: 8)")
    p.add_argument("--task-field", default=None, help="JSONL field holding the task label (e.g. category)")
    p.add_argument("--train-per-client", type=int, default=None, help="training examples per client (default as in run)")
    p.add_argument("--test-per-client", type=int, default=None, help="test examples per client (default as in run)")
    p.add_argument("--seed", type=int, default=None, help="random seed (data split and K-Means)")
    p.add_argument("--model", default=None, help="base model for --embedder base: 'tiny', a Hugging Face id, or a path")
    p.add_argument("--out", type=Path, default=Path("clusters.json"), help="JSON report (default: ./clusters.json)")


def _parse_int(text: str, flag: str, minimum: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise FedrouterError(f"{flag} expects an integer, got {text!r}") from None
    if value < minimum:
        raise FedrouterError(f"{flag} must be at least {minimum}, got {value}")
    return value


def parse_k(text: str, flag: str, n_clients: int | None = None):
    """'auto', a positive K, or (n_clients given) one positive K per client, comma-separated."""
    text = str(text).strip()
    if text == "auto":
        return "auto"
    if n_clients is not None and "," in text:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != n_clients:
            raise FedrouterError(f"{flag} lists {len(parts)} values for {n_clients} clients")
        return {i: _parse_int(p, flag, 1) for i, p in enumerate(parts)}
    try:
        value = int(text)
    except ValueError:
        raise FedrouterError(f"{flag} expects a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise FedrouterError(f"{flag} must be a positive integer or 'auto', got {value}")
    return value


def _cmd_clusters(args) -> int:
    from fedrouter.config import load_config
    from fedrouter.runtime import quiet_libraries
    from fedrouter.study.clusters import cluster_data, format_summary, write_report

    quiet_libraries(progress_bars=sys.stderr.isatty())
    # cheap checks first: nothing is loaded or embedded on bad input
    k_min = _parse_int(args.k_min, "--k-min", 1)
    k_max = _parse_int(args.k_max, "--k-max", k_min)
    flags = {"data": args.data, "scenario": args.scenario, "n_clients": args.n_clients, "task_field": args.task_field,
             "train_per_client": args.train_per_client, "test_per_client": args.test_per_client,
             "seed": args.seed, "model": args.model}
    cfg = load_config(None, {k: v for k, v in flags.items() if v is not None})  # validated as `fedrouter run` does
    n_local = parse_k(args.n_local, "--n-local", cfg.n_clients)
    n_global = parse_k(args.n_global, "--n-global")
    if args.out.is_dir():
        raise FedrouterError(f"--out {args.out} is a directory; give a file name")
    report = cluster_data(cfg, args.embedder, n_local, n_global, range(k_min, k_max + 1), args.cluster_on, args.assign,
                          args.global_router, args.answer_split == "on")
    write_report(args.out, report)
    print(format_summary(report))
    print(f"report: {args.out}")
    return 0


# -------------------------------------------------------------------------------------------- compare

def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="run a grid of methods x scenarios x seeds and tabulate it",
                       description="Run methods x scenarios x seeds (resumable) and write summary.csv, "
                                   "summary.json and table.md in --out.")
    p.add_argument("--methods", help="comma-separated methods (default: fedrouter,fedit,local)")
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
    from fedrouter.config import parse_sets
    from fedrouter.study.compare import CompareSpec, run_compare, run_scaling
    from fedrouter.study.report import build_report

    scenarios = _csv_list(args.scenarios, "scenarios")
    if args.generalization and "single" not in scenarios:
        scenarios.insert(0, "single")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    jobs = args.jobs if args.jobs is not None else (2 if args.quick else 1)
    if seeds < 1 or jobs < 1:
        raise FedrouterError("--seeds and --jobs must be positive")
    overrides = {**(QUICK_OVERRIDES if args.quick else {}), **parse_sets(args.sets)}
    methods = _csv_list(args.methods, "methods") if args.methods else list(QUICK_METHODS)
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
    from fedrouter.study.report import build_report

    print(f"report: {build_report(args.directory)}")
    return 0


# ----------------------------------------------------------------------------------------------- main

COMMANDS = {"run": (_add_run, _cmd_run), "clusters": (_add_clusters, _cmd_clusters),
            "predict": (_add_predict, _cmd_predict), "serve": (_add_serve, _cmd_serve), "compare": (_add_compare, _cmd_compare),
            "report": (_add_report, _cmd_report), "flower": (cli_flower.add_parser, cli_flower.run)}


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
    from fedrouter.runtime import quiet_libraries

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
    from fedrouter.runtime import Interrupted
    from fedrouter.runtime import stop_on_signals as signals_raise

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
