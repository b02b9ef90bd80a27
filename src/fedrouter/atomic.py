"""The one way fedrouter writes a file it may read back: whole or not at all.

`write_bytes` writes to a temporary file beside the target (created exclusively, with the final mode from
its first byte), flushes it to disk, renames it over the target and syncs the folder, so that after a
crash or a full disk the target is either the new content or what it was before -- never a partial file
under its name, and no temporary file left behind. Every run-directory file, checkpoint, node state and
key goes through it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """`data` at `path`, atomically and durably; `mode` applies from creation (0o600 for secrets)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # say which file could not be written (a full disk)
        raise
    _sync_folder(path.parent)


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    write_bytes(path, text.encode("utf-8"), mode)


def write_json(path: Path, payload, mode: int = 0o644) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n", mode)


def create_exclusive(path: Path, data: bytes, mode: int = 0o600) -> None:
    """A new file at `path` holding `data`, created only if nothing is there (O_EXCL) and with `mode` from
    its first byte: a file planted at that path beforehand is never written to."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)
