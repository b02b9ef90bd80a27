"""`fedrouter predict` and `fedrouter serve`: the command line of a finished run put to use (`fedrouter.serving`).

Each command imports the serving modules when it runs: they bring torch, peft and the model's libraries
(seconds), which `fedrouter --help` and a refused flag should not pay for.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from fedrouter.atomic import read_regular_text
from fedrouter.errors import FedrouterError
from fedrouter.threads import choose_threads, set_threads


def finite_float(text: str) -> float:
    """An argparse type: a finite number (float() alone takes 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


# -------------------------------------------------------------------------------------------- predict

def add_base_flags(p) -> None:
    """--model and --cache-dir of the commands that load a finished run: this machine chooses them."""
    p.add_argument("--model", default=None,
                   help="the base model the run was trained on: a Hugging Face id or a local path (default: "
                        "$FEDROUTER_MODEL, else the run's own when it is 'tiny'); refused when it is not the run's base")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the tiny base is built and kept (default: $FEDROUTER_CACHE or ~/.cache/fedrouter; "
                        "never the run's own cache_dir)")


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="answer prompts with a finished run's adapters and router")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--file", type=Path, help="JSONL with an 'instruction' field per line")
    p.add_argument("--out", type=Path, help="also write {prompt, adapter, distance, answer} lines here (JSONL)")
    add_base_flags(p)


def predict(args) -> int:
    from fedrouter.serving.predict import predict, read_prompts, write_answers  # start-up cost: torch, peft

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

def add_serve(sub) -> None:
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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the CPUs this process may use)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="no line per request on stderr")
    add_base_flags(p)


def _api_key(args) -> str | None:
    """The key from --api-key-file (a regular file, its content without surrounding whitespace), --api-key
    (with a warning: argv is world-readable) or $FEDROUTER_API_KEY; None: no key."""
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


def serve(args) -> int:
    from fedrouter.serving.lifecycle import serve  # start-up cost: torch, peft and the model's libraries

    if args.threads is not None and args.threads < 1:
        raise FedrouterError(f"--threads must be positive, got {args.threads}")
    api_key = _api_key(args)
    set_threads(choose_threads(args.threads), args.threads)  # the model's size is not known here: the CPUs this process may use
    return serve(args.run_dir, args.host, args.port, api_key, args.max_batch, args.max_wait_ms, args.max_body_bytes,
                 access_log=args.access_log, model=args.model, cache_dir=args.cache_dir,
                 allow_origins=tuple(args.allow_origins), body_timeout_s=args.body_timeout_s,
                 shutdown_timeout_s=args.shutdown_timeout_s)
