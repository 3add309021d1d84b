"""Unit tests of `personify.engine.config`: defaults, file, environment and overrides."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from personify.engine.config import (
    DEFAULT_WEIGHTS,
    BrokerConfig,
    Config,
    EventsConfig,
    ModelConfig,
    ProfilesConfig,
    ServerConfig,
    StorageConfig,
    load_config,
)
from personify.engine.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
ConfigFile = Callable[[str], Path]


@pytest.fixture
def config_file(tmp_path: Path) -> ConfigFile:
    """Write a config.toml with the given text and return its path."""

    def make(text: str) -> Path:
        path = tmp_path / "config.toml"
        path.write_text(text)
        return path

    return make


def test_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a file, an environment or overrides, load_config returns the dataclass defaults."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(environ={})
    assert cfg == Config()
    assert cfg.source == "<defaults>"
    assert cfg.broker.url == "embedded"
    assert cfg.broker.partitions == 4
    assert cfg.server.port == 8080
    assert cfg.events.custom_types == ()
    assert cfg.profiles.engagement_weights == DEFAULT_WEIGHTS


def test_cwd_config_toml_is_used_when_no_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With path=None, ./config.toml is read when it exists."""
    (tmp_path / "config.toml").write_text("[server]\nport = 9123\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(environ={})
    assert cfg.server.port == 9123
    assert cfg.source == "config.toml"


def test_repo_config_toml_equals_defaults() -> None:
    """The documented config.toml in the repository root holds exactly the defaults."""
    cfg = load_config(REPO_ROOT / "config.toml", environ={})
    assert cfg.source == str(REPO_ROOT / "config.toml")
    assert dataclasses.replace(cfg, source="<defaults>") == Config()


def test_repo_config_toml_lists_every_setting() -> None:
    """Every setting of every section appears in config.toml (it documents them all)."""
    data = tomllib.loads((REPO_ROOT / "config.toml").read_text())
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        names = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert set(data[section.name]) == names, section.name


def test_missing_file_names_it(tmp_path: Path) -> None:
    """A missing config file fails with its path named."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: file not found"):
        load_config(missing, environ={})


def test_invalid_toml_names_file(config_file: ConfigFile) -> None:
    """A file that is not TOML fails with the file named."""
    path = config_file("[server\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


def test_unknown_section_names_file_and_section(config_file: ConfigFile) -> None:
    """An unknown section fails with the file, the section and the known sections."""
    path = config_file("[servre]\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert str(path) in message
    assert "unknown section [servre]" in message
    assert "server" in message


def test_unknown_key_names_file_and_key(config_file: ConfigFile) -> None:
    """An unknown key fails with the file, the section, the key and the known keys."""
    path = config_file("[server]\nprot = 9000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert message.startswith(f"{path}: unknown key [server] prot")
    known = message.split("known keys: ", 1)[1].split(", ")
    assert {"host", "port"} <= set(known)


def test_top_level_scalar_is_rejected(config_file: ConfigFile) -> None:
    """A top-level key that is not a table fails, naming the expected table."""
    path = config_file("server = 1\n")
    with pytest.raises(ConfigError, match=r"expected a \[server\] table, got 1"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[server]\nport = "80"\n', "[server] port: expected an integer, got '80'"),
        ("[server]\nport = true\n", "[server] port: expected an integer, got True"),
        ("[server]\nhost = 1\n", "[server] host: expected a string, got 1"),
        ('[storage]\njournal_fsync = "yes"\n', "[storage] journal_fsync: expected true or false"),
        ('[worker]\ncommit_interval_s = "1"\n', "[worker] commit_interval_s: expected a number"),
        (
            '[storage]\njournal = "maybe"\n',
            "[storage] journal: expected one of 'auto', 'on', 'off'",
        ),
        ('[events]\ncustom_types = "x"\n', "[events] custom_types: expected a list, got 'x'"),
        ("[events]\ncustom_types = [1]\n", "[events] custom_types[0]: expected a string, got 1"),
        (
            '[profiles.engagement_weights]\npurchase = "a lot"\n',
            "[profiles] engagement_weights.purchase: expected a number, got 'a lot'",
        ),
        ('[logging]\nlevel = "loud"\n', "[logging] level: expected one of"),
    ],
)
def test_wrong_types_are_named(config_file: ConfigFile, text: str, expected: str) -> None:
    """A value of the wrong type fails with the file, the key, what was expected and got."""
    path = config_file(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_engagement_weights_not_a_table(config_file: ConfigFile) -> None:
    """engagement_weights that is not a table fails with a ConfigError naming the key."""
    path = config_file("[profiles]\nengagement_weights = 3\n")
    with pytest.raises(ConfigError, match=r"\[profiles\] engagement_weights: expected a table"):
        load_config(path, environ={})


def test_int_is_accepted_for_float_setting(config_file: ConfigFile) -> None:
    """An integer is accepted where a number is expected and stored as a float."""
    cfg = load_config(config_file("[profiles]\nsession_gap_s = 60\n"), environ={})
    assert cfg.profiles.session_gap_s == 60.0
    assert isinstance(cfg.profiles.session_gap_s, float)


@pytest.mark.parametrize("port", [-1, 65536, 100000])
def test_port_out_of_range(config_file: ConfigFile, port: int) -> None:
    """A port outside 0-65535 fails with the expected range and the value."""
    with pytest.raises(ConfigError, match=rf"\[server\] port: expected 0-65535, got {port}"):
        load_config(config_file(f"[server]\nport = {port}\n"), environ={})


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_port_in_range(config_file: ConfigFile, port: int) -> None:
    """Ports 0 (pick a free one) to 65535 are accepted."""
    assert load_config(config_file(f"[server]\nport = {port}\n"), environ={}).server.port == port


@pytest.mark.parametrize("value", [0, -3])
def test_partitions_must_be_positive(config_file: ConfigFile, value: int) -> None:
    """A partitions value <= 0 fails with 'expected a value > 0'."""
    with pytest.raises(
        ConfigError, match=rf"\[broker\] partitions: expected a value > 0, got {value}"
    ):
        load_config(config_file(f"[broker]\npartitions = {value}\n"), environ={})


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("profiles", "session_gap_s", "0.0"),
        ("profiles", "dedup_window", "0"),
        ("events", "max_batch", "-1"),
        ("storage", "journal_segment_bytes", "0"),
        ("worker", "ingest_batch", "0"),
    ],
)
def test_other_positive_settings(
    config_file: ConfigFile, section: str, key: str, value: str
) -> None:
    """Sizes, windows and intervals must be > 0."""
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key}: expected a value > 0"):
        load_config(config_file(f"[{section}]\n{key} = {value}\n"), environ={})


def test_fetch_max_wait_may_be_zero_not_negative(config_file: ConfigFile) -> None:
    """fetch_max_wait_ms accepts 0 and rejects negatives."""
    assert load_config(config_file("[worker]\nfetch_max_wait_ms = 0\n"), environ={})
    with pytest.raises(ConfigError, match="fetch_max_wait_ms: expected >= 0, got -1"):
        load_config(config_file("[worker]\nfetch_max_wait_ms = -1\n"), environ={})


def test_malloc_arenas_may_be_zero_not_negative(config_file: ConfigFile) -> None:
    """malloc_arenas accepts 0 (glibc's default) and rejects negatives."""
    assert load_config(config_file("[worker]\nmalloc_arenas = 0\n"), environ={})
    with pytest.raises(ConfigError, match="malloc_arenas: expected >= 0, got -1"):
        load_config(config_file("[worker]\nmalloc_arenas = -1\n"), environ={})


def test_malloc_trim_quiet_may_be_zero_not_negative(config_file: ConfigFile) -> None:
    """malloc_trim_quiet_s accepts 0 (never) and rejects negatives."""
    cfg = load_config(config_file("[worker]\nmalloc_trim_quiet_s = 0\n"), environ={})
    assert cfg.worker.malloc_trim_quiet_s == 0
    with pytest.raises(ConfigError, match="malloc_trim_quiet_s: expected >= 0, got -5"):
        load_config(config_file("[worker]\nmalloc_trim_quiet_s = -5\n"), environ={})


def test_embedded_warn_messages_may_be_zero_not_negative(config_file: ConfigFile) -> None:
    """embedded_warn_messages accepts 0 (never warn) and rejects negatives."""
    cfg = load_config(config_file("[broker]\nembedded_warn_messages = 0\n"), environ={})
    assert cfg.broker.embedded_warn_messages == 0
    with pytest.raises(ConfigError, match="embedded_warn_messages: expected >= 0"):
        load_config(config_file("[broker]\nembedded_warn_messages = -1\n"), environ={})


def test_broker_url_scheme(config_file: ConfigFile) -> None:
    """The broker url must be "embedded" or kafka://..."""
    cfg = load_config(config_file('[broker]\nurl = "kafka://k1:9092;k2:9092"\n'), environ={})
    assert cfg.broker.url == "kafka://k1:9092;k2:9092"
    assert cfg.broker.embedded is False
    with pytest.raises(ConfigError, match=r"\[broker\] url: expected \"embedded\""):
        load_config(config_file('[broker]\nurl = "http://k1:9092"\n'), environ={})


def test_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PERSONIFY_<SECTION>__<KEY> variables override settings, parsed as TOML literals."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        environ={
            "PERSONIFY_SERVER__PORT": "9000",
            "PERSONIFY_BROKER__URL": "kafka://kafka1:9092",
            "PERSONIFY_STORAGE__JOURNAL_FSYNC": "false",
            "PERSONIFY_EVENTS__CUSTOM_TYPES": '["wishlist_add", "share"]',
            "PERSONIFY_LOGGING__LEVEL": "warning",
            "PERSONIFY_PROFILES__SESSION_GAP_S": "60",
        }
    )
    assert cfg.server.port == 9000
    assert cfg.broker.url == "kafka://kafka1:9092"
    assert cfg.storage.journal_fsync is False
    assert cfg.events.custom_types == ("wishlist_add", "share")
    assert cfg.logging.level == "warning"
    assert cfg.profiles.session_gap_s == 60.0


