"""Triggers: the trigger plugins run on applied events and on due timers; their actions go out.

The profile agent hands over each event it applied, with the visitor's new profile; a service
beside it calls ``personify_on_event`` on them in order. A ``schedule`` action becomes a timer:
an internal ``$schedule`` event records it in the visitor's profile (so it survives restarts and
moves with the partition), and a Faust timer (every ``[triggers] tick_s``) calls
``personify_on_timer`` once it is due, then records that it fired (``$fired``). Every other
action passes the ``personify_allow_action`` hooks (frequency capping), reaches the visitor's
sockets and the outbound-action hooks (`deliver`), and an offer is recorded (``$sent``).

No trigger fires for a visitor without marketing consent. Each event is handed over once,
when it is first applied; a redelivered event is not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any

import mode

from personify.agents.push import deliver
from personify.engine.app import app, current_config, owns, publisher
from personify.engine.logging import get_logger
from personify.engine.metrics import PLUGIN_ERRORS, TRIGGER_ACTIONS
from personify.engine.models import Event, event_key, internal_event, new_id
from personify.engine.retry import until_done
from personify.plugins.manager import FAILED, plugins
from personify.plugins.timers import Timers
from personify.tables import profiles, store

__all__ = ["act", "fire_due", "note_timers", "queue_events"]

_log = get_logger(__name__)
_cfg = current_config()
#: (visitor, event, their profile's view) waiting for the triggers, in order.
_queue: asyncio.Queue[tuple[str, Event, dict[str, Any]]] = asyncio.Queue(maxsize=10_000)


#: The timers due on the visitors of the partitions this worker holds.
_TIMERS = Timers()


def note_timers(applied: Iterable[Event]) -> None:
    """Track the timers that applied ``$schedule``/``$fired`` events set or cleared."""
    for e in applied:
        if e["type"] == profiles.SCHEDULE:
            props = e["properties"]
            _TIMERS.add(event_key(e), props["timer"], int(props["due_ms"]))
        elif e["type"] == profiles.FIRED:
            props = e["properties"]
            _TIMERS.cancel(event_key(e), props["timer"], int(props["due_ms"]))


def queue_events(latest: Mapping[str, bytes], applied: Iterable[Event]) -> None:
    """Hand the ``applied`` events, with their visitor's new profile, to triggers.

    ``latest`` holds each visitor's new profile as stored (decoded here only for triggers).
    """
    gates = plugins()
    if not gates.has("personify_on_event"):
        return
    wanted = gates.event_types()
    now_ms = int(time.time() * 1000)
    views: dict[str, dict[str, Any] | None] = {}
    for e in applied:
        user = event_key(e)
        stored = latest.get(user)
        if stored is None or e["type"].startswith("$") or e["type"] == "consent":
            continue
        if wanted is not None and e["type"] not in wanted:
            continue
        if user not in views:
            views[user] = _view(profiles.decode(stored), now_ms)
        view = views[user]
        if view is None:
            continue  # no trigger fires for a visitor without marketing consent
        try:
            _queue.put_nowait((user, profiles.wire(e), view))
        except asyncio.QueueFull:
            _skipped(user)


_SKIP_LOG_EVERY_S = 10.0
_last_skip_log = 0.0


def _skipped(user_id: str) -> None:
    """Count an event the triggers could not take; say so at most every 10 s."""
    global _last_skip_log
    PLUGIN_ERRORS.labels("*", "personify_on_event").inc()
    now = time.monotonic()
    if now - _last_skip_log >= _SKIP_LOG_EVERY_S:
        _last_skip_log = now
        _log.error(
            "trigger queue full: events skipped by the triggers "
            '(counted in personify_plugin_errors_total{plugin="*"})',
            user_id=user_id,
        )


def _view(state: profiles.Profile, now_ms: int) -> dict[str, Any] | None:
    """The profile as plugins see it; None without marketing consent."""
    if not profiles.consents(state, "marketing", _cfg.profiles):
        return None
    return profiles.view(state, _cfg.profiles, now_ms)


_records: set[asyncio.Future[None]] = set()


def _record(etype: str, user_id: str, properties: dict[str, Any]) -> None:
    """Publish an internal bookkeeping event for ``user_id`` (applied by the profile agent).

    In the background: the triggers go on with the next event meanwhile (concurrent
    publishes travel together), and a failed publish is retried until it succeeds.
    """
    event = internal_event(
        etype,
        f"{etype}:{new_id()}",
        user_id=user_id,
        ts_ms=int(time.time() * 1000),
        properties=properties,
    )
    task = asyncio.ensure_future(
        until_done(f"{etype} publish", lambda: publisher().publish([event]))
    )
    _records.add(task)
    task.add_done_callback(_records.discard)


async def act(user_id: str, plugin: str, action: Any, view: dict[str, Any]) -> None:
    """Carry out one action a trigger returned for ``user_id``."""
    kind = action.get("type") if isinstance(action, dict) else None
    if kind == "schedule":
        timer, after_s = action.get("timer"), action.get("after_s")
        if not isinstance(timer, str) or not isinstance(after_s, int | float) or after_s < 0:
            TRIGGER_ACTIONS.labels(plugin, "schedule", "invalid").inc()
            _log.warning(
                "schedule action needs a timer name and after_s >= 0; dropped",
                plugin=plugin,
                action=repr(action),
            )
            return
        due_ms = int(time.time() * 1000 + after_s * 1000)
        _record(profiles.SCHEDULE, user_id, {"timer": timer, "due_ms": due_ms, "plugin": plugin})
        TRIGGER_ACTIONS.labels(plugin, "schedule", "sent").inc()
        return
    label = kind if isinstance(kind, str) else "?"
    if isinstance(action, dict):
        answers = await plugins().call(
            "personify_allow_action", user_id=user_id, action=action, profile=view
        )
        if any(answer is not True for _name, answer in answers):
            TRIGGER_ACTIONS.labels(plugin, label, "capped").inc()
            return
    if not await deliver(user_id, plugin, action):
        TRIGGER_ACTIONS.labels(plugin, label, "invalid").inc()
        return
    TRIGGER_ACTIONS.labels(plugin, label, "sent").inc()
    if kind == "offer":
        trigger = action.get("trigger")
        _record(
            profiles.SENT, user_id, {"trigger": trigger if isinstance(trigger, str) else plugin}
        )


async def _act_all(user_id: str, results: list[tuple[str, Any]], view: dict[str, Any]) -> None:
    for name, actions in results:
        if actions is FAILED or not actions:
            continue
        for action in actions if isinstance(actions, list) else [actions]:
            await act(user_id, name, action, view)


async def fire_due(now_ms: int) -> int:
    """Call ``personify_on_timer`` for each timer due at ``now_ms``; return how many fired."""
    fired = 0
    table = profiles.table()
    for user_id, timer, due_ms in _TIMERS.due(now_ms):
        if owns(user_id) is False:
            continue  # the partition moved: its new owner has the timer
        raw = table.get(user_id.encode())
        if raw is None:
            continue  # erased
        state = profiles.decode(raw)
        if state.get("timers", {}).get(timer) != due_ms:
            continue  # rescheduled or already fired
        view = _view(state, now_ms)
        if view is not None:
            results = await plugins().call(
                "personify_on_timer", timer=timer, user_id=user_id, profile=view, now_ms=now_ms
            )
            await _act_all(user_id, results, view)
        _record(profiles.FIRED, user_id, {"timer": timer, "due_ms": due_ms})
        fired += 1
    return fired


def _scan_timers() -> list[tuple[str, str, int]]:
    """Every timer set in the profiles this worker holds (read from RocksDB)."""
    out: list[tuple[str, str, int]] = []
    for partition_db in store.open_dbs(profiles.table()):
        for key, value in store.scan(partition_db):
            if key[:1] == b"\x00" or b'"timers":{"' not in value:
                continue  # a signal row, or a profile without timers
            for timer, due_ms in profiles.decode(value).get("timers", {}).items():
                out.append((key.decode(), timer, int(due_ms)))
    return out


@app.service
class Triggers(mode.Service):  # type: ignore[misc] # mode is untyped
    """Runs the trigger plugins on applied events, in order, and fires due timers."""

    async def on_start(self) -> None:
        """Load the plugins now, and say which."""
        names = plugins().names()
        if names:
            print(f"Plugins loaded: {', '.join(names)}", flush=True)

    async def on_stop(self) -> None:
        """Abandon hook calls still running."""
        plugins().close()

    @mode.Service.task  # type: ignore[untyped-decorator]
    async def _run(self) -> None:
        while not self.should_stop:
            user, event, view = await _queue.get()
            try:
                results = await plugins().call_on_event(event, view)
                await _act_all(user, results, view)
            except Exception:
                _log.exception("trigger actions failed", user_id=user)


@app.timer(_cfg.triggers.tick_s)  # type: ignore[untyped-decorator] # Faust is untyped
async def _tick() -> None:
    """Fire the timers now due."""
    try:
        await fire_due(int(time.time() * 1000))
    except Exception:
        _log.exception("timers failed; retried at the next tick")


_reload: set[asyncio.Task[None]] = set()


async def _reload_timers() -> None:
    """Once the tables are recovered, track the timers of every profile held now."""
    await app.tables.recovery.completed.wait()
    found = await asyncio.to_thread(_scan_timers)
    _TIMERS.clear()
    for user_id, timer, due_ms in found:
        _TIMERS.add(user_id, timer, due_ms)
    _log.info("timers loaded", timers=len(found))


async def _on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
    """Partitions moved: reload the timers (from the profiles held once restored)."""
    for task in _reload:
        task.cancel()
    task = asyncio.ensure_future(_reload_timers())
    _reload.add(task)
    task.add_done_callback(_reload.discard)


app.on_partitions_assigned.connect(_on_assigned)
