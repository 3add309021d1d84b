"""The event journal: the durable copy of the routed event log when the broker keeps none.

The embedded broker keeps topics in memory only. So that an acknowledged event survives any
stop (SIGTERM, kill -9, a crash of the broker), every message published to the routed events
topic is first appended here: segment files of length-prefixed, CRC-checked records
``(seq, partition, payload)``. The profile agent reports each sequence number it has applied;
the lowest sequence not yet applied is saved as the checkpoint. On start, every record from
the checkpoint on is published again (the profile agent skips what its partition's stored
position holds: `personify.tables.positions`), and when the tables are missing altogether the
whole journal is replayed to rebuild them. Segments applied and older than a retention are
deleted (`Journal.compact`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from personify.engine.errors import JournalError
from personify.engine.failpoints import failpoint

__all__ = ["Journal", "Record"]

_MAGIC = 0x504A  # "PJ": a zero-filled tail (a crash before the data hit the disk) never matches
_HEADER = struct.Struct(">HQiII")  # magic, seq, partition (-1: abort marker), length, crc32
_SEGMENT_DIGITS = 20

Record = tuple[int, int, bytes]


class Journal:
    """Append-only, segmented, CRC-checked log with an applied-up-to checkpoint.

    Args:
        directory: where segments and the checkpoint live.
        fsync: whether `append` waits for the data to reach the disk (group-committed).
        segment_bytes: size after which a new segment file is started.
    """

    def __init__(
        self, directory: Path, *, fsync: bool = True, segment_bytes: int = 64 << 20
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.next_seq = 0
        self._pending: set[int] = set()
        self._fh: BinaryIO | None = None
        self._written = 0  # appends so far (a generation number for group commit)
        self._synced = 0  # appends known to be on disk
        self._sync_task: asyncio.Future[None] | None = None
        self._saved_checkpoint = -1
        self._checkpoint_lock = threading.Lock()

    # -- opening ------------------------------------------------------------------------
    def open(self) -> None:
        """Open the journal: find the next sequence number and cut off a torn last record."""
        self.directory.mkdir(parents=True, exist_ok=True)
        segments = self._segments()
        if segments:
            last = segments[-1]
            end, last_seq = self._scan_valid(last)
            if end < last.stat().st_size:
                with open(last, "r+b") as fh:  # a record torn by a crash mid-write
                    fh.truncate(end)
            if last_seq is None and len(segments) > 1:
                _, last_seq = self._scan_valid(segments[-2])
            self.next_seq = (last_seq + 1) if last_seq is not None else int(last.stem)
        self._open_segment_for_append()
        if not (self.directory / "checkpoint").exists() and self.next_seq == 0:
            self.save_checkpoint()  # a new journal: "nothing applied yet" is known, not lost

    def close(self) -> None:
        """Save the checkpoint and close the current segment."""
        self.save_checkpoint()
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def _segments(self) -> list[Path]:
        return sorted(self.directory.glob("*.log"))

    def _open_segment_for_append(self) -> None:
        segments = self._segments()
        if segments and segments[-1].stat().st_size < self.segment_bytes:
            path = segments[-1]
        else:
            path = self.directory / f"{self.next_seq:0{_SEGMENT_DIGITS}d}.log"
        self._fh = open(path, "ab")  # noqa: SIM115 - kept open for appends, closed in close()

    @staticmethod
    def _scan_valid(path: Path) -> tuple[int, int | None]:
        """Return (offset after the last intact record, seq of the last data record)."""
        end = 0
        last_seq: int | None = None
        for offset, seq, partition, _payload in Journal._iter_file(path):
            end = offset
            if partition >= 0:
                last_seq = seq
        return end, last_seq

    @staticmethod
    def _iter_file(path: Path) -> Iterator[tuple[int, int, int, bytes]]:
        with open(path, "rb") as fh:
            data = fh.read()
        pos = 0
        while pos + _HEADER.size <= len(data):
            magic, seq, partition, length, crc = _HEADER.unpack_from(data, pos)
            start = pos + _HEADER.size
            payload = data[start : start + length]
            if magic != _MAGIC or len(payload) < length or zlib.crc32(payload) != crc:
                return  # torn or damaged tail: everything before it is intact
            pos = start + length
            yield pos, seq, partition, payload

    # -- writing ------------------------------------------------------------------------
    async def append(self, records: list[tuple[int, bytes]]) -> list[int]:
        """Append ``(partition, payload)`` records; return their sequence numbers.

        The records are flushed to the operating system before this returns, and to the disk
        when ``fsync`` is on: concurrent appends share one fsync (group commit). Each returned
        number stays pending until `mark_applied`.
        """
        if self._fh is None:
            raise JournalError("journal: append before open()")
        seqs: list[int] = []
        chunks: list[bytes] = []
        for partition, payload in records:
            seq = self.next_seq
            self.next_seq += 1
            chunks.append(_HEADER.pack(_MAGIC, seq, partition, len(payload), zlib.crc32(payload)))
            chunks.append(payload)
            seqs.append(seq)
        try:  # no await until the write is done: appends never interleave
            self._fh.write(b"".join(chunks))
            self._fh.flush()
        except OSError as exc:
            raise JournalError(f"journal: cannot write {self.directory}: {exc}") from exc
        failpoint("journal_append")
        self._pending.update(seqs)
        self._written += 1
        mine = self._written
        if self._fh.tell() >= self.segment_bytes:
            self._rotate()
        if self.fsync:
            await self._sync_to(mine)
        return seqs

    def _rotate(self) -> None:
        assert self._fh is not None
        if self.fsync:
            os.fsync(self._fh.fileno())  # rare (once per segment) and needed before close
            self._synced = self._written
        self._fh.close()
        self._fh = open(  # noqa: SIM115 - kept open for appends, closed in close()
            self.directory / f"{self.next_seq:0{_SEGMENT_DIGITS}d}.log", "ab"
        )

    async def _sync_to(self, generation: int) -> None:
        while self._synced < generation:
            if self._sync_task is None:
                self._sync_task = asyncio.ensure_future(self._sync_once())
            await asyncio.shield(self._sync_task)

    async def _sync_once(self) -> None:
        target = self._written
        try:
            assert self._fh is not None
            await asyncio.to_thread(os.fsync, self._fh.fileno())
        except (OSError, ValueError) as exc:
            if self._synced < target:  # not covered by a segment rotation meanwhile
                raise JournalError(f"journal: cannot sync {self.directory}: {exc}") from exc
        else:
            self._synced = max(self._synced, target)
        finally:
            self._sync_task = None

    async def abort(self, seqs: list[int]) -> None:
        """Mark records whose publication failed, so that a replay skips them."""
        if not seqs or self._fh is None:
            return
        for seq in seqs:  # synchronous: never interleaves with an append
            payload = struct.pack(">Q", seq)
            header = _HEADER.pack(_MAGIC, seq, -1, len(payload), zlib.crc32(payload))
            self._fh.write(header + payload)
            self._pending.discard(seq)
        self._fh.flush()

    def mark_applied(self, seq: int) -> None:
        """Record that the record ``seq`` has reached the tables."""
        self._pending.discard(seq)

    @property
    def checkpoint(self) -> int:
        """The lowest sequence number not yet known to be applied."""
        return min(self._pending) if self._pending else self.next_seq

    def save_checkpoint(self) -> None:
        """Persist the checkpoint (atomically: write, fsync, rename)."""
        value = self.checkpoint
        if value != self._saved_checkpoint:
            self._write_checkpoint(value)
            self._saved_checkpoint = value

    async def save_checkpoint_aside(self) -> None:
        """`save_checkpoint`, the file written and synced on a thread.

        A sync waits for the disk (a few milliseconds, more while RocksDB or the journal
        write much): once a second on the event loop, every event waited behind it.
        """
        value = self.checkpoint  # read here: the pending records change on the loop
        if value != self._saved_checkpoint:
            await asyncio.to_thread(self._write_checkpoint, value)
            self._saved_checkpoint = value

    def _write_checkpoint(self, value: int) -> None:
        path = self.directory / "checkpoint"
        tmp = path.with_suffix(".tmp")
        with self._checkpoint_lock:  # one writer of the temporary file at a time
            with open(tmp, "w") as fh:
                fh.write(str(value))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)

    def load_checkpoint(self) -> int:
        """The saved checkpoint, or 0 when none was saved."""
        try:
            return int((self.directory / "checkpoint").read_text().strip())
        except FileNotFoundError:
            return 0
        except ValueError as exc:
            raise JournalError(
                f"journal: {self.directory / 'checkpoint'} is damaged ({exc})"
            ) from None

    def replay_start(self, tables_exist: bool, tables_dir: Path, partial: bool = False) -> int:
        """Where replay must start: 0 to rebuild missing tables, else the saved checkpoint.

        With ``partial``, missing tables are rebuilt from what the journal still holds even
        if its oldest segments were deleted (`compact`).

        Raises:
            JournalError: the tables exist but the checkpoint is missing or damaged, so it is
                unknown which events they hold; replaying everything could count old events
                twice (only the last ``dedup_window`` ids per visitor are remembered).
        """
        if not tables_exist:
            first = self.first_seq
            if first > 0 and not partial:
                raise JournalError(
                    f"journal: the tables in {tables_dir} are missing and {self.directory} no "
                    f"longer holds the events before record {first} (segments applied and "
                    "older than [storage] journal_retention_s are deleted): a rebuild would "
                    "lose them. Restore the tables from a backup, or set [storage] "
                    "rebuild_partial = true to rebuild from the events the journal holds"
                )
            return 0
        path = self.directory / "checkpoint"
        fix = (
            f"to rebuild the tables from the journal, delete {tables_dir} and start again; "
            f"or restore {path} from a backup"
        )
        if not path.exists():
            if any(p.stat().st_size for p in self._segments()):
                raise JournalError(
                    f"journal: {path} is missing but the tables in {tables_dir} exist; {fix}"
                )
            return 0
        try:
            return self.load_checkpoint()
        except JournalError as exc:
            raise JournalError(f"{exc}; {fix}") from None

    # -- retention ----------------------------------------------------------------------
    def compact(self, retention_s: float, now: float | None = None) -> list[Path]:
        """Delete the oldest segments whose records are all applied and saved as such.

        A segment goes once the saved checkpoint has passed its last record and it was last
        written more than ``retention_s`` ago (0: keep every segment). The segment being
        appended to always stays. Returns the segments deleted, oldest first.
        """
        if retention_s <= 0 or self._saved_checkpoint < 0:
            return []
        now = time.time() if now is None else now
        segments = self._segments()
        removed: list[Path] = []
        for path, following in itertools.pairwise(segments):
            if int(following.stem) > self._saved_checkpoint:
                break  # it holds a record not yet applied (or not known to be)
            if now - path.stat().st_mtime < retention_s:
                break
            path.unlink()
            removed.append(path)
            failpoint("journal_compact")
        return removed

    @property
    def first_seq(self) -> int:
        """The sequence number of the oldest record kept (0 unless segments were deleted)."""
        segments = self._segments()
        return int(segments[0].stem) if segments else self.next_seq

    # -- replay -------------------------------------------------------------------------
    def records_from(self, start: int) -> list[Record]:
        """Every data record with ``seq >= start`` that was not aborted, in sequence order.

        The returned records are registered as pending (to be applied again).
        """
        records: dict[int, Record] = {}
        aborted: set[int] = set()
        for path in self._segments():
            for _end, seq, partition, payload in self._iter_file(path):
                if partition < 0:
                    aborted.add(seq)
                elif seq >= start:
                    records[seq] = (seq, partition, payload)
        out = [records[s] for s in sorted(records) if s not in aborted]
        self._pending.update(seq for seq, _p, _d in out)
        return out

    @property
    def size_bytes(self) -> int:
        """The journal's size on disk."""
        return sum(p.stat().st_size for p in self._segments())