def test_env_overrides_beat_the_file(config_file: ConfigFile) -> None:
    """An environment variable wins over the same key in the file; other keys stay."""
    path = config_file('[server]\nport = 7000\nhost = "localhost"\n')
    cfg = load_config(path, environ={"PERSONIFY_SERVER__PORT": "7001"})
    assert cfg.server.port == 7001
    assert cfg.server.host == "localhost"


def test_api_keys_and_the_loopback_rule(config_file: ConfigFile) -> None:
    """Keys load with their scopes; another address than loopback needs keys."""
    keys = (
        '[auth.keys.backend]\nkey = "k-0123456789abcdef"\nscopes = ["read", "admin"]\n'
        '[auth.keys.browser]\nkey = "k-fedcba9876543210"\nscopes = ["ingest"]\n'
    )
    cfg = load_config(config_file('[server]\nhost = "0.0.0.0"\n' + keys), environ={})
    assert cfg.auth.keys["backend"].scopes == ("read", "admin")
    assert cfg.auth.keys["browser"].key == "k-fedcba9876543210"
    with pytest.raises(ConfigError, match=r"host = '0.0.0.0' without \[auth.keys\] is refused"):
        load_config(config_file('[server]\nhost = "0.0.0.0"\n'), environ={})
    with pytest.raises(ConfigError, match=r"auth.keys.x\] key: expected at least 16"):
        load_config(config_file('[auth.keys.x]\nkey = "short"\n'), environ={})
    with pytest.raises(ConfigError, match=r"scopes\[0\]: expected one of"):
        load_config(
            config_file('[auth.keys.x]\nkey = "k-0123456789abcdef"\nscopes = ["all"]\n'), environ={}
        )
    with pytest.raises(ConfigError, match="the same key as"):
        load_config(
            config_file(
                '[auth.keys.a]\nkey = "k-0123456789abcdef"\n'
                '[auth.keys.b]\nkey = "k-0123456789abcdef"\n'
            ),
            environ={},
        )


