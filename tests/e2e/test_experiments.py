"""Experiments against a running engine.

Define them, assign visitors, keep a variant across a login and a restart, read results,
promote a winner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from personify.agents.experiments import Registry

pytestmark = pytest.mark.e2e

CATALOG = [
    ("h-jacket", "Waterproof hiking jacket", "outdoor/hiking"),
    ("h-boots", "Leather hiking boots", "outdoor/hiking"),
    ("k-knife", "Chef's kitchen knife", "home/kitchen"),
    ("k-pan", "Nonstick frying pan", "home/kitchen"),
]
SENT = "personify_exposures_sent_total"
EXPERIMENT = {
    "variants": [
        {"name": "A"},
        {"name": "B", "setting": {"weights.trending": 5.0}, "ranker": False},
    ]
}


@pytest.fixture(scope="module")
def live(module_engine: Callable[..., Any]) -> Iterator[Any]:
    eng = module_engine("[push]\ndebounce_ms = 0\n")
    eng.start()
    eng.add_items([{"item_id": i, "title": t, "category": c} for i, t, c in CATALOG])
    yield eng
    assert eng.stop() == 0, eng.tail()


def recommendations(eng: Any, user: str) -> dict[str, Any]:
    before = eng.metric(SENT)
    status, body = eng.request("GET", f"/v1/users/{user}/recommendations")
    assert status == 200, body
    eng.wait_for(lambda: eng.metric(SENT) > before, what="the exposure to be sent")
    return dict(body)


def short(uid: str) -> str:
    """An experiment id made from the test's visitor id (at most 64 characters)."""
    return "x" + uid[-12:]


def test_experiments_are_put_read_listed_and_deleted(live: Any, uid: str) -> None:
    uid = short(uid)
    path = f"/v1/experiments/{uid}"
    status, body = live.request("PUT", path, {**EXPERIMENT, "traffic": 0.2})
    assert status == 201, body
    assert body["running"] and body["control"] == "A" and body["traffic"] == 0.2
    status, body = live.request("PUT", path, {**EXPERIMENT, "traffic": 0.1})
    assert status == 200 and body["traffic"] == 0.1
    assert live.request("GET", path)[1]["variants"][1]["setting"] == {"weights.trending": 5.0}
    listed = live.request("GET", "/v1/experiments")[1]["experiments"]
    assert [e["id"] for e in listed] == [uid]
    status, body = live.request("PUT", f"/v1/experiments/{uid}-2", {**EXPERIMENT, "traffic": 0.95})
    assert status == 422 and body["field"] == "traffic", body  # only 0.9 is free
    bad = {"variants": [{"name": "A"}, {"name": "B", "setting": {"weights.nope": 1}}]}
    status, body = live.request("PUT", f"/v1/experiments/{uid}-2", bad)
    assert status == 422 and body["field"] == "variants[1].setting.weights.nope", body
    assert live.request("DELETE", path)[0] == 200
    assert live.request("GET", path)[0] == 404
    assert live.request("DELETE", path)[0] == 404


def _ids_in_different_variants(experiment_id: str, tmp: Path) -> tuple[str, str, str, str]:
    """An anonymous id and a user id that the hashes put in different variants."""
    registry = Registry(tmp / "experiments.json")
    registry.put(experiment_id, EXPERIMENT, 0)
    anon_variant = registry.assign(f"anon-{experiment_id}", {}, 0)
    assert anon_variant is not None
    for n in range(100):
        user = f"user-{experiment_id}-{n}"
        chosen = registry.assign(user, {}, 0)
        assert chosen is not None
        if chosen[1].name != anon_variant[1].name:
            return f"anon-{experiment_id}", anon_variant[1].name, user, chosen[1].name
    raise AssertionError("no user id in the other variant")


