"""The evaluation harness: the `Recommender` protocol and the two protocols that score it.

Any method, an offline baseline or the live engine behind HTTP, plugs in as a `Recommender`:
``fit(train, items)`` once, then ``recommend(user_id, k, exclude)`` as often as asked. A method
that can learn while it serves is also a `StreamingRecommender`: it has ``observe(event)``.

Protocols (both use the same temporal split and the same candidate set: the whole catalog minus
what the user has already interacted with):

- **offline** (`evaluate_offline`): the model sees only the training period. Every user with at
  least one training interaction and at least one test-period item not seen in training gets
  one top-K list, scored against all of those test-period items ("next items" = the set of
  items the user interacts with in the test period, minus items seen in training).
- **replay** (`evaluate_replay`): the test period is replayed in timestamp order, one *step*
  at a time: a step is the set of a user's events that share one timestamp (MovieLens users
  submit several ratings in the same second; their order inside the second is unknown, so
  nothing is predicted between them). Before each step the user's top-K list is requested
  (excluding everything the user has interacted with so far) and scored against the step's
  items new to the user; then the step's events are revealed: added to the user's exclusions
  and, with ``update=True``, passed one by one to ``observe``. With ``update=False`` the model
  stays as it was fitted (a static model evaluated on the same steps). Steps are predicted
  only for users with at least one earlier interaction (training or test period); each is
  tagged ``warm`` (the user has training interactions) or ``cold`` (the user first appeared
  in the test period).

The harness checks every list it gets (no more than ``k`` ids, no duplicates, nothing from
``exclude``) and raises `ValueError` otherwise.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from _metrics import RECALL_CUTOFF, MetricAccumulator
from _movielens import Interaction, Item

__all__ = [
    "Evaluation",
    "Recommender",
    "StreamingRecommender",
    "evaluate_offline",
    "evaluate_replay",
    "offline_targets",
    "replay_targets",
]


@runtime_checkable
class Recommender(Protocol):
    """A method under evaluation.

    The catalog is fixed by ``fit``: ``recommend`` may return only ids of ``items`` (or items
    seen in ``train``).
    """

    def fit(self, train: Sequence[Interaction], items: Sequence[Item]) -> None:
        """Learn from the training interactions (sorted by time) and the catalog."""
        ...

    def recommend(self, user_id: str, k: int, exclude: Collection[str]) -> list[str]:
        """The user's top-``k`` item ids, best first, none of them in ``exclude``.

        ``exclude`` is read-only and valid only during the call (the harness keeps mutating
        it); a user never seen gets the method's best non-personal list.
        """
        ...


@runtime_checkable
class StreamingRecommender(Recommender, Protocol):
    """A method that also learns online, one event at a time."""

    def observe(self, event: Interaction) -> None:
        """Take in one interaction that just happened (events arrive in timestamp order)."""
        ...


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The outcome of one protocol run.

    Attributes:
        metrics: the per-unit figures (users offline, events in replay), grouped.
        recommend_calls: how many lists were requested.
        recommend_s: seconds spent inside ``recommend``.
        observe_s: seconds spent inside ``observe`` (replay with ``update=True``).
        wall_s: seconds for the whole run.
    """

    metrics: MetricAccumulator
    recommend_calls: int
    recommend_s: float
    observe_s: float
    wall_s: float

    @property
    def recommend_us(self) -> float:
        """Mean microseconds per ``recommend`` call."""
        return 1e6 * self.recommend_s / self.recommend_calls if self.recommend_calls else 0.0


def _checked(ranked: list[str], k: int, exclude: Collection[str], who: str) -> list[str]:
    if not isinstance(ranked, list):
        raise ValueError(f"{who}: recommend returned {type(ranked).__name__}, expected a list")
    if len(ranked) > k:
        raise ValueError(f"{who}: recommend returned {len(ranked)} ids for k={k}")
    if len(set(ranked)) != len(ranked):
        raise ValueError(f"{who}: recommend returned duplicate ids: {ranked}")
    leaked = [item for item in ranked if item in exclude]
    if leaked:
        raise ValueError(f"{who}: recommend returned excluded ids {leaked[:5]}")
    return ranked


def _histories(interactions: Iterable[Interaction]) -> defaultdict[str, set[str]]:
    seen: defaultdict[str, set[str]] = defaultdict(set)
    for event in interactions:
        seen[event.user_id].add(event.item_id)
    return seen


def offline_targets(
    train: Sequence[Interaction], test: Sequence[Interaction]
) -> dict[str, frozenset[str]]:
    """Each evaluable user's relevant set: test-period items not seen in training.

    Users without a training interaction, or whose test items were all seen in training,
    are left out.
    """
    seen = _histories(train)
    future = _histories(test)
    targets = {}
    for user, items in future.items():
        fresh = items - seen.get(user, set())
        if user in seen and fresh:
            targets[user] = frozenset(fresh)
    return dict(sorted(targets.items()))


