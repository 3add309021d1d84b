"""The built-in plugins: triggers for shops, frequency capping of offers, and the webhook.

Each is an ordinary pluggy plugin, registered under its name before the installed ones, and
set up by ``[triggers]``. The three triggers are off until their setting is given (a shop
turns on the offers its pages show); frequency capping is always on, and the webhook is on
when it has a URL. ``[plugins] deny = ["name"]`` leaves any of them out.

- ``cart_abandonment``: an item added to the cart starts a timer (one per visitor); when it
  fires, an item added since moves it to ``cart_abandonment_s`` after that addition, and if
  the cart still holds items (a purchase empties the cart of what was bought) the visitor gets
  an offer naming them.
- ``browse_without_buy`` (it looks at every product view, which costs ingestion time): the
  ``browse_views``-th product viewed in one session with nothing added to the cart in it
  brings an offer of help (once per session).
- ``frequency_cap``: holds back an offer when the visitor already had ``max_offers`` in the last
  ``offer_window_s`` or one less than ``min_offer_gap_s`` ago.
- ``webhook``: POSTs each action of ``webhook_types`` to ``webhook_url`` from a thread of its
  own (a slow endpoint never delays the triggers), retried 3 times, HMAC-signed.
"""

from __future__ import annotations

import hashlib
import hmac
import queue
import threading
import time
import urllib.request
from collections import OrderedDict
from datetime import datetime
from typing import Any

import orjson

from personify.engine.config import TriggersConfig
from personify.engine.logging import get_logger
from personify.engine.metrics import WEBHOOK_CALLS
from personify.plugins.spec import Action, hookimpl

__all__ = [
    "BrowseWithoutBuy",
    "CartAbandonment",
    "FrequencyCap",
    "Webhook",
    "builtin_plugins",
]

_log = get_logger(__name__)


def _ms(iso: str | None) -> int:
    """Epoch milliseconds of a profile timestamp (0 for none)."""
    if not iso:
        return 0
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


class CartAbandonment:
    """An offer when items added to the cart are not bought within ``delay_s``."""

    TIMER = "cart_abandonment"
    event_types = frozenset({"add_to_cart"})

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    @hookimpl
    def personify_on_event(self, event: dict[str, Any], profile: dict[str, Any]) -> list[Action]:
        """An addition to the cart starts the timer (unless one runs already)."""
        if event["type"] != "add_to_cart" or self.TIMER in profile.get("timers", {}):
            return []
        return [{"type": "schedule", "timer": self.TIMER, "after_s": self.delay_s}]

    @hookimpl
    def personify_on_timer(
        self, timer: str, user_id: str, profile: dict[str, Any], now_ms: int
    ) -> list[Action]:
        """The offer, when the cart still holds what was added and nothing was added lately.

        An item added after the timer started moves the offer to ``delay_s`` after it.
        """
        if timer != self.TIMER:
            return []
        lines = profile["cart"]["items"]
        if not lines:
            return []  # bought or removed meanwhile
        latest = max(_ms(line["added_at"]) for line in lines)
        wait_s = (latest + self.delay_s * 1000 - now_ms) / 1000
        if wait_s > 0:
            return [{"type": "schedule", "timer": self.TIMER, "after_s": wait_s}]
        return [
            {
                "type": "offer",
                "trigger": self.TIMER,
                "payload": {
                    "message": "Still thinking it over? Your cart is waiting for you.",
                    "items": [line["item_id"] for line in lines],
                    "cart_total": profile["cart"]["total"],
                },
            }
        ]


class BrowseWithoutBuy:
    """An offer of help after ``views`` products viewed in a session without adding any."""

    TRIGGER = "browse_without_buy"
    event_types = frozenset({"product_view"})

    def __init__(self, views: int) -> None:
        self.views = views

    @hookimpl
    def personify_on_event(self, event: dict[str, Any], profile: dict[str, Any]) -> list[Action]:
        """The offer on exactly the ``views``-th product of the session (so once per session)."""
        if event["type"] != "product_view":
            return []
        # The profile may already hold later events of the same batch: count up to this one.
        # Timestamps are all UTC ISO 8601 of one width, so they compare as text.
        started = profile["sessions"]["current"]["started"] or ""
        this_session = [r for r in profile["recent_items"] if started <= r["ts"] <= event["ts"]]
        if any(r["type"] in ("add_to_cart", "purchase") for r in this_session):
            return []
        viewed = [r["item_id"] for r in this_session if r["type"] == "product_view"]
        if len(viewed) != self.views or event["item_id"] not in viewed:
            return []
        return [
            {
                "type": "offer",
                "trigger": self.TRIGGER,
                "payload": {
                    "message": "Need a hand choosing? Compare these or ask us anything.",
                    "items": viewed[:3],
                },
            }
        ]