def test_a_visitor_keeps_their_variant_across_a_login_and_a_restart(
    live: Any, uid: str, tmp_path: Path
) -> None:
    experiment_id = f"login-{short(uid)}"
    anon, anon_variant, user, _hashed = _ids_in_different_variants(experiment_id, tmp_path)
    assert live.request("PUT", f"/v1/experiments/{experiment_id}", EXPERIMENT)[0] == 201
    assert (
        live.post_events([{"type": "product_view", "anonymous_id": anon, "item_id": "h-jacket"}])[0]
        == 202
    )
    live.wait_profile(anon, lambda p: p["counts"].get("product_view") == 1)
    body = recommendations(live, anon)
    assert body["variant"] == f"{experiment_id}/{anon_variant}"
    live.wait_for(
        lambda: live.request("GET", f"/v1/users/{anon}/export")[1].get("exposures"),
        what="the exposure to be kept",
    )
    identify = {"type": "identify", "anonymous_id": anon, "user_id": user}
    assert live.post_events([identify])[0] == 202
    live.wait_profile(user, lambda p: anon in p.get("anonymous_ids", []))
    assert recommendations(live, user)["variant"] == f"{experiment_id}/{anon_variant}"
    # A list served to the anonymous id since is the user's exposure.
    as_anon = recommendations(live, anon)
    assert as_anon["variant"] == f"{experiment_id}/{anon_variant}"
    live.wait_for(
        lambda: (
            as_anon["recommendation_id"]
            in [
                x["recommendation_id"]
                for x in live.request("GET", f"/v1/users/{user}/export")[1]["exposures"]
            ]
        ),
        what="the anonymous id's exposure kept with the user",
    )

    results_path = f"/v1/experiments/{experiment_id}/results"

    def visitors() -> dict[str, Any]:
        shown = live.request("GET", results_path)[1]["variants"]
        return {v["name"]: v["visitors"] for v in shown}

    # Counted once, in the variant first served, though served as two ids.
    live.wait_for(lambda: visitors() == {"A": 0, "B": 0} | {anon_variant: 1}, what="one visitor")

    assert live.stop() == 0, live.tail()
    live.start()
    assert live.request("GET", f"/v1/experiments/{experiment_id}")[1]["running"]
    live.wait_for(  # the catalog loads: until then lists are empty (and not exposures)
        lambda: live.request("GET", f"/v1/users/{user}/recommendations")[1]["items"],
        what="a list with items",
    )
    assert recommendations(live, user)["variant"] == f"{experiment_id}/{anon_variant}"
    assert visitors() == {"A": 0, "B": 0} | {anon_variant: 1}
    assert live.request("DELETE", f"/v1/experiments/{experiment_id}")[0] == 200


def test_a_promoted_variant_becomes_the_default(live: Any, uid: str) -> None:
    experiment_id = f"promote-{short(uid)}"
    winner = {"name": "B", "setting": {"weights.trending": 7.5}}
    doc = {"variants": [{"name": "A", "size": 1}, winner]}
    assert live.request("PUT", f"/v1/experiments/{experiment_id}", doc)[0] == 201
    assert (
        live.post_events([{"type": "product_view", "user_id": uid, "item_id": "k-pan"}])[0] == 202
    )
    live.wait_profile(uid, lambda p: p["counts"].get("product_view") == 1)
    served = recommendations(live, uid)
    assert served["variant"] in (f"{experiment_id}/A", f"{experiment_id}/B")
    # A shows one item where the request names no k; B as many as there are (3 of 4 items).
    assert len(served["items"]) == (1 if served["variant"].endswith("/A") else 3)
    promote_path = f"/v1/experiments/{experiment_id}/promote"
    status, body = live.request("POST", promote_path, {"variant": "A"})
    assert status == 422 and body["field"] == "variant"  # its own list size is not a setting
    # A visitor never seen is in the experiment too (the list its variant's new visitors share).
    assert recommendations(live, f"{uid}-new")["variant"].startswith(f"{experiment_id}/")

    status, body = live.request(
        "POST", f"/v1/experiments/{experiment_id}/promote", {"variant": "Z"}
    )
    assert status == 422 and body["field"] == "variant"
    status, body = live.request(
        "POST", f"/v1/experiments/{experiment_id}/promote", {"variant": "B"}
    )
    assert status == 200, body
    assert body["promoted"] == "B" and not body["running"]
    assert live.request("GET", "/v1/quality")[1]["tuning"]["setting"]["weights.trending"] == 7.5
    assert recommendations(live, uid)["variant"] == "default"
    status, body = live.request("POST", "/v1/experiments/nope/promote", {"variant": "B"})
    assert status == 404
