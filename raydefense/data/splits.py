"""Per-identity splits following the protocol of Li & Wang (2019), section 5.1.

The paper takes, from each LFW identity, 10 images to train the GNR (the WGAN-GP noise
generator), 20 to train the denoiser on GNR-made adversarial images, 5 for validation and
5 for testing. The target classifier of this project is trained on the GNR and denoiser
images (never on validation or test images).

Within each identity the images are shuffled with a generator seeded by
``[seed, label]`` (so an identity's split does not depend on the other identities) and
handed out in the order ``test, val, gnr, denoise``: the evaluation sets are filled first.
While the test and validation sets are filled one image is held back for training, so an
identity in the test set always has a training image. Identities with fewer than
``min_test + 1`` images cannot be in both training and test and are left out entirely.
Where the data does not allow the requested counts, :attr:`SplitPlan.shortfalls` says so
in one plain line per affected split (not per identity), for the pipeline to print.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from raydefense.errors import ConfigError, DataError
from raydefense.seeding import numpy_rng

__all__ = ["SPLITS", "SplitPlan", "plan_splits", "PAPER_PER_IDENTITY", "images_needed", "synthetic_split_problem",
           "empty_split_problem"]

SPLITS = ("gnr", "denoise", "val", "test")
# Li & Wang (2019), section 5.1: images per class for each split.
PAPER_PER_IDENTITY = {"gnr": 10, "denoise": 20, "val": 5, "test": 5}
_FILL_ORDER = ("test", "val", "gnr", "denoise")  # evaluation sets first
_SPLIT_TAG = 2  # keeps these streams apart from the synthetic dataset's (tags 0 and 1)


@dataclass(frozen=True, eq=False)
class SplitPlan:
    """Which split each image belongs to.

    Attributes:
        assignment: int8 (N,), an index into :data:`SPLITS` per image, or -1 (unused).
        per_split_counts: number of images per split name (all of :data:`SPLITS`).
        shortfalls: plain one-line notes where identities had too few images.
    """

    assignment: np.ndarray
    per_split_counts: dict[str, int]
    shortfalls: list[str]

    def indices(self, *names: str) -> np.ndarray:
        """Sorted int64 indices of the images in any of the splits ``names``.

        ``plan.indices("gnr", "denoise")`` are the training images of the target classifier.
        """
        codes = []
        for name in names:
            if name not in SPLITS:
                raise ConfigError(f"unknown split {name!r}; known splits: {', '.join(SPLITS)}")
            codes.append(SPLITS.index(name))
        return np.flatnonzero(np.isin(self.assignment, codes)).astype(np.int64)


def images_needed(per_identity: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Per split: ``(images an identity needs to give it one image, to give it its full count)``.

    Follows :func:`plan_splits`' greedy fill (test, val, gnr, denoise; one image held back from
    test and val for training). A split asked for 0 images maps to ``(0, 0)``.
    """
    want = {name: int(per_identity.get(name, 0)) for name in SPLITS}
    reserve = 1 if want["gnr"] + want["denoise"] > 0 else 0
    out, before = {}, 0
    for name in _FILL_ORDER:
        hold = reserve if name in ("test", "val") else 0
        out[name] = (before + hold + 1, before + hold + want[name]) if want[name] else (0, 0)
        before += want[name]
    return out


