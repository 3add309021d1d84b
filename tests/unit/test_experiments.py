"""Experiments: assignment, validation, traffic slices and always-valid results."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from personify.agents.experiments import Registry, results
from personify.engine.errors import ValidationError

NOW = 1_765_022_400_000


def ab(**extra: Any) -> dict[str, Any]:
    return {
        "variants": [
            {"name": "A"},
            {"name": "B", "setting": {"weights.collab": 2.0}, "ranker": False},
        ],
        **extra,
    }


def test_assignment_is_deterministic_split_by_shares_and_kept(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "experiments.json")
    registry.put("e1", ab(), NOW)
    visitors = [f"v{n}" for n in range(4000)]
    first = {v: registry.assign(v, {}, NOW) for v in visitors}
    assert all(first[v] is not None for v in visitors)  # traffic 1: everyone is in it
    share_b = sum(1 for v in visitors if first[v][1].name == "B") / len(visitors)  # type: ignore[index]
    assert 0.46 < share_b < 0.54
    again = Registry(tmp_path / "experiments.json")  # after a restart: the same
    assert all(again.assign(v, {}, NOW) == first[v] for v in visitors[:200])
    chosen = first["v1"]
    assert chosen is not None
    other = "A" if chosen[1].name == "B" else "B"
    kept = again.assign("v1", {"e1": other}, NOW)  # served before in the other variant
    assert kept is not None and kept[1].name == other


def test_experiments_never_share_a_visitor(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "experiments.json")
    registry.put("e1", ab(traffic=0.3), NOW)
    registry.put("e2", ab(traffic=0.5), NOW)
    with pytest.raises(ValidationError) as exc:
        registry.put("e3", ab(traffic=0.3), NOW)
    assert exc.value.field == "traffic"
    counts = {"e1": 0, "e2": 0, None: 0}
    for n in range(5000):
        chosen = registry.assign(f"v{n}", {}, NOW)
        counts[None if chosen is None else chosen[0].id] += 1
    assert 0.27 < counts["e1"] / 5000 < 0.33 and 0.47 < counts["e2"] / 5000 < 0.53
    registry.stop("e1", NOW)  # its slice is free again
    assert registry.put("e3", ab(traffic=0.3), NOW + 1).offset == pytest.approx(0.0)


def test_an_experiment_on_a_segment_takes_only_its_visitors(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "experiments.json")
    registry.put("vip-test", ab(segment="vip", traffic=0.5), NOW)
    registry.put("everyone", ab(traffic=0.5), NOW)
    assert registry.targeted(NOW)
    vips = {f"v{n}": registry.assign(f"v{n}", {}, NOW, ["vip"]) for n in range(2000)}
    others = {f"v{n}": registry.assign(f"v{n}", {}, NOW, ["other"]) for n in range(2000)}
    in_test = [v for v, chosen in vips.items() if chosen and chosen[0].id == "vip-test"]
    assert 0.45 < len(in_test) / 2000 < 0.55  # its slice of the segment's visitors
    assert not any(chosen and chosen[0].id == "vip-test" for chosen in others.values())
    # A visitor served in it keeps their variant after leaving the segment.
    kept = registry.assign(in_test[0], {"vip-test": "B"}, NOW, [])
    assert kept is not None and (kept[0].id, kept[1].name) == ("vip-test", "B")
    assert Registry(tmp_path / "experiments.json").get("vip-test").segment == "vip"  # type: ignore[union-attr]


def test_start_and_stop_times(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "experiments.json")
    registry.put("e1", ab(start="2025-12-07T00:00:00Z", stop="2025-12-08T00:00:00Z"), NOW)
    assert registry.assign("v", {}, NOW) is None  # not started
    assert registry.assign("v", {}, NOW + 86_400_000) is not None
    assert registry.assign("v", {}, NOW + 2 * 86_400_000) is None  # stopped


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"variants": [{"name": "A"}]}, "variants"),
        ({"variants": [{"name": "A"}, {"name": "A"}]}, "variants"),
        (
            {"variants": [{"name": "A"}, {"name": "B", "setting": {"nope": 1}}]},
            "variants[1].setting.nope",
        ),
        ({"variants": [{"name": "A"}, {"name": "B", "share": -1}]}, "variants[1].share"),
        ({"variants": [{"name": "A"}, {"name": "B/C"}]}, "variants[1].name"),
        ({**ab(), "control": "Z"}, "control"),
        ({**ab(), "traffic": 2}, "traffic"),
        ({**ab(), "start": "soon"}, "start"),
        ({**ab(), "colour": "red"}, "colour"),
        ({**ab(), "segment": "not an id"}, "segment"),
    ],
)
def test_bad_experiments_name_the_field(tmp_path: Path, doc: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Registry(tmp_path / "experiments.json").put("e1", doc, NOW)
    assert exc.value.field == field


def _counts(rng: random.Random, n: int, rate: float) -> dict[str, float]:
    converters = sum(1 for _ in range(n) if rng.random() < rate)
    return {"visitors": n, "converters": converters, "clickers": 0, "revenue": 0.0}


def test_peeking_every_hour_keeps_the_false_positive_rate(tmp_path: Path) -> None:
    """200 A/A runs, results looked at after each of 24 hours: few ever look significant."""
    registry = Registry(tmp_path / "experiments.json")
    experiment = registry.put("aa", ab(), NOW)
    rng = random.Random(7)
    false_positives = 0
    for _run in range(200):
        totals = {"A": _counts(rng, 0, 0.05), "B": _counts(rng, 0, 0.05)}
        flagged = False
        for _hour in range(24):
            for name in ("A", "B"):
                more = _counts(rng, 200, 0.05)
                totals[name] = {k: totals[name][k] + more[k] for k in more}
            shown = results(experiment, totals, alpha=0.05, effect=0.1)
            b = next(v for v in shown["variants"] if v["name"] == "B")
            flagged = flagged or b["conversion"]["lift"]["significant"]
        false_positives += flagged
    assert false_positives / 200 <= 0.05


def test_a_real_difference_is_found(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "experiments.json")
    experiment = registry.put("ab", ab(), NOW)
    rng = random.Random(3)
    totals = {"A": _counts(rng, 40_000, 0.05), "B": _counts(rng, 40_000, 0.06)}
    shown = results(experiment, totals, alpha=0.05, effect=0.1)
    b = next(v for v in shown["variants"] if v["name"] == "B")
    lift = b["conversion"]["lift"]
    assert lift["significant"] and lift["interval"][0] > 0
    low, high = b["conversion"]["interval"]
    assert low < b["conversion"]["value"] < high


def test_thompson_sampling_favours_the_better_variant_above_a_floor(tmp_path: Path) -> None:
    counts = {
        "A": {"visitors": 1000, "converters": 50},
        "B": {"visitors": 1000, "converters": 90},
    }
    registry = Registry(tmp_path / "experiments.json", lambda _experiment: counts)
    registry.put("bandit", ab(allocation="thompson", floor=0.1), NOW)
    drawn = [registry.assign(f"v{n}", {}, NOW) for n in range(2000)]
    share_a = sum(1 for d in drawn if d is not None and d[1].name == "A") / len(drawn)
    assert 0.08 < share_a < 0.2  # the floor's even deal gives A about 10%, the draws almost none
    assert registry.assign("v1", {}, NOW + 5000) == drawn[1]  # a visitor keeps the draw
    with pytest.raises(ValidationError) as exc:
        registry.put("bandit2", ab(allocation="thompson", floor=0.6, traffic=0.0), NOW)
    assert exc.value.field == "floor"
