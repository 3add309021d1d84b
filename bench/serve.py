"""Serving benchmark: catalog import, event load, then recommendation latency under load.

``.venv/bin/python bench/serve.py [--items 100000] [--users 100000] [--rate 1000]
[--duration 30] [--concurrency 32] [--quick] [--json FILE]`` runs, against one
``personify run`` subprocess on a fresh data directory and a port of its choosing:

1. catalog import: ``--items`` synthetic products (deterministic titles, descriptions, tags
   and prices over 50 categories such as ``outdoor/jackets``) sent as ``POST /v1/items``
   batches of 1,000. Reported: items/s accepted (202), and items/s until every item is
   embedded and indexed, i.e. until ``GET /v1/items/{id}/similar?k=1`` lists a neighbour for
   the last item and for a random sample of the others (encoding with all-MiniLM-L6-v2 on the
   CPU is the slow part: progress is printed while it runs);
2. event load: ``--users`` visitors, each with 1-3 sessions over the last few days, 3-8
   product views mostly in 1-2 categories (Zipf-like popularity over categories and over
   the items of each), some add-to-cart and purchase events; ``POST /v1/events`` batches of
   1,000. Reported: events/s accepted, and events/s applied (``personify_events_applied_total``
   on ``GET /metrics``, and the last visitor's counts on ``GET /v1/users/{id}``);
   Then the model: the engine trains its collaborative model on the events and tunes its
   blend by itself (``GET /v1/quality``); the run waits for both and reports their times.
   Then the lists: every visitor whose profile changed gets their list computed ahead while
   the engine is all but idle; the run waits until none is pending or waits for an idle loop
   (``personify_lists_pending``, ``personify_lists_unasked``) and reports how many were
   computed and how long the queues took to drain after the events;
3. load test, from a separate process (``multiprocessing``, an asyncio + aiohttp client):
   about 80% ``GET /v1/users/{known user}/recommendations?k=10``, 10% the same for visitors
   never seen, 10% ``GET /v1/items/{item}/similar?k=10`` (a product page: items drawn as the
   events' product views are, by category and item popularity). First an open-loop run at
   each ``--rate`` for ``--duration`` seconds (latency measured from each request's scheduled
   send time, so a server that falls behind shows it; a run stops early, marked OVERLOADED,
   once more than 2 s of requests are outstanding), then a closed-loop run with
   ``--concurrency`` connections, each sending its next request when the last one answers
   (the maximum throughput). Reported per run: requests/s, p50/p90/p99/max latency, errors
   (anything but 200), the engine's CPU and its resident memory (RSS; peak during the run).

A summary table with the machine and date ends the output; ``--json FILE`` writes every
figure. The engine is stopped with SIGTERM at the end, also after an error or Ctrl-C.
``--quick`` is a smoke run: 2,000 items, 2,000 users, 10 s runs. Client and engine share this
machine's cores, so the client's own CPU is shown next to the engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from _proc import (
    add_settings_argument,
    children,
    cpu_seconds,
    parse_metrics,
    run_record,
    settings_env,
    status_kb,
)

REPO = Path(__file__).resolve().parent.parent
PERSONIFY = str(Path(sys.executable).with_name("personify"))
BATCH = 1000
MAX_BODY = 1 << 20  # [events] max_body_bytes: POST /v1/items bodies must stay below it
DAY_MS = 86_400_000

Json = dict[str, Any]

# -- the synthetic catalog ------------------------------------------------------------------
#: category -> (nouns, tag words, (lowest, highest) price)
CATEGORIES: dict[str, tuple[list[str], list[str], tuple[float, float]]] = {
    "outdoor/jackets": (
        ["rain jacket", "down jacket", "softshell", "parka", "windbreaker"],
        ["waterproof", "hiking", "insulated", "packable"],
        (49, 450),
    ),
    "outdoor/tents": (
        ["2-person tent", "4-person tent", "ultralight tent", "tarp shelter"],
        ["camping", "backpacking", "freestanding", "3-season"],
        (79, 700),
    ),
    "outdoor/boots": (
        ["hiking boot", "trail shoe", "mountaineering boot", "approach shoe"],
        ["waterproof", "vibram", "ankle support", "trail"],
        (69, 380),
    ),
    "outdoor/backpacks": (
        ["daypack", "trekking pack", "hydration pack", "travel backpack"],
        ["hiking", "ventilated", "hip belt", "rain cover"],
        (39, 320),
    ),
    "outdoor/sleeping-bags": (
        ["sleeping bag", "quilt", "sleeping pad", "bivy bag"],
        ["down", "synthetic", "compact", "winter"],
        (49, 500),
    ),
    "home/kitchen/knives": (
        ["chef knife", "paring knife", "santoku", "bread knife"],
        ["stainless", "forged", "japanese steel", "full tang"],
        (19, 260),
    ),
    "home/kitchen/pans": (
        ["frying pan", "saute pan", "wok", "dutch oven", "grill pan"],
        ["non-stick", "cast iron", "induction", "oven safe"],
        (24, 320),
    ),
    "home/kitchen/appliances": (
        ["blender", "toaster", "kettle", "espresso machine"],
        ["electric", "stainless", "compact", "programmable"],
        (29, 900),
    ),
    "home/bedding": (
        ["duvet cover", "pillow", "fitted sheet", "weighted blanket"],
        ["cotton", "linen", "hypoallergenic", "queen size"],
        (19, 280),
    ),
    "home/furniture": (
        ["bookshelf", "side table", "office chair", "sofa", "bed frame"],
        ["oak", "scandinavian", "assembly required", "modern"],
        (59, 1800),
    ),
    "home/lighting": (
        ["floor lamp", "desk lamp", "pendant light", "led strip"],
        ["dimmable", "smart", "warm white", "energy saving"],
        (15, 350),
    ),
    "home/decor": (
        ["wall mirror", "vase", "picture frame", "throw pillow", "rug"],
        ["handmade", "boho", "minimalist", "ceramic"],
        (9, 400),
    ),
    "electronics/audio/headphones": (
        ["over-ear headphones", "earbuds", "studio monitors"],
        ["noise cancelling", "wireless", "bluetooth", "hi-res"],
        (19, 550),
    ),
    "electronics/audio/speakers": (
        ["bluetooth speaker", "soundbar", "bookshelf speaker"],
        ["wireless", "waterproof", "bass", "multiroom"],
        (29, 900),
    ),
    "electronics/phones": (
        ["smartphone", "phone case", "screen protector", "charger"],
        ["5g", "fast charging", "dual sim", "oled"],
        (9, 1400),
    ),
    "electronics/laptops": (
        ["ultrabook", "gaming laptop", "2-in-1 laptop", "chromebook"],
        ["ssd", "16gb ram", "backlit keyboard", "lightweight"],
        (299, 3200),
    ),
    "electronics/cameras": (
        ["mirrorless camera", "action camera", "lens", "tripod"],
        ["4k", "stabilised", "interchangeable", "vlogging"],
        (49, 2600),
    ),
    "electronics/tv": (
        ["4k tv", "oled tv", "projector", "streaming stick"],
        ["hdr", "smart tv", "dolby vision", "120hz"],
        (39, 3000),
    ),
    "electronics/wearables": (
        ["smartwatch", "fitness tracker", "smart ring"],
        ["heart rate", "gps", "sleep tracking", "waterproof"],
        (29, 800),
    ),
    "electronics/gaming": (
        ["game controller", "gaming headset", "gaming mouse", "console"],
        ["rgb", "wireless", "low latency", "ergonomic"],
        (19, 600),
    ),
    "fashion/women/dresses": (
        ["maxi dress", "wrap dress", "cocktail dress", "shirt dress"],
        ["floral", "summer", "evening", "cotton"],
        (29, 320),
    ),
    "fashion/women/tops": (
        ["blouse", "tank top", "cardigan", "knit sweater"],
        ["silk", "oversized", "cropped", "merino"],
        (15, 180),
    ),
    "fashion/women/bags": (
        ["tote bag", "crossbody bag", "clutch", "backpack purse"],
        ["leather", "vegan", "everyday", "designer"],
        (25, 900),
    ),
    "fashion/men/shirts": (
        ["oxford shirt", "flannel shirt", "polo shirt", "linen shirt"],
        ["slim fit", "cotton", "button-down", "casual"],
        (19, 160),
    ),
    "fashion/men/trousers": (
        ["chinos", "jeans", "cargo pants", "suit trousers"],
        ["stretch", "slim fit", "relaxed", "organic cotton"],
        (29, 220),
    ),
    "fashion/men/outerwear": (
        ["overcoat", "bomber jacket", "denim jacket", "gilet"],
        ["wool", "quilted", "classic", "water repellent"],
        (59, 600),
    ),
    "fashion/shoes/sneakers": (
        ["running sneaker", "court sneaker", "high-top", "slip-on"],
        ["leather", "retro", "breathable", "cushioned"],
        (39, 260),
    ),
    "fashion/shoes/boots": (
        ["chelsea boot", "ankle boot", "work boot", "knee-high boot"],
        ["suede", "leather", "lug sole", "winter"],
        (59, 420),
    ),
    "fashion/accessories": (
        ["sunglasses", "leather belt", "scarf", "beanie", "wallet"],
        ["polarized", "wool", "gift", "unisex"],
        (9, 300),
    ),
    "sports/cycling": (
        ["road bike", "bike helmet", "cycling jersey", "bike light"],
        ["carbon", "aero", "commuter", "reflective"],
        (15, 4200),
    ),
    "sports/running": (
        ["running shoe", "running shorts", "running vest", "gps watch"],
        ["lightweight", "marathon", "trail", "breathable"],
        (15, 500),
    ),
    "sports/fitness": (
        ["dumbbell set", "yoga mat", "kettlebell", "resistance bands"],
        ["home gym", "non-slip", "adjustable", "strength"],
        (9, 700),
    ),
    "sports/swimming": (
        ["swim goggles", "swimsuit", "wetsuit", "swim cap"],
        ["anti-fog", "chlorine resistant", "triathlon", "open water"],
        (9, 450),
    ),
    "sports/team-sports": (
        ["football", "basketball", "shin guards", "goalkeeper gloves"],
        ["match", "training", "indoor", "outdoor"],
        (9, 160),
    ),
    "toys/lego": (
        ["lego city set", "lego technic set", "lego star wars set", "lego duplo"],
        ["building", "collectible", "ages 8+", "gift"],
        (9, 800),
    ),
    "toys/board-games": (
        ["strategy game", "party game", "family game", "puzzle"],
        ["2-4 players", "cooperative", "card game", "1000 pieces"],
        (9, 120),
    ),
    "toys/dolls": (
        ["fashion doll", "baby doll", "dollhouse", "plush toy"],
        ["soft", "accessories", "ages 3+", "pretend play"],
        (9, 250),
    ),
    "beauty/skincare": (
        ["face serum", "moisturiser", "cleanser", "sunscreen", "eye cream"],
        ["vitamin c", "hyaluronic", "spf 50", "fragrance free"],
        (7, 180),
    ),
    "beauty/makeup": (
        ["lipstick", "mascara", "foundation", "eyeshadow palette"],
        ["long lasting", "matte", "vegan", "waterproof"],
        (6, 90),
    ),
    "beauty/haircare": (
        ["shampoo", "conditioner", "hair dryer", "straightener"],
        ["sulfate free", "repair", "ionic", "curly hair"],
        (6, 400),
    ),
    "books/fiction": (
        ["novel", "thriller", "fantasy saga", "short stories"],
        ["bestseller", "paperback", "hardcover", "award winning"],
        (6, 40),
    ),
    "books/cooking": (
        ["cookbook", "baking book", "vegan cookbook", "bbq guide"],
        ["recipes", "illustrated", "hardcover", "weeknight"],
        (12, 60),
    ),
    "books/children": (
        ["picture book", "bedtime stories", "activity book", "early reader"],
        ["ages 3-5", "illustrated", "board book", "classic"],
        (5, 30),
    ),
    "garden/tools": (
        ["pruning shears", "garden hose", "spade", "leaf blower", "lawn mower"],
        ["cordless", "ergonomic", "heavy duty", "stainless"],
        (9, 900),
    ),
    "garden/plants": (
        ["olive tree", "rose bush", "herb seeds", "houseplant", "tulip bulbs"],
        ["perennial", "indoor", "easy care", "flowering"],
        (4, 200),
    ),
    "garden/furniture": (
        ["garden bench", "patio set", "hammock", "parasol", "sun lounger"],
        ["teak", "weatherproof", "foldable", "rattan"],
        (39, 2000),
    ),
    "pets/dogs": (
        ["dog bed", "dog leash", "chew toy", "dog food", "dog harness"],
        ["durable", "orthopedic", "grain free", "reflective"],
        (5, 250),
    ),
    "pets/cats": (
        ["cat tree", "cat litter", "scratching post", "cat food", "cat toy"],
        ["indoor", "clumping", "sisal", "interactive"],
        (4, 300),
    ),
    "grocery/coffee": (
        ["espresso beans", "ground coffee", "coffee capsules", "cold brew"],
        ["arabica", "single origin", "organic", "dark roast"],
        (5, 60),
    ),
    "grocery/snacks": (
        ["protein bar", "trail mix", "dark chocolate", "crisps"],
        ["gluten free", "high protein", "vegan", "multipack"],
        (2, 40),
    ),
}
BRANDS = [
    "Northpeak",
    "Alder & Co",
    "Vireo",
    "Kestrel",
    "Lumen",
    "Bramble",
    "Solace",
    "Orbis",
    "Tidewell",
    "Fjordline",
    "Marlowe",
    "Copperleaf",
    "Haven",
    "Quill",
    "Sable",
    "Urbano",
    "Wrenfield",
    "Zephyr",
    "Ironbark",
    "Juniper",
    "Halcyon",
    "Mistral",
    "Oakhurst",
    "Pika",
]
ADJECTIVES = [
    "classic",
    "essential",
    "pro",
    "lightweight",
    "premium",
    "everyday",
    "compact",
    "deluxe",
    "eco",
    "heritage",
    "urban",
    "performance",
    "signature",
    "vintage",
]
COLOURS = [
    "black",
    "navy",
    "olive",
    "sand",
    "grey",
    "red",
    "forest green",
    "white",
    "blue",
    "burgundy",
    "charcoal",
    "teal",
]
SENTENCES = [
    "Designed for {use}, this {noun} from {brand} combines {tag} construction with {tag2} details.",
    "A {adj} {noun} in {colour} that works as well on weekdays as it does for {use}.",
    "Customers choose it for its {tag} build and {tag2} finish; backed by a 2-year warranty.",
    "Made with {tag} materials and tested for {use}, it is our {adj} pick in {leaf}.",
    "Pairs well with other {leaf} from the {brand} {adj} range.",
    "Easy to care for and built to last: {tag}, {tag2} and ready for {use}.",
]
USES = [
    "daily use",
    "weekend trips",
    "busy mornings",
    "long days",
    "travel",
    "gifting",
    "small spaces",
    "beginners and experts",
    "all seasons",
    "the whole family",
]


@dataclass
class Catalog:
    """The synthetic catalog and what the event and request generators need from it."""

    items: list[Json]
    #: item indexes of each category, most popular first
    by_category: dict[str, list[int]]
    #: cumulative Zipf weights over category ranks, and over item ranks within a category
    category_cum: list[float]
    item_cum: dict[str, list[float]]

    @property
    def ids(self) -> list[str]:
        """Every item id, in load order."""
        return [it["item_id"] for it in self.items]

    def category(self, rng: random.Random) -> str:
        """A category drawn by popularity."""
        return rng.choices(list(self.by_category), cum_weights=self.category_cum)[0]

    def viewed(self, rng: random.Random, category: str) -> int | None:
        """An item index of ``category`` drawn by popularity (None: the category is empty)."""
        pool = self.by_category[category]
        return rng.choices(pool, cum_weights=self.item_cum[category])[0] if pool else None


def zipf_cum(n: int, s: float) -> list[float]:
    """Cumulative weights ``1/rank**s`` for ranks 1..n (for ``random.choices``)."""
    return list(accumulate(1.0 / (r**s) for r in range(1, n + 1)))


def make_catalog(n: int, seed: int = 7) -> Catalog:
    """``n`` deterministic products over the 50 categories (popular categories hold more).

    Args:
        n: how many items.
        seed: the random seed (the same seed gives the same catalog).

    Returns:
        The catalog, with popularity ranks for the generators.
    """
    rng = random.Random(seed)
    cats = list(CATEGORIES)
    rng.shuffle(cats)  # category popularity rank
    cat_cum = zipf_cum(len(cats), 0.8)
    # Items per category follow the category's popularity, but gently (every one has some).
    size_cum = zipf_cum(len(cats), 0.4)
    assigned = rng.choices(cats, cum_weights=size_cum, k=n)
    items: list[Json] = []
    by_category: dict[str, list[int]] = {c: [] for c in cats}
    for i, cat in enumerate(assigned):
        nouns, tags, (lo, hi) = CATEGORIES[cat]
        leaf = cat.rsplit("/", 1)[-1].replace("-", " ")
        noun = rng.choice(nouns)
        brand = rng.choice(BRANDS)
        adj = rng.choice(ADJECTIVES)
        colour = rng.choice(COLOURS)
        tag, tag2 = rng.sample(tags, 2)
        model = f"{rng.choice('ABCDEFGHKLMRSTX')}{rng.randrange(10, 990)}"
        title = f"{brand} {adj.title()} {noun.title()} {model} - {colour}"
        words = {
            "use": rng.choice(USES),
            "noun": noun,
            "brand": brand,
            "tag": tag,
            "tag2": tag2,
            "adj": adj,
            "colour": colour,
            "leaf": leaf,
        }
        desc = " ".join(s.format(**words) for s in rng.sample(SENTENCES, rng.randint(1, 3)))
        price = lo * (hi / lo) ** (rng.random() ** 1.5)
        item = {
            "item_id": f"sku-{i:07d}",
            "title": title,
            "description": desc,
            "category": cat,
            "price": max(round(price) - 0.01, 0.99),
            "tags": [tag, tag2, colour, *rng.sample(ADJECTIVES, 1)],
            "in_stock": rng.random() < 0.95,
        }
        items.append(item)
        by_category[cat].append(i)
    item_cum: dict[str, list[float]] = {}
    for cat, idx in by_category.items():
        rng.shuffle(idx)  # popularity rank within the category, not the load order
        item_cum[cat] = zipf_cum(len(idx), 1.0) if idx else []
    return Catalog(items, by_category, cat_cum, item_cum)


def item_bodies(items: Sequence[Json]) -> Iterator[bytes]:
    """``{"items": [...]}`` bodies of ``BATCH`` items (fewer if one would pass 1 MiB)."""
    for i in range(0, len(items), BATCH):
        group = list(items[i : i + BATCH])
        body = orjson.dumps({"items": group})
        if len(body) < MAX_BODY:
            yield body
        else:
            half = len(group) // 2
            yield orjson.dumps({"items": group[:half]})
            yield orjson.dumps({"items": group[half:]})


# -- the synthetic visitors ------------------------------------------------------------------
@dataclass
class EventPlan:
    """The events of every visitor, as POST bodies, with what to check at the end."""

    bodies: list[bytes]
    events: int
    counts: dict[str, int]  # events by type over all visitors
    last_user: str
    last_user_counts: dict[str, int]
    users: list[str] = field(repr=False, default_factory=list)


def user_events(rng: random.Random, cat: Catalog, uid: str, now_ms: int) -> list[Json]:
    """One visitor's events, oldest first: 1-3 sessions over the last 3 days, 3-8 views.

    Views are mostly in 1-2 categories chosen by popularity, items by popularity within the
    category; about a third of the visitors add a viewed item to the cart and half of those buy
    what is in the cart.
    """
    names = list(cat.by_category)
    chosen = rng.choices(names, cum_weights=cat.category_cum, k=rng.choice((1, 1, 2)))
    n_views = rng.randint(3, 8)
    n_sessions = min(rng.choice((1, 1, 2, 3)), n_views)
    # Session starts within the last 3 days, hours apart, the last one ending before now.
    start = now_ms - rng.randrange(DAY_MS // 2, 3 * DAY_MS)
    out: list[Json] = []
    seq = 0
    viewed: list[Json] = []

    def add(etype: str, ts: int, item: Json | None, props: Json) -> None:
        nonlocal seq
        ev: Json = {
            "event_id": f"{uid}-e{seq}",
            "type": etype,
            "user_id": uid,
            "ts": ts,
            "properties": props,
        }
        if item is not None:
            ev["item_id"] = item["item_id"]
        out.append(ev)
        seq += 1

    t = start
    per_session = [
        n_views // n_sessions + (1 if k < n_views % n_sessions else 0) for k in range(n_sessions)
    ]
    for views in per_session:
        for _ in range(views):
            c = chosen[0] if len(chosen) == 1 or rng.random() < 0.7 else chosen[1]
            if rng.random() < 0.1:  # an occasional detour to another category
                c = cat.category(rng)
            i = cat.viewed(rng, c)
            if i is None:
                continue
            item = cat.items[i]
            t += rng.randrange(5_000, 120_000)
            add("product_view", t, item, {"category": c, "price": item["price"]})
            viewed.append(item)
        t += rng.randrange(2 * 3_600_000, 12 * 3_600_000)  # the next session
    t = out[-1]["ts"] if out else t  # the cart belongs to the last session
    if viewed and rng.random() < 0.35:
        cart = rng.sample(viewed, min(len(viewed), rng.choice((1, 1, 2))))
        cart = list({it["item_id"]: it for it in cart}.values())
        for item in cart:
            t += rng.randrange(10_000, 90_000)
            props = {"category": item["category"], "quantity": 1, "price": item["price"]}
            add("add_to_cart", t, item, props)
        if rng.random() < 0.5:
            t += rng.randrange(30_000, 300_000)
            lines = [{"item_id": it["item_id"], "quantity": 1, "price": it["price"]} for it in cart]
            revenue = round(sum(it["price"] for it in cart), 2)
            add("purchase", t, None, {"items": lines, "revenue": revenue, "currency": "USD"})
    # Keep every timestamp in the past (a long last session could run past now).
    overshoot = max((ev["ts"] for ev in out), default=0) - (now_ms - 60_000)
    if overshoot > 0:
        for ev in out:
            ev["ts"] -= overshoot
    return out


def make_events(cat: Catalog, users: int, seed: int = 11) -> EventPlan:
    """The events of ``users`` visitors in ``BATCH``-event bodies, visitor by visitor.

    Args:
        cat: the catalog the visitors browse.
        users: how many visitors.
        seed: the random seed.

    Returns:
        The POST bodies and the counts to check once they are applied.
    """
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    bodies: list[bytes] = []
    pending: list[Json] = []
    counts: dict[str, int] = {}
    total = 0
    last_counts: dict[str, int] = {}
    ids: list[str] = []
    for u in range(users):
        uid = f"user-{u:07d}"
        evs = user_events(rng, cat, uid, now_ms)
        if not evs:
            continue
        ids.append(uid)
        last_counts = {}
        for ev in evs:
            counts[ev["type"]] = counts.get(ev["type"], 0) + 1
            last_counts[ev["type"]] = last_counts.get(ev["type"], 0) + 1
        total += len(evs)
        pending.extend(evs)
        while len(pending) >= BATCH:
            bodies.append(orjson.dumps({"events": pending[:BATCH]}))
            pending = pending[BATCH:]
    if pending:
        bodies.append(orjson.dumps({"events": pending}))
    return EventPlan(bodies, total, counts, ids[-1] if ids else "", last_counts, ids)


def check_valid(cat: Catalog, plan: EventPlan) -> None:
    """Fail early if the generators produce an item or event the engine would reject."""
    from personify.engine.config import load_config
    from personify.engine.models import validate_event, validate_item

    cfg = load_config(REPO / "config.toml").events
    now_ms = int(time.time() * 1000)
    for item in cat.items[:500]:
        validate_item(dict(item), cfg)
    for body in plan.bodies[:3]:
        for ev in orjson.loads(body)["events"]:
            validate_event(ev, cfg, now_ms)


def request_paths(cat: Catalog, users: Sequence[str], n: int, seed: int = 13) -> list[str]:
    """``n`` request paths: ~80% known visitors, ~10% unknown ones, ~10% similar items."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.8 and users:
            out.append(f"/v1/users/{rng.choice(users)}/recommendations?k=10")
        elif r < 0.9 or not cat.items:
            out.append(f"/v1/users/visitor-{rng.randrange(10**9)}/recommendations?k=10")
        else:
            # A product page's similar items: pages are opened as products are viewed.
            i = cat.viewed(rng, cat.category(rng))
            out.append(f"/v1/items/{cat.items[i or 0]['item_id']}/similar?k=10")
    return out


