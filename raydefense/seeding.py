"""The one place that seeds random number generators.

Two kinds of randomness, two helpers:

- **global state** (torch's default generator, which dropout, weight init, attacks' random
  starts and ``torch.randn`` without a generator use): :func:`seed_everything`, called by each
  training worker with :func:`worker_seed` and by each actor batch that draws;
- **derived streams**, one per purpose and key, independent of how work is batched or which
  worker does it: :func:`torch_generator` and :func:`numpy_rng`.
"""
from __future__ import annotations

import contextlib
import random
import zlib
from typing import Iterator

import numpy as np
import torch

# Per-loop offsets keep the global streams of the training loops apart (same seed, same rank).
STREAMS = {"classifier": 0, "gnr": 101, "denoiser": 202}


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a torch Generator seeded the same."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch_generator(seed)


def worker_seed(seed: int, loop: str, rank: int, task: str = "") -> int:
    """The global seed of training loop ``loop`` (a key of :data:`STREAMS`) on worker ``rank``.

    ``task`` (e.g. 'target', 'surrogate') gives each training of the same loop its own stream:
    without it a surrogate of the target's architecture started from the target's very weights
    and saw the same batches, i.e. it *was* the target and its "black-box" attacks were white-box.
    The offset is a CRC-32 of the name (stable across processes, unlike ``hash``)."""
    return seed + STREAMS[loop] + rank + _name_offset(task)


def epoch_seed(seed: int, epoch: int, stream: str = "") -> int:
    """The seed of epoch ``epoch``'s batch order and augmentation draws in a classifier training.

    Trainings with the same ``stream`` (by default the empty one: the target, the teacher and
    student, the baselines) see the same batches in the same order; a ``stream`` of their own
    (the surrogate's) gives their own, as an attacker who trains a copy does not replay the
    defender's batches. Same CRC-32 offset as :func:`worker_seed`."""
    return seed * 1000 + epoch + _name_offset(stream)


def _name_offset(name: str) -> int:
    return zlib.crc32(name.encode()) % 100_003 * 1_000 if name else 0


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block that seeds or draws from the global generators (Python, NumPy, torch CPU and
    CUDA) and put their states back afterwards, e.g. the driver building a worker's initial
    weights without moving its own streams."""
    py, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


def torch_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator of its own (no global state), seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(int(seed))


def numpy_rng(*keys: int) -> np.random.Generator:
    """A NumPy Generator derived from ``keys`` (e.g. seed, image index, purpose): the same keys
    give the same stream on any worker, in any batch."""
    return np.random.default_rng([int(k) for k in keys])


def row_seeds(indices, *keys: int) -> np.ndarray:
    """One seed per row, int64 in ``[0, 2**63)``: a pure function of ``keys`` (e.g. the run's seed
    and a purpose) and the row's stable id in ``indices`` (the data's ``index`` column).

    Ray Data promises neither which batch a row lands in, nor its position there, nor which actor
    runs it; randomness keyed this way (e.g. :meth:`raydefense.attacks.Attack.with_image_seeds`)
    is the same under all of them, unlike draws from one generator per batch."""
    return np.array([numpy_rng(*keys, int(i)).integers(0, 2**63 - 1) for i in np.asarray(indices).reshape(-1)],
                    dtype=np.int64)
