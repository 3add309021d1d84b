"""Configuration: reads config.toml and PERSONIFY_* overrides into frozen dataclasses.

This is the only module that reads the configuration file or the environment. Every other
module receives a `Config` object. Unknown keys, wrong types and out-of-range values fail
with a `ConfigError` naming the file, the key, what was expected and what was found.

Environment overrides use ``PERSONIFY_<SECTION>__<KEY>``, e.g. ``PERSONIFY_SERVER__PORT=9000``;
values are parsed as TOML literals when they can be (``true``, ``12``, ``["a"]``) and taken as
plain strings otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from personify.engine.errors import ConfigError

__all__ = [
    "TUNABLE",
    "ApiKey",
    "AttributionConfig",
    "AuthConfig",
    "BrokerConfig",
    "CatalogConfig",
    "Config",
    "EmbeddingsConfig",
    "EventsConfig",
    "ExperimentsConfig",
    "LoggingConfig",
    "ModelConfig",
    "PluginsConfig",
    "ProfilesConfig",
    "PushConfig",
    "RecommendConfig",
    "SegmentsConfig",
    "ServerConfig",
    "StorageConfig",
    "TopicsConfig",
    "TriggersConfig",
    "TuneConfig",
    "WorkerConfig",
    "load_config",
]

ENV_PREFIX = "PERSONIFY_"

#: Blend weights of the candidate sources (see [recommend.weights] in config.toml).
DEFAULT_BLEND: dict[str, float] = {
    "covisit": 1.0,
    "copurchase": 1.0,
    "content": 0.5,
    "chat": 2.0,
    "trending": 0.2,
    "category": 0.3,
    "collab": 1.0,
    "repeat": 10.0,
    "popular": 0.3,
}

#: The [recommend] settings self-tuning may change ([tune] pinned names some of them).
TUNABLE: tuple[str, ...] = (
    "weights.covisit",
    "weights.copurchase",
    "weights.content",
    "weights.category",
    "weights.trending",
    "weights.collab",
    "weights.repeat",
    "weights.popular",
    "seed_half_life",
)

DEFAULT_WEIGHTS: dict[str, float] = {
    "page_view": 0.5,
    "product_view": 1.0,
    "search": 1.0,
    "add_to_cart": 3.0,
    "remove_from_cart": 0.0,
    "purchase": 5.0,
    "chat_message": 1.0,
    "impression": 0.0,
    "click": 2.0,
    "identify": 0.0,
    "alias": 0.0,
    "custom": 1.0,
}


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where the Kafka-compatible broker is.

    Attributes:
        url: ``"embedded"`` starts the bundled broker on a free loopback port;
            ``"kafka://host:port[;host:port]"`` uses an external cluster.
        partitions: partitions of every topic Personify declares.
        replication_factor: replication factor of those topics.
        embedded_compact_messages: with the embedded broker, routed events go to two topics
            in turn, switching once a partition of the current one holds this many messages
            and all of them are applied; the one left is emptied. 0: one topic, never emptied.
            That broker keeps every message, and its work per fetch grows with them.
        embedded_warn_messages: with the embedded broker, warn when a partition of the routed
            topic holds this many messages (and again at each doubling); 0 never warns.
    """

    url: str = "embedded"
    partitions: int = 4
    replication_factor: int = 1
    embedded_compact_messages: int = 1000
    embedded_warn_messages: int = 20000

    @property
    def embedded(self) -> bool:
        """Whether Personify starts its own broker."""
        return self.url == "embedded"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The HTTP API."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: How other workers reach this one (to forward reads of keys it owns);
    #: empty means http://host:port.
    public_url: str = ""
    #: How long a write (events, items, consent, erasure) waits for the broker's acknowledgement
    #: before it answers 503 (the write may still be applied; a retry with the same ids is safe).
    publish_timeout_s: float = 30.0

    @property
    def url(self) -> str:
        """The URL other workers use to reach this worker's API."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Local state: RocksDB tables and, with the embedded broker, the event journal."""

    data_dir: str = "./data"
    journal: Literal["auto", "on", "off"] = "auto"
    journal_fsync: bool = True
    changelog: Literal["auto", "on", "off"] = "auto"
    journal_segment_bytes: int = 64 * 1024 * 1024
    #: Journal segments applied to the tables and last written longer ago than this are
    #: deleted (0: keep every event; the tables can then always be rebuilt from the journal).
    journal_retention_s: float = 7 * 86400.0
    #: Rebuild missing tables from what the journal holds even if older segments are gone.
    rebuild_partial: bool = False
    #: RocksDB, per table and partition: memtable size and count, and block cache.
    rocksdb_write_buffer_mib: int = 16
    rocksdb_write_buffers: int = 2
    rocksdb_block_cache_mib: int = 32


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """The Faust worker."""

    app_id: str = "personify"
    commit_interval_s: float = 1.0
    fetch_max_wait_ms: int = 10
    producer_linger_ms: int = 0
    standby_replicas: int = 0
    ingest_batch: int = 1000
    #: glibc malloc arenas of the process (0: glibc's own default, 8 per core). Each thread
    #: that allocates may otherwise get an arena of its own, and memory freed in one is not
    #: reused by another: the resident size climbs for hours. MALLOC_ARENA_MAX, if set, wins.
    malloc_arenas: int = 2
    #: Once the engine has applied no event for this many seconds, the allocator's free pages
    #: go back to the system, once a quiet spell (glibc's malloc_trim; 0: never): what a
    #: backfill or a burst freed stays resident otherwise.
    malloc_trim_quiet_s: float = 30.0


