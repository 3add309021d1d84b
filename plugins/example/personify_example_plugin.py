"""An example Personify plugin package.

``gift_wrap`` is a trigger: when a visitor searches for a gift, it offers free gift wrapping.
The offer reaches the visitor's open WebSockets as::

    {"type": "offer", "seq": 12, "trigger": "gift_wrap", "plugin": "gift_wrap",
     "payload": {"message": "...", "searches": 3}}

``no_tracking`` is a consent gate: an event marked ``"no_tracking": true`` changes nothing.

``sale_first`` is a re-ranker: items whose id starts with ``sale-`` move to the front of every
list and items whose id starts with ``hidden-`` are never shown.

``always_fails`` and ``hangs`` misbehave on purpose: Personify logs, counts and skips them
(``personify_plugin_errors_total``) and every other plugin and push goes on. Leave them out
with ``[plugins] allow = ["gift_wrap"]`` (or ``deny``).
"""

from __future__ import annotations

import time
from typing import Any

from personify.plugins.spec import hookimpl


class GiftWrap:
    """Offer gift wrapping to visitors searching for a gift."""

    @hookimpl
    def personify_on_event(
        self, event: dict[str, Any], profile: dict[str, Any]
    ) -> list[dict[str, Any]] | None:
        """An offer when the event is a search mentioning a gift."""
        if event["type"] != "search":
            return None
        if "gift" not in event["properties"]["query"].lower():
            return None
        return [
            {
                "type": "offer",
                "trigger": "gift_wrap",
                "payload": {
                    "message": "Free gift wrapping on this order",
                    "searches": len(profile.get("recent_searches", [])),
                },
            }
        ]


class SaleFirst:
    """A re-ranker: sale items first, hidden items never."""

    @hookimpl
    def personify_rerank(
        self, user_id: str | None, items: list[dict[str, Any]], context: dict[str, Any]
    ) -> list[str]:
        """The ids in the new order."""
        ids = [i["item_id"] for i in items if not i["item_id"].startswith("hidden-")]
        return sorted(ids, key=lambda i: not i.startswith("sale-"))  # stable: sale- first


class AlwaysFails:
    """A trigger and a re-ranker that raise every time."""

    @hookimpl
    def personify_on_event(self, event: dict[str, Any], profile: dict[str, Any]) -> None:
        """Raise."""
        raise RuntimeError("this plugin always fails")

    @hookimpl
    def personify_rerank(
        self, user_id: str | None, items: list[dict[str, Any]], context: dict[str, Any]
    ) -> list[str]:
        """Raise."""
        raise RuntimeError("this re-ranker always fails")


class Hangs:
    """A trigger that blocks far past the time limit when a visitor searches for "hang"."""

    @hookimpl
    def personify_on_event(self, event: dict[str, Any], profile: dict[str, Any]) -> None:
        """Block for 3 s on a search for "hang"."""
        if event["type"] == "search" and event["properties"]["query"] == "hang":
            time.sleep(3)


class NoTracking:
    """A consent gate: events marked ``"properties": {"no_tracking": true}`` change nothing."""

    @hookimpl
    def personify_consent(self, event: dict[str, Any], profile: dict[str, Any] | None) -> bool:
        """False for an event that asks not to be tracked."""
        return not event["properties"].get("no_tracking", False)


gift_wrap = GiftWrap()
sale_first = SaleFirst()
no_tracking = NoTracking()
always_fails = AlwaysFails()
hangs = Hangs()