def kind_of(path: str) -> str:
    """The request kind of a path, for per-kind figures."""
    if path.startswith("/v1/items/"):
        return "similar"
    return "recs_unknown" if path.startswith("/v1/users/visitor-") else "recs_known"


# -- the engine --------------------------------------------------------------------------------


def _is_broker(pid: int) -> bool:
    """Whether process ``pid`` is the embedded broker (Tansu)."""
    try:
        return b"tansu" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Engine:
    """A ``personify run`` subprocess on a fresh data directory, on a port it picks."""

    def __init__(
        self,
        workdir: Path,
        log_level: str = "warning",
        command: str = "run",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.log_level = log_level
        self.command = command
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.startup_s = 0.0

    @property
    def log_path(self) -> Path:
        """Where the engine's output goes."""
        return self.workdir / "personify.log"

    def log_tail(self, n: int = 3000) -> str:
        """The last ``n`` characters of the engine's output."""
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        return ""

    @property
    def pid(self) -> int:
        """The engine's process id."""
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The engine and its children (the embedded broker)."""
        return [self.pid, *children(self.pid)] if self.proc is not None else []

    def cpu(self) -> float:
        """CPU seconds used so far by the engine and its children."""
        return sum(cpu_seconds(p) for p in self.pids())

    def broker_pids(self) -> list[int]:
        """The embedded broker's processes (not the engine's other children, e.g. a tuning)."""
        return [p for p in self.pids()[1:] if _is_broker(p)]

    def broker_cpu(self) -> float:
        """CPU seconds used so far by the embedded broker."""
        return sum(cpu_seconds(p) for p in self.broker_pids())

    def rss_mib(self) -> tuple[float, float]:
        """Resident memory now of (the engine, its embedded broker), MiB."""
        if self.proc is None:
            return 0.0, 0.0
        broker = sum(status_kb(p, "VmRSS") for p in self.broker_pids())
        return status_kb(self.pid, "VmRSS") / 1024, broker / 1024

    async def start(self, session: aiohttp.ClientSession, limit_s: float = 120.0) -> None:
        """Start the engine, read its URL from its output and wait for /healthz 200."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONIFY_")}
        env.update(self.extra_env)
        cmd = [PERSONIFY, self.command, "--config", str(REPO / "config.toml")]
        cmd += [
            "--data-dir",
            str(self.workdir / "data"),
            "--port",
            "0",
            "--log-level",
            self.log_level,
        ]
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:  # noqa: ASYNC230 - opening a log is instant
            # Its own session: a Ctrl-C here reaches only this script, which stops it cleanly.
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        while time.perf_counter() < t0 + limit_s:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"personify exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if not self.url:
                text = self.log_tail(20000)
                # Faust logs a module that fails to import and goes on, without the API.
                broken = re.search(r"Autodiscovery importing module .{0,300}", text)
                if broken:
                    raise RuntimeError(f"personify failed to start: {broken.group(0)}")
                found = re.search(r"Personify API listening on (http://\S+)", text)
                if found:
                    self.url = found.group(1).replace("0.0.0.0", "127.0.0.1")
            if self.url:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.url + "/healthz") as resp:
                        if resp.status == 200:
                            self.startup_s = time.perf_counter() - t0
                            return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"personify not healthy after {limit_s:g} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM, wait (SIGKILL after 30 s); return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """GET /metrics, parsed."""
        async with session.get(self.url + "/metrics") as resp:
            return parse_metrics(await resp.text())


# -- phases 1 and 2: loading ----------------------------------------------------------------
async def post_all(
    session: aiohttp.ClientSession, url: str, bodies: Sequence[bytes], concurrency: int
) -> tuple[float, int, int]:
    """POST every body, ``concurrency`` at a time; return (seconds, accepted, rejected).

    Raises:
        RuntimeError: on any answer but 202 (after a few retries of a 503).
    """
    queue = list(reversed(bodies))
    totals = [0, 0]
    headers = {"Content-Type": "application/json"}

    async def poster() -> None:
        while queue:
            body = queue.pop()
            for attempt in range(20):
                async with session.post(url, data=body, headers=headers) as r:
                    doc = await r.json(content_type=None)
                    if r.status == 202:
                        totals[0] += int(doc["accepted"])
                        totals[1] += len(doc["rejected"])
                        if doc["rejected"]:
                            print(f"  rejected: {doc['rejected'][:3]}", flush=True)
                        break
                    if r.status != 503 or attempt == 19:
                        raise RuntimeError(f"POST {url}: {r.status} {str(doc)[:500]}")
                await asyncio.sleep(0.5)

    t0 = time.perf_counter()
    await asyncio.gather(*(poster() for _ in range(concurrency)))
    return time.perf_counter() - t0, totals[0], totals[1]


async def indexed(session: aiohttp.ClientSession, url: str, item_id: str) -> bool:
    """Whether ``item_id`` has a content neighbour, i.e. is embedded and in the index."""
    async with session.get(f"{url}/v1/items/{item_id}/similar?k=1") as r:
        if r.status != 200:
            return False
        return bool((await r.json())["items"])


async def load_catalog(
    eng: Engine, session: aiohttp.ClientSession, cat: Catalog, concurrency: int
) -> Json:
    """Phase 1: POST the catalog, then wait until every item is in the vector index."""
    items = cat.items
    bodies = list(item_bodies(items))
    print(
        f"\n[catalog] POST /v1/items: {len(items):,} items in {len(bodies)} batches "
        f"({sum(map(len, bodies)) / len(bodies) / 1024:.0f} KiB each), {concurrency} at once",
        flush=True,
    )
    cpu0 = eng.cpu()
    t0 = time.perf_counter()
    send_s, accepted, rejected = await post_all(session, eng.url + "/v1/items", bodies, concurrency)
    print(
        f"  accepted {accepted:,} items in {send_s:.2f} s = {accepted / send_s:,.0f} items/s "
        f"(rejected {rejected})",
        flush=True,
    )
    # Progress: the first item (in load order) not yet indexed, found by a moving pointer;
    # the end: the last item and a random sample of 200 all have a neighbour.
    ids = cat.ids
    rng = random.Random(5)
    sample = rng.sample(ids, min(200, len(ids)))
    pointer, last_print, done_t, cpu_mark = 0, t0, None, eng.cpu()
    step = max(len(ids) // 200, 1)
    while done_t is None:
        while pointer < len(ids) and await indexed(session, eng.url, ids[pointer]):
            pointer = min(pointer + step, len(ids)) if pointer < len(ids) - 1 else len(ids)
        now = time.perf_counter()
        if pointer >= len(ids):
            missing = [i for i in sample if not await indexed(session, eng.url, i)]
            if not missing and await indexed(session, eng.url, ids[-1]):
                done_t = now
                break
            pointer = ids.index(missing[0]) if missing else len(ids) - 1
        if now - last_print >= 10:
            # The engine indexes what one agent step took (often every item posted) at once,
            # so this count can stand still for minutes and then jump.
            rss, _ = eng.rss_mib()
            cores = (eng.cpu() - cpu_mark) / (now - last_print)
            print(
                f"  ... ~{pointer:,}/{len(ids):,} indexed after {now - t0:.0f} s "
                f"(engine CPU {100 * cores:.0f}%, RSS {rss:.0f} MiB)",
                flush=True,
            )
            last_print, cpu_mark = now, eng.cpu()
        if eng.proc is not None and eng.proc.poll() is not None:
            raise RuntimeError(f"personify exited during the import:\n{eng.log_tail()}")
        await asyncio.sleep(0.5)
    total_s = done_t - t0
    cpu = (eng.cpu() - cpu0) / total_s
    rss, broker = eng.rss_mib()
    out = {
        "items": len(items),
        "batches": len(bodies),
        "accepted": accepted,
        "rejected": rejected,
        "accept_s": send_s,
        "accepted_per_s": accepted / send_s,
        "indexed_s": total_s,
        "indexed_per_s": len(items) / total_s,
        "engine_cores": cpu,
        "rss_mib": rss,
        "broker_rss_mib": broker,
    }
    print(
        f"  all {len(items):,} items embedded + indexed {total_s:.1f} s after the first POST = "
        f"{len(items) / total_s:,.0f} items/s (engine CPU {100 * cpu:.0f}%, "
        f"RSS {rss:.0f} MiB + broker {broker:.0f} MiB)",
        flush=True,
    )
    return out


async def load_events(
    eng: Engine, session: aiohttp.ClientSession, plan: EventPlan, concurrency: int
) -> Json:
    """Phase 2: POST every visitor's events, then wait until they are all applied."""
    applied_name = "personify_events_applied_total"
    base = (await eng.metrics(session)).get(applied_name, 0.0)
    mix = ", ".join(f"{k} {v:,}" for k, v in sorted(plan.counts.items()))
    print(
        f"\n[events] POST /v1/events: {plan.events:,} events of {len(plan.users):,} visitors "
        f"({mix}) in {len(plan.bodies)} batches, {concurrency} at once",
        flush=True,
    )
    cpu0 = eng.cpu()
    t0 = time.perf_counter()
    send_s, accepted, rejected = await post_all(
        session, eng.url + "/v1/events", plan.bodies, concurrency
    )
    print(
        f"  accepted {accepted:,} events in {send_s:.2f} s = {accepted / send_s:,.0f} events/s "
        f"(rejected {rejected})",
        flush=True,
    )
    applied, last_change, last_print = 0, time.perf_counter(), t0
    while True:
        now = time.perf_counter()
        got = int((await eng.metrics(session)).get(applied_name, 0.0) - base)
        if got != applied:
            applied, last_change = got, now
        if applied >= accepted:
            break
        if now - last_change > 60:
            raise RuntimeError(f"events stalled at {applied:,}/{accepted:,}:\n{eng.log_tail()}")
        if now - last_print >= 10:
            print(f"  ... {applied:,}/{accepted:,} applied after {now - t0:.0f} s", flush=True)
            last_print = now
        await asyncio.sleep(0.05)
    applied_s = time.perf_counter() - t0
    counts: Json = {}
    for _ in range(200):  # the last visitor's profile shows every one of its events
        async with session.get(f"{eng.url}/v1/users/{plan.last_user}") as r:
            if r.status == 200:
                counts = (await r.json())["counts"]
                if counts == plan.last_user_counts:
                    break
        await asyncio.sleep(0.1)
    ok = counts == plan.last_user_counts
    cpu = (eng.cpu() - cpu0) / applied_s
    print(
        f"  all {applied:,} applied {applied_s:.2f} s after the first POST = "
        f"{applied / applied_s:,.0f} events/s (engine CPU {100 * cpu:.0f}%); last visitor "
        f"{plan.last_user}: counts {counts} {'as sent' if ok else 'MISMATCH: sent ' + str(plan.last_user_counts)}",  # noqa: E501
        flush=True,
    )
    return {
        "events": plan.events,
        "users": len(plan.users),
        "by_type": plan.counts,
        "accepted": accepted,
        "rejected": rejected,
        "accept_s": send_s,
        "accepted_per_s": accepted / send_s,
        "applied": applied,
        "applied_s": applied_s,
        "applied_per_s": applied / applied_s,
        "last_user_counts_match": ok,
        "engine_cores": cpu,
    }