@dataclass(frozen=True, slots=True)
class TopicsConfig:
    """Names of the topics."""

    events: str = "events"
    routed: str = "events-routed"
    dead_letter: str = "events-dlq"
    items: str = "items"
    #: Erasures (and other privacy actions) are recorded here, without personal data.
    audit: str = "audit"
    #: Live messages between workers (with an external broker only): who has sockets for
    #: which visitors, and the messages for them.
    push: str = "push"


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """Validation of incoming events."""

    custom_types: tuple[str, ...] = ()
    max_future_skew_s: float = 300.0
    max_body_bytes: int = 1024 * 1024
    max_batch: int = 1000
    max_id_length: int = 256
    max_string_length: int = 4096
    max_list_length: int = 500
    default_currency: str = "USD"
    #: Replace user and anonymous ids by HMAC-SHA256(id_secret, id) as events arrive.
    pseudonymize_ids: bool = False
    id_secret: str = ""


@dataclass(frozen=True, slots=True)
class ProfilesConfig:
    """How profiles are computed."""

    #: A visitor's consent to a purpose (analytics, personalization, marketing) before any
    #: ``consent`` event: "opt-out" grants it, "opt-in" withholds it until granted.
    consent: Literal["opt-out", "opt-in"] = "opt-out"
    session_gap_s: float = 1800.0
    recent_items: int = 500
    recent_searches: int = 20
    max_cart_items: int = 200
    #: Products a visitor bought kept with how often and when last (buy-again); past this the
    #: one bought longest ago goes.
    bought_items: int = 200
    affinity_half_life_s: float = 7 * 86400.0
    #: Categories (a path counts with its parents) kept in a visitor's affinity; past this the
    #: weakest, decayed to the event that adds one, go.
    affinity_categories: int = 100
    frequency_window_s: float = 7 * 86400.0
    dedup_window: int = 1000
    engagement_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))


@dataclass(frozen=True, slots=True)
class CatalogConfig:
    """The item catalog."""

    #: Items per request of POST /v1/items.
    max_batch: int = 1000


@dataclass(frozen=True, slots=True)
class EmbeddingsConfig:
    """Text embeddings (items and chat) and the vector index."""

    #: Texts encoded per model call.
    batch_size: int = 64
    #: Load the model when the engine starts rather than on the first item or chat message.
    preload: bool = True
    #: The index is exact below this many items and HNSW from there on.
    hnsw_threshold: int = 10_000
    hnsw_m: int = 32
    ef_search: int = 64
    #: How often the index is snapshotted to disk while items change (seconds).
    snapshot_interval_s: float = 60.0