def _steps(events: Sequence[Interaction]) -> Iterator[Sequence[Interaction]]:
    """Runs of consecutive events with the same user and timestamp."""
    start = 0
    for end in range(1, len(events) + 1):
        if (
            end == len(events)
            or events[end].user_id != events[start].user_id
            or events[end].timestamp != events[start].timestamp
        ):
            yield events[start:end]
            start = end


def replay_targets(
    train: Sequence[Interaction],
    test: Sequence[Interaction],
    users: Collection[str] | None = None,
) -> int:
    """How many steps `evaluate_replay` would predict (with ``sample=1.0``)."""
    seen = _histories(train)
    count = 0
    for step in _steps(test):
        history = seen[step[0].user_id]
        fresh = any(e.item_id not in history for e in step)
        if history and fresh and (users is None or step[0].user_id in users):
            count += 1
        history.update(e.item_id for e in step)
    return count


def evaluate_offline(
    recommender: Recommender,
    train: Sequence[Interaction],
    test: Sequence[Interaction],
    catalog_size: int,
    *,
    users: Collection[str] | None = None,
    name: str = "recommender",
) -> Evaluation:
    """One top-K list per evaluable user, from a model fitted on ``train`` (see module doc).

    Args:
        recommender: already fitted on ``train``.
        train: the training interactions (they define what each user has seen).
        test: the test-period interactions.
        catalog_size: items in the catalog (for coverage).
        users: evaluate only these users (None: every evaluable user).
        name: the method's name, for error messages.
    """
    started = time.perf_counter()
    seen = _histories(train)
    metrics = MetricAccumulator(catalog_size)
    spent = 0.0
    calls = 0
    for user, relevant in offline_targets(train, test).items():
        if users is not None and user not in users:
            continue
        exclude = seen[user]
        t0 = time.perf_counter()
        ranked = recommender.recommend(user, RECALL_CUTOFF, exclude)
        spent += time.perf_counter() - t0
        calls += 1
        metrics.add(_checked(ranked, RECALL_CUTOFF, exclude, name), relevant, "warm")
    return Evaluation(metrics, calls, spent, 0.0, time.perf_counter() - started)


def evaluate_replay(
    recommender: Recommender,
    train: Sequence[Interaction],
    test: Sequence[Interaction],
    catalog_size: int,
    *,
    update: bool,
    users: Collection[str] | None = None,
    sample: float = 1.0,
    seed: int = 0,
    name: str = "recommender",
) -> Evaluation:
    """Predict each step of the test period before revealing it, in time order (module doc).

    Args:
        recommender: already fitted on ``train``; with ``update=True`` it must be a
            `StreamingRecommender` and is changed by the run (fit a fresh one for the next).
        train: the training interactions (they define what each user has seen at the start).
        test: the test-period interactions, sorted by timestamp and, within a timestamp, by
            user (a user's events of one second must be contiguous to form one step).
        catalog_size: items in the catalog (for coverage).
        update: reveal each event to ``observe`` after its step was predicted.
        users: predict only these users' steps (None: every user); every event is still
            revealed, so the model's state does not depend on this sample.
        sample: predict each eligible step with this probability (1.0: every one), drawn
            from ``random.Random(seed)`` in order; again every event is revealed.
        seed: the seed of that draw.
        name: the method's name, for error messages.
    """
    observer: StreamingRecommender | None = None
    if update:
        if not isinstance(recommender, StreamingRecommender):
            raise TypeError(f"{name}: update=True needs a StreamingRecommender (with observe)")
        observer = recommender
    started = time.perf_counter()
    seen = _histories(train)
    warm = set(seen)
    metrics = MetricAccumulator(catalog_size)
    draw = random.Random(seed).random if sample < 1.0 else None
    spent = 0.0
    observing = 0.0
    calls = 0
    for step in _steps(test):
        user = step[0].user_id
        history = seen[user]
        fresh = {e.item_id for e in step} - history
        if (
            history
            and fresh
            and (users is None or user in users)
            and (draw is None or draw() < sample)
        ):
            t0 = time.perf_counter()
            ranked = recommender.recommend(user, RECALL_CUTOFF, history)
            spent += time.perf_counter() - t0
            calls += 1
            group = "warm" if user in warm else "cold"
            metrics.add(_checked(ranked, RECALL_CUTOFF, history, name), fresh, group)
        for event in step:
            if observer is not None:
                t0 = time.perf_counter()
                observer.observe(event)
                observing += time.perf_counter() - t0
            history.add(event.item_id)
    return Evaluation(metrics, calls, spent, observing, time.perf_counter() - started)