async def wait_lists(eng: Engine, session: aiohttp.ClientSession, limit_s: float = 1800.0) -> Json:
    """Phase 2c: wait until the lists queued as profiles changed are computed ahead.

    Done when ``personify_lists_pending`` and ``personify_lists_unasked`` (the lists of
    visitors who never asked, computed while the engine is all but idle) read 0 twice in a
    row; reports how long it took.
    """
    name = 'personify_lists_computed_total{kind="user"}'
    print("\n[lists] visitors' lists computed ahead after their events", flush=True)
    cpu0 = eng.cpu()
    t0 = last_print = time.perf_counter()
    base = (await eng.metrics(session)).get(name, 0.0)
    zero = 0
    while zero < 2:
        await asyncio.sleep(0.5)
        m = await eng.metrics(session)
        waiting = m.get("personify_lists_pending", 0.0) + m.get("personify_lists_unasked", 0.0)
        zero = zero + 1 if waiting == 0 else 0
        now = time.perf_counter()
        if now - t0 > limit_s:
            raise RuntimeError(f"lists still pending after {limit_s:.0f} s:\n{eng.log_tail()}")
        if now - last_print >= 10:
            print(
                f"  ... {m.get(name, 0.0):,.0f} computed, "
                f"{waiting:,.0f} pending after {now - t0:.0f} s",
                flush=True,
            )
            last_print = now
    m = await eng.metrics(session)
    took = time.perf_counter() - t0
    computed = m.get(name, 0.0)
    cpu = (eng.cpu() - cpu0) / took
    print(
        f"  {computed:,.0f} lists computed in all; the last {computed - base:,.0f} in {took:.1f} s"
        f" after the events were applied = {(computed - base) / took:,.0f} lists/s "
        f"(engine CPU {100 * cpu:.0f}%)",
        flush=True,
    )
    refresh = m.get("personify_lists_refresh_pending", 0.0)
    if refresh:
        print(
            f"  {refresh:,.0f} lists ranked before the model or setting now in use are still "
            "served, each recomputed behind the answers as the load runs",
            flush=True,
        )
    return {
        "refresh_pending": refresh,
        "computed": computed,
        "after_events": computed - base,
        "wait_s": took,
        "per_s": (computed - base) / took,
        "engine_cores": cpu,
    }


