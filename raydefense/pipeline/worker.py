"""What runs inside a Ray Train worker: device and rank, per-worker setup, mixed precision,
sums over the workers, optimizers by name, and :class:`EpochData`, the dataset every worker
holds whole and cuts into the same global batches each epoch.

(Split from :mod:`raydefense.pipeline.training`, which re-exports every name here.)
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from raydefense.config import Config
from raydefense.seeding import torch_generator


def worker_device() -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device()


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A network to train, on ``device`` with channels-last weights, through Ray Train's
    ``prepare_model`` (DistributedDataParallel with several workers).

    Channels-last (NHWC) convolutions train faster on this project's CPUs and are cuDNN's
    preferred layout on GPUs; inputs may stay NCHW (the first convolution converts). Measured on
    2 threads, interleaved (bench section 4): a FaceNet training step at 80 px, batch 32, 1.08x;
    a UDDN step (batch 8, eq. 5 through the frozen target) 1.07-1.08x; a WGAN-GP round
    (``n_critic`` critic steps with the gradient penalty, one generator step) 1.12x. Only the
    layout of 4-d weights changes, not their values, so checkpoints and artifacts load into
    either layout.
    """
    import ray.train.torch

    return ray.train.torch.prepare_model(model.to(device, memory_format=torch.channels_last))


def world() -> tuple[int, int]:
    """(rank, world size) of this Ray Train worker; (0, 1) outside a training."""
    import ray.train

    try:
        c = ray.train.get_context()
        return c.get_world_rank(), c.get_world_size()
    except (RuntimeError, AttributeError, ValueError):  # not inside a Ray Train worker
        return 0, 1


