"""The learned collaborative model: trained in the background, swapped in whole, kept on disk.

The profile agent keeps every item interaction in the history (`personify.tables.history`) and
tells `note_interactions` how many it added. The trainer checks every ``[model]
check_interval_s`` and trains a new model (`personify.embeddings.collab.train_als`) when:

- there is no model yet and the history holds at least ``min_interactions``, or
- ``retrain_interactions`` interactions arrived since the last model (a backfill), or
- ``retrain_interval_s`` passed since the last model and any interaction arrived.

Training runs on a thread of its own with one BLAS/OpenMP thread, so ingestion and serving keep
the other core; the history is read from a RocksDB snapshot. The new model is saved under
``<data_dir>/model`` (atomically) and then swapped in: lists ranked from then on use it, and
lists computed ahead are recomputed. At start the saved model is loaded, so a restart serves
the same model at once. Rows more than ``history_days`` older than the newest interaction are
deleted as training finds them.

With several workers (Kafka), each trains on the visitors of the partitions it holds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mode
import orjson

from personify.agents.evaluation import History, train_model
from personify.embeddings.collab import AlsSettings, CollabModel
from personify.engine.app import app, current_config
from personify.engine.config import Config
from personify.engine.logging import get_logger
from personify.engine.metrics import MODEL_INTERACTIONS, MODEL_TRAINED_AT, MODEL_TRAININGS
from personify.engine.models import format_ts
from personify.engine.retry import until_done
from personify.tables import history, profiles

__all__ = [
    "Trainer",
    "current_model",
    "current_repeat",
    "model_status",
    "note_interactions",
    "on_swap",
    "trainer",
]

_log = get_logger(__name__)
#: Training runs here: one run at a time, beside the event loop.
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
#: Expired history rows deleted per write.
_DELETE_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class _Run:
    """What one training run found and made."""

    model: CollabModel | None
    repeat: history.RepeatStats | None
    interactions: int
    expired: dict[int, list[bytes]]
    seconds: float


def _train(dbs: dict[int, Any], cfg: Config) -> _Run:
    """Read the history and fit a model (None: too little history). Runs on the thread."""
    started = time.perf_counter()
    m = cfg.model
    rows, expired = history.scan(dbs, keep_ms=int(m.history_days * 86_400_000))
    if len(rows) < m.min_interactions:
        return _Run(None, None, len(rows), expired, time.perf_counter() - started)
    repeat = history.repeat_stats(rows.user, rows.item, rows.kind, rows.ts_ms)
    settings = AlsSettings(m.factors, m.regularization, m.alpha, m.iterations)
    model = train_model(
        History.from_interactions(rows), settings, cfg.profiles.engagement_weights, threads=1
    )
    return _Run(model, repeat, len(rows), expired, time.perf_counter() - started)


class Trainer(mode.Service):  # type: ignore[misc] # mode is untyped
    """Loads the saved model, trains new ones when due, and holds the one in use."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        cfg = current_config()
        self.directory = cfg.data_path / "model"
        self.model: CollabModel | None = None
        self.repeat: history.RepeatStats | None = None
        #: Interactions added since the last run (and in all, as last counted).
        self.pending = 0
        self.interactions = 0
        self.last_run: dict[str, Any] | None = None
        self.running = False
        self._checked_once = False

    def _use(self, model: CollabModel, repeat: history.RepeatStats | None) -> None:
        self.model = model
        self.repeat = repeat
        MODEL_TRAINED_AT.set(model.trained_at_ms / 1000.0)
        for listener in _listeners:
            try:
                listener(model)
            except Exception:
                _log.exception("model swap listener failed")

    async def on_start(self) -> None:
        """Load the saved model, if any."""
        try:
            model = await asyncio.to_thread(CollabModel.load, self.directory)
        except Exception:
            _log.exception("saved model unreadable; a new one is trained", path=str(self.directory))
            return
        if model is not None:
            self._use(model, await asyncio.to_thread(_load_repeat, self.directory))
            _log.info("model loaded", items=len(model), interactions=model.interactions)

    def due(self, now_s: float) -> bool:
        """Whether a training run is due now."""
        m = current_config().model
        if self.model is None:
            # Never trained: look once at start, then whenever enough may have arrived.
            if not self._checked_once:
                return True
            return self.pending > 0 and self.interactions + self.pending >= m.min_interactions
        if self.pending >= m.retrain_interactions:
            return True
        age_s = now_s - self.model.trained_at_ms / 1000.0
        return self.pending > 0 and age_s >= m.retrain_interval_s

    async def train(self) -> CollabModel | None:
        """Run one training now (on the model thread); return the new model, if one was made."""
        cfg = current_config()
        self.running = True
        self._checked_once = True
        pending, self.pending = self.pending, 0
        started = time.time()
        try:
            store = profiles.ProfileStore(profiles.table(), changelog=cfg.changelog_enabled)
            run: _Run = await asyncio.get_running_loop().run_in_executor(
                _EXECUTOR, _train, store.dbs(), cfg
            )
        except Exception as exc:
            self.pending += pending  # counted again at the next try
            self.last_run = {"at": format_ts(int(started * 1000)), "error": repr(exc)}
            _log.exception("model training failed; retried at the next check")
            return None
        finally:
            self.running = False
        self.interactions = run.interactions
        MODEL_INTERACTIONS.set(run.interactions)
        outcome = "trained" if run.model is not None else "too little history"
        self.last_run = {
            "at": format_ts(int(started * 1000)),
            "outcome": outcome,
            "interactions": run.interactions,
            "seconds": round(run.seconds, 3),
        }
        MODEL_TRAININGS.labels(outcome).inc()
        for partition, keys in run.expired.items():
            for i in range(0, len(keys), _DELETE_CHUNK):
                chunk: list[tuple[bytes, bytes | None]] = [
                    (key, None) for key in keys[i : i + _DELETE_CHUNK]
                ]
                await until_done(
                    "expired history delete", functools.partial(store.put_many, partition, chunk)
                )
        if run.model is None:
            return None
        await asyncio.to_thread(_save, run.model, run.repeat, self.directory)
        self._use(run.model, run.repeat)
        _log.info(
            "model trained",
            items=len(run.model),
            users=run.model.users,
            pairs=run.model.interactions,
            interactions=run.interactions,
            seconds=round(run.seconds, 2),
        )
        return run.model

    @mode.Service.task  # type: ignore[untyped-decorator]
    async def _schedule(self) -> None:
        cfg = current_config()
        if not cfg.model.enabled:
            return
        await app.tables.recovery.completed.wait()
        while not self.should_stop:
            if self.due(time.time()):
                await self.train()
            await self.sleep(cfg.model.check_interval_s)

    def status(self) -> dict[str, Any]:
        """The model's state, as JSON (``GET /v1/quality``)."""
        model = self.model
        return {
            "enabled": current_config().model.enabled,
            "trained_at": None if model is None else format_ts(model.trained_at_ms),
            "interactions": self.interactions
            if model is None
            else max(self.interactions, model.interactions),
            "pending": self.pending,
            "training": self.running,
            "last_run": self.last_run,
            "repeat": None if self.repeat is None else self.repeat.as_json(),
            **({"description": model.describe()} if model is not None else {}),
        }


