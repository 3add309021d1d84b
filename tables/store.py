"""The one owner of RocksDB and of Faust's table internals.

Every table of the engine is a RocksDB-backed Faust table of raw bytes (`bytes_table`), one
RocksDB database per partition. What reaches past Faust's public API (its per-partition
databases, its key index, the persisted changelog offset, its producer's batches) and every
RocksDB write batch is here, so that an upgrade of Faust or of rocksdict touches this file
alone: the agents write through `TableStore` (the changelog, then one write batch with the
partition's applied position in it), and readers use `open_dbs`, `db`, `held_db`, `get_any`
and `scan`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from faust.types import TP
from rocksdict import WriteBatch

from personify.engine.app import app, current_config, routed_names
from personify.engine.metrics import ROCKSDB_MEMORY

__all__ = [
    "TableStore",
    "bytes_table",
    "db",
    "get_any",
    "held_db",
    "open_dbs",
    "prefixed",
    "scan",
    "write_batch",
]

#: Writes of up to this many rows are made on the event loop; larger ones on a thread.
_SYNC_WRITE_ROWS = 16
#: Keys of Faust's own bookkeeping rows in a table's databases.
_FAUST_PREFIX = b"__faust"


#: RocksDB properties reported by `ROCKSDB_MEMORY` (kind -> property).
_MEMORY_PROPERTIES = {
    "memtables": "rocksdb.cur-size-all-mem-tables",
    "block_cache": "rocksdb.block-cache-usage",
    "table_readers": "rocksdb.estimate-table-readers-mem",
}


def bytes_table(name: str, help: str) -> Any:
    """A RocksDB-backed Faust table of raw bytes, with the topics' partition count.

    RocksDB is sized by ``[storage]`` (Faust's defaults hold up to 2 GiB of block cache and
    192 MiB of memtables per partition) and reports its memory as `ROCKSDB_MEMORY`.
    """
    cfg = current_config()
    s = cfg.storage
    tbl = app.Table(
        name,
        default=None,
        partitions=cfg.broker.partitions,
        key_type=bytes,
        value_type=bytes,
        help=help,
        options={
            "write_buffer_size": s.rocksdb_write_buffer_mib << 20,
            "max_write_buffer_number": s.rocksdb_write_buffers,
            "block_cache_size": s.rocksdb_block_cache_mib << 20,
        },
    )
    tbl.key_serializer = "raw"
    tbl.value_serializer = "raw"
    for kind, prop in _MEMORY_PROPERTIES.items():
        ROCKSDB_MEMORY.labels(name, kind).set_function(functools.partial(_memory, tbl, prop))
    return tbl


def _memory(tbl: Any, prop: str) -> float:
    """``prop`` summed over the table's open partitions (0 before the table is opened)."""
    total = 0
    for partition_db in open_dbs(tbl):
        with contextlib.suppress(Exception):  # a store closing meanwhile
            total += int(partition_db.property_int_value(prop) or 0)
    return float(total)


def open_dbs(tbl: Any) -> list[Any]:
    """The RocksDB databases of ``tbl``'s partitions opened so far (none before it opens)."""
    if tbl._data is None:
        return []
    return list(tbl.data._dbs.values())


def db(tbl: Any, partition: int) -> Any:
    """The RocksDB database of ``tbl``'s ``partition`` (opened if it was not yet)."""
    return tbl.data._db_for_partition(partition)


def held_db(tbl: Any, partition: int) -> Any | None:
    """The database of ``partition``, or None for a partition this worker never held."""
    try:
        return db(tbl, partition)
    except Exception:  # Faust raises plain errors for a partition it has no store of
        return None


def get_any(tbl: Any, key: bytes) -> bytes | None:
    """``key``'s value in whichever open partition holds it (None: none does)."""
    for partition_db in open_dbs(tbl):
        value: bytes | None = partition_db.get(key)
        if value is not None:
            return value
    return None


def scan(partition_db: Any) -> Iterator[tuple[bytes, bytes]]:
    """Every row of one partition's database, Faust's bookkeeping rows left out."""
    for key, value in partition_db.items():
        if not key.startswith(_FAUST_PREFIX):
            yield key, value


