"""The learned collaborative model: trained in the background, swapped in whole, kept on disk.

The profile agent keeps every item interaction in the history (`personify.tables.history`) and
tells `note_interactions` how many it added. The trainer checks every ``[model]
check_interval_s`` and trains a new model (`personify.embeddings.collab.train_als`) when:

- there is no model yet and the history holds at least ``min_interactions``, or
- ``retrain_interactions`` interactions arrived since the last model (a backfill), and at
  least ``retrain_growth`` of the history it learned from (`ModelConfig.enough_new`), with the
  last model ``retrain_min_interval_s`` old or the history doubled since (a steady flow into a
  history of a fixed window would otherwise train every few minutes, and each new model has
  every list computed ahead ranked again), or
- ``retrain_interval_s`` passed since the last model and any interaction arrived.

A tuning run (`personify.agents.tuning`) follows a training when one is due, but not while a
backfill is pouring in: when the history grew by more than `tuning.GROWING` of itself during the
training or in the check interval before it, the tuning waits until one check interval passes
with less growth than that (or `TUNE_WAIT_MAX_S` passed), then a training on all of it and the
tuning run at once. A burst that ends with more than that share not yet learned trains again
at the next quiet check. So a bulk backfill is tuned on once, on the whole of it, minutes after
it ends, without a command.

The history is read from a RocksDB snapshot on the event loop itself, 512 rows (about a
millisecond) at a time with a rest of 4 ms after each: read on a thread, it made every socket call
of the loop wait for the interpreter lock, and pushes waited 100 ms and more at the start of
each training. The arrays are built on a thread, and the fit (`personify.agents.training.fit`)
runs in a child process at background priority with one BLAS/OpenMP thread, as tuning does
(`_tune_elsewhere`): ingestion and serving keep the interpreter lock and go first for the
cores, and what the fit allocates goes back when the child ends. While visitors' events
arrive, both children can also be held to ``[model] background_share`` of the time
(`Trainer.background_share`; not by default). The new model is saved under
``<data_dir>/model`` (atomically) and then swapped in: lists ranked from then on use it, and
lists computed ahead are recomputed. At start the saved model is loaded, so a restart serves
the same model at once. Rows more than ``history_days`` older than the newest interaction are
deleted as training finds them.

With several workers (Kafka), each trains on the visitors of the partitions it holds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import mode
import numpy as np
import numpy.typing as npt
import orjson

from personify.agents.catalog import embeddings
from personify.agents.evaluation import History
from personify.agents.ranker import Ranker
from personify.agents.training import Fitted, fit_in_child, run_in_child
from personify.agents.tuning import (
    GROWING,
    TUNE_WAIT_MAX_S,
    apply_setting,
    setting_of,
    settled,
    tune_in_child,
)
from personify.embeddings.collab import CollabModel
from personify.engine.app import app, current_config
from personify.engine.config import Config, RecommendConfig
from personify.engine.files import write_json
from personify.engine.logging import get_logger
from personify.engine.metrics import (
    BACKGROUND_SECONDS,
    MODEL_INTERACTIONS,
    MODEL_TRAINED_AT,
    MODEL_TRAININGS,
    QUALITY_NDCG,
    TUNINGS,
)
from personify.engine.models import format_ts
from personify.engine.retry import until_done
from personify.tables import history, profiles, store
from personify.tables.catalog import catalog
from personify.tables.propensity import Propensity

__all__ = [
    "Trainer",
    "current_model",
    "current_ranker",
    "current_recommend",
    "current_repeat",
    "model_changing",
    "note_interactions",
    "on_swap",
    "promote",
    "quality_status",
    "request_run",
    "shop_clock",
    "trainer",
]

_log = get_logger(__name__)
#: The history read is made into arrays here, beside the event loop (the fit itself runs in a
#: child process: `personify.agents.training`).
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
#: No visitor's event applied for this long is a quiet moment (`Trainer.background_share`).
_QUIET_S = 2.0
#: Expired history rows deleted per write.
_DELETE_CHUNK = 5000


#: History rows read per slice of the event loop (about a millisecond), and the rest after
#: each slice: the read takes about a fifth of the loop. (A slice at every turn of the loop
#: made each turn a millisecond longer, and a push takes many turns: pushes waited 100-170 ms
#: while 150,000 rows were read.)
_SCAN_SLICE = 512
_SCAN_PAUSE_S = 0.004


@dataclass(frozen=True, slots=True)
class _Run:
    """What one training run found and made."""

    model: CollabModel | None
    repeat: history.RepeatStats | None
    #: Purchase and churn scores learned on the same history (None: too short or small).
    propensity: Propensity | None
    interactions: int
    rows: History | None
    expired: dict[int, list[bytes]]
    seconds: float


async def _train(
    scan: history.Scan, cfg: Config, started: float, share: Callable[[], float] | None
) -> _Run:
    """Fit a model on the history read (None: too little history), in a process of its own.

    ``share``: the share of its time the process may run (`Trainer.background_share`; None:
    not paced).
    """
    rows, expired = await asyncio.get_running_loop().run_in_executor(_EXECUTOR, scan.result)
    if len(rows) < cfg.model.min_interactions:
        return _Run(None, None, None, len(rows), None, expired, time.perf_counter() - started)
    fitted: Fitted = await run_in_child(
        fit_in_child, (rows, cfg), "personify-training", share=share
    )
    return _Run(
        fitted.model,
        fitted.repeat,
        fitted.propensity,
        len(rows),
        fitted.rows.with_users(rows.users),
        expired,
        time.perf_counter() - started,
    )


async def _tune_elsewhere(
    rows: History,
    cfg: Config,
    setting: dict[str, float],
    vectors: tuple[list[str], npt.NDArray[np.float32]] | None,
    category_of: dict[str, str | None],
    progress: Callable[[int, int, float], None],
    ranker: str | None = None,
    share: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """`tuning.tune_and_score` in a child process, which is killed if this is cancelled.

    Tuning is Python for a minute or more: on a thread it would hold the interpreter lock
    against ingestion and serving half the time; a process of its own (at background priority)
    takes the other core instead. Raises what the child raised (ValueError: too little
    history), or RuntimeError if it died.
    """
    result: dict[str, Any] = await run_in_child(
        tune_in_child,
        (rows, cfg, setting, vectors, category_of, ranker),
        "personify-tuning",
        progress,
        share,
    )
    return result


class Trainer(mode.Service):  # type: ignore[misc] # mode is untyped
    """Loads the saved model, trains new ones when due, and holds the one in use."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        cfg = current_config()
        self.directory = cfg.data_path / "model"
        self.model: CollabModel | None = None
        self.repeat: history.RepeatStats | None = None
        #: The purchase and churn scores in use (None: not learned yet).
        self.propensity: Propensity | None = None
        #: Interactions added since the last run (and in all, as last counted).
        self.pending = 0
        self.interactions = 0
        self.last_run: dict[str, Any] | None = None
        self.running = False
        self._checked_once = False
        #: The tuned [recommend] setting in use, the runs so far (newest last), and whether one
        #: runs now.
        self.setting: dict[str, float] = {}
        self.recommend: RecommendConfig = current_config().recommend
        #: The learned ranker in use (None: the blend's order).
        self.ranker: Ranker | None = None
        self.tunings: list[dict[str, Any]] = []
        self.tuning = False
        #: Trials done and to do in the tuning run in progress.
        self.progress: tuple[int, int] = (0, 0)
        #: A training and tuning run was asked for (`request_run`).
        self.forced = False
        #: The newest event time seen (applied since start, or in the history last trained on).
        self.latest_ms = 0
        #: Since when a due tuning waits for the history to stop growing (None: none waits),
        #: and the pending count at the last check (to see the growth per interval).
        self.tune_waiting: float | None = None
        self._pending_at_check = 0
        #: The history of the last training while a tuning waits for it to settle (tuned as it
        #: is when nothing arrived since).
        self._waiting_rows: History | None = None
        #: Interactions that arrived in the check interval before the last check.
        self._grown = 0
        #: When visitors' events were last applied (`time.monotonic`; see `background_share`).
        self.active_at = -math.inf

    def background_share(self) -> float:
        """The share of its time a training or tuning process may run now.

        ``[model] background_share`` while visitors' events arrive (any applied in the last
        `_QUIET_S`), all of it in a quiet moment (a backfill just ended: the engine trains and
        tunes as fast as it can).
        """
        if time.monotonic() - self.active_at > _QUIET_S:
            return 1.0
        return current_config().model.background_share

    def _pacing(self) -> Callable[[], float] | None:
        """`background_share` where the children are paced at all (a configured share below 1)."""
        return self.background_share if current_config().model.background_share < 1.0 else None

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
        self.propensity = await asyncio.to_thread(_load_propensity, self.directory)
        if model is not None:
            self._use(model, await asyncio.to_thread(_load_repeat, self.directory))
            self.latest_ms = max(
                self.latest_ms, await asyncio.to_thread(_load_clock, self.directory)
            )
            _log.info("model loaded", items=len(model), interactions=model.interactions)
        saved = await asyncio.to_thread(_load_tuning, self.directory)
        if saved is not None:
            self.tunings = saved["runs"]
            ranker = None
            if saved.get("ranker") and current_config().tune.ranker:
                try:
                    ranker = Ranker.from_text(saved["ranker"])
                except Exception:
                    _log.exception("saved ranker unreadable; the blend ranks until the next tuning")
            self._apply(saved["setting"], ranker)

    def _apply(self, setting: dict[str, float], ranker: Ranker | None) -> None:
        """Rank with ``setting`` and ``ranker`` from now on (pinned names keep their values)."""
        cfg = current_config()
        mine = {k: v for k, v in setting.items() if k not in cfg.tune.pinned}
        self.setting = mine
        self.recommend = apply_setting(cfg.recommend, mine)
        self.ranker = ranker
        if self.model is not None:
            for listener in _listeners:
                listener(self.model)

    def promote(self, setting: Mapping[str, float], ranker: bool) -> None:
        """Rank with ``setting`` applied over the current one from now on (kept on disk).

        ``ranker``: keep re-ordering with the learned ranker (False: the blend's order).
        """
        self._apply({**self.setting, **setting}, self.ranker if ranker else None)
        _save_tuning(
            self.setting,
            self.tunings,
            self.directory,
            None if self.ranker is None else self.ranker.to_text(),
        )

    def tune_due(self, interactions: int) -> bool:
        """Whether a tuning run is due after a training on ``interactions``."""
        cfg = current_config().tune
        if not cfg.enabled:
            return False
        if not self.tunings:
            return True
        last = self.tunings[-1]
        age_s = time.time() - _epoch_s(last["tuned_at"])
        return age_s >= cfg.interval_s or interactions >= 2 * int(last["interactions"])

    async def tune(self, rows: History) -> dict[str, Any] | None:
        """Run one tuning now (in a process of its own); apply its setting if it won."""
        cfg = current_config()
        service = embeddings()
        if not service.index_ready.is_set():
            # The item text vectors are still being built (the text model loads at start): a
            # tuning without them would choose for lists ranked without the content source.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(service.index_ready.wait(), TUNE_WAIT_MAX_S)
        vectors = (
            await asyncio.to_thread(service.index.vectors, rows.items)
            if service.index_ready.is_set()
            else None
        )
        view = catalog()
        category_of = {item: view.category_of(item) for item in rows.items}
        self.tuning = True
        self.progress = (0, cfg.tune.trials)

        def progress(done: int, total: int, _best: float) -> None:
            self.progress = (done, total)

        began = time.perf_counter()
        try:
            run = await _tune_elsewhere(
                rows,
                cfg,
                dict(self.setting),
                vectors,
                category_of,
                progress,
                None if self.ranker is None else self.ranker.to_text(),
                self._pacing(),
            )
        except ValueError as exc:  # too little history to validate on
            _log.warning("no tuning yet", reason=str(exc), interactions=len(rows))
            TUNINGS.labels("skipped").inc()
            return None
        except Exception:
            _log.exception("tuning failed; tried again after the next training")
            TUNINGS.labels("failed").inc()
            return None
        finally:
            self.tuning = False
            BACKGROUND_SECONDS.labels("tuning").inc(time.perf_counter() - began)
        learned = run.pop("ranker_model", None)
        self.tunings = [*self.tunings, run][-_TUNINGS_KEPT:]
        choice = (run.get("ranker") or {}).get("choice", "blend")
        ranker = (
            Ranker.from_text(learned)
            if learned is not None
            else self.ranker
            if choice == "current"
            else None
        )
        applied = run["improved"] or ranker is not self.ranker
        if applied:
            self._apply(run["setting"], ranker)
        TUNINGS.labels("applied" if applied else "kept").inc()
        for protocol, methods in run["holdout"].items():
            for method, metrics in methods.items():
                QUALITY_NDCG.labels(protocol, method).set(metrics["ndcg10"])
        await asyncio.to_thread(
            _save_tuning,
            self.setting,
            self.tunings,
            self.directory,
            None if self.ranker is None else self.ranker.to_text(),
        )
        _log.info(
            "tuned",
            applied=run["improved"],
            ranker=choice,
            validation=run["validation"],
            setting=run["setting"],
            seconds=run["seconds"],
        )
        return run

    def request_run(self) -> bool:
        """Train, tune and evaluate at the next check, due or not; False if a run is going on."""
        if self.running or self.tuning or self.forced:
            return False
        self.forced = True
        return True

    def due(self, now_s: float) -> bool:
        """Whether a training run is due now."""
        m = current_config().model
        grown, self._pending_at_check = self.pending - self._pending_at_check, self.pending
        self._grown = grown
        if self.forced:
            return True
        if self.tune_waiting is not None and settled(
            grown, self.interactions, now_s - self.tune_waiting
        ):
            return True  # the history settled (or never will): train and tune on all of it
        if self.model is None:
            # Never trained: look once at start, then whenever enough may have arrived.
            if not self._checked_once:
                return True
            return self.pending > 0 and self.interactions + self.pending >= m.min_interactions
        burst_ended = grown <= 0.1 * GROWING * self.interactions
        if burst_ended and self.pending > GROWING * self.interactions:
            return True  # with a good share of it not learned yet
        age_s = now_s - self.model.trained_at_ms / 1000.0
        if m.enough_new(self.pending, self.interactions, age_s):
            return True
        return self.pending > 0 and age_s >= m.retrain_interval_s

    async def train(self) -> CollabModel | None:
        """Run one training now (on the model thread), then a tuning if one is due.

        A waiting tuning whose history settled with nothing new since its training is run on
        that history, with no training again. Returns the new model, if one was made.
        ``running`` holds until all of it is done.
        """
        self.running = True
        self._checked_once = True
        forced, self.forced = self.forced, False
        rows, self._waiting_rows = self._waiting_rows, None
        try:
            if (
                rows is not None
                and not forced
                and self.tune_waiting is not None
                and not self.pending
            ):
                self.tune_waiting = None
                await self.tune(rows)
                return None
            return await self._train_and_tune(forced)
        finally:
            self.running = False

    async def _train_and_tune(self, forced: bool) -> CollabModel | None:
        cfg = current_config()
        pending, self.pending = self.pending, 0
        self._pending_at_check = 0
        started = time.time()
        try:
            table_store = store.TableStore(profiles.table(), changelog=cfg.changelog_enabled)
            begun = time.perf_counter()
            scan = history.Scan(table_store.dbs(), keep_ms=int(cfg.model.history_days * 86_400_000))
            # Read on the event loop, a slice at a time, resting between slices.
            while not scan.step(_SCAN_SLICE):  # noqa: ASYNC110 - nothing to wait for
                await asyncio.sleep(_SCAN_PAUSE_S)
            run = await _train(scan, cfg, begun, self._pacing())
        except Exception as exc:
            self.pending += pending  # counted again at the next try
            self.last_run = {"at": format_ts(int(started * 1000)), "error": repr(exc)}
            _log.exception("model training failed; retried at the next check")
            return None
        self.interactions = run.interactions
        if run.rows is not None and len(run.rows):
            self.latest_ms = max(self.latest_ms, int(run.rows.ts_ms.max()))
        MODEL_INTERACTIONS.set(run.interactions)
        outcome = "trained" if run.model is not None else "too little history"
        self.last_run = {
            "at": format_ts(int(started * 1000)),
            "outcome": outcome,
            "interactions": run.interactions,
            "seconds": round(run.seconds, 3),
        }
        MODEL_TRAININGS.labels(outcome).inc()
        BACKGROUND_SECONDS.labels("training").inc(run.seconds)
        for partition, keys in run.expired.items():
            for i in range(0, len(keys), _DELETE_CHUNK):
                chunk: list[tuple[bytes, bytes | None]] = [
                    (key, None) for key in keys[i : i + _DELETE_CHUNK]
                ]
                write = functools.partial(table_store.put_many, partition, chunk)
                await until_done("expired history delete", write)
        if run.model is None:
            return None
        await asyncio.to_thread(_save, run.model, run.repeat, self.latest_ms, self.directory)
        if run.propensity is not None:
            await asyncio.to_thread(
                write_json, self.directory / _PROPENSITY_FILE, run.propensity.as_json()
            )
            self.propensity = run.propensity
        self._use(run.model, run.repeat)
        _log.info(
            "model trained",
            items=len(run.model),
            users=run.model.users,
            pairs=run.model.interactions,
            interactions=run.interactions,
            seconds=round(run.seconds, 2),
        )
        if run.rows is not None and (forced or self.tune_due(run.interactions)):
            waited = None if self.tune_waiting is None else time.time() - self.tune_waiting
            # Settled: little arrived while training, nor in the check interval before it.
            grown = max(self.pending, self._grown)
            if forced or settled(grown, run.interactions, waited):
                self.tune_waiting = None
                await self.tune(run.rows)
            else:
                self._waiting_rows = run.rows
                if self.tune_waiting is None:
                    self.tune_waiting = time.time()
                    _log.info("tuning waits for the history to settle", pending=self.pending)
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

    def tuning_status(self) -> dict[str, Any]:
        """The self-tuning's state, as JSON (``GET /v1/quality``)."""
        last = self.tunings[-1] if self.tunings else None
        applied = next((r for r in reversed(self.tunings) if r["improved"]), None)
        return {
            "enabled": current_config().tune.enabled,
            "running": self.tuning,
            "progress": {"trials_done": self.progress[0], "trials": self.progress[1]},
            "requested": self.forced,
            "tuned_at": None if last is None else last["tuned_at"],
            "setting": setting_of(self.recommend),
            "ranker": None
            if self.ranker is None
            else {"trees": self.ranker.trees, "importance": self.ranker.importance()},
            "pinned": list(current_config().tune.pinned),
            "applied_at": None if applied is None else applied["tuned_at"],
            "validation": {} if last is None else last["validation"],
            "runs": [{k: v for k, v in r.items() if k != "holdout"} for r in self.tunings],
        }

    def evaluation(self) -> dict[str, Any]:
        """The latest hold-out figures, as JSON (``GET /v1/quality``)."""
        if not self.tunings:
            return {}
        last = self.tunings[-1]
        return {"at": last["tuned_at"], "interactions": last["interactions"], **last["holdout"]}

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

    def propensity_status(self) -> dict[str, Any]:
        """The purchase and churn scores' hold-out figures, as JSON (``GET /v1/quality``)."""
        scores = self.propensity
        if scores is None:
            return {"trained_to": None, "targets": {}}
        return {"trained_to": format_ts(scores.trained_to_ms), "targets": scores.evaluation}


