"""Checkpoints of a run, one per finished round, written atomically; the newest readable one resumes it.

A checkpoint holds everything the rest of the run depends on: the server part (its adapters, cluster
maps, optimizer moments), every client's private state and batch-stream position (which also seeds its
LoRA dropout), the random generators (torch's global one; client sampling and failure injection), the
traffic counters, the round records so far, and the base evaluation. It is written to a temporary file
and renamed, so a crash mid-write never leaves a file that looks complete; the last `keep` are kept.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DIR = "checkpoints"
FORMAT = 1


def path_of(run_dir: Path, round_number: int) -> Path:
    return run_dir / DIR / f"round-{round_number:05d}.pt"


def save(run_dir: Path, round_number: int, payload: dict, keep: int) -> Path:
    folder = run_dir / DIR
    folder.mkdir(exist_ok=True)
    final = path_of(run_dir, round_number)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "round": round_number, **payload}, buffer)
    write_atomic(final, buffer.getvalue())
    for old in sorted(folder.glob("round-*.pt"))[:-keep]:
        old.unlink()
    return final


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, or (after a crash mid-write) the file as it was: never a partial file under its name."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the rename makes it visible
    os.replace(tmp, path)


def load_latest(run_dir: Path) -> dict | None:
    """The newest checkpoint that reads back whole (a corrupt one is reported and skipped), or None."""
    for path in sorted((run_dir / DIR).glob("round-*.pt"), reverse=True):
        try:
            payload = torch.load(path, weights_only=False)  # our own file: it holds the server part's objects
            if payload.get("format") != FORMAT or "round" not in payload:
                raise ValueError("not a fedrouter checkpoint of this version")
            return payload
        except Exception as exc:  # truncated, corrupt, foreign: fall back to the one before
            log.warning("checkpoint %s is unreadable (%s: %s); trying the one before", path.name, type(exc).__name__, exc)
    return None
