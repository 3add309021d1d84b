"""Lists served, recorded as exposures, and the KPIs they earn (see `personify.tables.attribution`).

A list served over HTTP or pushed on a WebSocket is noted here (a tuple appended: nothing on
the request's way is slower). Every ``[attribution] flush_interval_s`` the noted lists become
`EXPOSURE` events, published like the visitors' own events (to the journal, then routed to the
visitor's partition), where the profile agent keeps them in the visitor's attribution row and
joins the visitor's next clicks, cart additions and purchases to them.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterable
from datetime import date, timedelta
from typing import Any

import mode
import orjson

from personify.engine.app import app, current_config, publisher
from personify.engine.logging import get_logger
from personify.engine.metrics import EXPOSURES_SENT
from personify.engine.models import Event, internal_event, new_id
from personify.engine.retry import until_done
from personify.tables import attribution, profiles, store

__all__ = ["Recorder", "experiment_counts", "kpis", "recorder"]

_log = get_logger(__name__)

#: Lists noted and not yet sent on, at most; past this the oldest are dropped (with a warning):
#: only when the broker has been unreachable for a long while.
_MAX_PENDING = 200_000


def _sources(listed: list[dict[str, Any]]) -> list[str]:
    """Each item's candidate source: the kind of its strongest reason."""
    return [
        x["reasons"][0].get("kind", "unknown") if x.get("reasons") else "unknown" for x in listed
    ]


class Recorder:
    """The lists served and not yet recorded (on the event loop only)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        #: (visitor, recommendation id, items JSON, surface, variant, when in ms)
        self._pending: list[tuple[str, str, bytes, str, str, int]] = []
        #: Exposure events a send did not get onto the broker: sent first on the next turn.
        self._unsent: list[Event] = []
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._pending) + len(self._unsent)

    def served(
        self,
        visitor: str,
        rec_id: str,
        items: bytes,
        surface: str,
        variant: str = attribution.DEFAULT_VARIANT,
    ) -> None:
        """Note that ``visitor`` was served the list ``rec_id`` (its items as on the wire)."""
        if not self.enabled or not visitor:
            return
        self._pending.append((visitor, rec_id, items, surface, variant, int(time.time() * 1000)))
        if len(self._pending) > _MAX_PENDING:
            drop = len(self._pending) - _MAX_PENDING
            del self._pending[:drop]
            self.dropped += drop

    def forget(self, visitor: str) -> None:
        """Drop what is noted for ``visitor`` (an erasure)."""
        self._pending = [p for p in self._pending if p[0] != visitor]
        self._unsent = [e for e in self._unsent if e.get("anonymous_id") != visitor]

    def take(self) -> list[Event]:
        """The lists noted so far, as exposure events; they are no longer noted."""
        pending, self._pending = self._pending, []
        events: list[Event] = []
        for visitor, rec_id, items, surface, variant, ts_ms in pending:
            listed: list[dict[str, Any]] = orjson.loads(items)
            if not listed:
                continue
            events.append(
                internal_event(
                    attribution.EXPOSURE,
                    new_id(),
                    user_id=None,  # a linked anonymous visitor's go to the user they became
                    anonymous_id=visitor,
                    ts_ms=ts_ms,
                    properties={
                        "recommendation_id": rec_id,
                        "variant": variant,
                        "surface": surface,
                        "items": [x["item_id"] for x in listed],
                        "sources": _sources(listed),
                    },
                )
            )
        return events

    def drain(self) -> list[Event]:
        """What is still to send: the events a send left over, then the lists noted since."""
        events, self._unsent = self._unsent + self.take(), []
        return events

    async def send(self) -> int:
        """Publish the exposures noted so far (retried until the broker takes them).

        Should the publishing fail all the same (or be cancelled), the events are kept and
        sent first on the next call.
        """
        events = self.drain()
        if events:
            try:
                await until_done(
                    "exposures publish", functools.partial(publisher().publish, events)
                )
            except BaseException:
                self._unsent = events[-_MAX_PENDING:]
                self.dropped += len(events) - len(self._unsent)
                raise
            EXPOSURES_SENT.inc(len(events))
        if self.dropped:
            _log.warning("exposures dropped: the broker did not take them", count=self.dropped)
            self.dropped = 0
        return len(events)


@functools.cache
def recorder() -> Recorder:
    """This worker's recorder."""
    return Recorder(current_config().attribution.enabled)


@app.service
class _ExposureSender(mode.Service):  # type: ignore[misc] # mode is untyped
    """Sends the lists noted every ``[attribution] flush_interval_s``, and the last on stop.

    A send may take longer than the interval under load (the journal, the broker): the next one
    starts after it, with whatever was noted meanwhile.
    """

    @mode.Service.task  # type: ignore[untyped-decorator]
    async def _run(self) -> None:
        interval = current_config().attribution.flush_interval_s
        while not self.should_stop:
            await self.sleep(interval)
            try:
                await recorder().send()
            except Exception:  # never stop recording: the next turn sends them again
                _log.exception("exposures not sent; kept for the next turn")

    async def on_stop(self) -> None:
        with contextlib.suppress(Exception):  # the broker is already gone: nothing to do
            events = recorder().drain()
            if events:
                await publisher().publish(events)


def _days(first: date, last: date) -> Iterable[str]:
    day = first
    while day <= last:
        yield day.isoformat()
        day += timedelta(days=1)


def kpis(first: date, last: date, by: attribution.Grouping) -> dict[str, Any]:
    """The KPIs of the UTC days ``first`` to ``last``, grouped ``by`` (`attribution.report`).

    Summed over the partitions this worker holds (with several workers, each answers for its
    own visitors).
    """
    dbs = store.TableStore(profiles.table()).dbs().values()
    rows = attribution.kpi_rows(dbs, list(_days(first, last)))
    return {"from": first.isoformat(), "to": last.isoformat(), "by": by} | attribution.report(
        rows, by
    )


def experiment_counts(experiment: str) -> dict[str, dict[str, float]]:
    """``experiment``'s counts per variant since it started, over the partitions held here."""
    return attribution.experiment_counts(
        store.TableStore(profiles.table()).dbs().values(), experiment
    )