def setup_worker(cfg: Config) -> None:
    """Per-worker setup: use the CPUs this worker was given, and keep Ray Train's per-report
    INFO lines out of the console (the driver prints one line per task instead)."""
    import logging

    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.train") or "ray/train" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it
    (``torch.cuda.is_bf16_supported``), or a CPU with AVX512-BF16 or AMX tiles (what oneDNN's
    bf16 convolutions and matrix products use; without them PyTorch emulates bf16, slower than
    fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        # torch.cpu's probes are private, hence getattr: a torch without them reads as "no".
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


def amp_enabled(cfg: Config, device: torch.device) -> bool:
    """Whether a training on ``device`` runs under bf16 autocast: ``scale.amp`` when it is true or
    false; when null (the default), on a CPU that computes bf16 natively (:func:`native_bf16`),
    and not on a GPU: on an H200 at this project's sizes bf16 was slower than fp32 with TF32
    convolutions (a UDDN step 0.83x; README, "On a GPU"), the kernels being too small to gain
    from it. ``configs/paper_gpu.yaml`` sets ``amp: true`` for its larger networks.

    Only the trainings' forward passes and losses use it; the weights, the optimizer state and
    the gradients stay fp32, and evaluation, attacks and the validation metrics run in fp32, so
    a report's figures are never computed in reduced precision. Each trained model records which
    it was (``precision`` in its artifact's metrics: ``Progress.summary``). Measured on the 2-core
    AMD EPYC (AVX512-BF16) host, 2 threads, interleaved (bench section 4, n=5): a FaceNet
    training step at 80 px, batch 32, 1.19x [1.18, 1.22] faster; a UDDN step (batch 8, eq. 5
    through the frozen target) 1.32x [1.24, 1.36].
    """
    if cfg.scale.amp is not None:
        return bool(cfg.scale.amp)
    return device.type == "cpu" and native_bf16(device)


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on ``device`` when :func:`amp_enabled`; else a no-op context."""
    if amp_enabled(cfg, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def allreduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over the workers (no-op for one worker)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- data on the workers


@dataclass
class Step:
    """One optimizer step on one worker: this worker's rows of a global batch.

    Every worker walks the same global batches (``global_size`` rows, split over
    ``world_size`` workers by position: worker r takes positions r, r + W, ...). Random
    draws that belong to rows (flips, which inputs stay clean, generator noise) are made for
    the whole global batch from a generator seeded by (seed, step) that is the same on every
    worker, then sliced: W workers with batch B / W see the same randomness as one with B.
    """

    data: dict[str, torch.Tensor]
    rows: torch.Tensor  # positions of this worker's rows in the global batch, (b,) int64
    global_size: int
    world_size: int
    seed: int

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.data[key]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def loss_weight(self) -> float:
        """Multiply this worker's mean loss by this: DDP's average of the workers' gradients is
        then the gradient of the global batch's mean loss, also when the workers' row counts
        differ by one (b * W / G)."""
        return len(self.rows) * self.world_size / self.global_size

    @functools.cached_property
    def generator(self) -> torch.Generator:
        return torch_generator(self.seed)

    def rand(self, *shape: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """U[0, 1) draws of shape ``(b, *shape)`` for this worker's rows."""
        return torch.rand((self.global_size, *shape), generator=self.generator)[self.rows].to(device)

    def randn(self, *shape: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """N(0, 1) draws of shape ``(b, *shape)`` for this worker's rows."""
        return torch.randn((self.global_size, *shape), generator=self.generator)[self.rows].to(device)

    def shared_randint(self, low: int, high: int, n: int) -> list[int]:
        """``n`` integers in [low, high), the same on every worker (per-batch choices)."""
        return torch.randint(low, high, (n,), generator=self.generator).tolist()


def global_batches(n: int, global_batch: int, world_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` bounds of the global batches over ``n`` rows.

    A last batch too small to give every worker two rows (batch norm in train mode fails on
    one; a worker with none would stall DDP) is merged into the one before it, so each epoch
    sees every row exactly once.
    """
    bounds = [(i, min(i + global_batch, n)) for i in range(0, n, global_batch)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2 * world_size:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def _row_keys(cols: dict[str, torch.Tensor], chunk: int = 512) -> torch.Tensor:
    """A 64-bit content hash per row over every column: sorting by it gives one order of the
    rows whatever order Ray Data's blocks arrived in (identical rows share a key, and their
    order does not matter)."""
    n = len(next(iter(cols.values())))
    keys = torch.zeros(n, dtype=torch.int64)
    gen = torch_generator(0x5EED)
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for name in sorted(cols):
        v = cols[name].reshape(n, -1).contiguous()
        if v.is_floating_point():
            v = v.view(as_int[v.element_size()])
        w = torch.randint(1, 2**31 - 1, (v.shape[1],), generator=gen, dtype=torch.int64)
        col = torch.cat([(v[i:i + chunk].to(torch.int64) * w).sum(1) for i in range(0, n, chunk)]) if n else keys
        keys = keys * 1_000_003 + col  # int64 arithmetic wraps: a hash, not a number
    return keys


# The datasets of a sequence of trainings in one worker group (training.sequence_loop): each
# part reads the same shards, so the first part's EpochData (its rows cached in this process)
# serves the next ones instead of streaming the dataset again. None outside a sequence.
_SHARED_DATA: Optional[dict[str, "EpochData"]] = None
# The fit's name of each dataset the running part of a sequence calls by another name (a part's
# dataset that another part gives the same name); empty outside a sequence.
_DATASET_NAMES: dict[str, str] = {}


@contextlib.contextmanager
def dataset_names(names: dict[str, str]) -> Iterator[None]:
    """Within this block, :func:`epoch_data` reads dataset ``names[name]`` of the fit when asked
    for ``name`` (a sequence part's own names for its datasets)."""
    global _DATASET_NAMES
    outer, _DATASET_NAMES = _DATASET_NAMES, dict(names)
    try:
        yield
    finally:
        _DATASET_NAMES = outer


@contextlib.contextmanager
def sharing_epoch_data() -> Iterator[None]:
    """Within this block, :func:`epoch_data` hands every caller of the same dataset the same
    :class:`EpochData` (one read of each shard for all the trainings of a sequence)."""
    global _SHARED_DATA
    outer, _SHARED_DATA = _SHARED_DATA, {} if _SHARED_DATA is None else _SHARED_DATA
    try:
        yield
    finally:
        _SHARED_DATA = outer


def epoch_data(dataset: str, *, cache_mb: float, name: str) -> "EpochData":
    """:class:`EpochData` over this worker's shard of the fit's dataset ``dataset`` (Ray Train's
    ``get_dataset_shard``); ``name`` labels it in errors. Inside :func:`sharing_epoch_data`,
    the same object for every call with the same ``dataset`` (a column one caller adds with
    :meth:`EpochData.add_column` is there for the next, under a name that says what it holds)."""
    import ray.train

    dataset = _DATASET_NAMES.get(dataset, dataset)
    if _SHARED_DATA is not None and dataset in _SHARED_DATA:
        return _SHARED_DATA[dataset]
    data = EpochData(ray.train.get_dataset_shard(dataset), cache_mb=cache_mb, name=name)
    if _SHARED_DATA is not None:
        _SHARED_DATA[dataset] = data
    return data


class EpochData:
    """A whole dataset on every training worker, cut into global batches each epoch.

    Every pass over a Ray Data iterator starts a streaming execution (seconds of overhead),
    which dominates small trainings. A dataset whose tensors fit in ``cache_mb`` is therefore
    streamed once, kept in this worker's memory (10k uint8 images of 80x80 take 190 MB) and
    sorted by content, so every worker holds the same rows in the same order; each epoch
    permutes them with a seed shared by all workers, cuts global batches of
    ``batch_size * world_size`` rows and gives each worker its part (:class:`Step`). Each
    row is seen exactly once per epoch across the workers; no row is dropped or repeated.

    A larger dataset streams every epoch on every worker in the same order (``make_trainer``
    sets ``preserve_order``) with the same seeded local shuffle, and each worker keeps its
    positions of each global batch: the same guarantees at W times the reading.

    Raises:
        DataError: a training set with fewer than ``2 * world_size`` rows.
    """

    def __init__(self, dataset, *, cache_mb: float = 2048.0, name: str = "train",
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        self.dataset = dataset
        self.name = name
        self.cache_bytes = cache_mb * 1024 * 1024
        self.cache: Optional[dict[str, torch.Tensor]] = None
        self.streaming = cache_mb <= 0
        here = world() if rank is None or world_size is None else (rank, world_size)
        self.rank, self.world_size = here

    def _fill(self) -> None:
        if self.cache is not None or self.streaming:
            return
        cols: dict[str, list[torch.Tensor]] = {}
        size = 0
        # device="cpu": Ray's default ("auto") puts the batches on a GPU worker's device, and the
        # cache is host memory that each step slices and moves (found on an H200, 2026-12-04:
        # "Expected all tensors to be on the same device, cuda:0 and cpu" in _row_keys).
        for batch in self.dataset.iter_torch_batches(batch_size=512, drop_last=False, device="cpu"):
            for k, v in batch.items():
                cols.setdefault(k, []).append(v)
                size += v.element_size() * v.nelement()
            if size > self.cache_bytes:
                self.streaming = True
                return
        cache = {k: torch.cat(v) for k, v in cols.items()}
        if cache:
            order = torch.sort(_row_keys(cache), stable=True).indices
            cache = {k: v[order] for k, v in cache.items()}
        self.cache = cache

    def __len__(self) -> int:
        self._fill()
        if self.streaming:
            return self.dataset.count() if hasattr(self.dataset, "count") else 0
        return 0 if not self.cache else len(next(iter(self.cache.values())))

    def steps(self, *, batch_size: int, device: torch.device, shuffle: bool, seed: int) -> Iterator[Step]:
        """This worker's part of each global batch of one epoch; ``batch_size`` is per worker."""
        from raydefense.errors import DataError

        self._fill()
        g, w = batch_size * self.world_size, self.world_size
        if self.streaming:
            yield from self._streaming_steps(g, device=device, shuffle=shuffle, seed=seed)
            return
        n = len(self)
        if n < 2 * w:
            raise DataError(f"training set '{self.name}' has {n} rows: {w} training worker(s) need at least "
                            f"{2 * w} (two per worker per step); lower scale.num_workers or add data")
        order = torch.randperm(n, generator=torch_generator(seed)) if shuffle else torch.arange(n)
        for i, (a, b) in enumerate(global_batches(n, g, w)):
            rows = torch.arange(self.rank, b - a, w)
            idx = order[a:b][rows]
            yield Step({k: v[idx].to(device, non_blocking=True) for k, v in self.cache.items()}, rows=rows,
                       global_size=b - a, world_size=w, seed=seed * 100_003 + i)

    def _streaming_steps(self, g: int, *, device: torch.device, shuffle: bool, seed: int) -> Iterator[Step]:
        kwargs: dict[str, Any] = {"batch_size": g, "drop_last": False, "device": "cpu"}  # see _fill
        if shuffle:
            kwargs["local_shuffle_buffer_size"] = max(4 * g, 256)
            kwargs["local_shuffle_seed"] = seed
        w, pending, i = self.world_size, None, 0
        for batch in self.dataset.iter_torch_batches(**kwargs):
            n = len(next(iter(batch.values())))
            if pending is not None and n < 2 * w:  # merge a too-small tail into the batch before
                batch = {k: torch.cat([pending[k], v]) for k, v in batch.items()}
                pending = None
            if pending is not None:
                yield self._step(pending, device, seed * 100_003 + i)
                i += 1
            pending = batch
        if pending is not None:
            yield self._step(pending, device, seed * 100_003 + i)

    def _step(self, batch: dict[str, torch.Tensor], device: torch.device, seed: int) -> Step:
        n = len(next(iter(batch.values())))
        rows = torch.arange(self.rank, n, self.world_size)
        return Step({k: v[rows].to(device) for k, v in batch.items()}, rows=rows, global_size=n,
                    world_size=self.world_size, seed=seed)

    def add_column(self, name: str, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], *, batch_size: int,
                   device: torch.device) -> bool:
        """Compute ``fn(batch)`` (a tensor with one row per row of ``batch``, on ``device``) once
        for every row of the cached data, in batches of ``batch_size``, and keep it as column
        ``name``: the steps of every later epoch carry it. Each worker computes all rows (every
        worker holds the whole set). Returns False and adds nothing for a dataset too large to
        cache (:attr:`streaming`); the caller then computes the value per step. A column that
        exists already is kept: ``name`` must say everything ``fn`` depends on besides the row
        (the data of a sequence's parts is shared, :func:`sharing_epoch_data`)."""
        self._fill()
        if self.streaming or not self.cache:
            return False
        if name in self.cache:
            return True
        n = len(self)
        parts = [fn({k: v[i:i + batch_size].to(device) for k, v in self.cache.items()}).detach().cpu()
                 for i in range(0, n, batch_size)]
        self.cache[name] = torch.cat(parts)
        return True

    def eval_batches(self, *, batch_size: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        """This worker's share of the rows (positions r, r + W, ...), for metrics that are
        summed over workers with :func:`allreduce_sum`. Use the unwrapped model here: DDP's
        forward syncs buffers with the other workers, whose batch counts may differ."""
        self._fill()
        if self.streaming:
            for batch in self.dataset.iter_torch_batches(batch_size=batch_size * self.world_size, drop_last=False,
                                                         device="cpu"):  # see _fill
                n = len(next(iter(batch.values())))
                rows = torch.arange(self.rank, n, self.world_size)
                if len(rows):
                    yield {k: v[rows].to(device) for k, v in batch.items()}
            return
        idx = torch.arange(self.rank, len(self), self.world_size)
        for i in range(0, len(idx), batch_size):
            part = idx[i:i + batch_size]
            yield {k: v[part].to(device, non_blocking=True) for k, v in self.cache.items()}


#: TrainConfig.optimizer -> ``fn(params, lr, weight_decay)``; each name is the torch class it says.
OPTIMIZERS = {
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, nesterov=True),
}


def make_optimizer(params, *, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` of :data:`OPTIMIZERS`; ValueError for any other name."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name](params, lr, weight_decay)


class EpochTimer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t, self.t0 = time.perf_counter() - self.t0, time.perf_counter()
        return t
