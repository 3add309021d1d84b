"""The profiles table: one live profile per visitor, folded from their events.

The pure functions here (`new_profile`, `apply_events`, `view`) hold all profile logic and
know nothing of Faust; `table()` is the RocksDB-backed, changelog-backed Faust table that
the profile agent writes (and the API reads). A profile is stored as one JSON document.

Exactly-once effect: replay and redelivery skip by the partition's applied position, stored
in the same write batch (`personify.tables.positions`). For a client that sends an event
twice (a retry after a timeout), a profile also remembers the ids of the last
``dedup_window`` events applied to it, as fixed-size digests in one string, and skips an event
whose id is among them.
"""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Callable, Iterable
from hashlib import blake2b
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from personify.engine.config import ProfilesConfig
from personify.engine.models import PURPOSES, Event, format_ts
from personify.tables.attribution import EXPOSURE
from personify.tables.store import bytes_table

__all__ = [
    "ERASE",
    "FIRED",
    "LINK",
    "MERGE",
    "SCHEDULE",
    "SENT",
    "VECTOR_KEY",
    "Profile",
    "apply_events",
    "chat_vector",
    "decode",
    "encode",
    "id_digest",
    "merge",
    "new_profile",
    "seen_ids",
    "snapshot",
    "table",
    "view",
    "wire",
]

Profile = dict[str, Any]

#: Internal event carrying an anonymous visitor's profile to the user it was linked to.
MERGE = "$merge"
#: Internal event telling an anonymous visitor's profile which user it now belongs to.
LINK = "$link"
#: Erase the visitor: the profile is deleted (a tombstone in the changelog).
ERASE = "$erase"
#: A trigger's timer for the visitor (``timer``, ``due_ms``): a later one replaces it.
SCHEDULE = "$schedule"
#: The timer (``timer``, ``due_ms``) fired: it is cleared unless rescheduled since.
FIRED = "$fired"
#: An offer (``trigger``) was sent to the visitor (frequency capping reads these).
SENT = "$sent"
#: Trigger bookkeeping: applied whatever the visitor's consent (it records what the engine did).
_BOOKKEEPING = frozenset({SCHEDULE, FIRED, SENT})
#: Offers remembered per visitor.
_OFFERS_KEPT = 50

#: An event may carry its text's embedding under this key while it is folded (never stored).
VECTOR_KEY = "_vector"

_HOUR_MS = 3_600_000
#: Session intervals kept exactly (late events are placed among them); older ones are counted.
_MAX_SESSIONS = 200
_ITEM_TYPES = frozenset({"product_view", "add_to_cart", "remove_from_cart", "click"})


def wire(e: Event) -> Event:
    """The event without what folding attached to it (its chat vector)."""
    if VECTOR_KEY in e:
        return {k: v for k, v in e.items() if k != VECTOR_KEY}
    return e


def new_profile(user_id: str) -> Profile:
    """An empty profile for ``user_id``."""
    return {
        "user_id": user_id,
        "anonymous_ids": [],
        "counts": {},
        "first_seen": None,
        "last_seen": None,
        "sessions_closed": 0,
        "session_list": [],
        "hours": {},
        "orders": 0,
        "spend": 0.0,
        "spend_by_currency": {},
        "recent_items": [],
        "cart": {},
        "searches": [],
        "affinity": {},
        "engagement": 0.0,
        "seen": "",
    }


def encode(profile: Profile) -> bytes:
    """Serialise a profile for the table."""
    return orjson.dumps(profile)


def decode(data: bytes) -> Profile:
    """Deserialise a profile from the table."""
    profile: Profile = orjson.loads(data)
    return profile


def _categories(path: str) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b", "a/b/c"]``: a visit counts for the parents too."""
    parts = [p for p in path.strip("/").split("/") if p]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _decay(score: float, dt_ms: float, half_life_s: float) -> float:
    return score * math.pow(0.5, dt_ms / (half_life_s * 1000.0))


