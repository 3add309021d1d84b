"""Unit tests of `personify.engine.journal.Journal` on a temporary directory."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from personify.engine.errors import JournalError
from personify.engine.journal import Journal

JournalFactory = Callable[..., Journal]


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def journal_factory(journal_dir: Path) -> Iterator[JournalFactory]:
    """Open journals on one directory; every journal still open is closed after the test."""
    made: list[Journal] = []

    def make(*, segment_bytes: int = 64 << 20, fsync: bool = False) -> Journal:
        journal = Journal(journal_dir, fsync=fsync, segment_bytes=segment_bytes)
        journal.open()
        made.append(journal)
        return journal

    yield make
    for journal in made:
        journal.close()  # closing twice is harmless


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.log"))


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


async def test_append_returns_increasing_seqs(journal_factory: JournalFactory) -> None:
    """Appended records are numbered consecutively from 0, across calls."""
    j = journal_factory()
    assert await j.append([(0, b"a"), (1, b"b")]) == [0, 1]
    assert await j.append([(3, b"c")]) == [2]
    assert await j.append([]) == []
    assert j.next_seq == 3


async def test_append_with_fsync(journal_factory: JournalFactory) -> None:
    """With fsync on, append still returns the sequence numbers and the data is readable."""
    j = journal_factory(fsync=True)
    assert await j.append([(0, b"x")]) == [0]
    assert j.records_from(0) == [(0, 0, b"x")]


async def test_records_from_in_seq_order(journal_factory: JournalFactory) -> None:
    """records_from(start) returns the records with seq >= start, in order, with partitions."""
    j = journal_factory()
    await j.append([(0, b"r0"), (2, b"r1")])
    await j.append([(1, b"r2"), (0, b"r3"), (3, b"")])
    assert j.records_from(0) == [
        (0, 0, b"r0"),
        (1, 2, b"r1"),
        (2, 1, b"r2"),
        (3, 0, b"r3"),
        (4, 3, b""),
    ]
    assert j.records_from(3) == [(3, 0, b"r3"), (4, 3, b"")]
    assert j.records_from(5) == []


async def test_aborted_records_are_skipped(journal_factory: JournalFactory) -> None:
    """Records marked aborted are skipped on replay, also after reopening."""
    j = journal_factory()
    await j.append([(0, b"a"), (0, b"b"), (0, b"c")])
    await j.abort([1])
    await j.abort([])
    assert [seq for seq, _p, _d in j.records_from(0)] == [0, 2]
    j.close()
    j2 = journal_factory()
    assert [seq for seq, _p, _d in j2.records_from(0)] == [0, 2]
    assert j2.next_seq == 3


async def test_checkpoint_is_lowest_pending(journal_factory: JournalFactory) -> None:
    """The checkpoint is the lowest seq not yet applied (or aborted); next_seq when none."""
    j = journal_factory()
    assert j.checkpoint == 0
    await j.append([(0, b"a"), (0, b"b"), (0, b"c")])
    assert j.checkpoint == 0
    j.mark_applied(1)
    assert j.checkpoint == 0
    j.mark_applied(0)
    assert j.checkpoint == 2
    await j.abort([2])
    assert j.checkpoint == 3
    j.mark_applied(99)  # unknown seqs are ignored
    assert j.checkpoint == 3


async def test_records_from_registers_pending(journal_factory: JournalFactory) -> None:
    """Replayed records become pending again, holding the checkpoint back."""
    j = journal_factory()
    await j.append([(0, b"a"), (0, b"b"), (0, b"c")])
    for seq in (0, 1, 2):
        j.mark_applied(seq)
    assert j.checkpoint == 3
    replayed = j.records_from(1)
    assert [seq for seq, _p, _d in replayed] == [1, 2]
    assert j.checkpoint == 1


async def test_save_and_load_checkpoint(journal_factory: JournalFactory, journal_dir: Path) -> None:
    """save_checkpoint persists the checkpoint; a later journal loads it; 0 when none."""
    j = journal_factory()
    assert j.load_checkpoint() == 0
    await j.append([(0, b"a"), (0, b"b"), (0, b"c")])
    j.mark_applied(0)
    j.save_checkpoint()
    assert (journal_dir / "checkpoint").read_text() == "1"
    assert j.load_checkpoint() == 1
    j.mark_applied(1)
    await j.save_checkpoint_aside()  # the engine's, once a second: written on a thread
    assert j.load_checkpoint() == 2
    await j.append([(0, b"d")])
    j.mark_applied(2)
    j.close()  # close saves it too
    j2 = journal_factory()
    assert j2.load_checkpoint() == 3
    assert not (journal_dir / "checkpoint.tmp").exists()


async def test_damaged_checkpoint_is_a_journal_error(
    journal_factory: JournalFactory, journal_dir: Path
) -> None:
    """A checkpoint file that is not a number fails with a JournalError naming the file."""
    j = journal_factory()
    (journal_dir / "checkpoint").write_text("twelve")
    with pytest.raises(JournalError, match=r"checkpoint is damaged"):
        j.load_checkpoint()


async def test_reopen_finds_next_seq(journal_factory: JournalFactory) -> None:
    """A reopened journal continues numbering after the last record, keeping the old ones."""
    j = journal_factory()
    await j.append([(0, b"a"), (1, b"b")])
    j.close()
    j2 = journal_factory()
    assert j2.next_seq == 2
    assert j2.checkpoint == 2
    assert await j2.append([(2, b"c")]) == [2]
    assert j2.records_from(0) == [(0, 0, b"a"), (1, 1, b"b"), (2, 2, b"c")]


async def test_append_before_open_and_after_close(journal_dir: Path) -> None:
    """Appending to a journal that is not open fails with a JournalError."""
    j = Journal(journal_dir, fsync=False)
    with pytest.raises(JournalError, match="append before open"):
        await j.append([(0, b"a")])
    j.open()
    await j.append([(0, b"a")])
    j.close()
    with pytest.raises(JournalError):
        await j.append([(0, b"b")])


@pytest.mark.parametrize("cut", [1, 3, 10])
async def test_torn_last_record_is_cut_off(
    journal_factory: JournalFactory, journal_dir: Path, cut: int
) -> None:
    """A last record cut short by a crash is removed on open; appends then continue."""
    j = journal_factory()
    await j.append([(0, b"first"), (1, b"second"), (2, b"third-record")])
    j.close()
    (seg,) = segments(journal_dir)
    intact_size = seg.stat().st_size - cut
    os.truncate(seg, intact_size)
    j2 = journal_factory()
    assert seg.stat().st_size < intact_size  # the torn record is gone entirely
    assert j2.next_seq == 2
    assert j2.records_from(0) == [(0, 0, b"first"), (1, 1, b"second")]
    assert await j2.append([(2, b"again")]) == [2]
    j2.close()
    j3 = journal_factory()
    assert j3.records_from(0) == [(0, 0, b"first"), (1, 1, b"second"), (2, 2, b"again")]
    assert j3.next_seq == 3


@pytest.mark.parametrize("garbage", [b"\xde\xad", b"\xff" * 19, b"\x00\x00\x00\x01" * 10])
async def test_garbage_tail_is_cut_off(
    journal_factory: JournalFactory, journal_dir: Path, garbage: bytes
) -> None:
    """Bytes after the last intact record are cut off on open and appends still work."""
    j = journal_factory()
    await j.append([(0, b"a"), (1, b"b")])
    j.close()
    (seg,) = segments(journal_dir)
    size = seg.stat().st_size
    append_bytes(seg, garbage)
    j2 = journal_factory()
    assert seg.stat().st_size == size
    assert j2.next_seq == 2
    assert await j2.append([(2, b"c")]) == [2]
    assert j2.records_from(0) == [(0, 0, b"a"), (1, 1, b"b"), (2, 2, b"c")]


async def test_zero_filled_tail_is_cut_off(
    journal_factory: JournalFactory, journal_dir: Path
) -> None:
    """A tail of zero bytes after the last record is cut off like any torn tail."""
    j = journal_factory()
    await j.append([(0, b"a"), (1, b"b"), (2, b"c")])
    j.close()
    (seg,) = segments(journal_dir)
    append_bytes(seg, b"\x00" * 64)
    j2 = journal_factory()
    assert j2.next_seq == 3
    assert j2.records_from(0) == [(0, 0, b"a"), (1, 1, b"b"), (2, 2, b"c")]


async def test_segment_rotation(journal_factory: JournalFactory, journal_dir: Path) -> None:
    """Small segment_bytes starts new segment files, named by their first seq; replay spans them."""
    payload = b"x" * 40  # 20-byte header + 40 bytes: each append of one record fills a segment
    j = journal_factory(segment_bytes=50)
    for i in range(4):
        assert await j.append([(i % 2, payload + bytes([i]))]) == [i]
    names = [p.name for p in segments(journal_dir)]
    assert names == [f"{i:020d}.log" for i in range(5)]  # the last one is new and empty
    assert segments(journal_dir)[-1].stat().st_size == 0
    assert [seq for seq, _p, _d in j.records_from(0)] == [0, 1, 2, 3]
    assert j.records_from(2)[0] == (2, 0, payload + b"\x02")
    assert j.size_bytes == 4 * (22 + 41)  # header (magic, seq, partition, length, crc) + payload
    j.close()
    j2 = journal_factory(segment_bytes=50)
    assert j2.next_seq == 4
    assert await j2.append([(0, b"after")]) == [4]
    assert j2.records_from(3) == [(3, 1, payload + b"\x03"), (4, 0, b"after")]


async def test_abort_after_rotation_survives_reopen(
    journal_factory: JournalFactory, journal_dir: Path
) -> None:
    """An abort marker written to a newer segment still hides its record and keeps numbering."""
    j = journal_factory(segment_bytes=50)
    await j.append([(0, b"y" * 40)])  # fills segment 0; segment 1 is started
    await j.abort([0])
    assert len(segments(journal_dir)) == 2
    j.close()
    j2 = journal_factory(segment_bytes=50)
    assert j2.records_from(0) == []
    assert j2.next_seq == 1
    assert await j2.append([(0, b"z")]) == [1]
    assert j2.records_from(0) == [(1, 0, b"z")]


async def test_torn_record_in_new_segment(
    journal_factory: JournalFactory, journal_dir: Path
) -> None:
    """A torn first record of a newer segment is cut off and numbering resumes after the old one."""
    j = journal_factory(segment_bytes=50)
    await j.append([(0, b"y" * 40)])
    await j.append([(0, b"second")])
    j.close()
    last = segments(journal_dir)[-1]
    assert last.name == f"{1:020d}.log"
    os.truncate(last, last.stat().st_size - 2)
    j2 = journal_factory(segment_bytes=50)
    assert last.stat().st_size == 0
    assert j2.next_seq == 1
    assert await j2.append([(0, b"again")]) == [1]
    assert j2.records_from(0) == [(0, 0, b"y" * 40), (1, 0, b"again")]


async def test_replay_start_rebuilds_missing_tables(journal_factory: JournalFactory) -> None:
    """Without tables, replay starts at 0 whatever the checkpoint says."""
    j = journal_factory()
    seqs = await j.append([(0, b"a"), (0, b"b")])
    for seq in seqs:
        j.mark_applied(seq)
    j.save_checkpoint()
    assert j.replay_start(False, Path("/tables")) == 0
    assert j.replay_start(True, Path("/tables")) == 2


async def test_replay_start_refuses_a_missing_checkpoint(
    journal_factory: JournalFactory, journal_dir: Path
) -> None:
    """With tables and journal data but no checkpoint, start fails and says how to fix it."""
    j = journal_factory()
    assert (journal_dir / "checkpoint").read_text() == "0"  # a new journal records "nothing yet"
    await j.append([(0, b"a")])
    (journal_dir / "checkpoint").unlink()
    with pytest.raises(JournalError, match=r"is missing.*delete /tables"):
        j.replay_start(True, Path("/tables"))


async def test_replay_start_refuses_a_damaged_checkpoint(
    journal_factory: JournalFactory, journal_dir: Path
) -> None:
    """A damaged checkpoint is reported with the fix, not silently treated as 0."""
    j = journal_factory()
    await j.append([(0, b"a")])
    (journal_dir / "checkpoint").write_text("not a number")
    with pytest.raises(JournalError, match=r"damaged.*delete /tables"):
        j.replay_start(True, Path("/tables"))


async def test_concurrent_appends_share_fsyncs(journal_factory: JournalFactory) -> None:
    """Many concurrent appends with fsync all complete, with distinct ordered sequence numbers."""
    j = journal_factory(fsync=True)
    results = await asyncio.gather(*(j.append([(i % 4, f"r{i}".encode())]) for i in range(50)))
    seqs = [s for r in results for s in r]
    assert sorted(seqs) == list(range(50))
    assert [payload for _s, _p, payload in j.records_from(0)] == [
        f"r{i}".encode() for i in range(50)
    ]


async def test_applied_segments_past_their_retention_are_deleted(
    journal_factory: JournalFactory, journal_dir: Path
) -> None:
    """Only whole segments that are applied, saved as such and old enough go; replay still works."""
    j = journal_factory(segment_bytes=50)
    for i in range(5):  # one record per segment: segments 0-4 and an empty current one
        await j.append([(0, b"r" * 40 + bytes([i]))])
    for seq in (0, 1, 2):
        j.mark_applied(seq)
    assert j.compact(3600.0, now=1e12) == []  # applied, but the checkpoint is not saved yet
    j.save_checkpoint()  # 3: records 0-2 are applied
    old = time.time() - 7200
    for path in segments(journal_dir)[:4]:
        os.utime(path, (old, old))
    assert j.compact(0.0) == []  # 0 keeps every event
    assert j.compact(3600.0 * 3) == []  # not old enough
    removed = j.compact(3600.0)
    assert [p.name for p in removed] == [f"{i:020d}.log" for i in range(3)]
    assert j.first_seq == 3
    assert [seq for seq, _p, _d in j.records_from(j.load_checkpoint())] == [3, 4]
    j.close()
    j2 = journal_factory(segment_bytes=50)  # numbering goes on after a restart
    assert await j2.append([(0, b"next")]) == [5]


async def test_a_rebuild_from_a_compacted_journal_is_refused_unless_partial(
    journal_factory: JournalFactory, journal_dir: Path
) -> None:
    j = journal_factory(segment_bytes=50)
    for i in range(3):
        await j.append([(0, b"r" * 40 + bytes([i]))])
        j.mark_applied(i)
    j.save_checkpoint()
    assert j.replay_start(False, Path("/tables")) == 0  # nothing deleted: a full rebuild
    old = time.time() - 7200
    for path in segments(journal_dir):
        os.utime(path, (old, old))
    assert len(j.compact(60.0)) == 3
    with pytest.raises(JournalError, match=r"record 3.*rebuild_partial = true"):
        j.replay_start(False, Path("/tables"))
    assert j.replay_start(False, Path("/tables"), partial=True) == 0
    assert j.replay_start(True, Path("/tables")) == 3