def test_unrelated_env_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables without the prefix or without a double underscore are ignored."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        environ={"PERSONIFY_PORT": "1", "SERVER__PORT": "2", "HOME": "/root", "PERSONIFYX__A": "3"}
    )
    assert cfg == Config()


def test_env_unknown_key_and_bad_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt or invalid environment override fails naming the key."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown key \[server\] prot"):
        load_config(environ={"PERSONIFY_SERVER__PROT": "1"})
    with pytest.raises(ConfigError, match=r"unknown section \[srv\]"):
        load_config(environ={"PERSONIFY_SRV__PORT": "1"})
    with pytest.raises(ConfigError, match=r"\[server\] port: expected an integer, got 'abc'"):
        load_config(environ={"PERSONIFY_SERVER__PORT": "abc"})


def test_overrides_beat_env_and_file(config_file: ConfigFile) -> None:
    """The overrides argument (command-line flags) wins over the environment and the file."""
    path = config_file('[server]\nport = 7000\n[storage]\ndata_dir = "/file"\n')
    cfg = load_config(
        path,
        environ={"PERSONIFY_SERVER__PORT": "7001", "PERSONIFY_STORAGE__DATA_DIR": "/env"},
        overrides={"server": {"port": 7002}},
    )
    assert cfg.server.port == 7002
    assert cfg.storage.data_dir == "/env"


