"""The Faust application: one per process, configured from `Config` before agents are imported.

Agents, tables and the API server register themselves on `app` when Faust's autodiscovery
imports ``personify.agents`` and ``personify.api``; the engine knows them only by module name.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faust
import mode
import threadpoolctl

from personify.engine import memory
from personify.engine.config import Config
from personify.engine.errors import ConfigError
from personify.engine.journal import Journal
from personify.engine.logging import get_logger
from personify.engine.metrics import AGENT_LAG, EVENT_LOOP_DELAY, EVENTS_APPLIED, MALLOC_TRIMMED
from personify.engine.publisher import Publisher, partition_for
from personify.engine.transport import Transport

__all__ = [
    "PersonifyApp",
    "app",
    "check_journal",
    "configure",
    "current_config",
    "items_publisher",
    "note_lag",
    "one_blas_thread",
    "owns",
    "publisher",
    "routed_names",
    "tables_exist",
    "topic",
]

_log = get_logger(__name__)


class PersonifyApp(faust.App):  # type: ignore[misc] # Faust is untyped
    """A Faust app that uses Personify's tuned transport and carries the Personify config."""

    personify_config: Config | None = None
    personify_fetch_max_wait_ms: int = 10
    #: Table name -> whether the data directory held it at start.
    personify_tables_existed: dict[str, bool] = {}  # noqa: RUF012 # set per process in configure
    #: Distinguishes broker lifetimes in ids derived from offsets ("k": a durable cluster).
    personify_broker_epoch: str = "k"

    def _new_transport(self) -> Any:
        return Transport(self.conf.broker_consumer, self)


app = PersonifyApp(
    "personify",
    autodiscover=["personify.agents", "personify.api"],
    origin="personify.engine.app",
)


def configure(config: Config, broker_url: str, broker_epoch: str = "k") -> PersonifyApp:
    """Configure the app for ``config`` and the broker at ``broker_url`` (``kafka://h:p``).

    Must run before `app.discover()` and before any agent module is imported.
    """
    datadir = config.data_path / "faust"
    datadir.mkdir(parents=True, exist_ok=True)
    w = config.worker
    app.personify_config = config
    app.personify_fetch_max_wait_ms = w.fetch_max_wait_ms
    app.personify_broker_epoch = broker_epoch
    app.personify_tables_existed = {t: tables_exist(config, t) for t in _JOURNALS.values()}
    # The app id names the consumer group and changelog topics; Faust takes it from the
    # constructor's defaults, which configure() replaces here.
    app._default_options = (w.app_id, app._default_options[1])
    app.config_from_object(
        {
            "broker": broker_url,
            "store": "rocksdb://",
            "datadir": str(datadir),
            "topic_partitions": config.broker.partitions,
            "topic_replication_factor": config.broker.replication_factor,
            "table_standby_replicas": w.standby_replicas,
            "broker_commit_interval": w.commit_interval_s,
            "producer_linger": w.producer_linger_ms / 1000.0,
            "producer_acks": -1,
            # Table writes and routed messages travel in large producer batches.
            "producer_max_batch_size": 512 * 1024,
            "producer_max_request_size": 4 * 1024 * 1024,
            "broker_rebalance_timeout": 3.0,
            "broker_session_timeout": 6.0,
            "broker_heartbeat_interval": 1.0,
            # A restarted in-memory broker has empty changelogs while RocksDB keeps the
            # tables; the persisted offsets are then "ahead" of the broker, which is expected.
            "recovery_consistency_check": False,
            "consumer_auto_offset_reset": "earliest",
            "web_enabled": False,
            # Advertised to the other workers: reads of keys they own are forwarded here.
            "canonical_url": config.server.url,
            "key_serializer": "raw",
            "value_serializer": "raw",
            "logging_config": None,
        },
        force=True,
    )
    start_services()
    one_blas_thread()
    return app


def one_blas_thread() -> None:
    """Run numpy's BLAS on one thread.

    The ranking's matrix products are small (one visitor against the catalog), and the idle
    threads of a multi-threaded BLAS spin between calls: measured, a whole second core busy at
    100 events/s. The encoder's own threads (torch) are not touched.
    """
    import numpy  # noqa: F401 - loads its BLAS, which is then found below

    numpy_blas = {
        lib["prefix"]: 1
        for lib in threadpoolctl.threadpool_info()
        if lib["user_api"] == "blas" and "numpy" in lib["filepath"]
    }
    if numpy_blas:
        threadpoolctl.threadpool_limits(limits=numpy_blas)