def _add_affinity(p: Profile, category: str, weight: float, ts: int, cfg: ProfilesConfig) -> None:
    if weight <= 0:
        return
    aff = p["affinity"]
    for cat in _categories(category):
        score, ref = aff.get(cat, (0.0, ts))
        if ts >= ref:
            aff[cat] = [_decay(score, ts - ref, cfg.affinity_half_life_s) + weight, ts]
        else:  # a late event: its weight is decayed to the reference time instead
            aff[cat] = [score + _decay(weight, ref - ts, cfg.affinity_half_life_s), ref]
    _cap_affinity(aff, ts, cfg)


def _cap_affinity(aff: dict[str, list[Any]], ts: int, cfg: ProfilesConfig) -> None:
    """Keep the ``affinity_categories`` strongest of ``aff`` (decayed to ``ts``; ties by name)."""
    excess = len(aff) - cfg.affinity_categories
    if excess <= 0:
        return
    half_life = cfg.affinity_half_life_s
    weakest = sorted(aff, key=lambda cat: (_decay(aff[cat][0], ts - aff[cat][1], half_life), cat))
    for cat in weakest[:excess]:
        del aff[cat]


def _newest_first(entries: list[dict[str, Any]], entry: dict[str, Any], limit: int) -> list[Any]:
    """Insert ``entry`` by event time (a late event lands where it belongs), keep ``limit``."""
    i = 0
    while i < len(entries) and entries[i]["ts"] > entry["ts"]:
        i += 1
    return [*entries[:i], entry, *entries[i:]][:limit]


def _touch_item(p: Profile, item_id: str, etype: str, ts: int, cfg: ProfilesConfig) -> None:
    items = p["recent_items"]
    for old in items:
        if old["item_id"] == item_id:
            if old["ts"] > ts:
                return  # a newer interaction with this item is already recorded
            items = [r for r in items if r["item_id"] != item_id]
            break
    entry = {"item_id": item_id, "type": etype, "ts": ts}
    p["recent_items"] = _newest_first(items, entry, cfg.recent_items)


def _add_bought(bought: dict[str, list[int]], item: str, times: int, ts: int, cap: int) -> None:
    """Count ``times`` purchases of ``item`` at ``ts`` in ``bought`` (item -> [times, last ts])."""
    entry = bought.get(item)
    if entry is None:
        bought[item] = [times, ts]
        if len(bought) > cap:  # the product bought longest ago goes
            del bought[min(bought, key=lambda k: bought[k][1])]
    else:
        entry[0] += times
        entry[1] = max(entry[1], ts)


def _insert_session(sessions: list[list[int]], ts: int, count: int, gap_ms: float) -> None:
    """Place ``count`` events at ``ts`` into the sorted session intervals ``[start, end, n]``.

    A late event lands in the session it belongs to, and one that bridges two sessions joins
    them, so the result does not depend on the order events arrive in.
    """
    for i, (start, end, _n) in enumerate(sessions):
        if start - gap_ms <= ts <= end + gap_ms:
            sessions[i] = [min(start, ts), max(end, ts), sessions[i][2] + count]
            break
    else:
        sessions.append([ts, ts, count])
        sessions.sort()
        return
    merged: list[list[int]] = []
    for interval in sessions:
        if merged and interval[0] - merged[-1][1] <= gap_ms:
            last = merged[-1]
            merged[-1] = [last[0], max(last[1], interval[1]), last[2] + interval[2]]
        else:
            merged.append(interval)
    sessions[:] = merged


def _session(p: Profile, ts: int, cfg: ProfilesConfig) -> None:
    sessions: list[list[int]] = p["session_list"]
    _insert_session(sessions, ts, 1, cfg.session_gap_s * 1000)
    if len(sessions) > _MAX_SESSIONS:  # the oldest sessions are closed for good
        p["sessions_closed"] += len(sessions) - _MAX_SESSIONS
        del sessions[: len(sessions) - _MAX_SESSIONS]