def test_overrides_are_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overrides go through the same checks as the file."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="port: expected 0-65535, got 70000"):
        load_config(environ={}, overrides={"server": {"port": 70000}})


def test_engagement_weights_merge_with_defaults(config_file: ConfigFile) -> None:
    """[profiles.engagement_weights] changes only the listed weights; the rest keep defaults."""
    path = config_file("[profiles.engagement_weights]\npurchase = 9.0\nwishlist_add = 2\n")
    weights = load_config(path, environ={}).profiles.engagement_weights
    assert weights["purchase"] == 9.0
    assert weights["wishlist_add"] == 2.0
    assert weights["page_view"] == 0.5
    assert weights["custom"] == 1.0
    assert set(weights) == set(DEFAULT_WEIGHTS) | {"wishlist_add"}


def test_engagement_weights_env_and_overrides_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights given in the environment or as overrides are merged with the defaults too."""
    monkeypatch.chdir(tmp_path)
    env_cfg = load_config(environ={"PERSONIFY_PROFILES__ENGAGEMENT_WEIGHTS": "{click = 7.0}"})
    assert env_cfg.profiles.engagement_weights == {**DEFAULT_WEIGHTS, "click": 7.0}
    ov_cfg = load_config(environ={}, overrides={"profiles": {"engagement_weights": {"search": 4}}})
    assert ov_cfg.profiles.engagement_weights == {**DEFAULT_WEIGHTS, "search": 4.0}


def test_default_weights_are_not_shared() -> None:
    """Each ProfilesConfig gets its own copy of the default weights."""
    a, b = ProfilesConfig(), ProfilesConfig()
    assert a.engagement_weights == DEFAULT_WEIGHTS
    assert a.engagement_weights is not b.engagement_weights
    assert a.engagement_weights is not DEFAULT_WEIGHTS


def test_replace_changes_one_setting() -> None:
    """Config.replace changes the given settings and keeps the others and the source."""
    cfg = dataclasses.replace(Config(), source="some.toml")
    new = cfg.replace(server={"port": 9000}, events={"custom_types": ["x"]})
    assert new.server == ServerConfig(host="127.0.0.1", port=9000)
    assert new.events.custom_types == ("x",)
    assert new.events.max_batch == EventsConfig().max_batch
    assert new.broker == cfg.broker
    assert new.source == "some.toml"
    assert cfg.server.port == 8080  # the original is unchanged


def test_replace_validates() -> None:
    """Config.replace rejects invalid values and unknown keys like load_config does."""
    cfg = Config()
    with pytest.raises(ConfigError, match=r"<defaults>: \[server\] port: expected 0-65535"):
        cfg.replace(server={"port": -5})
    with pytest.raises(ConfigError, match=r"unknown key \[broker\] nodes"):
        cfg.replace(broker={"nodes": 3})


def test_replace_engagement_weights_merge_like_load_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Config.replace merges engagement weights with the defaults, as load_config does."""
    monkeypatch.chdir(tmp_path)
    change = {"engagement_weights": {"purchase": 9.0}}
    loaded = load_config(environ={}, overrides={"profiles": change})
    assert loaded.profiles.engagement_weights == {**DEFAULT_WEIGHTS, "purchase": 9.0}
    replaced = Config().replace(profiles=change)
    assert replaced.profiles.engagement_weights == loaded.profiles.engagement_weights


def test_frozen() -> None:
    """Config sections are frozen."""
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("url", "journal", "enabled"),
    [
        ("embedded", "auto", True),
        ("kafka://k:9092", "auto", False),
        ("embedded", "on", True),
        ("kafka://k:9092", "on", True),
        ("embedded", "off", False),
        ("kafka://k:9092", "off", False),
    ],
)
def test_journal_enabled(url: str, journal: str, enabled: bool) -> None:
    """The journal setting "auto" follows the embedded broker; on and off force it."""
    storage = StorageConfig(journal=journal)  # type: ignore[arg-type] # a str from parametrize
    cfg = Config(broker=BrokerConfig(url=url), storage=storage)
    assert cfg.journal_enabled is enabled


def test_data_path_is_absolute(tmp_path: Path) -> None:
    """data_path resolves the data directory to an absolute path."""
    cfg = Config().replace(storage={"data_dir": str(tmp_path / "a" / ".." / "d")})
    assert cfg.data_path == (tmp_path / "d").resolve()
    assert cfg.data_path.is_absolute()


