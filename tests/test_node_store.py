"""A Flower node's checkpoints of its client's state: written whole, pruned to exactly what the server's
kept checkpoints can still ask for, and a missing one is a clear error."""

from __future__ import annotations

import pytest

from fedrouter.engines.flower.node_store import NodeStateLost, NodeStore

RUN = "0123456789ab"  # a run id as the server makes them


def test_a_state_reads_back_as_written_and_a_missing_one_names_its_file(tmp_path):
    store = NodeStore.of(tmp_path, RUN, 3)
    store.write(5, b"after five", keep_from=0, keep=set())
    assert store.read(5, 3) == b"after five"
    assert not list(store.folder.glob(".*.tmp"))  # the temporary file was renamed, not left
    with pytest.raises(NodeStateLost, match=r"client 3's state after exchange 7 .*state-0000007.state is missing"):
        store.read(7, 3)


def test_a_write_cut_off_before_its_rename_is_not_a_state(tmp_path):
    store = NodeStore(tmp_path / "c")
    store.write(3, b"x", keep_from=0, keep=set())
    (store.folder / ".state-0000005.state.1a2b3c4d.tmp").write_bytes(b"half a wr")  # the node died mid-write
    assert store.seqs() == [3]
    with pytest.raises(NodeStateLost, match="exchange 5"):
        store.read(5, 0)


def test_pruning_keeps_the_newest_state_at_or_before_the_oldest_kept_checkpoint_and_all_after(tmp_path):
    store = NodeStore(tmp_path / "c")
    for seq in (2, 4, 6):
        store.write(seq, b"x", keep_from=0, keep=set())
    assert store.seqs() == [2, 4, 6]  # no server checkpoint yet: everything may be needed
    # the oldest kept server checkpoint was taken at exchange 5: a resume to it needs state 4, to any
    # later one 4, 6 or newer; state 2 can never be asked for again
    store.write(8, b"x", keep_from=5, keep=set())
    assert store.seqs() == [4, 6, 8]
    store.write(9, b"x", keep_from=8, keep=set())
    assert store.seqs() == [8, 9]
    # the state the server expects now (its reply of 9 was lost) is never pruned
    store.write(12, b"x", keep_from=12, keep={8})
    assert store.seqs() == [8, 12]


def test_a_resume_drops_later_states_and_the_end_of_a_run_removes_its_folders(tmp_path):
    a, b = NodeStore.of(tmp_path, RUN, 0), NodeStore.of(tmp_path, RUN, 1)
    for seq in (1, 3, 5):
        a.write(seq, b"x", keep_from=0, keep=set())
    b.write(1, b"x", keep_from=0, keep=set())
    a.drop_after(3)
    assert a.seqs() == [1, 3]
    a.remove()
    assert not a.folder.exists() and b.folder.exists()  # the other client's states stay
    b.remove()
    assert not (tmp_path / "checkpoints").exists()  # nothing of the run is left