async def wait_model(eng: Engine, session: aiohttp.ClientSession, limit_s: float = 3600.0) -> Json:
    """Phase 2b: wait until the engine trained its model on the events and tuned itself.

    Nothing asks for it: a backfill is learned from by itself. Done when ``GET /v1/quality``
    shows no run going, none asked for, nothing unlearned (``pending`` 0) and a tuning run on
    at least 99% of the model's interactions; reports the training and tuning times.
    """
    print("\n[model] the learned model trained and tuned on the events, by itself", flush=True)
    t0 = last_print = time.perf_counter()
    while True:
        async with session.get(eng.url + "/v1/quality") as resp:
            quality: Json = await resp.json()
        model, tuning = quality["model"], quality["tuning"]
        if not model["enabled"]:
            print("  [model] enabled = false: no model", flush=True)
            return {"enabled": False}
        busy = model["training"] or tuning["running"] or tuning["requested"]
        runs = tuning["runs"]
        tuned = not tuning["enabled"] or (
            runs and runs[-1]["interactions"] >= 0.99 * model["interactions"]
        )
        if not busy and model["trained_at"] and model["pending"] == 0 and tuned:
            break
        now = time.perf_counter()
        if now - t0 > limit_s:
            raise RuntimeError(f"not trained and tuned after {limit_s:.0f} s: {quality}")
        if now - last_print >= 10:
            done = tuning["progress"]
            state = (
                "training"
                if model["training"] and not tuning["running"]
                else f"tuning ({done['trials_done']}/{done['trials']} settings)"
                if tuning["running"]
                else "waiting"
            )
            print(f"  ... {state} after {now - t0:.0f} s", flush=True)
            last_print = now
        await asyncio.sleep(2.0)
    took = time.perf_counter() - t0
    last = runs[-1] if runs else {}
    out = {
        "wait_s": took,
        "interactions": model["interactions"],
        "training_s": (model["last_run"] or {}).get("seconds"),
        "tuning_s": last.get("seconds"),
        "tuning_applied": last.get("improved"),
    }
    print(
        f"  trained on {model['interactions']:,} interactions "
        f"(the last training {out['training_s']} s) and tuned ({out['tuning_s']} s), "
        f"{took:.0f} s after the events were applied",
        flush=True,
    )
    return out