def test_recommend_weights_merge_over_defaults(config_file: ConfigFile) -> None:
    """[recommend.weights] given in part keeps the defaults of the other sources."""
    cfg = load_config(config_file("[recommend.weights]\nchat = 5.0\n"), environ={})
    assert cfg.recommend.weights["chat"] == 5.0
    assert cfg.recommend.weights["covisit"] == Config().recommend.weights["covisit"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[recommend.weights]\npopularity = 1.0\n", r"\[recommend.weights\] popularity: unknown"),
        ("[recommend.weights]\nchat = -1.0\n", r"\[recommend.weights\] chat: expected >= 0"),
        ("[recommend]\ncovisit_alpha = 1.5\n", r"\[recommend\] covisit_alpha: expected 0-1"),
        ("[recommend]\nmax_per_category = -1\n", r"\[recommend\] max_per_category: expected >= 0"),
        ("[recommend]\nsimilar_ahead = -1\n", r"\[recommend\] similar_ahead: expected >= 0"),
        ("[recommend]\nseeds = 0\n", r"\[recommend\] seeds: expected a value > 0"),
        ("[embeddings]\nhnsw_threshold = 0\n", r"\[embeddings\] hnsw_threshold: expected"),
    ],
)
def test_recommend_and_embeddings_settings_are_checked(
    config_file: ConfigFile, text: str, message: str
) -> None:
    """Ranking and index settings out of range fail with the section, key and expectation."""
    with pytest.raises(ConfigError, match=message):
        load_config(config_file(text), environ={})


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[events]\npseudonymize_ids = true\nid_secret = "short"\n', "[events] id_secret"),
        ("[triggers]\nmax_offers = -1\n", "[triggers] max_offers"),
        ('[triggers]\nwebhook_url = "ftp://x"\n', "[triggers] webhook_url"),
        ("[push]\nannounce_s = 0\n", "[push] announce_s"),
    ],
)
def test_privacy_trigger_and_push_settings_are_checked(
    config_file: ConfigFile, text: str, field: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(config_file(text), environ={})


def test_a_new_model_waits_for_a_share_of_the_history() -> None:
    """retrain_interactions new interactions, and retrain_growth of those learned before."""
    m = ModelConfig()  # 20,000 and 10%
    assert m.enough_new(20_000, 100_000)
    assert not m.enough_new(19_999, 100_000)
    assert not m.enough_new(20_000, 1_000_000)  # a tenth of a large history is 100,000
    assert m.enough_new(100_000, 1_000_000)
    assert ModelConfig(retrain_growth=0.0).enough_new(20_000, 1_000_000)


def test_a_steady_flow_trains_at_most_once_per_min_interval() -> None:
    """Within retrain_min_interval_s of the last model only a doubled history trains again."""
    m = ModelConfig()  # 15 minutes
    assert not m.enough_new(20_000, 100_000, age_s=600.0)
    assert m.enough_new(20_000, 100_000, age_s=900.0)
    assert m.enough_new(100_000, 100_000, age_s=10.0)  # as many new as learned: a backfill
    assert m.enough_new(25_000, 5_000, age_s=10.0)  # a young shop
    assert not m.enough_new(19_999, 100_000, age_s=10_000.0)  # never with too few new
    assert ModelConfig(retrain_min_interval_s=0.0).enough_new(20_000, 100_000, age_s=0.0)


def test_retrain_growth_may_be_zero_not_negative(config_file: ConfigFile) -> None:
    """retrain_growth accepts 0 (a fixed count) and rejects negatives."""
    assert load_config(config_file("[model]\nretrain_growth = 0\n"), environ={})
    with pytest.raises(ConfigError, match=r"retrain_growth: expected >= 0, got -0\.5"):
        load_config(config_file("[model]\nretrain_growth = -0.5\n"), environ={})
    assert load_config(config_file("[model]\nretrain_min_interval_s = 0\n"), environ={})
    with pytest.raises(ConfigError, match=r"retrain_min_interval_s: expected >= 0"):
        load_config(config_file("[model]\nretrain_min_interval_s = -1\n"), environ={})


def test_background_share_is_a_share_of_time(config_file: ConfigFile) -> None:
    """background_share takes more than 0 and up to 1; anything else is named and refused."""
    cfg = load_config(config_file("[model]\nbackground_share = 0.25\n"), environ={})
    assert cfg.model.background_share == 0.25
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match=r"\[model\] background_share: expected more than 0"):
            load_config(config_file(f"[model]\nbackground_share = {bad}\n"), environ={})