@functools.cache
def trainer() -> Trainer:
    """The process's trainer (built on first use, inside the event loop)."""
    return Trainer()


def model_changing() -> bool:
    """Whether a training or tuning run is under way: lists ranked now are ranked again soon."""
    return trainer().running


def current_model() -> CollabModel | None:
    """The model in use, or None."""
    return trainer().model


def current_recommend() -> RecommendConfig:
    """The [recommend] settings in use: the configured ones with the tuned setting applied."""
    return trainer().recommend


def quality_status() -> dict[str, Any]:
    """``GET /v1/quality``: the model, the tuning and the latest hold-out evaluation."""
    t = trainer()
    return {
        "model": t.status(),
        "tuning": t.tuning_status(),
        "evaluation": t.evaluation(),
        "propensity": t.propensity_status(),
    }


def request_run() -> bool:
    """See `Trainer.request_run`."""
    return trainer().request_run()


def promote(setting: Mapping[str, float], *, ranker: bool = True) -> None:
    """See `Trainer.promote`."""
    trainer().promote(setting, ranker)


def current_ranker() -> Ranker | None:
    """The learned ranker in use, or None (the blend's order)."""
    return trainer().ranker


def current_propensity() -> Propensity | None:
    """The purchase and churn scores in use, or None (not learned yet)."""
    return trainer().propensity


