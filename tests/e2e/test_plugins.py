"""Plugins through their entry points: the example package installed, loaded, isolated."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "plugins" / "example"


@pytest.fixture(scope="module")
def with_plugins(
    module_engine: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """An engine whose environment has the example plugin package installed."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "src"
    shutil.copytree(EXAMPLE, source)
    target = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
    )
    eng = module_engine("[plugins]\ntimeout_ms = 300.0\n[push]\ndebounce_ms = 0\n")
    eng.extra_env = {"PYTHONPATH": str(target)}
    eng.start()
    yield eng
    assert eng.stop() == 0, eng.tail()


def search(user: str, query: str) -> dict[str, Any]:
    return {"type": "search", "user_id": user, "properties": {"query": query}}


def errors_of(eng: Any, plugin: str, hook: str = "personify_on_event") -> float:
    return float(eng.metric(f'personify_plugin_errors_total{{hook="{hook}",plugin="{plugin}"}}'))


def test_a_trigger_plugin_pushes_an_offer(with_plugins: Any, uid: str) -> None:
    """The example's gift_wrap trigger, found through its entry point, offers on a gift search."""
    url = with_plugins.ws_url(f"user_id={uid}")

    async def run() -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            first = await with_plugins.next_message(ws, "recommendations")
            status, _ = await asyncio.to_thread(
                with_plugins.post_events, [search(uid, "Birthday GIFT ideas")]
            )
            assert status == 202
            offer = await with_plugins.next_message(ws, "offer")
            assert offer["trigger"] == "gift_wrap" and offer["plugin"] == "gift_wrap"
            assert offer["payload"]["searches"] == 1
            assert offer["seq"] > first["seq"]

    asyncio.run(run())
    loaded = "Plugins loaded: always_fails, frequency_cap, gift_wrap, hangs, no_tracking, "
    loaded += "sale_first"
    assert loaded in with_plugins.tail(20000)


def test_failing_and_hanging_plugins_are_skipped(with_plugins: Any, uid: str) -> None:
    """A plugin that raises or hangs is counted and skipped; pushes and offers go on."""
    url = with_plugins.ws_url(f"user_id={uid}")

    async def run() -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            await with_plugins.next_message(ws, "recommendations")
            failed = await asyncio.to_thread(errors_of, with_plugins, "always_fails")
            hung = await asyncio.to_thread(errors_of, with_plugins, "hangs")
            for query in ("hang", "gift for dad"):
                status, _ = await asyncio.to_thread(with_plugins.post_events, [search(uid, query)])
                assert status == 202
            # The list still follows the events, and the good plugin still offers.
            await with_plugins.next_message(ws, "recommendations")
            offer = await with_plugins.next_message(ws, "offer")
            assert offer["trigger"] == "gift_wrap"
            assert await asyncio.to_thread(errors_of, with_plugins, "always_fails") >= failed + 2
            assert await asyncio.to_thread(errors_of, with_plugins, "hangs") == hung + 1

    asyncio.run(run())


def test_no_trigger_without_marketing_consent(with_plugins: Any, uid: str) -> None:
    """A visitor who said no to marketing gets no offer; their list still follows them."""
    status, _ = with_plugins.request("PUT", f"/v1/users/{uid}/consent", {"marketing": False})
    assert status == 202
    with_plugins.wait_profile(uid, lambda p: p["consent"]["marketing"] is False)
    url = with_plugins.ws_url(f"user_id={uid}")

    async def run() -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            await with_plugins.next_message(ws, "recommendations")
            status, _ = await asyncio.to_thread(
                with_plugins.post_events, [search(uid, "a gift for mum")]
            )
            assert status == 202
            await with_plugins.next_message(ws, "recommendations")  # the event was applied ...
            with pytest.raises(asyncio.TimeoutError):  # ... and no offer follows
                await with_plugins.next_message(ws, "offer", limit_s=3.0)

    asyncio.run(run())


def test_a_consent_gate_vetoes_events(with_plugins: Any, uid: str) -> None:
    """The example's no_tracking gate: a marked event changes nothing; the others count."""
    marked = {
        "type": "search",
        "user_id": uid,
        "properties": {"query": "secret", "no_tracking": True},
    }
    assert with_plugins.post_events([search(uid, "boots"), marked, search(uid, "hats")])[0] == 202
    profile = with_plugins.wait_profile(uid, lambda p: p["counts"].get("search") == 2)
    assert sorted(s["query"] for s in profile["recent_searches"]) == ["boots", "hats"]
    assert with_plugins.metric("personify_events_vetoed_total") >= 1


def test_a_reranker_reorders_and_filters_every_list(with_plugins: Any, uid: str) -> None:
    """The example's sale_first: sale items first, hidden ones never; a failing one is skipped."""
    ids = ["plain-tent", "hidden-tent", "sale-tent", "plain-stove", "sale-stove"]
    items = [{"item_id": i, "title": i.replace("-", " "), "category": "camping"} for i in ids]
    with_plugins.add_items(items)
    # Other shoppers make every item trending; this visitor has seen one.
    views = [
        {"type": "product_view", "user_id": f"{uid}-{n}", "item_id": i}
        for n, i in enumerate(ids * 2)
    ]
    assert with_plugins.post_events(views)[0] == 202
    failed = errors_of(with_plugins, "always_fails", "personify_rerank")
    assert with_plugins.post_events([{**views[0], "user_id": uid}])[0] == 202
    with_plugins.wait_profile(uid, lambda p: p["counts"].get("product_view") == 1)

    def shown() -> list[str]:
        status, body = with_plugins.request("GET", f"/v1/users/{uid}/recommendations?k=4")
        assert status == 200, body
        return [r["item_id"] for r in body["items"]]

    got = with_plugins.wait_for(lambda: shown() if len(shown()) >= 3 else None, what="a list")
    assert "hidden-tent" not in got
    sales = [i for i in got if i.startswith("sale-")]
    assert sales and got[: len(sales)] == sales  # sale items lead
    assert errors_of(with_plugins, "always_fails", "personify_rerank") > failed
