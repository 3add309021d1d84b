"""The hooks a Personify plugin can implement (pluggy, project name ``personify``).

A plugin is a module or object with functions marked ``@hookimpl``; third-party plugins
declare it under ``[project.entry-points.personify]``. Hooks are synchronous and quick: each
call runs with a time limit (``[plugins] timeout_ms``); a hook that raises or runs over is
logged, counted (``personify_plugin_errors_total``) and skipped. Events and profiles are
passed as plain dicts (the wire form); treat them as read-only.

An *action*, as returned by triggers, is a dict::

    {"type": "offer", "trigger": "cart_abandonment", "payload": {...}}

It is pushed to the visitor's WebSockets as ``{"type": "offer", "seq": N, "trigger": ...,
"payload": ...}`` and handed to every ``personify_action`` hook (webhooks and the like).
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
