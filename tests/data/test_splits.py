"""Tests of the per-identity splits (raydefense.data.splits), Li & Wang (2019) section 5.1."""
from __future__ import annotations

import numpy as np
import pytest

from raydefense.data import PAPER_PER_IDENTITY, SPLITS, plan_splits
from raydefense.errors import ConfigError, DataError


def _labels(*sizes: int) -> np.ndarray:
    """Identity c gets sizes[c] images, interleaved so identities are not contiguous."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    return labels[np.random.default_rng(0).permutation(len(labels))]


def _per_identity_counts(plan, labels):
    return {int(c): {s: int(((labels == c) & (plan.assignment == k)).sum()) for k, s in enumerate(SPLITS)}
            for c in np.unique(labels)}


class TestPlanSplits:
    def test_paper_counts_when_enough(self):
        labels = _labels(40, 45, 60)
        plan = plan_splits(labels, per_identity=PAPER_PER_IDENTITY, seed=0)
        assert plan.assignment.dtype == np.int8 and plan.assignment.shape == labels.shape
        assert plan.per_split_counts == {"gnr": 30, "denoise": 60, "val": 15, "test": 15}
        assert plan.shortfalls == []
        for counts in _per_identity_counts(plan, labels).values():
            assert counts == PAPER_PER_IDENTITY
        assert (plan.assignment == -1).sum() == len(labels) - 120  # the extra images stay unused

    def test_disjoint_and_indices(self):
        labels = _labels(12, 9, 30)
        plan = plan_splits(labels, per_identity=PAPER_PER_IDENTITY, seed=3)
        parts = [set(plan.indices(s).tolist()) for s in SPLITS]
        for i in range(4):
            for j in range(i + 1, 4):
                assert not parts[i] & parts[j]
        assert sum(map(len, parts)) == (plan.assignment >= 0).sum()
        train = plan.indices("gnr", "denoise")
        assert set(train.tolist()) == parts[0] | parts[1] and np.all(np.diff(train) > 0)
        with pytest.raises(ConfigError, match="train"):
            plan.indices("train")

    def test_deterministic_and_seeded(self):
        labels = _labels(40, 40, 40)
        a = plan_splits(labels, per_identity=PAPER_PER_IDENTITY, seed=5)
        b = plan_splits(labels, per_identity=PAPER_PER_IDENTITY, seed=5)
        c = plan_splits(labels, per_identity=PAPER_PER_IDENTITY, seed=6)
        np.testing.assert_array_equal(a.assignment, b.assignment)
        assert (a.assignment != c.assignment).any()

    def test_identity_independent_of_others(self):
        """Adding an identity leaves the other identities' splits alone."""
        labels = np.repeat(np.arange(3), 20)
        more = np.concatenate([labels, np.full(20, 3)])
        want = {"gnr": 5, "denoise": 5, "val": 3, "test": 3}
        a = plan_splits(labels, per_identity=want, seed=1)
        b = plan_splits(more, per_identity=want, seed=1)
        np.testing.assert_array_equal(a.assignment, b.assignment[:60])

    def test_evaluation_sets_filled_first(self):
        labels = _labels(12)
        plan = plan_splits(labels, per_identity=PAPER_PER_IDENTITY, seed=0)
        assert _per_identity_counts(plan, labels)[0] == {"test": 5, "val": 5, "gnr": 2, "denoise": 0}
        assert plan.shortfalls == [
            "1 identity has fewer than 20 images: gnr gets fewer images for them (2 in all instead of 10 per identity)",
            "1 identity has fewer than 40 images: denoise gets fewer images for them (0 in all instead of 20 per identity)",
        ]

    def test_one_training_image_held_back(self):
        """An identity in the test set always keeps a training image."""
        labels = _labels(2, 6)
        plan = plan_splits(labels, per_identity=PAPER_PER_IDENTITY, seed=0)
        counts = _per_identity_counts(plan, labels)
        assert counts[0] == {"test": 1, "val": 0, "gnr": 1, "denoise": 0}
        assert counts[1] == {"test": 5, "val": 0, "gnr": 1, "denoise": 0}
        assert plan.shortfalls[0].startswith("1 identity has fewer than 6 images: test gets fewer")
        assert plan.shortfalls[1].startswith("2 identities have fewer than 11 images: val gets fewer")

    def test_too_small_identities_left_out(self):
        labels = _labels(1, 1, 40, 3)
        plan = plan_splits(labels, per_identity=PAPER_PER_IDENTITY, seed=0, min_test=2)
        counts = _per_identity_counts(plan, labels)
        assert sum(counts[0].values()) == 0 and sum(counts[1].values()) == 0
        assert counts[3] == {"test": 2, "val": 0, "gnr": 1, "denoise": 0}
        assert plan.shortfalls[0] == ("2 of 4 identities have fewer than 3 images (min_test=2 plus one for "
                                      "training): left out of every split")

    def test_invariants_on_random_sizes(self):
        rng = np.random.default_rng(11)
        sizes = rng.integers(1, 50, size=40)
        labels = _labels(*sizes)
        want = {"gnr": 4, "denoise": 7, "val": 2, "test": 3}
        plan = plan_splits(labels, per_identity=want, seed=2)
        for c, counts in _per_identity_counts(plan, labels).items():
            n = sizes[c]
            for s in SPLITS:
                assert counts[s] <= want[s]
            if n < 2:
                assert sum(counts.values()) == 0
            else:
                assert counts["test"] >= 1 and counts["gnr"] + counts["denoise"] >= 1
                assert sum(counts.values()) == min(n, sum(want.values()))
        # one line per affected split (plus the left-out line), never one per identity
        assert len(plan.shortfalls) <= 5

    def test_missing_split_means_zero(self):
        labels = _labels(10, 10)
        plan = plan_splits(labels, per_identity={"test": 2, "gnr": 3}, seed=0)
        assert plan.per_split_counts == {"gnr": 6, "denoise": 0, "val": 0, "test": 4}
        assert plan.shortfalls == []

    def test_no_training_wanted_takes_all_for_test(self):
        plan = plan_splits(_labels(3), per_identity={"test": 5}, seed=0)
        assert plan.per_split_counts["test"] == 3

    def test_empty_labels(self):
        plan = plan_splits(np.zeros(0, dtype=np.int64), per_identity=PAPER_PER_IDENTITY, seed=0)
        assert plan.assignment.shape == (0,) and sum(plan.per_split_counts.values()) == 0

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(per_identity={"train": 3}), "unknown split 'train'"),
            (dict(per_identity={"test": -1}), r"per_identity\['test'\]"),
            (dict(per_identity={"test": 1.5}), r"per_identity\['test'\]"),
            (dict(per_identity={"test": 1}, min_test=2), "min_test=2 exceeds"),
            (dict(per_identity={"test": 1}, seed=-3), "seed"),
        ],
    )
    def test_bad_config(self, kwargs, match):
        args = dict(per_identity=PAPER_PER_IDENTITY, seed=0)
        args.update(kwargs)
        with pytest.raises(ConfigError, match=match):
            plan_splits(_labels(5, 5), **args)

    @pytest.mark.parametrize("labels", [np.zeros((2, 3), dtype=int), np.array([0.0, 1.0]), np.array([0, -1])])
    def test_bad_labels(self, labels):
        with pytest.raises(DataError, match="labels"):
            plan_splits(labels, per_identity=PAPER_PER_IDENTITY, seed=0)