# -- phase 3: the load generator (runs in its own process) ------------------------------------
@dataclass
class LoadSpec:
    """One load-test run, as sent to the load-generator process."""

    name: str
    url: str
    paths: list[str]
    duration: float
    rate: float | None = None  # open loop at this rate; None: closed loop
    concurrency: int = 32
    timeout_s: float = 10.0
    backlog_s: float = 2.0  # open loop: stop once this many seconds of requests are in flight
    warmup: int = 0  # requests sent (closed loop, not counted) before the run


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of sorted values, nearest rank; NaN when empty."""
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, max(0, round(q * len(sorted_ms)) - 1))]


def summarise(lat_ms: list[float]) -> Json:
    """n, p50/p90/p99/max and mean of latencies in ms."""
    s = sorted(lat_ms)
    return {
        "n": len(s),
        "p50": percentile(s, 0.50),
        "p90": percentile(s, 0.90),
        "p99": percentile(s, 0.99),
        "max": s[-1] if s else float("nan"),
        "mean": sum(s) / len(s) if s else float("nan"),
    }


async def run_load(spec: LoadSpec) -> Json:
    """Run one load test; every latency is to the last byte of the answer."""
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    by_kind: dict[str, list[float]] = {}
    statuses: dict[str, int] = {}
    paths = spec.paths
    state = {"inflight": 0, "sent": 0, "last_done": 0.0}
    per_second: list[list[float]] = []  # latencies by the second their request was due in
    t0 = loop.time() + 0.05
    limit = spec.concurrency if spec.rate is None else 0  # 0: no limit on connections
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)

    async def one(session: aiohttp.ClientSession, path: str, start: float, record: bool) -> None:
        state["inflight"] += 1
        try:
            async with session.get(spec.url + path) as r:
                await r.read()
                status = str(r.status)
        except TimeoutError:
            status = "timeout"
        except aiohttp.ClientError as exc:
            status = type(exc).__name__
        finally:
            state["inflight"] -= 1
        end = loop.time()
        if record:
            ms = (end - start) * 1000
            lat.append(ms)
            second = max(0, int(start - t0))
            while len(per_second) <= second:
                per_second.append([])
            per_second[second].append(ms)
            by_kind.setdefault(kind_of(path), []).append(ms)
            statuses[status] = statuses.get(status, 0) + 1
            state["last_done"] = end

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if spec.warmup:
            for i in range(0, spec.warmup, 16):
                await asyncio.gather(
                    *(
                        one(session, paths[(i + j) % len(paths)], loop.time(), False)
                        for j in range(16)
                    )
                )
        cpu0 = time.process_time()
        overloaded = ""
        t0 = loop.time() + 0.05
        per_second.clear()
        if spec.rate is not None:
            n = int(spec.rate * spec.duration)
            tasks: set[asyncio.Task[None]] = set()
            i = 0
            max_behind = 0.0
            while i < n and not overloaded:
                now = loop.time()
                due = min(n, int((now - t0) * spec.rate) + 1)
                while i < due:
                    sched = t0 + i / spec.rate
                    max_behind = max(max_behind, now - sched)
                    task = asyncio.create_task(one(session, paths[i % len(paths)], sched, True))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    i += 1
                if state["inflight"] > spec.rate * spec.backlog_s:
                    overloaded = (
                        f"stopped after {now - t0:.1f} s: over {spec.backlog_s:g} s of requests "
                        f"({state['inflight']:,}) waiting"
                    )
                await asyncio.sleep(max(0.0, t0 + i / spec.rate - loop.time()))
            state["sent"] = i
            if tasks:
                await asyncio.wait(tasks)
            window = max(state["last_done"] - t0, 1e-9)
        else:
            deadline = t0 + spec.duration
            await asyncio.sleep(max(0.0, t0 - loop.time()))
            counter = iter(range(10**12))

            async def worker(w: int) -> None:
                rng = random.Random(w)
                while loop.time() < deadline:
                    k = next(counter)
                    await one(
                        session, paths[(k + rng.randrange(7)) % len(paths)], loop.time(), True
                    )

            await asyncio.gather(*(worker(w) for w in range(spec.concurrency)))
            state["sent"] = len(lat)
            window = max(state["last_done"] - t0, 1e-9)
            max_behind = 0.0
        cpu = (time.process_time() - cpu0) / window
    return {
        "name": spec.name,
        "mode": "open" if spec.rate is not None else "closed",
        "offered_rate": spec.rate,
        "concurrency": spec.concurrency if spec.rate is None else None,
        "duration_s": window,
        "requests": len(lat),
        "achieved_rate": len(lat) / window,
        "ok": statuses.get("200", 0),
        "errors": len(lat) - statuses.get("200", 0),
        "statuses": statuses,
        "latency_ms": summarise(lat),
        "by_kind_ms": {k: summarise(v) for k, v in sorted(by_kind.items())},
        "client_cores": cpu,
        "client_max_behind_ms": max_behind * 1000,
        "started_at": time.time() - (loop.time() - t0),
        "p99_by_second_ms": [percentile(sorted(x), 0.99) if x else None for x in per_second],
        "overloaded": overloaded,
    }


def _load_process(spec: LoadSpec, conn: Any) -> None:
    """The load generator process: run ``spec``, send back the figures (or the error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    try:
        conn.send(asyncio.run(run_load(spec)))
    except Exception as exc:
        conn.send({"error": repr(exc)})
    finally:
        conn.close()


async def settle(eng: Engine, limit_s: float = 20.0) -> float:
    """Wait until the engine is idle (under 25% of a core for 0.5 s); return the seconds."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        c0 = eng.cpu()
        await asyncio.sleep(0.5)
        if (eng.cpu() - c0) / 0.5 < 0.25:
            break
    return time.perf_counter() - t0


async def load_test(eng: Engine, session: aiohttp.ClientSession, spec: LoadSpec) -> Json:
    """Run ``spec`` in a separate process, metering the engine's CPU, RSS and /metrics."""
    waited = await settle(eng)
    if waited > 2:
        print(f"  (waited {waited:.0f} s for the engine to go idle first)", flush=True)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_load_process, args=(spec, child), daemon=True)
    m0 = await eng.metrics(session)
    proc.start()
    child.close()
    peak_rss, cpu0, t0 = 0.0, eng.cpu(), time.perf_counter()
    try:
        while not parent.poll():
            if not proc.is_alive():
                raise RuntimeError(f"the load generator exited with {proc.exitcode}")
            peak_rss = max(peak_rss, eng.rss_mib()[0])
            await asyncio.sleep(0.25)
        res: Json = parent.recv()
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join()
    if "error" in res:
        raise RuntimeError(f"the load generator failed: {res['error']}")
    # The whole window includes the generator's start (~1 s idle), so CPU is read over it.
    res["engine_cores_incl_start"] = (eng.cpu() - cpu0) / (time.perf_counter() - t0)
    rss, broker = eng.rss_mib()
    res["engine_rss_mib"] = rss
    res["engine_peak_rss_mib"] = max(peak_rss, rss)
    res["broker_rss_mib"] = broker
    m1 = await eng.metrics(session)
    server: Json = {}
    for route in ("/v1/users/{user_id}/recommendations", "/v1/items/{item_id}/similar"):
        key = f'{{method="GET",route="{route}",status="200"}}'
        n = m1.get("personify_http_request_seconds_count" + key, 0) - m0.get(
            "personify_http_request_seconds_count" + key, 0
        )
        s = m1.get("personify_http_request_seconds_sum" + key, 0) - m0.get(
            "personify_http_request_seconds_sum" + key, 0
        )
        if n:
            server[route] = {"n": int(n), "mean_ms": 1000 * s / n}
    res["server_mean_ms"] = server
    res["lists_served"] = {
        how: int(
            m1.get(f'personify_lists_served_total{{how="{how}"}}', 0)
            - m0.get(f'personify_lists_served_total{{how="{how}"}}', 0)
        )
        for how in ("memory", "computed")
    }
    res["loop_delay"] = _loop_delay(m0, m1)
    res["gc"] = _gc_pauses(m0, m1)
    return res


