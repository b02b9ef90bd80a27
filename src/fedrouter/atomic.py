"""The one way fedrouter writes a file it may read back -- whole or not at all -- and reads it back.

`write_bytes` writes to a temporary file beside the target (created exclusively, with the final mode from
its first byte), flushes it to disk, renames it over the target and syncs the folder, so that after a
crash or a full disk the target is either the new content or what it was before -- never a partial file
under its name, and no temporary file left behind. Every run-directory file, checkpoint, node state and
key goes through it.

`read_regular` reads a file back only if it is a regular file: a FIFO, a device or a folder planted under
a run directory's file name is refused at once instead of hanging the reader (a FIFO with no writer
blocks a plain open forever).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path


class NotRegularFile(OSError):
    """A path that names something other than a regular file (a FIFO, a device, a folder, a socket)."""


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


def read_regular(path: Path) -> bytes:
    """The bytes of the regular file at `path`; NotRegularFile for anything else. Opened without blocking
    (O_NONBLOCK), so a FIFO is recognised and refused rather than waited on; symlinks are followed."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device or socket"
            raise NotRegularFile(f"{path} is {kind}, not a regular file")
        os.set_blocking(fd, True)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_regular_text(path: Path) -> str:
    return read_regular(path).decode("utf-8")