def current_repeat() -> history.RepeatStats | None:
    """How the shop's visitors re-buy, as of the model in use (None: not known yet)."""
    return trainer().repeat


_REPEAT_FILE = "repeat.json"
_PROPENSITY_FILE = "propensity.json"
_TUNING_FILE = "tuning.json"
_CLOCK_FILE = "clock.json"
#: Tuning runs kept (and shown).
_TUNINGS_KEPT = 10


def _epoch_s(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _save_tuning(
    setting: dict[str, float], runs: list[dict[str, Any]], directory: Path, ranker: str | None
) -> None:
    write_json(directory / _TUNING_FILE, {"setting": setting, "runs": runs, "ranker": ranker})


def _load_tuning(directory: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = orjson.loads((directory / _TUNING_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        _log.warning("saved tuning unreadable; tuned again after the next training")
        return None
    return data


def _save(
    model: CollabModel, repeat: history.RepeatStats | None, latest_ms: int, directory: Path
) -> None:
    """Save the model and what was learned with it (the repeat stats and clock first)."""
    if repeat is not None:
        write_json(directory / _REPEAT_FILE, repeat.as_json())
    write_json(directory / _CLOCK_FILE, {"latest_ms": latest_ms})
    model.save(directory)


def _load_clock(directory: Path) -> int:
    try:
        return int(orjson.loads((directory / _CLOCK_FILE).read_bytes())["latest_ms"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError):
        _log.warning("saved shop clock unreadable; now is used until the next event")
        return 0


def _load_propensity(directory: Path) -> Propensity | None:
    try:
        return Propensity.from_json(orjson.loads((directory / _PROPENSITY_FILE).read_bytes()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        _log.warning("saved propensity scores unreadable; learned again at the next training")
        return None


def _load_repeat(directory: Path) -> history.RepeatStats | None:
    try:
        return history.RepeatStats.from_json(orjson.loads((directory / _REPEAT_FILE).read_bytes()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        _log.warning("saved repeat stats unreadable; learned again at the next training")
        return None


def note_interactions(count: int, latest_ms: int | None = None) -> None:
    """The profile agent added ``count`` rows to the history; ``latest_ms``: its newest event."""
    t = trainer()
    t.active_at = time.monotonic()
    if count:
        t.pending += count
    if latest_ms is not None and latest_ms > t.latest_ms:
        t.latest_ms = latest_ms


def shop_clock(wall_ms: int) -> int:
    """The time lists are ranked at: the shop's newest event, if that is earlier than now.

    Decays (trending, co-visitation, buy-again) count from the shop's own last moment, so a
    backfill of old history at its real timestamps ranks as it did when it happened instead of
    fading to nothing; in a shop with live traffic it is now. Unknown (no event since start
    and no model): now.
    """
    latest = trainer().latest_ms
    return min(wall_ms, latest) if latest > 0 else wall_ms


#: Called with each model swapped in (and the one loaded at start).
_listeners: list[Callable[[CollabModel], None]] = []


def on_swap(listener: Callable[[CollabModel], None]) -> None:
    """Call ``listener`` with each new model swapped in."""
    _listeners.append(listener)


@app.service
class _TrainerHost(mode.Service):  # type: ignore[misc] # mode is untyped
    """Starts (and stops) the trainer with the worker."""

    async def on_start(self) -> None:
        await self.add_runtime_dependency(trainer())