def _gc_pauses(m0: dict[str, float], m1: dict[str, float]) -> dict[str, dict[str, float]]:
    """The engine's garbage collections during a load, by generation.

    How many, how many held it over 10 ms, and the seconds they held it in all
    (``personify_gc_pause_seconds``).
    """
    out: dict[str, dict[str, float]] = {}
    for gen in ("0", "1", "2"):
        name = "personify_gc_pause_seconds"
        count = f'{name}_count{{generation="{gen}"}}'
        under = f'{name}_bucket{{generation="{gen}",le="0.01"}}'
        total = f'{name}_sum{{generation="{gen}"}}'
        n = m1.get(count, 0.0) - m0.get(count, 0.0)
        if n:
            out[gen] = {
                "collections": n,
                "over_10ms": n - (m1.get(under, 0.0) - m0.get(under, 0.0)),
                "seconds": m1.get(total, 0.0) - m0.get(total, 0.0),
            }
    return out


def _loop_delay(m0: dict[str, float], m1: dict[str, float]) -> dict[str, float]:
    """How late the engine's event loop woke its 0.1 s timer during a load.

    The share of the wake-ups later than each bucket's bound, from
    ``personify_event_loop_delay_seconds``.
    """
    name = "personify_event_loop_delay_seconds_bucket"
    counts = {
        key[len(name) :]: m1.get(key, 0.0) - m0.get(key, 0.0)
        for key in m1
        if key.startswith(name + "{")
    }
    total = counts.get('{le="+Inf"}', 0.0)
    if not total:
        return {}
    out = {"wakeups": total}
    for key, n in counts.items():
        bound = key.split('"')[1]
        if bound != "+Inf" and float(bound) >= 0.005:
            out[f"over_{float(bound) * 1000:g}ms"] = (total - n) / total
    return out


