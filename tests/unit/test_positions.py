"""A partition's applied position: what replay and redelivery skip."""

from __future__ import annotations

from personify.tables.positions import Position


def test_journal_records_below_the_floor_or_applied_past_it_are_held() -> None:
    position = Position()
    assert not position.holds_record(0)
    position.advance([7, 9], floor=5)  # 5, 6 and 8 still in flight somewhere
    assert [s for s in range(12) if position.holds_record(s)] == [0, 1, 2, 3, 4, 7, 9]
    position.advance([5], floor=5)
    position.advance([8], floor=6)  # the checkpoint moved past 5: 6 is the lowest pending
    assert [s for s in range(12) if position.holds_record(s)] == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    position.advance([6], floor=10)
    assert position.above == set()  # everything below the floor is held: nothing kept past it
    assert [s for s in range(12) if position.holds_record(s)] == list(range(10))


def test_a_floor_never_goes_back() -> None:
    """After a restart the journal's checkpoint may be older than the stored floor."""
    position = Position()
    position.advance([20], floor=20)
    position.advance([3], floor=2)
    assert position.floor == 20
    assert position.holds_record(19) and position.holds_record(20)


def test_offsets_per_topic() -> None:
    position = Position()
    position.advance(offsets={"routed": 41})
    position.advance(offsets={"routed": 40, "other": 3})
    assert position.holds_offset("routed", 41) and not position.holds_offset("routed", 42)
    assert position.holds_offset("other", 0) and not position.holds_offset("unknown", 0)


def test_stored_and_read_back() -> None:
    position = Position()
    position.advance([12, 15], floor=10, offsets={"routed": 7})
    again = Position.decode(position.encode())
    assert again == position
    assert Position.decode(None) == Position()
