"""The durable outbox: persist before publish, ack records, replay, compaction and a monotonic seq
after restart."""

from __future__ import annotations

import pytest

from edge.outbox import Entry, Outbox, _encode, read_outbox
from kernel.errors import ConfigError
from protos.envelope import Publish


def msg(i: int) -> Publish:
    return Publish(topic="fogfl/r/fog/fog-0/samples", payload=bytes([i]) * (i + 1), qos=1, retain=bool(i % 2))


def test_persist_ack_and_replay(tmp_path):
    box = Outbox(tmp_path)
    seqs = [box.next_seq() for _ in range(3)]
    assert seqs == [1, 2, 3]
    for s in seqs:
        box.put(s, msg(s))
    assert box.ack(2) and not box.ack(2) and not box.ack(99)
    pending, recorded = read_outbox(tmp_path)
    assert [e.seq for e in pending] == [1, 3] and [e.seq for e in recorded] == [1, 2, 3]
    assert [e.seq for e in box.recorded()] == [1, 2, 3]

    again = Outbox(tmp_path)
    assert [(e.seq, e.msg) for e in again.pending()] == [(1, msg(1)), (3, msg(3))]
    assert again.next_seq() == 4  # monotonic across the restart
    again.ack(1)
    again.ack(3)
    assert len(Outbox(tmp_path)) == 0 and Outbox(tmp_path).next_seq() == 4  # 4 was handed out, never stored
    again.compact()
    assert again.recorded() == [] and read_outbox(tmp_path) == ([], [])
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files behind
    assert Outbox(tmp_path).next_seq() == 5  # from the counter compaction wrote


def test_seq_never_goes_back_even_if_its_file_is_lost(tmp_path):
    box = Outbox(tmp_path)
    for _ in range(5):
        s = box.next_seq()
    box.put(s, msg(5))
    assert Outbox(tmp_path).next_seq() == 6  # the journal's record carries its seq
    box.ack(5)
    assert Outbox(tmp_path).next_seq() == 6  # so does it after the ack, until a compaction
    (tmp_path / "seq").write_text("garbage")
    assert Outbox(tmp_path).next_seq() == 6
    box.compact()  # the counter is written before the records go
    assert (tmp_path / "seq").read_text().strip() == "6" and Outbox(tmp_path).next_seq() == 6


def test_unstored_numbers_may_be_reused_and_advance_restores_a_callers_counter(tmp_path):
    box = Outbox(tmp_path)
    assert [box.next_seq() for _ in range(3)] == [1, 2, 3]  # handed out, never stored: nothing carried them
    again = Outbox(tmp_path)
    assert again.next_seq() == 1
    again.advance(10)
    again.advance(4)  # never backwards
    assert again.next == 10 and again.next_seq() == 10


def test_a_fogfl_020_outbox_moves_into_the_journal_and_a_corrupt_file_is_moved_aside(tmp_path):
    for seq in (2, 4):
        (tmp_path / f"{seq:020d}.msg").write_bytes(_encode(Entry(seq, msg(seq))))
    (tmp_path / f"{7:020d}.msg").write_bytes(b"half a messa")
    (tmp_path / "seq").write_text("6\n")
    box = Outbox(tmp_path)
    assert [(e.seq, e.msg) for e in box.pending()] == [(2, msg(2)), (4, msg(4))] and box.next == 6
    assert (tmp_path / f"{7:020d}.corrupt").exists() and not list(tmp_path.glob("*.msg"))
    assert [e.seq for e in read_outbox(tmp_path)[0]] == [2, 4]
    box.close()
    assert [e.seq for e in Outbox(tmp_path).pending()] == [2, 4]


def test_a_damaged_journal_tail_loses_only_the_record_being_written(tmp_path):
    box = Outbox(tmp_path)
    box.put(box.next_seq(), msg(1))
    box.put(box.next_seq(), msg(2))
    box.close()
    journal = tmp_path / "outbox.journal"
    journal.write_bytes(journal.read_bytes()[:-2])  # a power cut while the second put was written
    again = Outbox(tmp_path)
    assert [e.seq for e in again.pending()] == [1] and again.next_seq() == 2
    (tmp_path / "outbox.journal").write_bytes(b"not a journal")
    with pytest.raises(ConfigError, match="not a fogfl journal"):
        Outbox(tmp_path)