def print_load(res: Json) -> None:
    """One load-test run's figures."""
    lat = res["latency_ms"]
    errs = {k: v for k, v in res["statuses"].items() if k != "200"}
    print(
        f"  {res['requests']:,} requests in {res['duration_s']:.1f} s = "
        f"{res['achieved_rate']:,.0f} req/s | latency p50 {lat['p50']:.1f} p90 {lat['p90']:.1f} "
        f"p99 {lat['p99']:.1f} max {lat['max']:.1f} ms | errors {res['errors']}"
        f"{' ' + str(errs) if errs else ''}",
        flush=True,
    )
    kinds = "; ".join(
        f"{k} n={v['n']:,} p50 {v['p50']:.1f} p99 {v['p99']:.1f}"
        for k, v in res["by_kind_ms"].items()
    )
    server = "; ".join(
        f"{r.rsplit('/', 1)[-1]} {v['mean_ms']:.2f} ms" for r, v in res["server_mean_ms"].items()
    )
    print(f"  by kind: {kinds}", flush=True)
    print(
        f"  engine CPU {100 * res['engine_cores_incl_start']:.0f}%, client CPU "
        f"{100 * res['client_cores']:.0f}% (100% = one core); engine RSS "
        f"{res['engine_rss_mib']:.0f} MiB (peak {res['engine_peak_rss_mib']:.0f}) + broker "
        f"{res['broker_rss_mib']:.0f} MiB; server-side mean (/metrics): {server}",
        flush=True,
    )
    served = res.get("lists_served") or {}
    if sum(served.values()):
        print(
            f"  lists answered from memory {served.get('memory', 0):,}, ranked on request "
            f"{served.get('computed', 0):,} (a similar-items list not asked for before, a visitor "
            "whose list is not stored)",
            flush=True,
        )
    delay = res.get("loop_delay") or {}
    if delay:
        over = ", ".join(
            f"{100 * v:.1f}% over {k[5:]}" for k, v in delay.items() if k.startswith("over_")
        )
        print(
            f"  the engine's event loop woke late ({delay['wakeups']:.0f} timer wake-ups): {over}"
        )
    collections = res.get("gc") or {}
    if collections:
        print(
            "  the engine's garbage collections: "
            + "; ".join(
                f"generation {g}: {v['collections']:.0f} ({v['over_10ms']:.0f} over 10 ms), "
                f"{1000 * v['seconds']:.0f} ms in all"
                for g, v in collections.items()
            )
        )
    worst = sorted(
        ((p, i) for i, p in enumerate(res.get("p99_by_second_ms", [])) if p is not None),
        reverse=True,
    )[:5]
    if worst:
        print(
            "  worst seconds by p99: "
            + ", ".join(f"second {i + 1} {p:.0f} ms" for p, i in sorted(worst, key=lambda x: x[1]))
        )
    if res["mode"] == "open":
        print(f"  client fell behind its schedule by at most {res['client_max_behind_ms']:.1f} ms")
    if res["overloaded"]:
        print(f"  OVERLOADED: {res['overloaded']}", flush=True)


# -- the whole run -----------------------------------------------------------------------------


