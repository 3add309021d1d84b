"""The hooks a Personify plugin can implement (pluggy, project name ``personify``).

A plugin is a module or object with functions marked ``@hookimpl``; third-party plugins
declare it under ``[project.entry-points.personify]``. Hooks are synchronous and quick: each
call runs with a time limit (``[plugins] timeout_ms``); a hook that raises or runs over is
logged, counted (``personify_plugin_errors_total``) and skipped. Events and profiles are
passed as plain dicts (the wire form); treat them as read-only.

An *action*, as returned by triggers, is a dict::

    {"type": "offer", "trigger": "cart_abandonment", "payload": {...}}

It is pushed to the visitor's WebSockets as ``{"type": "offer", "seq": N, "trigger": ...,
"payload": ...}`` and handed to every ``personify_action`` hook (webhooks and the like), unless
a ``personify_allow_action`` hook (frequency capping) holds it back.

A trigger can also ask to be called back later, for the same visitor::

    {"type": "schedule", "timer": "cart_abandonment", "after_s": 1800}

After ``after_s`` seconds ``personify_on_timer`` is called with ``timer`` and the visitor's
profile as it is then. Timers are kept in the visitor's profile (a later schedule of the same
timer replaces the earlier one), survive restarts and move with the visitor's partition.
"""

from __future__ import annotations

from typing import Any

import pluggy

__all__ = ["Action", "Specs", "hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("personify")
hookimpl = pluggy.HookimplMarker("personify")

Action = dict[str, Any]


class Specs:
    """Hook specifications."""

    @hookspec
    def personify_consent(self, event: dict[str, Any], profile: dict[str, Any] | None) -> bool:
        """Whether ``event`` may update the visitor's profile (personalisation).

        Called before the event is applied (``profile`` is None for now). Anything but True
        (False, an exception, a time-out) vetoes the event: it changes nothing (fail closed).
        ``consent`` events and internal ones are never gated.
        """
        raise NotImplementedError

    @hookspec
    def personify_on_event(
        self, event: dict[str, Any], profile: dict[str, Any]
    ) -> list[Action] | None:
        """A trigger: actions for the visitor after ``event`` was applied to ``profile``."""
        raise NotImplementedError

    @hookspec
    def personify_action(self, user_id: str, action: Action) -> None:
        """An outbound action for ``user_id`` (a webhook, a message queue, a log)."""
        raise NotImplementedError

    @hookspec
    def personify_on_timer(
        self, timer: str, user_id: str, profile: dict[str, Any], now_ms: int
    ) -> list[Action] | None:
        """A timer scheduled for the visitor is due: actions for them (check ``timer``)."""
        raise NotImplementedError

    @hookspec
    def personify_allow_action(self, user_id: str, action: Action, profile: dict[str, Any]) -> bool:
        """Whether ``action`` may go to the visitor now (frequency capping and the like).

        Called for every action but ``schedule``; anything but True (False, an exception, a
        time-out) holds the action back.
        """
        raise NotImplementedError

    @hookspec
    def personify_rerank(
        self, user_id: str | None, items: list[dict[str, Any]], context: dict[str, Any]
    ) -> list[str] | None:
        """A candidate filter or re-ranker: the ids of ``items`` to show, in this order.

        ``items`` are the ranked recommendations as the API shows them (``item_id``,
        ``score``, ``reasons``), a few more than will be shown; ``context`` holds ``kind``
        (``user``, ``new_visitor`` or ``similar``) and, for similar items, ``item_id``.
        None leaves the list as it is; ids not in ``items`` are ignored. Runs on the ranking
        thread for every list computed: keep it quick. A failure or a time-out leaves the list
        as it is (and is counted).
        """
        raise NotImplementedError
