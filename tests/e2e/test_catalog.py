"""The catalog end to end: the items topic, the dead-letter topic, restarts and the importer."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

ITEMS = [
    {"item_id": "tent", "title": "Two-person camping tent", "category": "outdoor/camping"},
    {"item_id": "stove", "title": "Camping gas stove", "category": "outdoor/camping"},
    {"item_id": "mug", "title": "Enamel camping mug", "category": "outdoor/camping"},
    {"item_id": "kettle", "title": "Electric kettle", "category": "home/kitchen"},
]


def similar(eng: Any, item: str) -> list[str]:
    status, body = eng.request("GET", f"/v1/items/{item}/similar?k=10")
    return [r["item_id"] for r in body["items"]] if status == 200 else []


async def test_items_from_the_topic_and_dead_letters(engine_factory: Callable[..., Any]) -> None:
    """Any Kafka client can write the catalog; invalid items land in the DLQ with the field."""
    eng = engine_factory().start()
    good = {"items": ITEMS[:2]}
    bad = {"items": [{"item_id": "nameless"}, {"item_id": "p", "title": "P", "price": "free"}]}
    await eng.produce(
        "items",
        (b"batch", json.dumps(good).encode()),
        (b"bad", json.dumps(bad).encode()),
        (b"x", b"{not json"),
        (b"mug", json.dumps(ITEMS[2]).encode()),
    )
    eng.wait_for(lambda: eng.request("GET", "/v1/items/mug")[0] == 200, what="the topic items")
    assert eng.request("GET", "/v1/items/tent")[1]["title"] == "Two-person camping tent"
    dead = [d for d in await eng.dead_letters(3, lambda d: "item" in d) if "item" in d]
    fields = sorted(d["field"] for d in dead)
    assert fields == ["", "price", "title"], dead
    assert all(d["source"]["topic"] == "items" for d in dead)
    await eng.produce("items", (b"tent", json.dumps({"delete": "tent"}).encode()))
    eng.wait_for(lambda: eng.request("GET", "/v1/items/tent")[0] == 404, what="the delete")
    assert "tent" not in similar(eng, "stove")
    assert eng.stop() == 0


def test_events_right_after_their_items_get_the_category(
    engine_factory: Callable[..., Any],
) -> None:
    """Events posted right after their items get the items' categories.

    A backfill posts its catalog, then its history at once, while the text model may still be
    loading: the catalog view takes the items without waiting for it, so the events get the
    items' categories (category affinity, trending), as the tuning sees them.
    """
    eng = engine_factory().start()
    assert eng.request("POST", "/v1/items", {"items": ITEMS})[0] == 202
    # The view holds them without waiting for the text model (the items' own topic and the
    # events' are read side by side: the catalog is applied first, as a backfill does).
    eng.wait_for(lambda: eng.metric("personify_catalog_items") == len(ITEMS), what="the view")
    views = [
        {"event_id": f"v{n}", "type": "product_view", "user_id": "camper", "item_id": item}
        for n, item in enumerate(["tent", "stove", "mug"])
    ]
    status, body = eng.post_events(views)
    assert status == 202, body
    profile = eng.wait_profile("camper", lambda p: sum(p["counts"].values()) == 3)
    assert "outdoor/camping" in profile["category_affinity"], profile
    eng.wait_for(lambda: len(similar(eng, "kettle")) == 3, what="the items indexed after")
    assert eng.stop() == 0


def test_catalog_and_index_survive_a_restart(engine_factory: Callable[..., Any]) -> None:
    """After a restart the catalog is back and the index is loaded from its snapshot."""
    eng = engine_factory().start()
    status, _ = eng.request("POST", "/v1/items", {"items": ITEMS})
    assert status == 202
    eng.wait_for(lambda: len(similar(eng, "kettle")) == 3, what="indexing")
    status, _ = eng.request("DELETE", "/v1/items/kettle")
    eng.wait_for(lambda: eng.request("GET", "/v1/items/kettle")[0] == 404, what="the delete")
    before = similar(eng, "tent")
    assert eng.stop() == 0
    again = engine_factory(eng.data_dir, env={"PERSONIFY_LOGGING__LEVEL": "info"}).start()
    after = again.wait_for(lambda: similar(again, "tent"), what="the index after restart")
    assert after == before and "kettle" not in after
    assert again.request("GET", "/v1/items/kettle")[0] == 404
    assert "index snapshot loaded" in again.tail(20000)
    assert again.stop() == 0


def test_catalog_rebuilt_when_the_snapshot_is_missing(engine_factory: Callable[..., Any]) -> None:
    """Without an index snapshot, the index is rebuilt from the items table on start."""
    eng = engine_factory().start()
    eng.request("POST", "/v1/items", {"items": ITEMS})
    eng.wait_for(lambda: len(similar(eng, "kettle")) == 3, what="indexing")
    assert eng.stop() == 0
    for path in (eng.data_dir / "index").iterdir():
        path.unlink()
    again = engine_factory(eng.data_dir, env={"PERSONIFY_LOGGING__LEVEL": "info"}).start()
    after = again.wait_for(lambda: len(similar(again, "kettle")) == 3 and similar(again, "kettle"))
    assert set(after) == {"tent", "stove", "mug"}
    assert "index rebuilt from the items table" in again.tail(20000)
    assert again.stop() == 0


def test_items_known_only_by_codes_get_no_text_vector(engine_factory: Callable[..., Any]) -> None:
    """Text without words is not embedded; an item gains or loses its vector as its text does."""
    eng = engine_factory().start()
    coded = [
        {"item_id": "c1", "title": "110411", "category": "110411"},
        {"item_id": "c2", "title": "110412 / 7", "category": "110412"},
    ]
    eng.add_items(ITEMS + coded)
    eng.wait_for(lambda: eng.metric("personify_items_embedded") == len(ITEMS), what="indexing")
    assert similar(eng, "c1") == []  # no vector, no history: nothing is similar
    assert not {"c1", "c2"} & set(similar(eng, "tent"))
    # The digits alone would place c1 next to c2.
    eng.request("PUT", "/v1/items/c1", {"title": "Camping lantern", "category": "110411"})
    eng.wait_for(lambda: eng.metric("personify_items_embedded") == len(ITEMS) + 1)
    assert "c1" in similar(eng, "tent")
    eng.request("PUT", "/v1/items/tent", {"title": "4711", "category": "4711"})
    eng.wait_for(lambda: eng.metric("personify_items_embedded") == len(ITEMS))
    assert "tent" not in similar(eng, "stove")
    before = similar(eng, "stove")
    assert eng.stop() == 0
    again = engine_factory(eng.data_dir, env={"PERSONIFY_LOGGING__LEVEL": "info"}).start()
    after = again.wait_for(lambda: similar(again, "stove"), what="the index after restart")
    assert after == before
    assert again.metric("personify_items_embedded") == len(ITEMS)
    assert "index snapshot loaded" in again.tail(20000)
    assert again.stop() == 0


def test_import_command_loads_a_csv_into_the_engine(
    engine_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """`personify items import` reports bad rows by line and the good ones become searchable."""
    eng = engine_factory().start()
    csv_file = tmp_path / "catalog.csv"
    csv_file.write_text(
        "item_id,title,category,price,tags,in_stock,brand\n"
        "tent,Two-person camping tent,outdoor/camping,199,camping|tent,true,Acme\n"
        "stove,Camping gas stove,outdoor/camping,not-a-number,,yes,Acme\n"
        "mug,Enamel camping mug,outdoor/camping,12.5,,1,Acme\n"
    )
    personify = str(Path(eng.proc.args[0]))
    done = subprocess.run(
        [personify, "items", "import", str(csv_file), "--url", eng.url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "line 3" in done.stdout and "price" in done.stdout
    mug = eng.wait_for(lambda: (r := eng.request("GET", "/v1/items/mug"))[0] == 200 and r[1])
    assert mug["price"] == 12.5 and mug["attributes"] == {"brand": "Acme"}
    assert eng.request("GET", "/v1/items/stove")[0] == 404
    eng.wait_for(lambda: similar(eng, "tent") == ["mug"], what="the imported items in the index")
    assert eng.stop() == 0