def print_summary(out: Json) -> None:
    """The summary table."""
    width = 118
    print("\n" + "=" * width)
    print(
        f"SUMMARY  {out['date']}  {out['cpus']} CPUs  {out['cpu_model']}  "
        f"Python {out['python']}  ({out['elapsed_s']:.0f} s)"
    )
    c, e = out.get("catalog"), out.get("events")
    if c:
        print(
            f"catalog: {c['items']:,} items; accepted {c['accepted_per_s']:,.0f} items/s "
            f"({c['accept_s']:.1f} s); embedded+indexed {c['indexed_per_s']:,.0f} items/s "
            f"({c['indexed_s']:.1f} s, engine CPU {100 * c['engine_cores']:.0f}%)"
        )
    if e:
        print(
            f"events:  {e['events']:,} events of {e['users']:,} visitors; accepted "
            f"{e['accepted_per_s']:,.0f} events/s ({e['accept_s']:.1f} s); applied "
            f"{e['applied_per_s']:,.0f} events/s ({e['applied_s']:.1f} s); last visitor's counts "
            f"{'match' if e['last_user_counts_match'] else 'MISMATCH'}"
        )
    model = out.get("model")
    if model and model.get("wait_s") is not None:
        print(
            f"model:   trained on {model['interactions']:,} interactions (the last training "
            f"{model['training_s']} s) and tuned ({model['tuning_s']} s) by itself, "
            f"{model['wait_s']:.0f} s after the events were applied"
        )
    lists = out.get("lists")
    if lists:
        print(
            f"lists:   {lists['computed']:,.0f} visitors' lists computed ahead; the last "
            f"{lists['after_events']:,.0f} {lists['wait_s']:.1f} s after the events were applied "
            f"({lists['per_s']:,.0f} lists/s)"
        )
    print(f"engine start {out.get('startup_s', 0):.1f} s to /healthz 200")
    head = (
        f"{'load run':<22} {'req/s':>8} {'requests':>9} {'p50 ms':>8} {'p90 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8} {'errors':>7} {'eng CPU':>8} {'cli CPU':>8} "
        f"{'RSS MiB':>8} {'peak':>6}"
    )
    print(head)
    for r in out.get("load", []):
        lat = r["latency_ms"]
        print(
            f"{r['name']:<22} {r['achieved_rate']:>8,.0f} {r['requests']:>9,} "
            f"{lat['p50']:>8.1f} {lat['p90']:>8.1f} {lat['p99']:>8.1f} {lat['max']:>8.1f} "
            f"{r['errors']:>7,} {100 * r['engine_cores_incl_start']:>7.0f}% "
            f"{100 * r['client_cores']:>7.0f}% {r['engine_rss_mib']:>8.0f} "
            f"{r['engine_peak_rss_mib']:>6.0f}"
        )
        if r["overloaded"]:
            print(f"{'':<24}OVERLOADED: {r['overloaded']}")
    print(
        "latency: open loop from each request's scheduled send time, closed loop from its send; "
        "to the last byte. req/s = answers received / run time. RSS = the engine process "
        "(its broker apart)."
    )
    if "exit_code" in out:
        print(f"engine stopped with SIGTERM: exit code {out['exit_code']}")
    print("=" * width, flush=True)


async def amain(args: argparse.Namespace, eng: Engine, out: Json) -> None:
    """Start the engine, load it, load-test it; figures go into ``out``."""
    t = time.perf_counter()
    cat = make_catalog(args.items)
    plan = make_events(cat, args.users)
    check_valid(cat, plan)
    paths = request_paths(cat, plan.users, max(50_000, int(max(args.rate, default=0) * 30)))
    print(
        f"generated {args.items:,} items and {plan.events:,} events of {args.users:,} visitors "
        f"in {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await eng.start(session)
        out["startup_s"] = eng.startup_s
        print(f"personify up at {eng.url} in {eng.startup_s:.1f} s (pid {eng.pid})", flush=True)
        out["catalog"] = await load_catalog(eng, session, cat, args.post_concurrency)
        out["events"] = await load_events(eng, session, plan, args.post_concurrency)
        out["model"] = await wait_model(eng, session)
        out["lists"] = await wait_lists(eng, session)
        runs = [
            LoadSpec(f"open {r:g}/s", eng.url, paths, args.duration, rate=r, warmup=400 * (k == 0))
            for k, r in enumerate(args.rate)
        ]
        if args.concurrency:
            runs.append(
                LoadSpec(
                    f"closed c={args.concurrency}",
                    eng.url,
                    paths,
                    args.duration,
                    concurrency=args.concurrency,
                    warmup=0 if runs else 400,
                )
            )
        out["load"] = []
        for spec in runs:
            how = (
                f"open loop, {spec.rate:g} req/s"
                if spec.rate is not None
                else f"closed loop, {spec.concurrency} connections"
            )
            print(
                f"\n[load] {spec.name}: {how} for {spec.duration:g} s, separate process", flush=True
            )
            res = await load_test(eng, session, spec)
            print_load(res)
            out["load"].append(res)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=None, help="catalog items (default 100,000)")
    p.add_argument("--users", type=int, default=None, help="visitors (default 100,000)")
    p.add_argument(
        "--rate",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=None,
        help="open-loop request rates, comma-separated (default 1000)",
    )
    p.add_argument("--duration", type=float, default=None, help="seconds per run (default 30)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="connections of the closed-loop run (0: skip it; default 32)",
    )
    p.add_argument("--post-concurrency", type=int, default=2, help="POSTs in flight (default 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2,000 items and users, 10 s")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory (engine log)")
    add_settings_argument(p)
    p.add_argument(
        "--embeddings-cache",
        metavar="DIR",
        help="reuse the engine's vector cache from DIR (saved there after the run when DIR does "
        "not exist yet): the catalog phase then measures indexing, not encoding",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="the engine's log level (default warning)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    args.items = args.items if args.items is not None else 2000 if quick else 100_000
    args.users = args.users if args.users is not None else 2000 if quick else 100_000
    args.rate = args.rate if args.rate is not None else [1000.0]
    args.duration = args.duration if args.duration is not None else 10.0 if quick else 30.0
    if args.items < 2:
        p.error("--items must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark, print the figures, and stop the engine whatever happens."""
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="personify-serve-"))
    eng = Engine(workdir, args.log_level, extra_env=settings_env(args.set))
    out: Json = run_record(args)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds to the finally below

    signal.signal(signal.SIGTERM, on_term)
    print(
        f"Personify serving benchmark; {os.cpu_count()} CPUs ({out['cpu_model']}); "
        f"work dir {workdir}",
        flush=True,
    )
    started = time.perf_counter()
    code = 0
    cache = Path(args.embeddings_cache) if args.embeddings_cache else None
    if cache is not None and cache.exists():
        shutil.copytree(cache, workdir / "data" / "embeddings-cache")
        print(f"vector cache reused from {cache}: items are indexed, not encoded", flush=True)
    try:
        asyncio.run(amain(args, eng, out))
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        code = 130
    except Exception as exc:
        print(f"\nFAILED: {exc}", flush=True)
        code = 1
    finally:
        if eng.proc is not None:
            print("stopping personify (SIGTERM) ...", flush=True)
            out["exit_code"] = eng.stop()
        if cache is not None and not cache.exists() and out.get("catalog"):
            shutil.copytree(workdir / "data" / "embeddings-cache", cache)
            print(f"vector cache saved to {cache} for later runs", flush=True)
        out["elapsed_s"] = time.perf_counter() - started
        if out.get("load") or out.get("catalog"):
            print_summary(out)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2, default=str))
            print(f"figures written to {args.json}")
        if args.keep or code:
            print(f"work directory kept: {workdir} (engine log: {eng.log_path})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
