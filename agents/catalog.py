"""The catalog agent and the embedding service: items table, catalog view and vector index.

A message on the items topic is one item, ``{"items": [...]}`` or ``{"delete": id or [ids]}``.
The agent validates each change (invalid ones go to the dead-letter topic with the reason),
writes the items table, updates the in-memory catalog view, embeds the new item texts (batched,
in a worker thread, cached by content hash so an unchanged item is never encoded again) and
upserts or removes their vectors in the FAISS index.

`Embeddings` (a Faust service) loads the catalog view from the items table at start (the agent
applies changes from then on), loads the model meanwhile, and loads the index snapshot when its
fingerprint matches the catalog's vectors; else it rebuilds the index from the table. Changes
applied before the index is built are indexed by the build. It saves a snapshot periodically
while the catalog changes and on stop.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import mode
import numpy as np
import orjson

from personify.agents.ingest import dead_letter, send_dead_letter
from personify.embeddings import (
    CachedEncoder,
    FaissIndex,
    IndexSettings,
    SentenceEncoder,
    content_fingerprint,
    read_snapshot_info,
)
from personify.engine.app import app, current_config, items_publisher, note_lag, topic
from personify.engine.errors import ValidationError
from personify.engine.failpoints import failpoint
from personify.engine.logging import get_logger
from personify.engine.metrics import (
    CATALOG_ITEMS,
    ITEMS_EMBEDDED,
    ITEMS_ENCODED,
    ITEMS_REJECTED,
)
from personify.engine.models import Item, validate_item
from personify.engine.publisher import SEQ_HEADER, partition_for
from personify.engine.retry import until_done
from personify.tables import catalog as catalog_table
from personify.tables import store

__all__ = ["Embeddings", "catalog_agent", "embeddings", "on_index_ready", "parse_catalog_message"]

_log = get_logger(__name__)
_cfg = current_config()
_items_topic = topic(_cfg.topics.items)
_store = store.TableStore(catalog_table.table(), changelog=_cfg.changelog_enabled)
_ENCODE_CHUNK = 512


class Embeddings(mode.Service):  # type: ignore[misc] # mode is untyped
    """Holds the text encoder and the item vector index of this process."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        cfg = current_config()
        self.model: SentenceEncoder | None = None
        self.encoder: CachedEncoder | None = None
        self.index = FaissIndex(
            384,
            IndexSettings(
                hnsw_threshold=cfg.embeddings.hnsw_threshold,
                hnsw_m=cfg.embeddings.hnsw_m,
                ef_search=cfg.embeddings.ef_search,
            ),
        )
        self.model_ready = asyncio.Event()
        #: Set once the catalog view holds the items table (after recovery): the catalog agent
        #: applies changes from then on, without waiting for the text model.
        self.view_ready = asyncio.Event()
        self.index_ready = asyncio.Event()
        #: Item changes applied before the index was built (id -> item, None: deleted): the
        #: build embeds (or removes) them before the index is ready.
        self.unindexed: dict[str, Item | None] = {}
        self.dirty = False
        self.error: str | None = None
        self.snapshot_dir = cfg.data_path / "index"
        self.cache_dir = cfg.data_path / "embeddings-cache"

    async def wait_model(self) -> SentenceEncoder:
        """The loaded model (waits for it)."""
        await self.model_ready.wait()
        if self.model is None:
            raise RuntimeError(f"the embedding model did not load: {self.error}")
        return self.model

    async def index_items(self, items: list[Item]) -> None:
        """Upsert the vectors of items whose text has words; drop the others from the index."""
        texts = [catalog_table.item_text(item) for item in items]
        keep = [i for i, text in enumerate(texts) if catalog_table.has_words(text)]
        if keep:
            vectors = await self.encode_texts([texts[i] for i in keep])
            await self.index.upsert_async([items[i]["item_id"] for i in keep], vectors)
        if len(keep) < len(items):
            kept = set(keep)
            gone = [item["item_id"] for i, item in enumerate(items) if i not in kept]
            await self.index.remove_async([i for i in gone if i in self.index])

    async def encode_texts(self, texts: list[str]) -> np.ndarray[Any, Any]:
        """Vectors of texts, cached by content (encoded in a worker thread)."""
        await self.wait_model()
        assert self.encoder is not None
        out = []
        misses = self.encoder.misses
        for i in range(0, len(texts), _ENCODE_CHUNK):
            out.append(await self.encoder.encode_async(texts[i : i + _ENCODE_CHUNK]))
        ITEMS_ENCODED.inc(self.encoder.misses - misses)
        if not out:
            return np.empty((0, 384), dtype=np.float32)
        return np.concatenate(out)

    async def _load_model(self) -> None:
        cfg = current_config()
        try:
            model = await SentenceEncoder.load_async(batch_size=cfg.embeddings.batch_size)
            self.model = model
            self.encoder = CachedEncoder(model, directory=self.cache_dir, capacity=20_000)
            _log.info("embedding model loaded", seconds=round(model.load_seconds, 1))
        except Exception as exc:
            self.error = repr(exc)
            _log.exception("embedding model failed to load")
        finally:
            self.model_ready.set()

    @mode.Service.task  # type: ignore[untyped-decorator]
    async def _load(self) -> None:
        cfg = current_config()
        loading = asyncio.ensure_future(self._load_model())
        await app.tables.recovery.completed.wait()
        # The view first: items (and their categories) are known to the profile agent while
        # the text model still loads. Events folded before their item is in the view lose
        # its category (category affinity, trending), and a backfill posts its catalog and
        # then its history at once.
        items = await self._load_view()
        self.view_ready.set()
        await loading
        if self.model is None:
            # Without the model the catalog still works; lists go without content and chat.
            self.unindexed.clear()
        else:
            await self._build_index(items)
            ITEMS_EMBEDDED.set(len(self.index))
        self.index_ready.set()
        for listener in _index_listeners:
            try:
                listener()
            except Exception:
                _log.exception("index ready listener failed")
        if self.model is None:
            return
        while not self.should_stop:
            await self.sleep(cfg.embeddings.snapshot_interval_s)
            await self.save()

    async def _load_view(self) -> list[Item]:
        """Fill the catalog view from the items table; return the items."""
        cfg = current_config()
        view = catalog_table.catalog()
        items = await asyncio.to_thread(
            lambda: list(catalog_table.stored_items(catalog_table.table(), cfg.broker.partitions))
        )
        for item in items:
            view.put(item)
        view.loaded = True
        CATALOG_ITEMS.set(len(view))
        return items

    async def _build_index(self, items: list[Item]) -> None:
        """Index ``items`` (the table at start), then what the agent applied meanwhile."""
        started = time.perf_counter()
        await self._build_from(items)
        # Changes the catalog agent applied while the model loaded or the index was built
        # (no await between the last look and index_ready: none is missed).
        while self.unindexed:
            changes, self.unindexed = self.unindexed, {}
            upserts = [item for item in changes.values() if item is not None]
            deletes = [i for i, item in changes.items() if item is None and i in self.index]
            if upserts:
                await self.index_items(upserts)
            if deletes:
                await self.index.remove_async(deletes)
            self.dirty = True
            _log.info(
                "items applied during the index build indexed",
                items=len(changes),
                seconds=round(time.perf_counter() - started, 1),
            )

    async def _build_from(self, items: list[Item]) -> None:
        started = time.perf_counter()
        if not items:
            _log.info("catalog empty")
            return
        _log.info("catalog loaded", items=len(items))
        texts = [catalog_table.item_text(item) for item in items]
        worded = [i for i, text in enumerate(texts) if catalog_table.has_words(text)]
        if len(worded) < len(items):
            _log.info(
                "items without words in their text are not embedded", items=len(items) - len(worded)
            )
        vectors = await self.encode_texts([texts[i] for i in worded])
        ids = [items[i]["item_id"] for i in worded]
        info = read_snapshot_info(self.snapshot_dir)
        wanted = content_fingerprint(ids, vectors)
        if info is not None and info.fingerprint == wanted:
            try:
                self.index = await FaissIndex.load_async(
                    self.snapshot_dir, settings=self.index.settings, dim=384
                )
                _log.info("index snapshot loaded", items=len(self.index))
                return
            except Exception:
                _log.exception("index snapshot unreadable; rebuilding")
        await self.index.upsert_async(ids, vectors)
        self.dirty = True
        _log.info(
            "index rebuilt from the items table",
            items=len(ids),
            kind=self.index.kind,
            seconds=round(time.perf_counter() - started, 1),
        )
        await self.save()

    async def save(self) -> None:
        """Snapshot the index when it changed since the last snapshot."""
        if not self.dirty or (not self.index_ready.is_set() and not len(self.index)):
            return
        self.dirty = False
        try:
            await self.index.save_async(self.snapshot_dir)
        except Exception:
            self.dirty = True
            _log.exception("index snapshot failed")

    async def on_stop(self) -> None:
        """Save the index and close the encoder cache."""
        if self.index_ready.is_set():
            await self.save()
        if self.encoder is not None:
            self.encoder.close()