@dataclass(frozen=True, slots=True)
class RecommendConfig:
    """Collaborative signals and ranking."""

    default_k: int = 10
    max_k: int = 100
    #: An item a visitor interacts with is paired with this many of their previous items.
    covisit_window: int = 5
    #: The pair's weight falls with distance d in the visitor's sequence as d ** -power ...
    covisit_distance_power: float = 0.5
    #: ... and halves for every this many seconds between the two interactions.
    covisit_gap_half_life_s: float = 3600.0
    #: Normalisation of a pair count c(a, b): c / (n(a) ** alpha * n(b) ** (1 - alpha));
    #: 0.5 is the cosine, 1 the share of a's pairs.
    covisit_alpha: float = 0.5
    #: Neighbours kept per item in the co-visitation and co-purchase tables.
    neighbours: int = 100
    #: Co-visitation and co-purchase counts halve every this many seconds.
    signal_half_life_s: float = 30 * 86400.0
    #: Changed signal rows are written to the table at this interval (and on stop).
    signal_flush_interval_s: float = 5.0
    #: Trending scores halve every this many seconds.
    trending_half_life_s: float = 86400.0
    #: Items kept in each trending list (global and per category).
    trending_size: int = 500
    #: Recent items of the visitor that seed candidates ...
    seeds: int = 10
    #: ... the newest counts fully, and a seed's weight halves every this many items back.
    seed_half_life: float = 2.0
    #: Candidates taken from each seed's row and from each other source before blending.
    candidates: int = 50
    #: The chat text vector halves every this many seconds (a new message counts fully).
    chat_half_life_s: float = 3600.0
    #: At most this many recommendations from one category (0: no limit).
    max_per_category: int = 0
    #: Compute the list ahead, in the background, when the profile of a visitor who asked for
    #: it (within ``list_max_age_s``) since it was last computed ahead changes: one list ahead
    #: per request (while over 1,000 are queued, within a share of the event loop that shrinks
    #: as the engine gets busier); any other visitor's list is dropped and computed when they
    #: ask, or while the event loop is all but idle. While fewer than half of the lists
    #: computed ahead are read before the visitor changes again, only visitors whose last one
    #: was read (and one try in eight) have theirs computed ahead. A visitor with a socket
    #: open has theirs computed at once.
    precompute: bool = True
    #: Items kept in each stored list: requests with k up to this and no other parameter are
    #: answered from memory.
    list_size: int = 10
    #: A stored list older than this is served once more and recomputed behind the answer ...
    list_refresh_s: float = 600.0
    #: ... and one older than this is recomputed before answering.
    list_max_age_s: float = 3600.0
    #: Stored lists kept per worker (visitors; as many again for similar items).
    list_cache_size: int = 200_000
    #: The similar-items lists of this many of the items most visitors interacted with are
    #: computed ahead after each new model, behind the answers (0: only when asked for).
    similar_ahead: int = 10_000
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_BLEND))


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The learned collaborative model (implicit ALS) and the interaction history it learns from."""

    #: Train a model at all (off: lists blend the other sources only).
    enabled: bool = True
    #: Item interactions (visitor, item, kind, time) are kept this many days before the newest.
    history_days: float = 730.0
    #: No model is trained before the history holds this many interactions.
    min_interactions: int = 1000
    #: A new model is trained once this many interactions arrived since the last one, and
    #: at least ``retrain_growth`` of what it learned from (training costs grow with the
    #: history: this keeps its cost per new interaction flat) ...
    retrain_interactions: int = 20_000
    retrain_growth: float = 0.1
    #: ... but a steady flow trains at most once per this many seconds, unless the history
    #: doubled since the last model (a young shop, a backfill: trained at once). Each new model
    #: makes every list computed ahead be ranked again.
    retrain_min_interval_s: float = 900.0
    #: ... or this many seconds after it, if any arrived at all.
    retrain_interval_s: float = 3600.0
    #: How often the trainer checks whether to train (seconds).
    check_interval_s: float = 10.0
    #: While visitors' events arrive, a training or tuning process runs this share of the time
    #: and is paused the rest (0-1; 1: never paused); in a quiet moment, all of the time.
    background_share: float = 1.0
    #: The vectors: length, L2 penalty, confidence of an interaction, ALS sweeps.
    factors: int = 64
    regularization: float = 0.05
    alpha: float = 2.0
    iterations: int = 15

    def enough_new(self, pending: int, interactions: int, age_s: float = math.inf) -> bool:
        """Whether ``pending`` new interactions call for a new model over ``interactions``.

        At least ``retrain_interactions``, and ``retrain_growth`` of the history learned: a
        training costs in proportion to the history, so its cost per new interaction stays
        flat as the history grows. And the last model at least ``retrain_min_interval_s``
        old (``age_s``), unless as many arrived as it learned from.
        """
        if pending < max(self.retrain_interactions, self.retrain_growth * interactions):
            return False
        return age_s >= self.retrain_min_interval_s or pending >= interactions


@dataclass(frozen=True, slots=True)
class TuneConfig:
    """Self-tuning of the blend on the shop's own history, after a new model, at most so often."""

    #: Tune at all (off: the [recommend] settings are used as configured).
    enabled: bool = True
    #: At most one tuning run per this many seconds (the first follows the first model).
    interval_s: float = 86400.0
    #: Settings tried per run (the current one first).
    trials: int = 30
    #: Visitors scored per validation split (a seeded sample beyond).
    max_users: int = 1000
    #: Settings the tuner never changes (names as listed in the README, e.g. "weights.chat"
    #: or "seed_half_life"): they keep their configured values.
    pinned: tuple[str, ...] = ()
    #: Also learn a ranker (LambdaMART over each candidate's source scores and the visitor's
    #: history) that re-orders the blend's best candidates; used only where it beats the
    #: tuned blend on validation visitors it was not trained on.
    ranker: bool = True