def test_in_memory_mode(tmp_path):
    box = Outbox()
    assert not box.durable
    box.put(box.next_seq(), msg(1))
    box.put(box.next_seq(), msg(2))
    assert [e.seq for e in box.pending()] == [1, 2] and box.ack(1) and len(box) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_unusable_directory_is_a_config_error(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="cannot create the outbox directory"):
        Outbox(tmp_path / "a-file" / "outbox")


def test_sync_durability_syncs_before_put_returns_and_acks_are_not_synced(tmp_path, datasyncs):
    box = Outbox(tmp_path)  # "sync" is the default
    box.put(box.next_seq(), msg(1))
    assert len(datasyncs) == 1 and box.unsynced == 0
    assert box.sync() == 0 and len(datasyncs) == 1
    assert box.ack(1) and len(datasyncs) == 1  # one lost in a power cut only means a resend


def test_async_durability_writes_at_put_and_syncs_at_sync(tmp_path, datasyncs):
    box = Outbox(tmp_path, durability="async")
    for _ in range(3):
        box.put(box.next_seq(), msg(_))
    assert datasyncs == [] and box.unsynced == 3
    # written (to the OS) already: a crash of the process right now loses nothing
    assert [(e.seq, e.msg) for e in read_outbox(tmp_path)[0]] == [(1, msg(0)), (2, msg(1)), (3, msg(2))]
    assert box.sync() == 3 and box.unsynced == 0
    assert len(datasyncs) == 1  # group commit: one sync for all three
    assert box.sync() == 0 and len(datasyncs) == 1


def test_an_entry_acknowledged_before_its_sync_is_not_synced(tmp_path, datasyncs):
    box = Outbox(tmp_path, durability="async")
    box.put(box.next_seq(), msg(1))
    assert box.ack(1)  # the broker has it: no reason to sync it any more
    assert box.unsynced == 0 and box.sync() == 0 and datasyncs == []
    box.put(box.next_seq(), msg(2))
    assert box.sync() == 1 and len(datasyncs) == 1
    assert [e.seq for e in Outbox(tmp_path).pending()] == [2]


def test_compaction_with_a_counter_saved_elsewhere_writes_no_seq_file(tmp_path):
    box = Outbox(tmp_path, compact_bytes=1)
    box.put(box.next_seq(), msg(1))
    box.put(box.next_seq(), msg(2))
    box.ack(1)
    assert box.needs_compaction
    box.compact(counter_saved=True)
    assert not (tmp_path / "seq").exists() and [e.seq for e in box.recorded()] == [2]
    box.ack(2)
    box.compact(counter_saved=True)
    again = Outbox(tmp_path)
    assert again.next_seq() == 1  # nothing on disk carries a seq any more
    again.advance(3)  # what the caller does with the counter it saved
    assert again.next_seq() == 3


def test_unknown_durability_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="durability"):
        Outbox(tmp_path, durability="eventually")
    from kernel.config import build_config

    assert build_config([], [("edge.durability", "async")], use_env=False).edge.durability == "async"
    with pytest.raises(ConfigError):
        build_config([], [("edge.durability", "eventually")], use_env=False)


def test_an_ack_that_cannot_be_written_still_clears_the_entry_and_costs_only_a_resend(tmp_path):
    import os

    box = Outbox(tmp_path)
    box.put(box.next_seq(), msg(1))
    full = os.open("/dev/full", os.O_WRONLY)  # every write now fails with ENOSPC, as on a full disk
    saved = os.dup(box._journal._fd)
    os.dup2(full, box._journal._fd)
    os.close(full)
    assert box.ack(1) and len(box) == 0  # the broker has it: not pending here any more
    os.dup2(saved, box._journal._fd)
    os.close(saved)
    box.close()
    assert [e.seq for e in Outbox(tmp_path).pending()] == [1]  # after a restart it goes again
