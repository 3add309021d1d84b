"""The command line: clear errors for bad configuration and for a data directory in use."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

PERSONIFY = str(Path(sys.executable).with_name("personify"))


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PERSONIFY, *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


def test_unknown_config_key_names_file_and_key(tmp_path: Path) -> None:
    """A misspelt key stops the start (exit 2), naming the file, the key and the known keys."""
    cfg = tmp_path / "config.toml"
    cfg.write_text("[server]\nprot = 9000\n")
    result = _run("run", "--config", str(cfg), "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{cfg}: unknown key [server] prot" in result.stderr
    assert "port" in result.stderr


def test_bad_value_names_expected_and_got(tmp_path: Path) -> None:
    """A value of the wrong type says what was expected and what was found."""
    cfg = tmp_path / "config.toml"
    cfg.write_text('[broker]\npartitions = "four"\n')
    result = _run("run", "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "[broker] partitions: expected an integer, got 'four'" in result.stderr


def test_worker_refuses_the_embedded_broker(tmp_path: Path) -> None:
    """`personify worker` needs an external broker and says how to get one process instead."""
    result = _run("worker", "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert result.returncode == 2
    assert "kafka://host:port" in result.stderr and "personify run" in result.stderr


def test_data_directory_in_use_is_refused(engine: Any, tmp_path: Path) -> None:
    """A second engine on a running engine's data directory stops with a clear message."""
    result = _run("run", "--data-dir", str(engine.data_dir), "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "is in use by another Personify process" in result.stderr


def test_metrics_expose_lag_latency_and_sources(engine: Any, uid: str) -> None:
    """/metrics has agent lag, loop delay, request latency histograms, events by source."""
    assert engine.post_events([{"type": "page_view", "user_id": uid}])[0] == 202
    engine.wait_profile(uid, lambda p: p["counts"] == {"page_view": 1})
    status, text = engine.request("GET", "/metrics")
    assert status == 200
    assert 'personify_agent_lag{agent="profile",partition=' in text
    assert (
        'personify_http_request_seconds_bucket{le="0.005",method="POST",route="/v1/events"' in text
    )
    assert 'personify_events_accepted_total{source="http"}' in text
    assert "personify_events_applied_total" in text
    ticks = re.search(r"^personify_event_loop_delay_seconds_count (\S+)$", text, re.M)
    assert ticks and float(ticks.group(1)) >= 1, "the event loop's delay is measured"
    # A scraper that polls one counter often asks for it alone.
    names = ("personify_events_applied_total", "personify_events_accepted_total")
    query = "&".join(f"name%5B%5D={name}" for name in names)
    status, only = engine.request("GET", f"/metrics?{query}")
    samples = {line.split("{")[0].split(" ")[0] for line in str(only).splitlines()}
    assert status == 200 and samples - {"#"} == set(names), samples
    # Caught up, every partition's lag reads 0 (a round may hold several partitions).
    assert engine.post_events([{"type": "page_view", "user_id": f"{uid}-{n}"} for n in range(40)])
    engine.wait_profile(f"{uid}-39", lambda p: p["counts"] == {"page_view": 1})

    def lags() -> list[float]:
        text = str(engine.request("GET", "/metrics")[1])
        return [float(v) for v in re.findall(r"^personify_agent_lag\{[^}]*\} (\S+)$", text, re.M)]

    engine.wait_for(lambda: lags() and not any(lags()), what="every lag to read 0")
    ends = re.findall(r'^personify_routed_end_offset\{partition="\d+"\} (\S+)$', text, re.M)
    assert ends and max(float(e) for e in ends) >= 1
    # A view makes signal rows (trending, at least); once flushed they are counted as held.
    item = {"type": "product_view", "user_id": uid, "item_id": f"{uid}-item"}
    assert engine.post_events([item])[0] == 202
    engine.wait_for(
        lambda: engine.metric('personify_signal_rows_cached{what="neighbours"}') > 0,
        what="the signal rows held to be counted",
    )
    assert engine.metric('personify_signal_rows_cached{what="rows"}') >= 1


def test_embedded_broker_warns_as_a_partition_fills(engine_factory: Any, uid: str) -> None:
    """Past [broker] embedded_warn_messages a routed partition's size is logged, with the remedy."""
    eng = engine_factory(config="[broker]\nembedded_warn_messages = 3\n").start()
    for n in range(4):  # one POST, one message on the visitor's partition
        assert eng.post_events({"type": "page_view", "user_id": uid})[0] == 202
        eng.wait_profile(uid, lambda p, n=n: p["counts"] == {"page_view": n + 1})
    log = eng.log_path.read_text()
    warnings = [line for line in log.splitlines() if "embedded broker holds many" in line]
    assert len(warnings) == 1, log[-3000:]  # the next one waits for 6 messages
    assert "restart Personify" in warnings[0] and "events-routed" in warnings[0]