@dataclass(frozen=True, slots=True)
class PushConfig:
    """Live updates over WebSocket (GET /v1/ws)."""

    #: A visitor's event is pushed at once; events within this long after their last list
    #: was ranked wait for it to pass and go out together in one more push (0: none wait).
    debounce_ms: float = 10.0
    #: Messages kept per visitor so a client that reconnects with resume_from misses none.
    replay_size: int = 64
    #: Messages queued per socket; past this the oldest is dropped (and counted).
    queue_size: int = 64
    #: Ping interval; a client that does not answer is closed.
    heartbeat_s: float = 20.0
    #: A visitor's replay buffer is kept this long after their last socket closed.
    replay_ttl_s: float = 300.0
    #: Visitors with a replay buffer kept per worker (the least recently used go first).
    max_channels: int = 100_000
    #: With several workers, each tells the others which visitors it has sockets for this
    #: often (and at once when one connects); a worker silent for three periods is forgotten.
    announce_s: float = 10.0


@dataclass(frozen=True, slots=True)
class PluginsConfig:
    """Plugins found through the ``personify`` entry-point group, and the built-in ones."""

    #: Only these entry-point names are loaded (empty: every one installed).
    allow: tuple[str, ...] = ()
    #: These are never loaded (entry points and built-ins alike).
    deny: tuple[str, ...] = ()
    #: A hook call running longer than this is abandoned, counted and skipped.
    timeout_ms: float = 200.0
    #: Threads that run hook calls.
    threads: int = 4