def _add_chat(p: Profile, vector: Any, ts: int, half_life_s: float) -> None:
    """Fold a chat message's unit vector into the visitor's decayed chat vector."""
    new = np.asarray(vector, dtype=np.float32)
    chat = p.get("chat")
    if chat is None:
        total, ref = new, ts
    else:
        old = np.frombuffer(base64.b64decode(chat["v"]), dtype=np.float32)
        ref = max(ts, chat["ts"])
        total = old * math.pow(0.5, (ref - chat["ts"]) / (half_life_s * 1000.0)) + new * math.pow(
            0.5, (ref - ts) / (half_life_s * 1000.0)
        )
    p["chat"] = {
        "v": base64.b64encode(total.astype(np.float32).tobytes()).decode(),
        "ts": ref,
        "n": (chat or {}).get("n", 0) + 1,
    }


def chat_vector(p: Profile, now_ms: int, half_life_s: float) -> npt.NDArray[np.float32] | None:
    """The visitor's chat vector decayed to ``now_ms`` (its length says how recent), or None."""
    chat = p.get("chat")
    if chat is None:
        return None
    vec = np.frombuffer(base64.b64decode(chat["v"]), dtype=np.float32)
    scale = math.pow(0.5, max(now_ms - chat["ts"], 0) / (half_life_s * 1000.0))
    out: npt.NDArray[np.float32] = (vec * scale).astype(np.float32)
    return out


