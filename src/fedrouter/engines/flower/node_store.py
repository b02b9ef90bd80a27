"""A Flower node's own checkpoints of its client's private state.

The server's checkpoint (`fedrouter.checkpoint`) cannot hold a Flower client's private state: that never
leaves its node. So the node keeps it. The server numbers its exchanges (`seq`: one per batch of
messages, setup, a round's training, an evaluation); after every message that changed its client's state,
the node writes the state to `state-<seq>.state` in this folder, atomically, and its reply tells the server
that seq. The server remembers, per client, the seq of the state it knows of (a reply that never reached
it does not count), records that in its own checkpoint, and sends it with every message. A node whose
in-memory state is not that one -- the SuperNode restarted, or the run was resumed as a new Flower run --
reloads exactly that file; a node that cannot is an error, never a silent fresh start.

Pruning: with every message the server also sends `keep_from`, the seq of its oldest kept checkpoint. A
resume from any kept checkpoint needs the node's newest file at or before that checkpoint, so the node
deletes only files older than its newest one at or before `keep_from` -- and never the one the server
currently expects.

Paths: the folder is `<node's run folder>/checkpoints/nodes/<run id>/client<i>`, where the run folder comes
from the node's own configuration (`flower_node.run_folder`) and the run id must be a plain identifier:
nothing a server sends can point a node at a file outside its own folder.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from fedrouter.atomic import write_bytes
from fedrouter.checkpoint import DIR
from fedrouter.errors import FedrouterError

_NAME = re.compile(r"state-(\d+)\.state")
RUN_ID = re.compile(r"[0-9a-f]{12}")


class NodeStateLost(RuntimeError):
    """The state the server expects of this node's client is neither in memory nor on disk."""


class NodeStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def of(cls, run_folder: Path, run_id, client_id: int) -> "NodeStore":
        """The folder of one client of one run under the node's own `run_folder`; a run id that is not a
        plain identifier (a path, `..`) is refused."""
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            raise FedrouterError(f"the server sent run id {str(run_id)[:40]!r}, which is not a run id (12 hex digits)")
        if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
            raise FedrouterError(f"client id {client_id!r} is not a non-negative integer")
        return cls(Path(run_folder) / DIR / "nodes" / run_id / f"client{client_id}")

    def path(self, seq: int) -> Path:
        return self.folder / f"state-{int(seq):07d}.state"

    def seqs(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for m in map(_NAME.fullmatch, (p.name for p in self.folder.iterdir())) if m)

    def read(self, seq: int, client_id: int) -> bytes:
        try:
            return self.path(seq).read_bytes()
        except FileNotFoundError:
            raise NodeStateLost(
                f"client {client_id}'s state after exchange {seq} is not on this node ({self.path(seq)} is missing): "
                "start the SuperNode holding this partition with the out-dir it had") from None

    def write(self, seq: int, blob: bytes, keep_from: int, keep: set[int]) -> None:
        """`blob` as the state after exchange `seq`, then the files no kept checkpoint needs removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_bytes(self.path(seq), blob, mode=0o600)
        seqs = self.seqs()
        oldest_needed = max((s for s in seqs if s <= keep_from), default=None)
        for s in seqs:
            if oldest_needed is not None and s < oldest_needed and s not in keep | {seq}:
                self.path(s).unlink(missing_ok=True)

    def drop_after(self, seq: int) -> None:
        """Forget states written after exchange `seq` (a resumed run goes on from there and rewrites them)."""
        for s in self.seqs():
            if s > seq:
                self.path(s).unlink(missing_ok=True)

    def remove(self) -> None:
        """The run is over: its states go, and the run's folder too once no client of it is left."""
        shutil.rmtree(self.folder, ignore_errors=True)
        for parent in list(self.folder.parents)[:3]:  # <run id>/, nodes/, checkpoints/
            try:
                parent.rmdir()
            except OSError:  # not empty (another client's, or another run's), or already gone
                break
