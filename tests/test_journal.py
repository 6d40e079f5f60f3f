"""The append-only journal under the edge's outbox and the fog's pool: records come back as
written, a write cut short is cut off on reopen (and kept aside), a full disk leaves the journal
whole, and the fog's pool survives a restart, also one from fogfl 0.2.0's .npz files."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fog.pool import PooledBatch, SamplePool, decode_batch, encode_batch
from kernel.journal import MAGIC, Journal


def test_records_come_back_in_order_and_sync_is_explicit(tmp_path, datasyncs):
    calls = datasyncs
    j = Journal(tmp_path / "j")
    assert j.records == [] and j.size == len(MAGIC)
    j.append(b"one")
    assert len(calls) == 1
    j.append(b"", sync=False)
    j.append(bytes(range(256)) * 100, sync=False)
    assert len(calls) == 1 and j.sync() and len(calls) == 2 and not j.sync()
    j.close()
    again = Journal(tmp_path / "j")
    assert again.records == [b"one", b"", bytes(range(256)) * 100]
    assert again.size == (tmp_path / "j").stat().st_size
    again.append(b"four")
    again.close()
    assert Journal(tmp_path / "j").records[-1] == b"four"


@pytest.mark.parametrize("damage", ["truncated", "flipped", "header-only"])
def test_a_write_cut_short_is_cut_off_and_kept_aside(tmp_path, damage):
    path = tmp_path / "j"
    j = Journal(path)
    for r in (b"a" * 10, b"b" * 20, b"c" * 30):
        j.append(r)
    j.close()
    data = path.read_bytes()
    last = len(data) - (8 + 30)
    if damage == "truncated":
        path.write_bytes(data[:-7])
    elif damage == "flipped":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        path.write_bytes(data[:last + 5])
    again = Journal(path)
    assert again.records == [b"a" * 10, b"b" * 20]
    assert path.stat().st_size == last and again.size == last
    assert (tmp_path / "j.torn").exists()
    again.append(b"d")
    again.close()
    assert Journal(path).records == [b"a" * 10, b"b" * 20, b"d"]


def test_a_full_disk_raises_and_leaves_the_journal_whole(tmp_path):
    j = Journal(tmp_path / "j")
    j.append(b"kept")
    size = j.size
    full = os.open("/dev/full", os.O_WRONLY)
    saved = os.dup(j._fd)
    os.dup2(full, j._fd)
    os.close(full)
    with pytest.raises(OSError):
        j.append(b"lost" * 1000)
    assert j.size == size
    os.dup2(saved, j._fd)
    os.close(saved)
    j.append(b"after")
    j.close()
    assert Journal(tmp_path / "j").records == [b"kept", b"after"]


def test_rewrite_replaces_the_content_and_appends_continue(tmp_path):
    j = Journal(tmp_path / "j")
    for r in (b"1", b"2", b"3"):
        j.append(r)
    j.rewrite([b"2"])
    j.append(b"4")
    j.close()
    assert Journal(tmp_path / "j").records == [b"2", b"4"]
    assert not list(tmp_path.glob(".j.tmp-*"))


def test_a_file_that_is_not_a_journal_is_refused(tmp_path):
    (tmp_path / "j").write_bytes(b"something else")
    with pytest.raises(ValueError, match="not a fogfl journal"):
        Journal(tmp_path / "j")


def _batch(edge: str, seq: int, rnd: int, n: int = 3) -> PooledBatch:
    rng = np.random.default_rng(seq)
    return PooledBatch(edge, seq, rnd, rng.normal(size=(n, 1, 8, 8)).astype(np.float32),
                       rng.integers(0, 10, n), rng.integers(0, 1000, n))


def _same(a: PooledBatch, b: PooledBatch) -> bool:
    return (a.edge_id, a.seq, a.round) == (b.edge_id, b.seq, b.round) and all(
        np.array_equal(getattr(a, f), getattr(b, f)) and getattr(a, f).dtype == getattr(b, f).dtype
        for f in ("x", "y", "sample_ids"))


def test_pool_records_round_trip_and_damaged_ones_are_refused():
    b = _batch("fog-0.edge-1", 7, 3)
    assert _same(decode_batch(encode_batch(b)), b)
    empty = PooledBatch("e", 1, 1, np.empty((0,), np.float32), np.empty(0, np.int64), np.empty(0, np.int64))
    assert _same(decode_batch(encode_batch(empty)), empty)
    rec = encode_batch(b)
    for bad in (rec[:-1], rec + b"\0", rec[:10]):
        with pytest.raises((ValueError, KeyError, TypeError)):
            decode_batch(bad)


def test_pool_is_on_stable_storage_before_add_returns_and_survives_a_restart(tmp_path, datasyncs):
    calls = datasyncs
    pool = SamplePool(tmp_path)
    assert not pool.resumed
    sent = [_batch("fog-0.edge-0", 1, 1), _batch("fog-0.edge-1", 1, 1), _batch("fog-0.edge-0", 2, 2)]
    for b in sent:
        assert pool.add(b)
    assert len(calls) == 3  # one fdatasync per accepted batch
    assert not pool.add(sent[0]) and len(calls) == 3  # a duplicate is neither pooled nor written
    pool.close()
    again = SamplePool(tmp_path)
    assert again.resumed and len(again) == 9
    for a, b in zip(again._batches, sent, strict=True):
        assert _same(a, b)
    assert not again.add(sent[2])
    x, y = again.arrays(2)
    assert np.array_equal(x, sent[2].x) and np.array_equal(y, sent[2].y)


def test_a_fogfl_020_pool_of_npz_files_moves_into_the_journal(tmp_path):
    d = tmp_path / "pool"
    d.mkdir()
    old = [_batch("fog-0.edge-0", 1, 1), _batch("fog-0.edge-1", 1, 1)]
    for b in old:
        np.savez(d / f"{b.edge_id}-{b.seq:08d}.npz", edge_id=b.edge_id, seq=b.seq, round=b.round, x=b.x, y=b.y,
                 sample_ids=b.sample_ids)
    (d / "fog-0.edge-0-00000009.npz").write_bytes(b"not a zip")
    pool = SamplePool(tmp_path)
    assert pool.resumed and len(pool) == 6
    assert sorted(p.name for p in d.glob("*.npz")) == ["fog-0.edge-0-00000009.npz"]  # the unreadable one stays
    pool.close()
    again = SamplePool(tmp_path)
    assert len(again) == 6 and all(_same(a, b) for a, b in zip(again._batches, old, strict=True))
