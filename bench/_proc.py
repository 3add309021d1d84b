"""What the benchmarks read about processes (from /proc), the engine (/metrics) and the run."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "add_settings_argument",
    "children",
    "cpu_model",
    "cpu_seconds",
    "parse_metrics",
    "run_record",
    "settings_env",
    "status_kb",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Label values can hold braces (route="/v1/users/{user_id}"): the labels run to the last "}".
_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)$")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` figure of /proc/PID/status (VmRSS: resident now, VmHWM: peak resident)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def disk_mib(path: Path) -> float:
    """Bytes under ``path`` in MiB (0 if it is missing; files vanishing meanwhile are skipped)."""
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total / (1 << 20)


def children(pid: int) -> list[int]:
    """The child process ids of ``pid``."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_model() -> str:
    """The CPU's model name."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus samples by ``name`` (labels summed) and by ``name{labels}``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_RE.match(line)
        if m:
            name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
            out[name] = out.get(name, 0.0) + value
            if labels:
                out[name + labels] = value
    return out


def run_record(args: Any) -> dict[str, Any]:
    """When and where a benchmark runs, with its arguments: the head of its JSON output."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "args": vars(args),
    }


def add_settings_argument(parser: argparse.ArgumentParser) -> None:
    """``--set SECTION__KEY=VALUE``, repeatable: Personify settings for the run (`settings_env`)."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION__KEY=VALUE",
        help="a Personify setting for this run (PERSONIFY_SECTION__KEY), repeatable; "
        "e.g. --set storage__journal_fsync=false",
    )


def settings_env(items: Iterable[str]) -> dict[str, str]:
    """``--set SECTION__KEY=VALUE`` arguments as the engine's PERSONIFY_* environment."""
    env = {}
    for item in items:
        key, _, value = item.partition("=")
        env["PERSONIFY_" + key.upper()] = value
    return env


#: The stages of `personify_push_stage_seconds`, in the order an event goes through them.
PUSH_STAGES = ("broker", "fold", "queue", "rank", "send")


def stage_means_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Each push stage's mean milliseconds between two parsed ``/metrics`` readings."""
    out = {}
    for stage in PUSH_STAGES:
        key = f'personify_push_stage_seconds_{{}}{{{{stage="{stage}"}}}}'
        n = after.get(key.format("count"), 0.0) - before.get(key.format("count"), 0.0)
        total = after.get(key.format("sum"), 0.0) - before.get(key.format("sum"), 0.0)
        out[stage] = 1000.0 * total / n if n > 0 else 0.0
    return out


def stage_line(stages: dict[str, float], total_ms: float) -> str:
    """The stages' means and shares of ``total_ms``, and what they leave of it.

    ``total_ms``: the client's mean from sending the event to receiving the push. What the
    stages leave is the HTTP request, the publish, and the socket's way to the client.
    """
    parts = [
        f"{name} {ms:.1f} ms ({100 * ms / total_ms:.0f}%)" if total_ms > 0 else f"{name} {ms:.1f}"
        for name, ms in stages.items()
    ]
    rest = total_ms - sum(stages.values())
    share = f" ({100 * rest / total_ms:.0f}%)" if total_ms > 0 else ""
    return ", ".join(parts) + f"; the rest {rest:.1f} ms{share} of a mean {total_ms:.1f} ms"