@dataclass(frozen=True, slots=True)
class TriggersConfig:
    """The built-in trigger plugins, frequency capping and the webhook."""

    #: cart_abandonment: an offer when an item added to the cart is not bought within this
    #: (0: off).
    cart_abandonment_s: float = 0.0
    #: high_value: the rule segment "high_value" (``spend >= high_value_spend``) is set up
    #: (0: none).
    high_value_spend: float = 0.0
    #: browse_without_buy: a nudge after this many products viewed in a session, none added
    #: (0: off).
    browse_views: int = 0
    #: frequency_cap: at most max_offers offers per visitor per offer_window_s ...
    max_offers: int = 3
    offer_window_s: float = 86400.0
    #: ... and none within min_offer_gap_s of the previous one.
    min_offer_gap_s: float = 300.0
    #: How often due timers (cart abandonment) are checked.
    tick_s: float = 1.0
    #: webhook: each action of these types is POSTed as JSON to this URL (empty: none) ...
    webhook_url: str = ""
    webhook_types: tuple[str, ...] = ("offer", "segments")
    #: ... signed with HMAC-SHA256 of this secret in X-Personify-Signature (empty: unsigned).
    webhook_secret: str = ""
    webhook_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class AttributionConfig:
    """What recommendations earn: lists served (exposures) joined to what visitors do next."""

    #: Record exposures and attribute outcomes at all (off: no exposure is recorded and the
    #: KPIs stay empty).
    enabled: bool = True
    #: An outcome without a recommendation id counts for a list that showed its item at most
    #: this long before it.
    window_s: float = 86400.0
    #: Exposures kept per visitor (the newest); an older one can no longer be joined to.
    exposures_kept: int = 20
    #: Served lists are sent on to be recorded in batches, this often (each batch is folded in
    #: one round of the event loop: at 1,000 lists a second, 0.2 s made rounds that held it
    #: long enough to show in the answers' p99).
    flush_interval_s: float = 0.05
    #: Days of KPIs kept (older days are deleted as new ones start).
    kpi_days: int = 400


@dataclass(frozen=True, slots=True)
class SegmentsConfig:
    """Rule segments (PUT /v1/segments/{id}) and RFM scores."""

    #: Every profile is evaluated again this often (seconds): rules that depend on the time
    #: (days since, events in the last days) and RFM scores change without an event. The RFM
    #: cut points are computed again on the same schedule.
    sweep_interval_s: float = 3600.0
    #: Segments defined at most.
    max_segments: int = 100


@dataclass(frozen=True, slots=True)
class ExperimentsConfig:
    """How experiment results are tested (see the README)."""

    #: The error rate of the intervals and tests, however often results are looked at.
    alpha: float = 0.05
    #: The relative difference from the control the test is most sensitive to.
    effect: float = 0.1