def _apply_one(p: Profile, e: Event, cfg: ProfilesConfig, chat_half_life_s: float = 3600.0) -> None:
    etype: str = e["type"]
    ts: int = e["ts_ms"]
    props: dict[str, Any] = e["properties"]
    weights = cfg.engagement_weights
    weight = weights.get(etype, weights.get("custom", 0.0))

    p["counts"][etype] = p["counts"].get(etype, 0) + 1
    p["first_seen"] = ts if p["first_seen"] is None else min(p["first_seen"], ts)
    p["last_seen"] = ts if p["last_seen"] is None else max(p["last_seen"], ts)
    _session(p, ts, cfg)
    hour = str(ts // _HOUR_MS)
    p["hours"][hour] = p["hours"].get(hour, 0) + 1
    p["engagement"] += weight
    anon = e.get("anonymous_id")
    if anon and e.get("user_id") and anon not in p["anonymous_ids"]:
        p["anonymous_ids"] = [*p["anonymous_ids"], anon][-20:]

    item_id = e.get("item_id")
    category = props.get("category")
    if item_id and etype in _ITEM_TYPES:
        _touch_item(p, item_id, etype, ts, cfg)
    if isinstance(category, str) and etype != "purchase":
        _add_affinity(p, category, weight, ts, cfg)

    if etype == "add_to_cart":
        cart = p["cart"]
        line = cart.setdefault(item_id, {"quantity": 0, "price": None, "added_at": ts})
        line["quantity"] += props["quantity"]
        if props.get("price") is not None:
            line["price"] = float(props["price"])
        if len(cart) > cfg.max_cart_items:  # the line added longest ago leaves
            del cart[min(cart, key=lambda k: cart[k]["added_at"])]
    elif etype == "remove_from_cart":
        line = p["cart"].get(item_id)
        if line is not None:
            line["quantity"] -= props["quantity"]
            if line["quantity"] <= 0:
                del p["cart"][item_id]
    elif etype == "purchase":
        revenue = float(props["revenue"])
        currency = props["currency"]
        p["orders"] += 1
        p["spend"] += revenue
        p["last_order"] = max(p.get("last_order") or ts, ts)
        p["spend_by_currency"][currency] = p["spend_by_currency"].get(currency, 0.0) + revenue
        bought = p.setdefault("bought", {})
        for line in props["items"]:
            _touch_item(p, line["item_id"], "purchase", ts, cfg)
            p["cart"].pop(line["item_id"], None)
            _add_bought(bought, line["item_id"], 1, ts, cfg.bought_items)
            cat = line.get("category", category)
            if isinstance(cat, str):
                _add_affinity(p, cat, weight, ts, cfg)
    elif etype == "chat_message" and e.get(VECTOR_KEY) is not None:
        _add_chat(p, e[VECTOR_KEY], ts, chat_half_life_s)
    elif etype == "search":
        entry: dict[str, Any] = {"query": props["query"], "ts": ts}
        if props.get("filters"):
            entry["filters"] = props["filters"]
        p["searches"] = _newest_first(p["searches"], entry, cfg.recent_searches)

    # keep only the hourly buckets the frequency window can still see
    horizon = (p["last_seen"] - cfg.frequency_window_s * 1000) // _HOUR_MS
    if len(p["hours"]) > cfg.frequency_window_s / 3600 + 2:
        p["hours"] = {h: v for h, v in p["hours"].items() if int(h) >= horizon}


def _digest(event_id: str) -> bytes:
    return blake2b(event_id.encode(), digest_size=8).digest()


def id_digest(event_id: str) -> int:
    """The 64-bit digest under which a profile remembers an applied event id.

    Fixed-size digests keep a profile's dedup memory small whatever the ids look like; with
    1,000 ids remembered, a collision is about as likely as 1 in 10^13.
    """
    return int.from_bytes(_digest(event_id), "big", signed=True)


#: Characters of one remembered event id: its 8-byte digest and a zero byte, in base64.
_CODE = 12


def _code(digest: bytes) -> str:
    return base64.b64encode(digest + b"\0").decode("ascii")


def _seen_codes(p: Profile) -> str:
    """The profile's remembered event ids: `_CODE`-character codes, oldest first, end to end.

    One string (12 KB for 1,000 ids) that is searched as it is stored, never decoded; profiles
    written before kept a list of `id_digest` numbers, read here the same.
    """
    stored = p["seen"]
    if isinstance(stored, str):
        return stored
    return "".join(_code(eid.to_bytes(8, "big", signed=True)) for eid in stored)


def _remembers(seen: str, code: str) -> bool:
    """Whether ``code`` is one of the codes in ``seen`` (not across two of them)."""
    at = seen.find(code)
    while at >= 0:
        if at % _CODE == 0:
            return True
        at = seen.find(code, at + 1)
    return False


def seen_ids(p: Profile) -> list[int]:
    """The event ids ``p`` remembers as applied (as `id_digest` numbers), oldest first."""
    seen = _seen_codes(p)
    return [
        int.from_bytes(base64.b64decode(seen[i : i + _CODE])[:8], "big", signed=True)
        for i in range(0, len(seen), _CODE)
    ]


def consents(p: Profile | None, purpose: str, cfg: ProfilesConfig) -> bool:
    """Whether the visitor of ``p`` consents to ``purpose`` (their choice, else the regime's)."""
    record = (p or {}).get("consent", {}).get(purpose)
    if record is None:
        return cfg.consent == "opt-out"
    return bool(record[0])


def _set_consent(p: Profile, e: Event) -> None:
    """Record each purpose the event sets; a later choice wins over an earlier one."""
    choices = p.setdefault("consent", {})
    for purpose, granted in e["properties"].items():
        old = choices.get(purpose)
        if old is None or e["ts_ms"] >= old[1]:
            choices[purpose] = [bool(granted), e["ts_ms"]]


def _apply_bookkeeping(p: Profile, e: Event) -> None:
    props = e["properties"]
    if e["type"] == SCHEDULE:
        p.setdefault("timers", {})[props["timer"]] = int(props["due_ms"])
    elif e["type"] == FIRED:
        timers = p.get("timers", {})
        if timers.get(props["timer"]) == props["due_ms"]:
            del timers[props["timer"]]
    else:  # SENT
        offers = p.setdefault("offers", [])
        offers.append([e["ts_ms"], props["trigger"]])
        del offers[:-_OFFERS_KEPT]


def apply_events(
    p: Profile,
    events: Iterable[Event],
    cfg: ProfilesConfig,
    *,
    observe: Callable[[Profile, Event], None] | None = None,
    chat_half_life_s: float = 3600.0,
    vetoed: list[Event] | None = None,
    applied: list[Event] | None = None,
    attribute: Callable[[Profile, Event], None] | None = None,
) -> int:
    """Fold ``events`` into profile ``p`` in place; return how many were new (not duplicates).

    Without personalization consent (`consents`) an event changes nothing: it is appended to
    ``vetoed`` instead, not even remembered as seen. ``consent`` events always apply.

    Args:
        p: the profile.
        events: the events, in order.
        cfg: the [profiles] settings.
        observe: called with the profile and each new event just before it is applied (the
            collaborative signals are derived there).
        chat_half_life_s: how fast the chat vector fades (chat events carry their vector under
            `VECTOR_KEY`).
        vetoed: receives the events left out for want of personalization consent.
        applied: receives the events applied (the new ones), in order.
        attribute: called with the profile after each event applied, and with each
            `EXPOSURE` (which changes nothing else, counts as no event and is not remembered:
            replay skips it by position).
    """
    seen = _seen_codes(p)
    added: list[str] = []
    count = 0
    for e in events:
        if e["type"] == EXPOSURE:
            if attribute is not None:
                attribute(p, e)
            continue
        code = _code(_digest(e["event_id"]))
        if _remembers(seen, code) or code in added:
            continue
        if e["type"] == "consent":
            _set_consent(p, e)
        elif e["type"] in _BOOKKEEPING:
            _apply_bookkeeping(p, e)
        elif e["type"] != MERGE and not consents(p, "personalization", cfg):
            if vetoed is not None:
                vetoed.append(e)
            continue
        elif e["type"] == MERGE:
            merge(p, e["properties"]["profile"], cfg)
        else:
            if observe is not None:
                observe(p, e)
            _apply_one(p, e, cfg, chat_half_life_s)
        if attribute is not None:
            attribute(p, e)
        added.append(code)
        count += 1
        if applied is not None:
            applied.append(e)
    if added:
        p["seen"] = (seen + "".join(added))[-_CODE * cfg.dedup_window :]
    return count


def _iso(ms: int | None) -> str | None:
    return None if ms is None else format_ts(ms)


def view(p: Profile, cfg: ProfilesConfig, now_ms: int) -> dict[str, Any]:
    """The public JSON form of a profile, with time-dependent figures computed at ``now_ms``."""
    horizon_ms = now_ms - cfg.frequency_window_s * 1000
    horizon_hour = horizon_ms // _HOUR_MS
    cart_items = [
        {
            "item_id": item,
            "quantity": line["quantity"],
            "price": line["price"],
            "added_at": _iso(line["added_at"]),
        }
        for item, line in p["cart"].items()
    ]
    cart_total = sum((line["price"] or 0.0) * line["quantity"] for line in p["cart"].values())
    affinity = {
        cat: round(_decay(score, max(now_ms - ref, 0), cfg.affinity_half_life_s), 6)
        for cat, (score, ref) in p["affinity"].items()
    }
    orders = p["orders"]
    sessions = p["session_list"]
    current = sessions[-1] if sessions else None
    active = current is not None and now_ms - current[1] <= cfg.session_gap_s * 1000
    return {
        "user_id": p["user_id"],
        "anonymous_ids": p["anonymous_ids"],
        "counts": p["counts"],
        "sessions": {
            "count": p["sessions_closed"] + len(sessions),
            "current": {
                "started": _iso(current[0] if current else None),
                "last_event": _iso(current[1] if current else None),
                "events": current[2] if current else 0,
                "active": active,
            },
        },
        "first_seen": _iso(p["first_seen"]),
        "last_seen": _iso(p["last_seen"]),
        "frequency": {
            "window_days": round(cfg.frequency_window_s / 86400, 3),
            "events": sum(n for h, n in p["hours"].items() if int(h) >= horizon_hour),
            "sessions": sum(1 for start, _end, _n in sessions if start >= horizon_ms),
        },
        "lifetime_spend": round(p["spend"], 2),
        "order_count": orders,
        "average_order_value": round(p["spend"] / orders, 2) if orders else 0.0,
        "spend_by_currency": {c: round(v, 2) for c, v in p["spend_by_currency"].items()},
        "recent_items": [
            {"item_id": r["item_id"], "type": r["type"], "ts": _iso(r["ts"])}
            for r in p["recent_items"]
        ],
        "cart": {
            "items": cart_items,
            "count": sum(line["quantity"] for line in p["cart"].values()),
            "total": round(cart_total, 2),
        },
        "recent_searches": [{**s, "ts": _iso(s["ts"])} for s in p["searches"]],
        "category_affinity": dict(sorted(affinity.items(), key=lambda kv: -kv[1])),
        "engagement_score": round(p["engagement"], 4),
        "consent": {purpose: consents(p, purpose, cfg) for purpose in PURPOSES},
        "offers_sent": [{"trigger": t, "at": _iso(ts)} for ts, t in p.get("offers", [])],
        "timers": {name: _iso(due) for name, due in sorted(p.get("timers", {}).items())},
        "segments": p.get("segments", []),
        "last_order": _iso(p.get("last_order")),
    }


@functools.cache
def table() -> Any:
    """The Faust profiles table, RocksDB- and changelog-backed.

    It is co-partitioned with the routed events topic: the profile agent is its only writer
    (through `personify.tables.store.TableStore`); the API reads it.
    """
    return bytes_table("profiles", "Live visitor profiles, keyed by user id.")


def snapshot(p: Profile) -> Profile:
    """A copy of ``p`` to merge into another profile (without its dedup memory)."""
    return {k: v for k, v in p.items() if k not in ("seen", "alias_of")}


def merge(into: Profile, other: Profile, cfg: ProfilesConfig) -> None:
    """Fold an anonymous visitor's profile ``other`` into ``into`` (session stitching)."""
    for etype, n in other["counts"].items():
        into["counts"][etype] = into["counts"].get(etype, 0) + n
    for name, pick in (("first_seen", min), ("last_seen", max)):
        values = [v for v in (into[name], other[name]) if v is not None]
        into[name] = pick(values) if values else None
    into["sessions_closed"] += other["sessions_closed"]
    for start, end, n in other["session_list"]:
        _insert_session(into["session_list"], start, n, cfg.session_gap_s * 1000)
        _insert_session(into["session_list"], end, 0, cfg.session_gap_s * 1000)
    for hour, events in other["hours"].items():
        into["hours"][hour] = into["hours"].get(hour, 0) + events
    into["orders"] += other["orders"]
    orders = [t for t in (into.get("last_order"), other.get("last_order")) if t is not None]
    if orders:
        into["last_order"] = max(orders)
    into["spend"] += other["spend"]
    for cur, amount in other["spend_by_currency"].items():
        into["spend_by_currency"][cur] = into["spend_by_currency"].get(cur, 0.0) + amount
    items = sorted(into["recent_items"] + other["recent_items"], key=lambda r: -r["ts"])
    unique: dict[str, dict[str, Any]] = {}
    for r in items:
        unique.setdefault(r["item_id"], r)
    into["recent_items"] = list(unique.values())[: cfg.recent_items]
    for item, line in other["cart"].items():
        mine = into["cart"].get(item)
        if mine is None:
            into["cart"][item] = dict(line)
        else:
            mine["quantity"] += line["quantity"]
            mine["price"] = mine["price"] if mine["price"] is not None else line["price"]
    if other.get("bought"):
        bought = into.setdefault("bought", {})
        for item, (times, ts) in other["bought"].items():
            _add_bought(bought, item, times, ts, cfg.bought_items)
    searches = sorted(into["searches"] + other["searches"], key=lambda s: -s["ts"])
    into["searches"] = searches[: cfg.recent_searches]
    for cat, (score, ref) in other["affinity"].items():
        if cat not in into["affinity"]:
            into["affinity"][cat] = [score, ref]
            continue
        mine_score, mine_ref = into["affinity"][cat]
        top = max(ref, mine_ref)
        into["affinity"][cat] = [
            _decay(mine_score, top - mine_ref, cfg.affinity_half_life_s)
            + _decay(score, top - ref, cfg.affinity_half_life_s),
            top,
        ]
    if into["affinity"]:
        newest = max(ref for _score, ref in into["affinity"].values())
        _cap_affinity(into["affinity"], newest, cfg)
    into["engagement"] += other["engagement"]
    for anon in other["anonymous_ids"]:
        if anon not in into["anonymous_ids"]:
            into["anonymous_ids"] = [*into["anonymous_ids"], anon][-20:]
    chat = other.get("chat")
    if chat is not None and (into.get("chat") is None or chat["ts"] > into["chat"]["ts"]):
        into["chat"] = dict(chat)