#: Called once the text index is built (lists ranked before it have no content source).
_index_listeners: list[Callable[[], None]] = []


def on_index_ready(listener: Callable[[], None]) -> None:
    """Call ``listener`` once the text index is built."""
    _index_listeners.append(listener)


@functools.cache
def embeddings() -> Embeddings:
    """The process's embedding service (built on first use, inside the event loop)."""
    return Embeddings()


@app.service
class _EmbeddingsHost(mode.Service):  # type: ignore[misc] # mode is untyped
    """Starts (and stops) the embedding service with the worker."""

    async def on_start(self) -> None:
        await self.add_runtime_dependency(embeddings())


def parse_catalog_message(
    value: bytes, source: dict[str, Any]
) -> tuple[list[tuple[str, Item | None]], list[bytes]]:
    """Read one items-topic message: ([(item id, item or None to delete)], dead letters)."""
    ops: list[tuple[str, Item | None]] = []
    dead: list[bytes] = []
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raw = value.decode("utf-8", "replace")[:10000]
        return ops, [dead_letter(f"malformed JSON: {exc}", "", source, raw, what="item")]
    if isinstance(obj, dict) and "delete" in obj:
        ids = obj["delete"] if isinstance(obj["delete"], list) else [obj["delete"]]
        for i, item_id in enumerate(ids):
            if isinstance(item_id, str) and 0 < len(item_id) <= _cfg.events.max_id_length:
                ops.append((item_id, None))
            else:
                where = {**source, "index": i}
                dead.append(
                    dead_letter("expected an item id", "delete", where, item_id, what="item")
                )
        return ops, dead
    batch = obj.get("items") if isinstance(obj, dict) and "item_id" not in obj else None
    entries = batch if isinstance(batch, list) else [obj]
    for i, entry in enumerate(entries):
        try:
            item = validate_item(entry, _cfg.events)
        except ValidationError as exc:
            dead.append(
                dead_letter(exc.reason, exc.field, {**source, "index": i}, entry, what="item")
            )
            continue
        ops.append((item["item_id"], item))
    return ops, dead


