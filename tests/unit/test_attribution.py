"""Attribution: exposures joined to what visitors do next, and the KPIs counted from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from rocksdict import Rdict

from personify.engine.config import AttributionConfig
from personify.engine.models import Event, internal_event
from personify.tables.attribution import (
    EXPOSURE,
    Attribution,
    Tally,
    day_of,
    experiment_counts,
    experiment_key,
    expired_kpi_keys,
    kpi_key,
    kpi_rows,
    report,
)

T0 = 1_765_022_400_000  # 2025-12-06 12:00 UTC
MIN = 60_000


def exposure(
    rec_id: str, items: list[str], sources: list[str], ts: int, variant: str = ""
) -> Event:
    props: dict[str, Any] = {"recommendation_id": rec_id, "items": items, "sources": sources}
    if variant:
        props["variant"] = variant
    return internal_event(
        EXPOSURE, f"x-{rec_id}-{ts}", user_id=None, anonymous_id="u", ts_ms=ts, properties=props
    )


def event(etype: str, ts: int, item: str | None = None, **props: Any) -> Event:
    return internal_event(
        etype, f"{etype}-{ts}", user_id="u", item_id=item, ts_ms=ts, properties=props
    )


def purchase(
    ts: int, lines: list[tuple[str, float, int]], currency: str = "USD", **props: Any
) -> Event:
    items = [{"item_id": i, "price": p, "quantity": q} for i, p, q in lines]
    revenue = sum(p * q for _i, p, q in lines)
    return event("purchase", ts, items=items, revenue=revenue, currency=currency, **props)


def counts(
    tally: Tally, by: str = "variant", name: str = "default", day: str | None = None
) -> dict[str, float]:
    return tally.days[day or day_of(T0)].get(by, {}).get(name, {})


def visitor(
    cfg: AttributionConfig | None = None, raw: bytes | None = None
) -> tuple[Attribution, Tally]:
    tally = Tally()
    return Attribution(raw, cfg or AttributionConfig(), tally, "USD"), tally


def test_an_exposure_counts_once_per_serve_and_its_visitor_once_a_day() -> None:
    attr, tally = visitor()
    attr.observe(exposure("r1", ["a", "b"], ["covisit", "popular"], T0))
    attr.observe(exposure("r1", ["a", "b"], ["covisit", "popular"], T0 + MIN))  # served again
    attr.observe(exposure("r2", ["c"], ["popular"], T0 + 2 * MIN))
    assert counts(tally) == {"exposures": 3, "visitors": 1}
    assert counts(tally, "source", "popular") == {"shown": 3}
    assert [x[1] for x in attr.exposures] == ["r1", "r2"]  # one entry per list, newest last
    assert attr.changed


def test_a_click_joins_by_recommendation_id_or_by_the_item_shown() -> None:
    attr, tally = visitor()
    attr.observe(exposure("r1", ["a", "b"], ["covisit", "popular"], T0))
    attr.observe(exposure("r2", ["b", "c"], ["content", "model"], T0 + MIN))
    attr.observe(event("click", T0 + 2 * MIN, "b", recommendation_id="r1"))  # by id: r1's source
    attr.observe(event("click", T0 + 3 * MIN, "c"))  # by item: the newest list showing it
    attr.observe(event("click", T0 + 4 * MIN, None, recommendation_id="r2", position=0))
    attr.observe(event("click", T0 + 5 * MIN, "zzz"))  # never shown: not attributed
    attr.observe(event("click", T0 + 6 * MIN, "a", recommendation_id="unknown"))
    assert counts(tally)["clicks"] == 3
    assert counts(tally, "source", "popular") == {"shown": 1, "clicks": 1}
    assert counts(tally, "source", "model") == {"shown": 1, "clicks": 1}
    assert counts(tally, "source", "content") == {"shown": 1, "clicks": 1}  # position 0 of r2


def test_an_outcome_outside_the_window_is_not_attributed() -> None:
    attr, tally = visitor(AttributionConfig(window_s=3600))
    attr.observe(exposure("r1", ["a"], ["covisit"], T0))
    attr.observe(event("add_to_cart", T0 + 61 * MIN, "a"))  # an hour and a minute later
    attr.observe(event("add_to_cart", T0 - 10 * MIN, "a"))  # before the list, beyond the skew
    assert "add_to_carts" not in counts(tally)
    attr.observe(event("add_to_cart", T0 + 59 * MIN, "a"))
    attr.observe(event("add_to_cart", T0 - 2 * MIN, "a"))  # a device clock a little behind
    assert counts(tally)["add_to_carts"] == 2


def test_a_purchase_counts_its_attributed_lines_and_the_buyer_once_a_day() -> None:
    attr, tally = visitor()
    attr.observe(exposure("r1", ["a", "b"], ["covisit", "popular"], T0, variant="B"))
    attr.observe(purchase(T0 + MIN, [("a", 10.0, 2), ("zzz", 5.0, 1)]))
    attr.observe(purchase(T0 + 2 * MIN, [("b", 3.0, 1)]))
    attr.observe(purchase(T0 + 3 * MIN, [("zzz", 3.0, 1)]))  # nothing shown: no order
    variant = counts(tally, name="B")
    assert variant["orders"] == 2 and variant["converters"] == 1
    assert variant["revenue"] == pytest.approx(23.0)  # the lines shown: 2 x 10 + 3
    assert variant["order_revenue"] == pytest.approx(28.0)  # the whole orders: 25 + 3
    assert counts(tally, "source", "covisit")["revenue"] == pytest.approx(20.0)
    next_day = T0 + 13 * 60 * MIN  # 01:00 the next day, within the window
    attr.observe(purchase(next_day, [("a", 1.0, 1)]))
    assert counts(tally, name="B", day=day_of(next_day))["converters"] == 1


def test_a_purchase_with_a_recommendation_id_counts_only_that_lists_items() -> None:
    attr, tally = visitor()
    attr.observe(exposure("r1", ["a"], ["covisit"], T0))
    attr.observe(exposure("r2", ["b"], ["popular"], T0 + MIN))
    attr.observe(purchase(T0 + 2 * MIN, [("a", 4.0, 1), ("b", 6.0, 1)], recommendation_id="r2"))
    assert counts(tally)["revenue"] == pytest.approx(6.0)
    assert "revenue" not in counts(tally, "source", "covisit")


def test_another_currency_counts_the_order_without_revenue() -> None:
    attr, tally = visitor()
    attr.observe(exposure("r1", ["a"], ["covisit"], T0))
    attr.observe(purchase(T0 + MIN, [("a", 4.0, 1)], currency="EUR"))
    assert counts(tally)["orders"] == 1
    assert counts(tally)["revenue"] == 0
    assert "order_revenue" not in counts(tally)


def test_the_newest_exposures_are_kept_and_the_row_round_trips() -> None:
    cfg = AttributionConfig(exposures_kept=3)
    attr, _tally = visitor(cfg)
    for n in range(5):
        attr.observe(exposure(f"r{n}", [f"i{n}"], ["popular"], T0 + n * MIN))
    assert [x[1] for x in attr.exposures] == ["r2", "r3", "r4"]
    again, tally = visitor(cfg, attr.encode())
    again.observe(event("click", T0 + 9 * MIN, "i1"))  # its list is no longer kept
    again.observe(event("click", T0 + 9 * MIN, "i3"))
    assert counts(tally)["clicks"] == 1
    assert [e["recommendation_id"] for e in again.export()] == ["r2", "r3", "r4"]


def test_cleared_rows_are_deleted_and_merges_take_the_newest() -> None:
    cfg = AttributionConfig(exposures_kept=3)
    user, _ = visitor(cfg)
    anon, _ = visitor(cfg)
    user.observe(exposure("u1", ["a"], ["popular"], T0))
    anon.observe(exposure("a1", ["b"], ["popular"], T0 + MIN))
    anon.observe(exposure("a2", ["c"], ["popular"], T0 + 3 * MIN))
    user.observe(exposure("u2", ["d"], ["popular"], T0 + 2 * MIN))
    user.merged(anon.snapshot())
    assert [x[1] for x in user.exposures] == ["a1", "u2", "a2"]
    user.clear()
    assert user.encode() is None


def test_kpi_rows_add_up_and_report_rates() -> None:
    round1, round2 = Tally(), Tally()
    day = day_of(T0)
    round1.add(day, "variant", "A", "exposures", 4)
    round1.add(day, "variant", "A", "visitors", 2)
    round1.add(day, "variant", "A", "clicks", 1)
    round2.add(day, "variant", "A", "exposures", 4)
    round2.add(day, "variant", "B", "exposures", 5)
    round2.add(day, "variant", "A", "converters", 1)
    round2.add(day, "variant", "A", "orders", 2)
    round2.add(day, "variant", "A", "order_revenue", 30.0)
    round2.add(day, "variant", "A", "revenue", 20.0)
    round2.add(day, "source", "popular", "shown", 10)
    round2.add(day, "source", "popular", "clicks", 1)
    stored = round2.added_to(day, round1.added_to(day, None))
    other_partition = Tally()
    other_partition.add(day, "variant", "B", "visitors", 1)
    rows = [(day, stored), (day, other_partition.added_to(day, None))]
    by_variant = {row["variant"]: row for row in report(rows, "variant")["rows"]}
    assert by_variant["A"]["exposures"] == 8
    assert by_variant["A"]["ctr"] == pytest.approx(1 / 8)
    assert by_variant["A"]["conversion"] == pytest.approx(1 / 2)
    assert by_variant["A"]["revenue_per_visitor"] == pytest.approx(10.0)
    assert by_variant["A"]["average_order_value"] == pytest.approx(15.0)
    assert by_variant["B"]["ctr"] == 0 and by_variant["B"]["conversion"] == 0
    assert by_variant["B"]["average_order_value"] is None
    [source] = report(rows, "source")["rows"]
    assert source["source"] == "popular" and source["ctr"] == pytest.approx(0.1)
    [per_day] = report(rows, "day")["rows"]
    assert per_day["day"] == day and per_day["exposures"] == 13
    assert report(rows, "day")["totals"]["exposures"] == 13
    assert orjson.loads(stored)["variant"]["A"]["exposures"] == 8


def test_kpi_and_experiment_rows_are_read_from_every_partition(tmp_path: Path) -> None:
    day, other_day = day_of(T0), day_of(T0 + 86_400_000)
    dbs = [Rdict(str(tmp_path / f"p{n}")) for n in range(3)]
    try:
        for n, partition_db in enumerate(dbs[:2]):
            tally = Tally()
            tally.add(day, "variant", "A", "exposures", n + 1)
            tally.add_experiment("exp", "B", "visitors", 2 * (n + 1))
            partition_db[kpi_key(day)] = tally.added_to(day, None)
            partition_db[experiment_key("exp")] = tally.experiment_added_to("exp", None)
        rows = kpi_rows(dbs, [day, other_day])
        assert [d for d, _raw in rows] == [day, day]
        [a] = report(rows, "variant")["rows"]
        assert a["variant"] == "A" and a["exposures"] == 3
        assert experiment_counts(dbs, "exp") == {"B": {"visitors": 6.0}}
        assert experiment_counts(dbs, "other") == {}
    finally:
        for partition_db in dbs:
            partition_db.close()


def test_kpi_rows_expire_after_the_days_kept() -> None:
    keys = [kpi_key(d) for d in ("2025-01-01", "2025-06-01", "2025-12-05", "2025-12-06")]
    assert expired_kpi_keys(keys, "2025-12-06", 30) == keys[:2]


def test_an_outcome_before_its_exposure_waits_for_it() -> None:
    """Exposures are sent on in batches: a quick click can arrive before its list is recorded."""
    attr, tally = visitor()
    attr.observe(event("click", T0 + 100, "b", recommendation_id="r1"))
    attr.observe(purchase(T0 + 200, [("b", 5.0, 1)], recommendation_id="r1"))
    assert not tally  # nothing counted yet
    again, tally = visitor(raw=attr.encode())  # kept in the row meanwhile
    again.observe(exposure("r1", ["a", "b"], ["covisit", "popular"], T0))
    assert counts(tally)["clicks"] == 1 and counts(tally)["orders"] == 1
    assert counts(tally, "source", "popular")["revenue"] == pytest.approx(5.0)
    assert again.waiting == []


def test_kpis_count_for_the_segments_the_visitor_was_in() -> None:
    attr, tally = visitor()
    attr.segments = ["vip", "lapsed"]
    attr.observe(exposure("r1", ["a", "b"], ["collab", "trending"], T0, variant="exp/A"))
    attr.observe(exposure("r2", ["c"], ["trending"], T0 + MIN, variant="exp/B"))
    attr.observe(event("click", T0 + 2 * MIN, "a", recommendation_id="r1"))
    attr.observe(purchase(T0 + 3 * MIN, [("a", 10.0, 2), ("c", 5.0, 1)]))
    attr.segments = []  # left the segments: later outcomes count for none
    attr.observe(event("click", T0 + 4 * MIN, "c", recommendation_id="r2"))
    vip = counts(tally, "segment", "vip")
    assert vip == counts(tally, "segment", "lapsed")
    assert vip["exposures"] == 2 and vip["visitors"] == 1  # once a day, whatever the variant
    assert vip["clicks"] == 1 and vip["orders"] == 1  # one order, joined to two variants
    assert vip["revenue"] == 25.0 and vip["converters"] == 1
    assert counts(tally, "variant", "exp/A")["orders"] == 1
    assert counts(tally, "variant", "exp/B")["orders"] == 1
    rows = [(day_of(T0), tally.added_to(day_of(T0), None))]
    by_segment = {row["segment"]: row for row in report(rows, "segment")["rows"]}
    assert set(by_segment) == {"vip", "lapsed"}
    assert by_segment["vip"]["ctr"] == pytest.approx(0.5)
    assert counts(tally, "variant", "exp/B")["clicks"] == 1
