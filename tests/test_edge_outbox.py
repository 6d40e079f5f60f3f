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