class FrequencyCap:
    """Holds back offers past ``max_offers`` per ``window_s`` or within ``min_gap_s``.

    Offers sent are recorded in the visitor's profile (they survive restarts); the few sent
    since the profile passed in was read are remembered here.
    """

    def __init__(
        self, max_offers: int, window_s: float, min_gap_s: float, remember: int = 100_000
    ) -> None:
        self.max_offers = max_offers
        self.window_ms = window_s * 1000.0
        self.min_gap_ms = min_gap_s * 1000.0
        self.remember = remember
        self._recent: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    @hookimpl
    def personify_allow_action(self, user_id: str, action: Action, profile: dict[str, Any]) -> bool:
        """False for an offer over the cap; True for anything else."""
        if action.get("type") != "offer":
            return True
        now = int(time.time() * 1000)
        with self._lock:
            recorded = [_ms(o["at"]) for o in profile.get("offers_sent", ())]
            newest = max(recorded, default=0)
            # Offers allowed here since the newest one recorded in the profile.
            pending = [t for t in self._recent.get(user_id, ()) if t > newest]
            recent = [t for t in recorded + pending if now - t < self.window_ms]
            if len(recent) >= self.max_offers:
                return False
            if recent and now - max(recent) < self.min_gap_ms:
                return False
            self._recent[user_id] = [*pending, now]
            self._recent.move_to_end(user_id)
            while len(self._recent) > self.remember:
                self._recent.popitem(last=False)
        return True


class Webhook:
    """POSTs actions to a URL from a background thread, with retries and an HMAC signature."""

    RETRIES = 3

    def __init__(
        self,
        url: str,
        types: tuple[str, ...],
        secret: str,
        timeout_s: float,
        capacity: int = 10_000,
    ) -> None:
        self.url = url
        self.types = frozenset(types)
        self.secret = secret.encode()
        self.timeout_s = timeout_s
        self._queue: queue.Queue[bytes] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    @hookimpl
    def personify_action(self, user_id: str, action: Action) -> None:
        """Queue the action for the webhook (dropped, and counted, when the queue is full)."""
        if action.get("type") not in self.types:
            return
        body = orjson.dumps(
            {"user_id": user_id, "action": action, "sent_at": int(time.time() * 1000)}
        )
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            WEBHOOK_CALLS.labels("dropped").inc()
            _log.error("webhook queue full; action dropped", user_id=user_id)

    def _headers(self, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "personify-webhook"}
        if self.secret:
            digest = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
            headers["X-Personify-Signature"] = f"sha256={digest}"
        return headers

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(
            self.url, data=body, headers=self._headers(body), method="POST"
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            response.read()

    def _run(self) -> None:
        while True:
            body = self._queue.get()
            for attempt in range(1, self.RETRIES + 1):
                try:
                    self._post(body)
                except Exception as exc:
                    if attempt == self.RETRIES:
                        WEBHOOK_CALLS.labels("failed").inc()
                        _log.error("webhook failed; action dropped", url=self.url, error=str(exc))
                    else:
                        time.sleep(0.5 * 2**attempt)
                else:
                    WEBHOOK_CALLS.labels("ok").inc()
                    break


def builtin_plugins(cfg: TriggersConfig) -> list[tuple[str, object]]:
    """The built-in plugins set up by ``cfg``, as (name, plugin)."""
    out: list[tuple[str, object]] = []
    if cfg.cart_abandonment_s > 0:
        out.append(("cart_abandonment", CartAbandonment(cfg.cart_abandonment_s)))
    if cfg.browse_views > 0:
        out.append(("browse_without_buy", BrowseWithoutBuy(cfg.browse_views)))
    out.append(
        ("frequency_cap", FrequencyCap(cfg.max_offers, cfg.offer_window_s, cfg.min_offer_gap_s))
    )
    if cfg.webhook_url:
        out.append(
            (
                "webhook",
                Webhook(
                    cfg.webhook_url, cfg.webhook_types, cfg.webhook_secret, cfg.webhook_timeout_s
                ),
            )
        )
    return out
