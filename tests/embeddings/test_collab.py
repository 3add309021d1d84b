"""The learned collaborative model: ALS training, fold-in, top items, explanations, saving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

from personify.embeddings import SnapshotError
from personify.embeddings.collab import AlsSettings, CollabModel, train_als

SETTINGS = AlsSettings(factors=4, regularization=0.5, alpha=2.0, iterations=15, seed=3)


def _clusters(
    users_per: int = 40, items_per: int = 12, seed: int = 0
) -> tuple[list[int], list[int], list[str]]:
    """Two tastes: visitors of group A interact with A items only, B with B items."""
    rng = np.random.default_rng(seed)
    items = [f"a-{j}" for j in range(items_per)] + [f"b-{j}" for j in range(items_per)]
    u: list[int] = []
    i: list[int] = []
    for user in range(2 * users_per):
        offset = 0 if user < users_per else items_per
        for j in rng.choice(items_per, size=8, replace=False).tolist():
            u.append(user)
            i.append(offset + j)
    return u, i, items


@pytest.fixture(scope="module")
def model() -> CollabModel:
    u, i, items = _clusters()
    return train_als(u, i, np.ones(len(u), dtype=np.float32), items, SETTINGS)


def test_a_visitor_of_one_taste_gets_items_of_that_taste(model: CollabModel) -> None:
    """Fold-in from four A items ranks the eight other A items above every B item."""
    seeds = ["a-0", "a-1", "a-2", "a-3"]
    vector = model.fold_in(seeds, [1.0] * 4)
    assert vector is not None
    found, scores = model.top(vector, 8, exclude=set(seeds))
    assert sorted(found) == sorted(f"a-{j}" for j in range(4, 12))
    assert list(scores) == sorted(scores, reverse=True)
    vector_b = model.fold_in(["b-3", "b-5"], [1.0, 1.0])
    assert vector_b is not None
    assert model.top(vector_b, 1)[0][0].startswith("b-")


def test_fold_in_solves_the_visitors_step_of_als(model: CollabModel) -> None:
    """The folded-in vector is the exact least-squares solution implicit computes."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        exact = AlternatingLeastSquares(
            factors=model.dim,
            regularization=SETTINGS.regularization,
            alpha=SETTINGS.alpha,
            use_cg=False,
            random_state=0,
        )
    exact.item_factors = model.factors.copy()
    exact.user_factors = np.zeros((1, model.dim), dtype=np.float32)
    positions = model.positions(["a-2", "a-5", "b-1"])
    weights = np.array([1.0, 3.0, 0.5], dtype=np.float32)
    row = sparse.csr_matrix((weights, ([0, 0, 0], positions)), shape=(1, len(model)))
    expected = exact.recalculate_user(0, row)
    got = model.fold_in(["a-2", "a-5", "b-1"], weights.tolist())
    assert got is not None
    np.testing.assert_allclose(got, np.asarray(expected).ravel(), rtol=1e-3, atol=1e-4)


def test_unknown_items_are_left_out_of_the_fold_in(model: CollabModel) -> None:
    """Items the model never saw add nothing; with none known there is no vector."""
    assert model.fold_in(["new-1", "new-2"], [1.0, 1.0]) is None
    with_unknown = model.fold_in(["a-0", "new-1"], [1.0, 1.0])
    alone = model.fold_in(["a-0"], [1.0])
    assert with_unknown is not None and alone is not None
    np.testing.assert_allclose(with_unknown, alone, rtol=1e-6)


def test_an_item_given_twice_counts_with_its_stronger_weight(model: CollabModel) -> None:
    """Repeats do not add up: the strongest interaction with an item counts, as in training."""
    twice = model.fold_in(["a-0", "a-0", "a-4"], [1.0, 5.0, 1.0])
    once = model.fold_in(["a-0", "a-4"], [5.0, 1.0])
    assert twice is not None and once is not None
    np.testing.assert_allclose(twice, once, rtol=1e-6)


def test_the_reason_is_the_visitors_item_most_like_the_candidate(model: CollabModel) -> None:
    """Explaining an A item among one A and one B item of the visitor names the A item."""
    assert model.closest("a-7", ["b-2", "a-3"]) == "a-3"
    assert model.closest("b-7", ["b-2", "a-3"]) == "b-2"
    assert model.closest("unknown", ["a-3"]) is None
    assert model.closest("a-7", ["unknown"]) is None