Scope = Literal["ingest", "read", "admin"]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key and what it may do."""

    key: str
    #: ingest: POST /v1/events (safe to ship to browsers); read: profiles, recommendations,
    #: items, WebSocket tokens; admin: the catalog and everything else.
    scopes: tuple[Scope, ...] = ("read",)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """API keys. With none (the local default) the API answers on loopback only."""

    #: name -> key; requests send ``Authorization: Bearer <key>``.
    keys: Mapping[str, ApiKey] = field(default_factory=dict)
    #: Signs WebSocket tokens (POST /v1/ws/tokens); every worker needs the same one. Empty: a
    #: random secret per process (tokens then work only on the worker that made them).
    token_secret: str = ""
    #: How long a WebSocket token is valid.
    token_ttl_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Structured logs."""

    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; ``source`` names the file it came from (or ``<defaults>``)."""

    broker: BrokerConfig = field(default_factory=BrokerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    profiles: ProfilesConfig = field(default_factory=ProfilesConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    recommend: RecommendConfig = field(default_factory=RecommendConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    push: PushConfig = field(default_factory=PushConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    triggers: TriggersConfig = field(default_factory=TriggersConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    experiments: ExperimentsConfig = field(default_factory=ExperimentsConfig)
    segments: SegmentsConfig = field(default_factory=SegmentsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<defaults>"

    @property
    def data_path(self) -> Path:
        """The data directory as an absolute path."""
        return Path(self.storage.data_dir).expanduser().resolve()

    @property
    def changelog_enabled(self) -> bool:
        """Whether table writes also go to their changelog topics.

        A broker that forgets everything when it stops cannot restore a table, so with the
        embedded broker the tables are rebuilt from the journal instead.
        """
        if self.storage.changelog == "auto":
            return not self.broker.embedded
        return self.storage.changelog == "on"

    @property
    def journal_enabled(self) -> bool:
        """Whether acknowledged events are also kept in the local journal."""
        if self.storage.journal == "auto":
            return self.broker.embedded
        return self.storage.journal == "on"

    def replace(self, **sections: Any) -> Config:
        """Return a copy with some settings changed: ``cfg.replace(server={"port": 9000})``."""
        changes: dict[str, Any] = {}
        for name, values in sections.items():
            current = getattr(self, name)
            if name in ("profiles", "recommend"):
                values = _merge_weights(values, self.source, name)
            changes[name] = _build(type(current), {**_asdict(current), **values}, self.source, name)
        return _checked(dataclasses.replace(self, **changes))


def _asdict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _check(value: Any, tp: Any, where: str) -> Any:
    """Check (and lightly coerce) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(
            f"{where}: expected one of {', '.join(map(repr, allowed))}, got {value!r}"
        )
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_check(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table of key = value, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {
            _check(k, key_tp, where): _check(v, val_tp, f"{where}.{k}") for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        source, _, section = where.rpartition(": [")
        return _build(tp, value, source, section.replace("] ", "."))
    if isinstance(tp, types.UnionType):  # pragma: no cover - no unions in use yet
        return value
    raise ConfigError(f"{where}: unsupported setting type {tp!r}")  # pragma: no cover


_POSITIVE = {
    "server.publish_timeout_s",
    "tune.interval_s",
    "tune.trials",
    "tune.max_users",
    "model.history_days",
    "model.min_interactions",
    "model.retrain_interactions",
    "model.retrain_interval_s",
    "model.check_interval_s",
    "model.factors",
    "model.alpha",
    "model.iterations",
    "broker.partitions",
    "broker.replication_factor",
    "events.max_body_bytes",
    "events.max_batch",
    "events.max_id_length",
    "events.max_string_length",
    "events.max_list_length",
    "profiles.session_gap_s",
    "profiles.recent_items",
    "profiles.recent_searches",
    "profiles.max_cart_items",
    "profiles.bought_items",
    "profiles.affinity_half_life_s",
    "profiles.affinity_categories",
    "profiles.frequency_window_s",
    "profiles.dedup_window",
    "worker.commit_interval_s",
    "worker.ingest_batch",
    "storage.journal_segment_bytes",
    "storage.rocksdb_write_buffer_mib",
    "storage.rocksdb_write_buffers",
    "storage.rocksdb_block_cache_mib",
    "catalog.max_batch",
    "embeddings.batch_size",
    "embeddings.hnsw_threshold",
    "embeddings.hnsw_m",
    "embeddings.ef_search",
    "embeddings.snapshot_interval_s",
    "recommend.default_k",
    "recommend.max_k",
    "recommend.covisit_window",
    "recommend.covisit_gap_half_life_s",
    "recommend.seed_half_life",
    "recommend.neighbours",
    "recommend.signal_half_life_s",
    "recommend.trending_half_life_s",
    "recommend.signal_flush_interval_s",
    "recommend.trending_size",
    "recommend.seeds",
    "recommend.candidates",
    "recommend.chat_half_life_s",
    "recommend.list_size",
    "recommend.list_refresh_s",
    "recommend.list_max_age_s",
    "recommend.list_cache_size",
    "push.replay_size",
    "push.queue_size",
    "push.heartbeat_s",
    "push.replay_ttl_s",
    "push.max_channels",
    "push.announce_s",
    "triggers.offer_window_s",
    "attribution.window_s",
    "attribution.exposures_kept",
    "attribution.flush_interval_s",
    "attribution.kpi_days",
    "experiments.alpha",
    "experiments.effect",
    "segments.sweep_interval_s",
    "segments.max_segments",
    "triggers.tick_s",
    "triggers.webhook_timeout_s",
    "auth.token_ttl_s",
    "plugins.timeout_ms",
    "plugins.threads",
}


def _build(cls: Any, raw: Mapping[str, Any], source: str, section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key [{section}] {key}; known keys: {', '.join(sorted(names))}"
            )
    values = {k: _check(v, hints[k], f"{source}: [{section}] {k}") for k, v in raw.items()}
    obj = cls(**values)
    for name in names:
        dotted = f"{section}.{name}"
        value = getattr(obj, name)
        if dotted in _POSITIVE and value <= 0:
            raise ConfigError(f"{source}: [{section}] {name}: expected a value > 0, got {value!r}")
    if section == "server" and not 0 <= obj.port <= 65535:
        raise ConfigError(f"{source}: [server] port: expected 0-65535, got {obj.port}")
    if section == "broker" and not (obj.url == "embedded" or obj.url.startswith("kafka://")):
        raise ConfigError(
            f'{source}: [broker] url: expected "embedded" or "kafka://host:port", got {obj.url!r}'
        )
    if section == "storage" and obj.journal_retention_s < 0:
        raise ConfigError(
            f"{source}: [storage] journal_retention_s: expected >= 0 (0: keep every event), "
            f"got {obj.journal_retention_s}"
        )
    if section == "broker":
        for name in ("embedded_compact_messages", "embedded_warn_messages"):
            if getattr(obj, name) < 0:
                raise ConfigError(
                    f"{source}: [broker] {name}: expected >= 0 (0: never), got {getattr(obj, name)}"
                )
    if section == "events" and obj.pseudonymize_ids and len(obj.id_secret) < 16:
        raise ConfigError(
            f"{source}: [events] id_secret: pseudonymize_ids needs a secret of at least 16 "
            f"characters (got {len(obj.id_secret)}); set one, the same on every worker and "
            "for good: another secret makes other pseudonyms, and the profiles are lost"
        )
    if section == "experiments" and not obj.alpha < 1:
        raise ConfigError(f"{source}: [experiments] alpha: expected below 1, got {obj.alpha}")
    if section == "triggers":
        for name in (
            "cart_abandonment_s",
            "high_value_spend",
            "browse_views",
            "max_offers",
            "min_offer_gap_s",
        ):
            if getattr(obj, name) < 0:
                raise ConfigError(
                    f"{source}: [triggers] {name}: expected >= 0, got {getattr(obj, name)}"
                )
        if obj.webhook_url and not obj.webhook_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{source}: [triggers] webhook_url: expected an http:// or https:// URL, "
                f"got {obj.webhook_url!r}"
            )
    if section == "recommend":
        if not 0.0 <= obj.covisit_alpha <= 1.0:
            raise ConfigError(
                f"{source}: [recommend] covisit_alpha: expected 0-1, got {obj.covisit_alpha}"
            )
        if obj.covisit_distance_power < 0:
            raise ConfigError(
                f"{source}: [recommend] covisit_distance_power: expected >= 0, "
                f"got {obj.covisit_distance_power}"
            )
        if obj.list_max_age_s < obj.list_refresh_s:
            raise ConfigError(
                f"{source}: [recommend] list_max_age_s: expected >= list_refresh_s "
                f"({obj.list_refresh_s}), got {obj.list_max_age_s}"
            )
        if obj.max_per_category < 0:
            raise ConfigError(
                f"{source}: [recommend] max_per_category: expected >= 0 (0: no limit), "
                f"got {obj.max_per_category}"
            )
        if obj.similar_ahead < 0:
            raise ConfigError(
                f"{source}: [recommend] similar_ahead: expected >= 0 (0: only when asked for), "
                f"got {obj.similar_ahead}"
            )
        for name, weight in obj.weights.items():
            if weight < 0:
                raise ConfigError(
                    f"{source}: [recommend.weights] {name}: expected >= 0, got {weight}"
                )
    if section.startswith("auth.keys.") and len(obj.key) < 16:
        raise ConfigError(
            f"{source}: [{section}] key: expected at least 16 characters (a random secret)"
        )
    if section == "auth":
        seen: dict[str, str] = {}
        for name, api_key in obj.keys.items():
            if api_key.key in seen:
                raise ConfigError(
                    f"{source}: [auth.keys] {name}: the same key as {seen[api_key.key]}"
                )
            seen[api_key.key] = name
    if section == "tune":
        unknown = [name for name in obj.pinned if name not in TUNABLE]
        if unknown:
            raise ConfigError(
                f"{source}: [tune] pinned: unknown setting {unknown[0]!r}; "
                f"known: {', '.join(TUNABLE)}"
            )
    if section == "model" and not 0.0 < obj.background_share <= 1.0:
        raise ConfigError(
            f"{source}: [model] background_share: expected more than 0 and at most 1, "
            f"got {obj.background_share}"
        )
    if section == "model" and obj.retrain_growth < 0:
        raise ConfigError(
            f"{source}: [model] retrain_growth: expected >= 0, got {obj.retrain_growth}"
        )
    if section == "model" and obj.retrain_min_interval_s < 0:
        raise ConfigError(
            f"{source}: [model] retrain_min_interval_s: expected >= 0, "
            f"got {obj.retrain_min_interval_s}"
        )
    if section == "model" and obj.regularization < 0:
        raise ConfigError(
            f"{source}: [model] regularization: expected >= 0, got {obj.regularization}"
        )
    if section == "push" and obj.debounce_ms < 0:
        raise ConfigError(f"{source}: [push] debounce_ms: expected >= 0, got {obj.debounce_ms}")
    if section == "worker" and obj.malloc_trim_quiet_s < 0:
        raise ConfigError(
            f"{source}: [worker] malloc_trim_quiet_s: expected >= 0, got {obj.malloc_trim_quiet_s}"
        )
    if section == "worker" and obj.malloc_arenas < 0:
        raise ConfigError(
            f"{source}: [worker] malloc_arenas: expected >= 0, got {obj.malloc_arenas}"
        )
    if section == "worker" and obj.fetch_max_wait_ms < 0:
        raise ConfigError(
            f"{source}: [worker] fetch_max_wait_ms: expected >= 0, got {obj.fetch_max_wait_ms}"
        )
    return obj


def _merge_weights(values: Mapping[str, Any], source: str, section: str) -> dict[str, Any]:
    """Weights given are merged over the defaults (the others keep theirs)."""
    name, defaults = (
        ("engagement_weights", DEFAULT_WEIGHTS)
        if section == "profiles"
        else ("weights", DEFAULT_BLEND)
    )
    weights = values.get(name)
    if weights is None:
        return dict(values)
    if not isinstance(weights, Mapping):
        raise ConfigError(
            f"{source}: [{section}] {name}: expected a table of name = weight, got {weights!r}"
        )
    if section == "recommend":
        unknown = set(weights) - set(DEFAULT_BLEND)
        if unknown:
            raise ConfigError(
                f"{source}: [recommend.weights] {sorted(unknown)[0]}: unknown source; "
                f"known: {', '.join(sorted(DEFAULT_BLEND))}"
            )
    return {**values, name: {**defaults, **weights}}


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Load the configuration.

    Args:
        path: a TOML file; ``None`` uses ``./config.toml`` when it exists, else the defaults.
        environ: environment to read ``PERSONIFY_*`` overrides from (default ``os.environ``).
        overrides: section -> key -> value applied last (command-line flags).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: the file is missing or malformed, or a key is unknown or invalid.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, dict[str, Any]] = {}
    source = "<defaults>"
    if path is None and Path("config.toml").is_file():
        path = "config.toml"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(
                f"{source}: file not found; pass --config with an existing file"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(
                    f"{source}: {section}: expected a [{section}] table, got {values!r}"
                )
            raw[section] = dict(values)
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        raw.setdefault(section, {})[key] = _parse_env_value(text)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)

    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "source"}
    built: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(
                f"{source}: unknown section [{section}]; "
                f"known sections: {', '.join(sorted(sections))}"
            )
        cls = typing.get_type_hints(Config)[section]
        if section in ("profiles", "recommend"):
            values = _merge_weights(values, source, section)
        built[section] = _build(cls, values, source, section)
    return _checked(Config(**built, source=source))


def _checked(cfg: Config) -> Config:
    """Checks across sections: an API without keys stays on loopback."""
    if not cfg.auth.keys and cfg.server.host not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"{cfg.source}: [server] host = {cfg.server.host!r} without [auth.keys] is refused: "
            "anyone who reaches that address could read and change every profile. Add API keys "
            "(see [auth] in config.toml) or bind 127.0.0.1."
        )
    return cfg