@functools.cache
def trainer() -> Trainer:
    """The process's trainer (built on first use, inside the event loop)."""
    return Trainer()


def current_model() -> CollabModel | None:
    """The model in use, or None."""
    return trainer().model


def current_repeat() -> history.RepeatStats | None:
    """How the shop's visitors re-buy, as of the model in use (None: not known yet)."""
    return trainer().repeat


_REPEAT_FILE = "repeat.json"


def _save(model: CollabModel, repeat: history.RepeatStats | None, directory: Path) -> None:
    """Save the model and what was learned with it (the repeat stats first)."""
    directory.mkdir(parents=True, exist_ok=True)
    if repeat is not None:
        tmp = directory / f".{_REPEAT_FILE}.tmp"
        tmp.write_bytes(orjson.dumps(repeat.as_json()))
        os.replace(tmp, directory / _REPEAT_FILE)
    model.save(directory)


def _load_repeat(directory: Path) -> history.RepeatStats | None:
    try:
        return history.RepeatStats.from_json(orjson.loads((directory / _REPEAT_FILE).read_bytes()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        _log.warning("saved repeat stats unreadable; learned again at the next training")
        return None


def note_interactions(count: int) -> None:
    """The profile agent added ``count`` rows to the history."""
    if count:
        trainer().pending += count


#: Called with each model swapped in (and the one loaded at start).
_listeners: list[Callable[[CollabModel], None]] = []


def on_swap(listener: Callable[[CollabModel], None]) -> None:
    """Call ``listener`` with each new model swapped in."""
    _listeners.append(listener)


def model_status() -> dict[str, Any]:
    """See `Trainer.status`."""
    return trainer().status()


@app.service
class _TrainerHost(mode.Service):  # type: ignore[misc] # mode is untyped
    """Starts (and stops) the trainer with the worker."""

    async def on_start(self) -> None:
        await self.add_runtime_dependency(trainer())
