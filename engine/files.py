"""Small files the engine keeps beside its tables (the model's state, the experiments)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

__all__ = ["write_json"]


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` whole (a crash leaves the old file or the new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(orjson.dumps(value))
    os.replace(tmp, path)
