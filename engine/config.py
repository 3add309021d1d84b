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
    "BrokerConfig",
    "Config",
    "EventsConfig",
    "LoggingConfig",
    "ProfilesConfig",
    "ServerConfig",
    "StorageConfig",
    "TopicsConfig",
    "WorkerConfig",
    "load_config",
]

ENV_PREFIX = "PERSONIFY_"

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
    """

    url: str = "embedded"
    partitions: int = 4
    replication_factor: int = 1

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


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """The Faust worker."""

    app_id: str = "personify"
    commit_interval_s: float = 1.0
    fetch_max_wait_ms: int = 10
    producer_linger_ms: int = 0
    standby_replicas: int = 0
    ingest_batch: int = 1000


@dataclass(frozen=True, slots=True)
class TopicsConfig:
    """Names of the topics."""

    events: str = "events"
    routed: str = "events-routed"
    dead_letter: str = "events-dlq"


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


@dataclass(frozen=True, slots=True)
class ProfilesConfig:
    """How profiles are computed."""

    session_gap_s: float = 1800.0
    recent_items: int = 50
    recent_searches: int = 20
    max_cart_items: int = 200
    affinity_half_life_s: float = 7 * 86400.0
    frequency_window_s: float = 7 * 86400.0
    dedup_window: int = 1000
    engagement_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))


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
            if name == "profiles":
                values = _merge_weights(values, self.source)
            changes[name] = _build(type(current), {**_asdict(current), **values}, self.source, name)
        return dataclasses.replace(self, **changes)


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
    if isinstance(tp, types.UnionType):  # pragma: no cover - no unions in use yet
        return value
    raise ConfigError(f"{where}: unsupported setting type {tp!r}")  # pragma: no cover


_POSITIVE = {
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
    "profiles.affinity_half_life_s",
    "profiles.frequency_window_s",
    "profiles.dedup_window",
    "worker.commit_interval_s",
    "worker.ingest_batch",
    "storage.journal_segment_bytes",
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
    if section == "worker" and obj.fetch_max_wait_ms < 0:
        raise ConfigError(
            f"{source}: [worker] fetch_max_wait_ms: expected >= 0, got {obj.fetch_max_wait_ms}"
        )
    return obj


def _merge_weights(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Engagement weights given are merged over the defaults (the others keep theirs)."""
    weights = values.get("engagement_weights")
    if weights is None:
        return dict(values)
    if not isinstance(weights, Mapping):
        raise ConfigError(
            f"{source}: [profiles] engagement_weights: expected a table of event type = weight, "
            f"got {weights!r}"
        )
    return {**values, "engagement_weights": {**DEFAULT_WEIGHTS, **weights}}


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
        if section == "profiles":
            values = _merge_weights(values, source)
        built[section] = _build(cls, values, source, section)
    return Config(**built, source=source)
