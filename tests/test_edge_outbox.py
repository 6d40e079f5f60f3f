"""The durable outbox: persist before publish, drop on ack, replay and monotonic seq after restart."""

from __future__ import annotations

import pytest

from edge.outbox import Outbox
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
    assert sorted(p.name for p in tmp_path.glob("*.msg")) == [f"{1:020d}.msg", f"{3:020d}.msg"]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files behind

    again = Outbox(tmp_path)
    assert [(e.seq, e.msg) for e in again.pending()] == [(1, msg(1)), (3, msg(3))]
    assert again.next_seq() == 4  # monotonic across the restart
    again.ack(1)
    again.ack(3)
    assert len(Outbox(tmp_path)) == 0 and Outbox(tmp_path).next_seq() == 5


def test_seq_never_goes_back_even_if_its_file_is_lost(tmp_path):
    box = Outbox(tmp_path)
    for _ in range(5):
        s = box.next_seq()
    box.put(s, msg(5))
    assert Outbox(tmp_path).next_seq() == 6  # the pending entry carries its seq
    (tmp_path / "seq").write_text("garbage")
    assert Outbox(tmp_path).next_seq() == 6
    box.ack(5)  # the counter is written before the entry goes
    assert (tmp_path / "seq").read_text().strip() == "6" and Outbox(tmp_path).next_seq() == 6


def test_unstored_numbers_may_be_reused_and_advance_restores_a_callers_counter(tmp_path):
    box = Outbox(tmp_path)
    assert [box.next_seq() for _ in range(3)] == [1, 2, 3]  # handed out, never stored: nothing carried them
    again = Outbox(tmp_path)
    assert again.next_seq() == 1
    again.advance(10)
    again.advance(4)  # never backwards
    assert again.next == 10 and again.next_seq() == 10


def test_a_corrupt_entry_is_moved_aside_not_fatal(tmp_path):
    box = Outbox(tmp_path)
    box.put(box.next_seq(), msg(1))
    (tmp_path / f"{7:020d}.msg").write_bytes(b"half a messa")
    again = Outbox(tmp_path)
    assert [e.seq for e in again.pending()] == [1]
    assert (tmp_path / f"{7:020d}.corrupt").exists()


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


@pytest.fixture
def fsyncs(monkeypatch):
    """Counts the outbox's fsync calls (they still happen)."""
    import edge.outbox as outbox_mod

    calls: list[int] = []
    real = outbox_mod.os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(outbox_mod.os, "fsync", counting)
    return calls


def test_sync_durability_fsyncs_before_put_returns(tmp_path, fsyncs):
    box = Outbox(tmp_path)  # "sync" is the default
    box.put(box.next_seq(), msg(1))
    assert len(fsyncs) == 2 and box.unsynced == 0  # the file and its directory
    assert box.sync() == 0 and len(fsyncs) == 2


def test_async_durability_writes_at_put_and_fsyncs_at_sync(tmp_path, fsyncs):
    box = Outbox(tmp_path, durability="async")
    for _ in range(3):
        box.put(box.next_seq(), msg(_))
    assert fsyncs == [] and box.unsynced == 3
    # written (to the OS) already: a crash of the process right now loses nothing
    assert [(e.seq, e.msg) for e in Outbox(tmp_path).pending()] == [(1, msg(0)), (2, msg(1)), (3, msg(2))]
    assert box.sync() == 3 and box.unsynced == 0
    assert len(fsyncs) == 4  # group commit: one per file, one for the directory
    assert box.sync() == 0 and len(fsyncs) == 4


def test_an_entry_acknowledged_before_its_sync_is_not_synced(tmp_path, fsyncs):
    box = Outbox(tmp_path, durability="async")
    box.put(box.next_seq(), msg(1))
    box.put(box.next_seq(), msg(2))
    assert box.ack(1, counter_saved=True)  # the broker has it: no reason to sync it any more
    assert box.unsynced == 1 and fsyncs == []
    assert box.sync() == 1 and len(fsyncs) == 2
    assert [e.seq for e in Outbox(tmp_path).pending()] == [2]


def test_ack_with_a_counter_saved_elsewhere_writes_no_seq_file(tmp_path, fsyncs):
    box = Outbox(tmp_path)
    box.put(box.next_seq(), msg(1))
    n = len(fsyncs)
    box.ack(1, counter_saved=True)
    assert len(fsyncs) == n and not (tmp_path / "seq").exists()
    again = Outbox(tmp_path)
    again.advance(2)  # what the caller does with the counter it saved
    assert again.next_seq() == 2


def test_unknown_durability_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="durability"):
        Outbox(tmp_path, durability="eventually")
    from kernel.config import build_config

    assert build_config([], [("edge.durability", "async")], use_env=False).edge.durability == "async"
    with pytest.raises(ConfigError):
        build_config([], [("edge.durability", "eventually")], use_env=False)