def _tables_dir(config: Config) -> Path:
    return config.data_path / "faust"


def tables_exist(config: Config, table: str = "profiles") -> bool:
    """Whether the data directory already holds ``table`` (from an earlier run)."""
    return any(_tables_dir(config).rglob(f"{table}-*.db"))


#: Journal directory (under the data directory) -> the table its records are applied to.
_JOURNALS = {"journal": "profiles", "journal-items": "items"}


def check_journal(config: Config) -> None:
    """Fail early, with the fix, when a journal cannot tell what the tables hold.

    Raises:
        JournalError: see `Journal.replay_start`.
    """
    if config.journal_enabled:
        for directory, table in _JOURNALS.items():
            Journal(config.data_path / directory).replay_start(
                tables_exist(config, table), _tables_dir(config), config.storage.rebuild_partial
            )


def current_config() -> Config:
    """The configuration the app was configured with.

    Raises:
        ConfigError: `configure` has not run yet.
    """
    if app.personify_config is None:
        raise ConfigError("the engine is not configured yet: call personify.engine.configure first")
    return app.personify_config


@functools.cache
def owns(key: str) -> bool | None:
    """Whether this worker owns ``key``'s partition (None: it owns none now, e.g. rebalancing).

    A visitor's events, profile and lists live with the worker that holds their partition of
    the routed events topic.
    """
    cfg = current_config()
    try:
        actives = app.assignor.assigned_actives()
    except Exception:  # no assignor state yet: the worker is starting
        return None
    mine = {tp.partition for tp in actives if tp.topic == cfg.topics.routed}
    if not mine:
        return None
    return partition_for(key, cfg.broker.partitions) in mine


def topic(name: str, *more: str) -> Any:
    """The Faust topic of ``name`` (and ``more``), configured partitions, declared on start."""
    cfg = current_config()
    return app.topic(
        name,
        *more,
        partitions=cfg.broker.partitions,
        replicas=cfg.broker.replication_factor,
        internal=True,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )


def routed_names(cfg: Config) -> tuple[str, ...]:
    """The routed topic's names: with the embedded broker two, published to in turn.

    One is emptied while the other takes the new events (see `personify.engine.compaction`).
    """
    if cfg.broker.embedded and cfg.broker.embedded_compact_messages:
        return (cfg.topics.routed, f"{cfg.topics.routed}-alt")
    return (cfg.topics.routed,)


def _journal(cfg: Config, directory: str) -> Journal | None:
    if not cfg.journal_enabled:
        return None
    return Journal(
        cfg.data_path / directory,
        fsync=cfg.storage.journal_fsync,
        segment_bytes=cfg.storage.journal_segment_bytes,
    )


@functools.cache
def publisher() -> Publisher:
    """The process's publisher of routed events (with the journal when it is enabled)."""
    cfg = current_config()
    return Publisher(
        topic(cfg.topics.routed),
        cfg.broker.partitions,
        _journal(cfg, "journal"),
        cfg.server.publish_timeout_s,
    )


@functools.cache
def items_publisher() -> Publisher:
    """The process's publisher of catalog changes (with their own journal when enabled)."""
    cfg = current_config()
    return Publisher(
        topic(cfg.topics.items),
        cfg.broker.partitions,
        _journal(cfg, "journal-items"),
        cfg.server.publish_timeout_s,
    )


def _publishers() -> list[tuple[Publisher, str]]:
    return [(publisher(), "profiles"), (items_publisher(), "items")]