def test_top_never_returns_more_than_there_is(model: CollabModel) -> None:
    """Asking for more items than are left after exclusions returns those left."""
    vector = model.fold_in(["a-0"], [1.0])
    assert vector is not None
    everything = set(model.item_ids)
    found, _scores = model.top(vector, 100, exclude=everything - {"a-1", "b-1"})
    assert sorted(found) == ["a-1", "b-1"]
    assert model.top(vector, 5, exclude=everything) == ([], pytest.approx([]))


def test_saved_model_loads_back_the_same(model: CollabModel, tmp_path: Path) -> None:
    """Save then load: same items, vectors and description; the latest save wins."""
    model.save(tmp_path / "m")
    loaded = CollabModel.load(tmp_path / "m")
    assert loaded is not None
    assert loaded.item_ids == model.item_ids
    np.testing.assert_array_equal(loaded.factors, model.factors)
    np.testing.assert_array_equal(loaded.popularity, model.popularity)
    assert loaded.popular(3)[0] == model.popular(3)[0]
    assert loaded.describe() == model.describe()
    newer = train_als([0, 0, 1], [0, 1, 1], [1.0, 1.0, 1.0], ["x", "y"], SETTINGS)
    newer.save(tmp_path / "m")
    again = CollabModel.load(tmp_path / "m")
    assert again is not None and again.item_ids == ("x", "y")
    assert len(list((tmp_path / "m").glob("factors-*.npy"))) == 1


def test_loading_where_there_is_no_model_gives_none(tmp_path: Path) -> None:
    """An empty or missing directory holds no model."""
    assert CollabModel.load(tmp_path / "nothing") is None
    assert CollabModel.load(tmp_path) is None


def test_a_damaged_model_is_reported(model: CollabModel, tmp_path: Path) -> None:
    """A manifest whose vectors are gone, or of another format, raises SnapshotError."""
    model.save(tmp_path)
    for old in tmp_path.glob("factors-*.npy"):
        old.unlink()
    with pytest.raises(SnapshotError, match="cannot read the model"):
        CollabModel.load(tmp_path)
    (tmp_path / "model.json").write_text('{"format": "something else"}')
    with pytest.raises(SnapshotError, match="not a model of this version"):
        CollabModel.load(tmp_path)


def test_training_needs_interactions_and_valid_settings() -> None:
    """No interaction, ragged arrays and impossible settings are refused with the reason."""
    with pytest.raises(ValueError, match="no interaction"):
        train_als([], [], [], ["a"], SETTINGS)
    with pytest.raises(ValueError, match="same length"):
        train_als([0, 1], [0], [1.0], ["a"], SETTINGS)
    with pytest.raises(ValueError, match="at least 1"):
        AlsSettings(factors=0)
    with pytest.raises(ValueError, match="alpha"):
        AlsSettings(alpha=0.0)


def test_the_model_counts_what_it_learned_from(model: CollabModel) -> None:
    """It says how many visitors, items and pairs it was fitted on, and knows best sellers."""
    info = model.describe()
    assert info["items"] == 24
    assert info["users"] == 80
    assert info["interactions"] == 640
    assert info["factors"] == 4
    # Visitors per item: each of the 80 visitors interacted with 8 items.
    assert model.popularity.sum() == 640 and len(model.popularity) == 24
    found, counts = model.popular(24, exclude={"a-0"})
    assert "a-0" not in found and len(found) == 23
    assert counts.tolist() == sorted(counts.tolist(), reverse=True)


def test_a_large_catalog_is_searched_through_an_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the threshold the top items come from an inverted-file index.

    They are nearly the exact ones, never an excluded one, best first.
    """
    from personify.embeddings import collab

    monkeypatch.setattr(collab, "ANN_THRESHOLD", 1000)
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((40, 16)).astype(np.float32)
    factors = (centres[rng.integers(0, 40, 4000)] + 0.5 * rng.standard_normal((4000, 16))).astype(
        np.float32
    )
    model = CollabModel(tuple(f"i{j}" for j in range(4000)), factors, SETTINGS, 0, 0, 0)
    seeds = [f"i{j}" for j in range(0, 400, 20)]
    vector = model.fold_in(seeds, [1.0] * len(seeds))
    assert vector is not None
    found, scores = model.top(vector, 50, exclude=set(seeds))
    order = np.argsort(-model.scores(vector))
    exact = [model.item_ids[j] for j in order if model.item_ids[j] not in seeds][:50]
    assert len(set(found) & set(exact)) >= 45
    assert not set(found) & set(seeds)
    assert list(scores) == sorted(scores, reverse=True)
