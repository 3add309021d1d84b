"""One training run's work, and the child processes that training and tuning run in.

`fit` learns, from the interaction history read by the trainer (`personify.agents.model`),
what a training makes: the collaborative model, the shop's re-buying (`RepeatStats`), the
purchase and churn scores, and the history as arrays for a tuning that follows. The engine
runs it in a process of its own (`fit_in_child` through `run_in_child`), at background
priority: on a thread of the engine, the numpy and Python parts of a training (a second or
more at 100,000 interactions) held the interpreter lock against ingestion and serving, and the
fit took a whole core from them at their own priority. A child's memory also goes back to the
system when it ends.

`run_in_child` starts a function in a fresh interpreter (``spawn``: the engine's threads and
sockets are not copied) at background priority (`personify.engine.priority`), and reads its
messages: ``("progress", ...)`` as it goes, then ``("done", result)``, ``("too little
history", reason)`` or ``("error", traceback)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.process
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from personify.agents.evaluation import History, train_model
from personify.embeddings.collab import AlsSettings, CollabModel
from personify.engine.config import Config
from personify.engine.logging import get_logger
from personify.engine.priority import to_background
from personify.tables import history, propensity
from personify.tables.propensity import Propensity

__all__ = ["Fitted", "fit", "fit_in_child", "run_in_child"]

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Fitted:
    """What one training learned from a history (see `fit`).

    Attributes:
        model: the collaborative model (None: nothing to learn from).
        repeat: how the shop's visitors re-buy.
        propensity: purchase and churn scores (None: too short or small a history).
        rows: the history as arrays, for a tuning run.
    """

    model: CollabModel | None
    repeat: history.RepeatStats
    propensity: Propensity | None
    rows: History


def fit(rows: history.Interactions, cfg: Config) -> Fitted:
    """Learn the model, the re-buying and the propensity scores on ``rows``."""
    m = cfg.model
    repeat = history.repeat_stats(rows.user, rows.item, rows.kind, rows.ts_ms)
    settings = AlsSettings(m.factors, m.regularization, m.alpha, m.iterations)
    arrays = History.from_interactions(rows)
    model = train_model(arrays, settings, cfg.profiles.engagement_weights, threads=1)
    try:
        scores = propensity.fit(rows.user, rows.kind, rows.ts_ms)
    except Exception:  # the scores wait for the next training; the model is used meanwhile
        _log.exception("propensity scores not learned")
        scores = None
    return Fitted(model, repeat, scores, arrays)


def fit_in_child(conn: Any, rows: history.Interactions, cfg: Config) -> None:
    """`fit` in a child process: ``("done", Fitted)`` or ``("error", reason)`` on ``conn``."""
    from threadpoolctl import threadpool_limits

    to_background()  # where it was not started at that priority already
    try:
        with threadpool_limits(1):
            fitted = fit(rows, cfg)
        # The parent holds the visitors' names (it sent them): not sent back, nor made twice.
        conn.send(("done", dataclasses.replace(fitted, rows=fitted.rows.without_users())))
    except Exception:  # reported to the parent, which logs it, with where it happened
        conn.send(("error", traceback.format_exc(limit=-8)))
    finally:
        conn.close()


def _start_in_background(child: multiprocessing.process.BaseProcess) -> None:
    """Start ``child`` at background priority (`to_background`) from its first instruction.

    Its interpreter's start and imports take most of a second of CPU, which at the usual
    priority is taken from ingestion and serving. A process started from a thread inherits
    the thread's priority: a short-lived thread lowers its own and starts the child (a thread
    of the pool could not raise its priority again).
    """
    failed: list[BaseException] = []

    def start() -> None:
        to_background()
        try:
            child.start()
        except BaseException as exc:  # raised again in the caller's thread
            failed.append(exc)

    starter = threading.Thread(target=start, name=f"{child.name}-start", daemon=True)
    starter.start()
    starter.join()
    if failed:
        raise failed[0]


#: A paced child runs for ``share`` of each period of this many seconds and is paused the rest.
PACE_PERIOD_S = 0.2


async def _pace(pid: int, share: Callable[[], float], period_s: float = PACE_PERIOD_S) -> None:
    """Hold the process ``pid`` to ``share()`` of its time (1 or more: not held), until cancelled.

    Background priority is not enough where the cores are not the machine's own: on a virtual
    machine, whatever runs on the second core slows the first (measured: a loop at
    ``SCHED_IDLE`` on two vCPUs made pushes half as slow again; the same loop running a quarter
    of the time, a sixth to a third, for four times as long: ``bench/RESULTS.md``). The process
    is stopped (``SIGSTOP``) between its turns; it is always let go on the way out.
    """
    running = True
    try:
        while True:
            allowed = share()
            if allowed >= 1.0:
                if not running:
                    os.kill(pid, signal.SIGCONT)
                    running = True
                await asyncio.sleep(period_s)
                continue
            if not running:
                os.kill(pid, signal.SIGCONT)
                running = True
            await asyncio.sleep(period_s * max(allowed, 0.01))
            os.kill(pid, signal.SIGSTOP)
            running = False
            await asyncio.sleep(period_s * (1.0 - max(allowed, 0.01)))
    except ProcessLookupError:  # it ended
        return
    finally:
        if not running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def run_in_child(
    target: Callable[..., None],
    args: tuple[Any, ...],
    name: str,
    progress: Callable[..., None] | None = None,
    share: Callable[[], float] | None = None,
) -> Any:
    """Run ``target(conn, *args)`` in a child process at background priority; its result.

    ``share``: called every `PACE_PERIOD_S`, the share of its time the child may run then (see
    `_pace`; None, or where processes cannot be paused: all of it). The child is killed if this
    is cancelled. Raises what the child reported (ValueError: too little history), or
    RuntimeError if it failed or died.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=target, args=(send, *args), name=name, daemon=True)
    started = time.perf_counter()
    # Off the event loop: start() writes the arguments to the child, which reads them only once
    # its interpreter is up (half a second in which the loop would answer nothing).
    await asyncio.to_thread(_start_in_background, child)
    send.close()
    pacer = None
    if share is not None and child.pid is not None and hasattr(signal, "SIGSTOP"):
        pacer = asyncio.create_task(_pace(child.pid, share), name=f"{name}-pace")
    try:
        while True:
            try:
                # The result is unpickled on that thread too (a model builds its index there).
                message = await asyncio.to_thread(receive.recv)
            except EOFError:
                raise RuntimeError(f"{name} died (exit code {child.exitcode})") from None
            kind = message[0]
            if kind == "progress":
                if progress is not None:
                    progress(*message[1:])
            elif kind == "done":
                _log.debug("child done", name=name, seconds=round(time.perf_counter() - started, 2))
                return message[1]
            elif kind == "too little history":
                raise ValueError(message[1])
            else:
                raise RuntimeError(f"{name} failed: {message[1]}")
    finally:
        if pacer is not None:
            pacer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pacer
        if child.is_alive():
            child.kill()
        await asyncio.to_thread(child.join, 10.0)
        receive.close()