#: Items applied (written, encoded, indexed) at a time: a large import becomes visible as it
#: goes, and the agent yields to the rest of the worker between chunks.
_APPLY_CHUNK = 256


async def apply_changes(changes: dict[str, Item | None]) -> None:
    """Write item changes (id -> item, or None to delete) to the table, view and index."""
    entries = list(changes.items())
    started = time.perf_counter()
    for i in range(0, len(entries), _APPLY_CHUNK):
        await _apply_chunk(dict(entries[i : i + _APPLY_CHUNK]))
        done = min(i + _APPLY_CHUNK, len(entries))
        if len(entries) > _APPLY_CHUNK:
            elapsed = time.perf_counter() - started
            _log.info(
                "catalog progress",
                applied=done,
                total=len(entries),
                items_per_s=round(done / max(elapsed, 1e-9), 1),
            )


async def _apply_chunk(changes: dict[str, Item | None]) -> None:
    service = embeddings()
    parts = _cfg.broker.partitions
    by_partition: dict[int, list[tuple[bytes, bytes | None]]] = {}
    for item_id, item in changes.items():
        value = None if item is None else catalog_table.encode_item(item)
        by_partition.setdefault(partition_for(item_id, parts), []).append((item_id.encode(), value))
    await asyncio.gather(
        *(
            until_done("catalog write", functools.partial(_store.put_many, p, writes))
            for p, writes in by_partition.items()
        )
    )
    failpoint("catalog_write")
    view = catalog_table.catalog()
    upserts = [item for item in changes.values() if item is not None]
    deletes = [item_id for item_id, item in changes.items() if item is None]
    for item in upserts:
        view.put(item)
    for item_id in deletes:
        view.remove(item_id)
    if not service.index_ready.is_set():
        # The index is being built: it takes these changes before it is ready.
        service.unindexed.update(changes)
    else:
        if upserts and service.model is not None:
            await service.index_items(upserts)
        if deletes:
            await service.index.remove_async(deletes)
    view.touch()  # lists computed before the vectors were indexed are stale
    service.dirty = True
    CATALOG_ITEMS.set(len(view))
    ITEMS_EMBEDDED.set(len(service.index))


@app.agent(_items_topic, name="catalog")  # type: ignore[untyped-decorator] # Faust is untyped
async def catalog_agent(stream: Any) -> None:
    """Apply catalog changes in arrival order; the last change of an item in a round wins."""
    pub = items_publisher()
    service = embeddings()
    async for batch in stream.take_events(500, within=0.01):
        await service.view_ready.wait()
        changes: dict[str, Item | None] = {}
        dead: list[bytes] = []
        for event in batch:
            m = event.message
            source = {"topic": m.topic, "partition": m.partition, "offset": m.offset}
            ops, bad = parse_catalog_message(event.value or b"", source)
            for item_id, item in ops:
                changes.pop(item_id, None)  # keep arrival order: the last change goes last
                changes[item_id] = item
            dead.extend(bad)
        if changes:
            await apply_changes(changes)
        for record in dead:
            ITEMS_REJECTED.labels("topic").inc()
            await until_done("dead-letter send", functools.partial(send_dead_letter, record))
        for event in batch:
            for name, value in event.message.headers or ():
                if name == SEQ_HEADER and pub.journal is not None:
                    pub.journal.mark_applied(int(value))
        note_lag("catalog", (event.message for event in batch))
