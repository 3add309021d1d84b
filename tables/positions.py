"""What of the event log a partition's state already holds: its applied position.

The profile agent writes each partition's position in the same RocksDB write batch as the
profiles and interaction history that the round's events changed. The state and its position
therefore never disagree, whatever stops the process: replay and redelivery skip what the
position holds, however many events one visitor had since the journal's last checkpoint.
(Each visitor's window of event ids is only for what a client sends twice.)

Two kinds of position, by where the routed events come from:

- the journal (the embedded broker, whose topics do not outlive it): every sequence number
  below ``floor`` is applied, and those in ``above``. The floor is the journal's checkpoint
  (its lowest record not yet applied, any partition) when the batch was written, so ``above``
  holds only the few records applied out of order past it;
- a Kafka cluster: each routed topic's offset of the last message applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson

from personify.tables.signals import PREFIX

__all__ = ["POSITION_KEY", "Position"]

#: The key of a partition's position in its store (no visitor id starts with ``PREFIX``).
POSITION_KEY = PREFIX + b"o"


@dataclass(slots=True)
class Position:
    """One partition's applied position (see the module).

    Attributes:
        floor: every journal record with a lower sequence number is applied.
        above: journal records at or above ``floor`` that are applied.
        offsets: routed topic -> offset of the last message applied (a Kafka cluster).
    """

    floor: int = 0
    above: set[int] = field(default_factory=set)
    offsets: dict[str, int] = field(default_factory=dict)

    def holds_record(self, seq: int) -> bool:
        """Whether the journal record ``seq`` is applied."""
        return seq < self.floor or seq in self.above

    def holds_offset(self, topic: str, offset: int) -> bool:
        """Whether the message at ``offset`` of ``topic`` (this partition) is applied."""
        return offset <= self.offsets.get(topic, -1)

    def advance(
        self, seqs: Iterable[int] = (), floor: int = 0, offsets: Mapping[str, int] | None = None
    ) -> None:
        """Add what a round applied.

        Args:
            seqs: the journal records applied.
            floor: the journal's checkpoint before them (every lower record is applied).
            offsets: routed topic -> offset of its last message applied.
        """
        self.floor = max(self.floor, floor)
        self.above = {s for s in (*self.above, *seqs) if s >= self.floor}
        for topic, offset in (offsets or {}).items():
            self.offsets[topic] = max(self.offsets.get(topic, -1), offset)

    def encode(self) -> bytes:
        """As stored."""
        return orjson.dumps(
            {"floor": self.floor, "above": sorted(self.above), "offsets": self.offsets}
        )

    @classmethod
    def decode(cls, raw: bytes | None) -> Position:
        """The stored position ``raw`` (None: nothing applied yet)."""
        if raw is None:
            return cls()
        data = orjson.loads(raw)
        return cls(int(data["floor"]), set(data["above"]), dict(data["offsets"]))