def prefixed(partition_db: Any, start: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of one partition's database from ``start`` on, while keys start with it."""
    it = partition_db.iter()
    it.seek(start)
    while it.valid():
        key: bytes = it.key()
        if not key.startswith(start):
            return
        yield key, it.value()
        it.next()


def write_batch(items: list[tuple[bytes, bytes | None]]) -> WriteBatch:
    """One RocksDB write batch of ``(key, value)`` pairs; a value of None deletes the key."""
    batch = WriteBatch(raw_mode=True)
    for key, value in items:
        if value is None:
            batch.delete(key)
        else:
            batch.put(key, value)
    return batch


class TableStore:
    """Batched access to a bytes table for its one writer (the profile or the catalog agent).

    Faust's per-key write (``table[key] = value``) sends one changelog record and rewrites
    the partition's persisted offset for every key, which capped a worker at a few thousand
    writes per second. `put_many` writes a whole batch the way Faust's own changelog restore
    does: the changelog records go out as producer batches and are acknowledged first, then one
    RocksDB write batch and one persisted-offset update per partition. The records and their
    layout are Faust's, so restores, standbys and rebalancing work unchanged; and since the
    changelog is written before the local store, a crash in between is repaired by redelivery.

    Args:
        tbl: the Faust table (`bytes_table`).
        changelog: whether writes go to the changelog topic too (see
            `Config.changelog_enabled`).
    """

    def __init__(self, tbl: Any, *, changelog: bool = True) -> None:
        self.table = tbl
        self.changelog = changelog

    def db(self, partition: int) -> Any:
        """The RocksDB database of ``partition`` (opened if it was not yet)."""
        return db(self.table, partition)

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        """Read the values of ``keys`` (all of ``partition``) in one call."""
        values: list[bytes | None] = self.db(partition).get(keys)
        return values

    def dbs(self) -> dict[int, Any]:
        """The store of each partition this worker holds (opened if it was not yet).

        Faust opens a partition's store on its first use: after a restart, one whose visitors
        were not read or written yet is not open, but its rows are this worker's all the same.
        """
        consumer = app.consumer
        topics = set(routed_names(current_config()))
        assigned = consumer.assignment() if consumer is not None else ()
        held = {tp.partition for tp in assigned if tp.topic in topics}
        held.update(self.table.data._dbs)
        return {partition: self.db(partition) for partition in sorted(held)}

    async def put_many(self, partition: int, items: list[tuple[bytes, bytes | None]]) -> None:
        """Write ``(key, value)`` pairs of ``partition``: changelog first, then RocksDB.

        A value of None deletes the key (a tombstone in the changelog).
        """
        if not items:
            return
        last_offset = await self._send_changelog(partition, items) if self.changelog else None
        batch = write_batch(items)
        store = self.table.data
        target = self.db(partition)
        if len(items) <= _SYNC_WRITE_ROWS:
            target.write(batch)  # tens of microseconds: less than a hop to a thread and back
        else:
            # RocksDB releases the GIL: a large write overlaps with the event loop's work.
            await asyncio.to_thread(target.write, batch)
        for key, value in items:
            if value is None:
                store._key_index.pop(key, None)
            elif key[:1] != b"\x00":  # lets reads outside the agent find the key
                store._key_index[key] = partition
        if last_offset is not None:
            topic_name = self.table.changelog_topic.get_topic_name()
            store.set_persisted_offset(TP(topic_name, partition), last_offset)

    async def _send_changelog(self, partition: int, items: list[tuple[bytes, bytes | None]]) -> int:
        """Send the changelog records; return the offset of the last one once acknowledged."""
        producer = app.producer._ensure_producer()  # Faust's started aiokafka producer
        topic_name = self.table.changelog_topic.get_topic_name()
        futures = []
        counts = []
        builder = producer.create_batch()
        n = 0
        for key, value in items:
            if builder.append(key=key, value=value, timestamp=None) is None:
                if n == 0:
                    raise ValueError(f"record {key!r} of {len(value or b'')} bytes exceeds a batch")
                futures.append(await producer.send_batch(builder, topic_name, partition=partition))
                counts.append(n)
                builder = producer.create_batch()
                n = 0
                if builder.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"record {key!r} of {len(value or b'')} bytes exceeds a batch")
            n += 1
        futures.append(await producer.send_batch(builder, topic_name, partition=partition))
        counts.append(n)
        metas = await asyncio.gather(*futures)
        last: int = max(m.offset + c - 1 for m, c in zip(metas, counts, strict=True))
        return last