def _asked(per_identity: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {int(per_identity.get(name, 0))}" for name in SPLITS)


def synthetic_split_problem(images_per_identity: int, per_identity: Mapping[str, int]) -> str | None:
    """Why ``images_per_identity`` images of every identity cannot fill the splits, or None.

    The synthetic dataset gives every identity the same number of images, so each split gets its
    full count or the config is refused (no short and no empty split goes downstream).
    """
    for name, (_, full) in sorted(images_needed(per_identity).items(), key=lambda kv: _FILL_ORDER.index(kv[0])):
        if full > images_per_identity:
            total = sum(int(per_identity.get(n, 0)) for n in SPLITS)
            return (f"{images_per_identity} images per identity leave split '{name}' short: the splits "
                    f"(data.splits: {_asked(per_identity)}) need {total} per identity; raise it to {total} "
                    f"or lower data.splits.*")
    return None


def empty_split_problem(plan: "SplitPlan", per_identity: Mapping[str, int], *, largest: int) -> str | None:
    """Why ``plan`` cannot be used, or None: a split that ``per_identity`` asks for got no image.

    ``largest`` is the image count of the largest identity (for the message). Splits may come
    out short for some identities (their notes are :attr:`SplitPlan.shortfalls`), never empty.
    """
    needed = images_needed(per_identity)
    for name in _FILL_ORDER:
        if int(per_identity.get(name, 0)) > 0 and plan.per_split_counts.get(name, 0) == 0:
            return (f"split '{name}' would be empty: an identity needs at least {needed[name][0]} images to give it "
                    f"one (data.splits: {_asked(per_identity)}), and the largest identity has {largest}; "
                    f"add images or lower data.splits.*")
    return None


def _have(n: int) -> str:
    return "has" if n == 1 else "have"


def _count(n: int) -> str:
    return f"{n} identity has" if n == 1 else f"{n} identities have"


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def plan_splits(
    labels: np.ndarray,
    *,
    per_identity: Mapping[str, int],
    seed: int,
    min_test: int = 1,
) -> SplitPlan:
    """Assign images to the GNR / denoiser / validation / test splits, per identity.

    Args:
        labels: int (N,) identity label of each image (non-negative).
        per_identity: images wanted per identity for each split name in :data:`SPLITS`;
            a missing name means 0. The paper's counts are :data:`PAPER_PER_IDENTITY`
            (10 / 20 / 5 / 5).
        seed: non-negative seed of the per-identity shuffles.
        min_test: test images an identity must be able to give (plus one training image)
            to take part at all; must not exceed ``per_identity["test"]`` (default 1).

    Returns:
        A :class:`SplitPlan`; deterministic for a seed, splits disjoint.

    Raises:
        ConfigError: an unknown split name or a bad count.
        DataError: ``labels`` is not a 1-D array of non-negative integers.
    """
    unknown = sorted(set(per_identity) - set(SPLITS))
    if unknown:
        raise ConfigError(f"unknown split {unknown[0]!r} in per_identity; known splits: {', '.join(SPLITS)}")
    want = {name: _check_count(f"per_identity[{name!r}]", per_identity.get(name, 0)) for name in SPLITS}
    _check_count("seed", seed)
    _check_count("min_test", min_test)
    if min_test > want["test"]:
        raise ConfigError(f"min_test={min_test} exceeds per_identity['test']={want['test']}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0)):
        raise DataError(f"labels must be a 1-D array of non-negative integers, got dtype {labels.dtype} shape {labels.shape}")

    assignment = np.full(labels.shape[0], -1, dtype=np.int8)
    train_wanted = want["gnr"] + want["denoise"] > 0
    reserve = 1 if train_wanted else 0  # held back from test / val for training
    # Images an identity needs so that a split gets all it asked for (the fill is greedy).
    needed, running = {}, 0
    for name in _FILL_ORDER:
        running += want[name]
        needed[name] = running + (reserve if name in ("test", "val") else 0)
    short = {name: 0 for name in SPLITS}
    given = {name: 0 for name in SPLITS}
    left_out = 0

    classes = np.unique(labels)
    for label in classes:
        members = np.flatnonzero(labels == label)
        if len(members) < min_test + 1:
            left_out += 1
            continue
        order = members[numpy_rng(seed, _SPLIT_TAG, label).permutation(len(members))]
        pos = 0
        for name in _FILL_ORDER:
            hold = reserve if name in ("test", "val") else 0
            take = max(0, min(want[name], len(order) - pos - hold))
            assignment[order[pos:pos + take]] = SPLITS.index(name)
            pos += take
            given[name] += take
            if take < want[name]:
                short[name] += 1

    shortfalls = []
    if left_out:
        shortfalls.append(
            f"{left_out} of {len(classes)} identities {_have(left_out)} fewer than {min_test + 1} images "
            f"(min_test={min_test} plus one for training): left out of every split"
        )
    for name in _FILL_ORDER:
        if short[name]:
            shortfalls.append(
                f"{_count(short[name])} fewer than {needed[name]} images: {name} gets fewer "
                f"images for them ({given[name]} in all instead of {want[name]} per identity)"
            )
    counts = {name: int((assignment == SPLITS.index(name)).sum()) for name in SPLITS}
    return SplitPlan(assignment=assignment, per_split_counts=counts, shortfalls=shortfalls)
