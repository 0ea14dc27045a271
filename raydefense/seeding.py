"""The one place that seeds random number generators.

Two kinds of randomness, two helpers:

- **global state** (torch's default generator, which dropout, weight init, attacks' random
  starts and ``torch.randn`` without a generator use): :func:`seed_everything`, called by each
  training worker with :func:`worker_seed` and by each actor batch that draws;
- **derived streams**, one per purpose and key, independent of how work is batched or which
  worker does it: :func:`torch_generator` and :func:`numpy_rng`.
"""
from __future__ import annotations

import random

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


def worker_seed(seed: int, loop: str, rank: int) -> int:
    """The global seed of training loop ``loop`` (a key of :data:`STREAMS`) on worker ``rank``."""
    return seed + STREAMS[loop] + rank


def torch_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator of its own (no global state), seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(int(seed))


def numpy_rng(*keys: int) -> np.random.Generator:
    """A NumPy Generator derived from ``keys`` (e.g. seed, image index, purpose): the same keys
    give the same stream on any worker, in any batch."""
    return np.random.default_rng([int(k) for k in keys])
