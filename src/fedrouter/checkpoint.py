"""Checkpoints of a run, one per finished round, written atomically; the newest readable one resumes it.

A checkpoint holds everything the rest of the run depends on: the server part's state (its adapters,
cluster maps, optimizer moments), every client's private state and batch-stream position (which also
seeds its LoRA dropout), the random generators (torch's global one; client sampling and failure
injection), the traffic counters, the round records so far, the base evaluation -- and the config it
belongs to, so that a resume under an edited config.json is refused before any work.

The file is `fedrouter.core.statefile` bytes (safetensors + JSON): reading one back runs no code, so a
run directory someone hands you cannot execute anything through `--resume`. It is written to a temporary
file and renamed (`atomic.write_bytes`), so a crash mid-write never leaves a file that looks complete;
the last `keep` are kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedrouter.atomic import read_regular, write_bytes
from fedrouter.core.statefile import UnreadableState, dumps, loads
from fedrouter.errors import FedrouterError

log = logging.getLogger(__name__)

DIR = "checkpoints"
FORMAT = 3  # 3: traffic per client
SUFFIX = ".safetensors"
# What every checkpoint holds; one without any of these is not a checkpoint of this version.
REQUIRED = ("format", "round", "config", "server", "torch_rng", "sampling_rng", "traffic", "history",
            "base_reports", "setup_report", "timings")
# Config keys that may differ between a run and its resume: they change how it runs, not what it computes.
RESUMABLE_CHANGES = {"threads", "cache_dir", "checkpoint_keep", "client_timeout_s"}


def path_of(run_dir: Path, round_number: int) -> Path:
    return Path(run_dir) / DIR / f"round-{round_number:05d}{SUFFIX}"


def save(run_dir: Path, round_number: int, payload: dict, keep: int) -> Path:
    folder = Path(run_dir) / DIR
    folder.mkdir(exist_ok=True)
    final = path_of(run_dir, round_number)
    write_bytes(final, dumps({"format": FORMAT, "round": round_number, **payload}))
    for old in sorted(folder.glob(f"round-*{SUFFIX}"))[:-keep]:
        old.unlink()
    return final


def read(path: Path) -> dict:
    """One checkpoint file, or UnreadableState saying why it is not one."""
    payload = loads(read_regular(path))  # a FIFO planted as a checkpoint: refused, not waited on
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UnreadableState(f"not a fedrouter checkpoint of format {FORMAT}")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise UnreadableState(f"incomplete: no {', '.join(missing)}")
    return payload


def load_latest(run_dir: Path) -> dict | None:
    """The newest checkpoint that reads back whole (a corrupt one is reported and skipped), or None."""
    for path in sorted((Path(run_dir) / DIR).glob(f"round-*{SUFFIX}"), reverse=True):
        try:
            return read(path)
        except (OSError, UnreadableState) as exc:  # truncated, corrupt, foreign: fall back to the one before
            log.warning("checkpoint %s is unreadable (%s); trying the one before", path.name, exc)
    return None


def check_belongs(saved: dict, config: dict, where: Path) -> None:
    """Refuse to resume `saved` under a config that differs from the one it was written under."""
    before = saved["config"]
    for key in sorted(set(before) | set(config)):
        if key in RESUMABLE_CHANGES or before.get(key) == config.get(key):
            continue
        raise FedrouterError(f"{where}: config.json says {key} = {config.get(key)!r}, but the checkpoint was written "
                             f"with {key} = {before.get(key)!r}; a run resumes only under its own config")