class _Lifecycle(mode.Service):  # type: ignore[misc] # mode is untyped
    """Opens the journals and replays their tails on start; saves and closes them on stop."""

    async def on_start(self) -> None:
        for pub, _table in _publishers():
            if pub.journal is not None:
                pub.journal.open()

    @mode.Service.task  # type: ignore[untyped-decorator]
    async def _replay(self) -> None:
        cfg = current_config()
        await app.producer.maybe_start()
        await topic(cfg.topics.dead_letter).maybe_declare()
        journals = []
        for pub, table in _publishers():
            await pub.topic.maybe_declare()
            if pub.journal is not None:
                existed = app.personify_tables_existed.get(table, False)
                start = pub.journal.replay_start(
                    existed, _tables_dir(cfg), cfg.storage.rebuild_partial
                )
                count = await pub.replay(start)
                _log.info(
                    "journal ready", table=table, replayed=count, next_seq=pub.journal.next_seq
                )
                journals.append(pub.journal)
            pub.ready.set()
        compacted = time.monotonic()
        retention_s = cfg.storage.journal_retention_s
        every_s = min(_COMPACT_EVERY_S, retention_s or _COMPACT_EVERY_S)
        while not self.should_stop and journals:
            await self.sleep(1.0)
            for journal in journals:
                await journal.save_checkpoint_aside()
            if time.monotonic() - compacted >= every_s:
                compacted = time.monotonic()
                for journal in journals:
                    # Deleting a segment of tens of MiB takes the file system a while.
                    await asyncio.to_thread(_compact, journal, retention_s)

    @mode.Service.task  # type: ignore[untyped-decorator]
    async def _trim_memory(self) -> None:
        """Give the allocator's free pages back once no event was applied for a while.

        Once per quiet spell of ``[worker] malloc_trim_quiet_s``: trimming every 30 s under
        steady traffic made pushes slower (``bench/RESULTS.md``).
        """
        quiet_s = current_config().worker.malloc_trim_quiet_s
        fn = memory.trimmer()
        if not quiet_s or fn is None:
            return
        spell = memory.QuietSpell()
        while not self.should_stop:
            await self.sleep(quiet_s)
            # The one counter's samples, not the whole registry's (RocksDB gauges included).
            applied = sum(
                s.value for s in EVENTS_APPLIED.collect()[0].samples if s.name.endswith("_total")
            )
            if spell.due(applied):
                MALLOC_TRIMMED.inc(await asyncio.to_thread(memory.trim, fn))

    @mode.Service.task  # type: ignore[untyped-decorator]
    async def _loop_delay(self) -> None:
        """Observe how late the event loop wakes a timer: a stalled loop delays everything."""
        while not self.should_stop:
            before = time.perf_counter()
            await asyncio.sleep(_LOOP_TICK_S)
            EVENT_LOOP_DELAY.observe(max(0.0, time.perf_counter() - before - _LOOP_TICK_S))

    async def on_stop(self) -> None:
        for pub, _table in _publishers():
            if pub.journal is not None:
                pub.journal.close()


#: The timer `_Lifecycle._loop_delay` sets to measure the event loop's delay.
_LOOP_TICK_S = 0.1

#: How often applied journal segments past their retention are looked for (at most: a
#: shorter retention is checked as often as it lasts).
_COMPACT_EVERY_S = 60.0


def _compact(journal: Journal, retention_s: float) -> None:
    try:
        removed = journal.compact(retention_s)
    except OSError as exc:
        _log.warning("journal segments could not be deleted", error=repr(exc))
        return
    if removed:
        _log.info(
            "journal segments deleted",
            journal=str(journal.directory),
            segments=len(removed),
            first_seq=journal.first_seq,
            bytes_kept=journal.size_bytes,
        )


def start_services() -> None:
    """Register the engine's own services on the app (called once, after `configure`)."""
    app.service(_Lifecycle)


def note_lag(agent: str, messages: Iterable[Any]) -> dict[int, int]:
    """Set ``agent``'s lag for every partition among ``messages`` (a round's, in order).

    Each partition's lag is its end offset (as last fetched) past its last message here.
    Returns the end offsets found, by partition.
    """
    last: dict[Any, int] = {}
    for message in messages:
        last[message.tp] = message.offset
    ends: dict[int, int] = {}
    consumer = app.consumer
    if consumer is None:
        return ends
    for tp, offset in last.items():
        end = consumer.highwater(tp)
        if end is not None:
            AGENT_LAG.labels(agent, str(tp.partition)).set(max(end - offset - 1, 0))
            ends[tp.partition] = end
    return ends
