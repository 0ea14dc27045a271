"""Ray Train plumbing: one ``fit`` for every training stage, and the helpers its loops share.

Every training task (target, surrogate, GNR, denoisers, teacher, student, baselines) is a
``train_loop_per_worker(config)`` run by a :class:`~ray.train.torch.TorchTrainer` whose
``RunConfig`` points at ``<run>/train/<task>`` on the run's storage (local or S3). The
loop reports a checkpoint every epoch; running the same task again with the same
storage path and name makes Ray Train hand the latest checkpoint back through
``ray.train.get_checkpoint()``, so an interrupted training resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from raydefense.config import Config
from raydefense.pipeline.runtime import user_errors


def scaling_config(cfg: Config, *, gpu: bool):
    """Workers per training stage; elastic ``(min, max)`` when ``scale.max_workers`` is set."""
    import ray.train

    s = cfg.scale
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if gpu:
        resources["GPU"] = s.gpus_per_worker
    workers: Any = (s.num_workers, s.max_workers) if s.max_workers > s.num_workers else s.num_workers
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources)


def make_trainer(cfg: Config, storage, name: str, loop: Callable[[dict], None], loop_config: dict[str, Any],
                 datasets: dict[str, Any], *, gpu: bool, callbacks: Sequence[Any] = ()):
    """The TorchTrainer of one training task: ``datasets['train']`` split over the workers, the
    others whole on each; checkpoints under ``<storage>/train/<name>`` (same place, same name:
    Ray Train resumes from the latest one)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    for ds in datasets.values():
        # Training reads are short and repeated per worker: their progress bars are noise.
        ds.context.enable_progress_bars = False
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        scaling_config=scaling_config(cfg, gpu=gpu),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.path("train"),
            storage_filesystem=storage.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=0),
            callbacks=list(callbacks),
        ),
    )


def fit(ctx, task: str, loop: Callable[[dict], None], loop_config: dict[str, Any],
        datasets: dict[str, Any], *, gpu: bool) -> dict[str, Any]:
    """Run one training task on Ray Train; returns the last reported metrics."""
    trainer = make_trainer(ctx.cfg, ctx.storage, task, loop, loop_config, datasets, gpu=gpu)
    with user_errors():
        result = trainer.fit()
    return dict(result.metrics or {})


# ----------------------------------------------------------------------------- in-loop helpers


def worker_device() -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device()


def world() -> tuple[int, int]:
    import ray.train

    c = ray.train.get_context()
    return c.get_world_rank(), c.get_world_size()


def setup_worker(cfg: Config) -> None:
    """Per-worker setup: use the CPUs this worker was given, and keep Ray Train's per-report
    INFO lines out of the console (the driver prints one line per task instead)."""
    import logging

    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.train") or "ray/train" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on GPU when ``scale.amp``; a no-op elsewhere."""
    if cfg.scale.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def allreduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over the workers (no-op for one worker)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def restore(objects: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Load the latest Ray Train checkpoint into ``objects`` (name -> module/optimizer/scheduler).

    Returns (first epoch to run, extra state saved with the checkpoint).
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, {}
    with ckpt.as_directory() as d:
        blob = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    for name, obj in objects.items():
        target = obj.module if hasattr(obj, "module") and isinstance(obj, nn.Module) else obj
        target.load_state_dict(blob[name])
    return int(blob["epoch"]) + 1, blob.get("extra", {})


_LAST_CHECKPOINT: dict[str, float] = {}


def report_epoch(epoch: int, metrics: dict[str, float], objects: dict[str, Any], *,
                 config: dict[str, Any], final: bool = True, extra: Optional[dict[str, Any]] = None) -> None:
    """Report an epoch's metrics (every worker must call this); rank 0 attaches a checkpoint at
    the first epoch this process runs, at the ``final`` one, and otherwise at most every
    ``scale.checkpoint_interval_s`` seconds.

    Fault injection for tests: ``RAYDEFENSE_CRASH_AFTER=<task>:<epoch>`` makes the task fail
    right after that epoch's checkpoint, as a preempted node would.
    """
    import ray.train

    rank, _ = world()
    now = time.monotonic()
    interval = float(config.get("scale", {}).get("checkpoint_interval_s", 0.0))
    last = _LAST_CHECKPOINT.get("t")
    due = final or last is None or now - last >= interval
    if due and rank == 0:
        _LAST_CHECKPOINT["t"] = now
    _report(epoch, metrics, objects, config=config, extra=extra, rank=rank if due else -1)
    crash = os.environ.get("RAYDEFENSE_CRASH_AFTER", "")
    if crash and crash == f"{ray.train.get_context().get_experiment_name()}:{epoch}":
        raise RuntimeError(f"injected failure after epoch {epoch} (RAYDEFENSE_CRASH_AFTER={crash})")


def _report(epoch: int, metrics: dict[str, float], objects: dict[str, Any], *, config: dict[str, Any],
            extra: Optional[dict[str, Any]], rank: int) -> None:
    import ray.train

    metrics = {**metrics, "epoch": epoch}
    if rank != 0:  # other ranks, or rank 0 between checkpoints (rank -1)
        ray.train.report(metrics, checkpoint=None)
        return
    state = {"epoch": epoch, "config": config, "extra": extra or {}}
    for name, obj in objects.items():
        target = obj.module if hasattr(obj, "module") and isinstance(obj, nn.Module) else obj
        state[name] = target.state_dict()
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, os.path.join(d, "state.pt"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class EpochData:
    """Torch batches from a Ray Data shard, epoch after epoch.

    Every pass over a Ray Data iterator starts a streaming execution (seconds of overhead),
    which dominates small trainings. A shard whose tensors fit in ``cache_mb`` is therefore
    streamed once and kept in this worker's memory (uint8 images are compact: 10k images of
    80x80 take 190 MB), and later epochs shuffle it with a seeded permutation. Larger shards
    stream every epoch with a local shuffle buffer.
    """

    def __init__(self, shard, *, cache_mb: float = 2048.0):
        self.shard = shard
        self.cache_bytes = cache_mb * 1024 * 1024
        self.cache: Optional[dict[str, torch.Tensor]] = None
        self.streaming = cache_mb <= 0

    def _fill(self) -> None:
        cols: dict[str, list[torch.Tensor]] = {}
        size = 0
        for batch in self.shard.iter_torch_batches(batch_size=512, drop_last=False):
            for k, v in batch.items():
                cols.setdefault(k, []).append(v)
                size += v.element_size() * v.nelement()
            if size > self.cache_bytes:
                self.streaming = True
                return
        self.cache = {k: torch.cat(v) for k, v in cols.items()} if cols else {}

    def __len__(self) -> int:
        return 0 if not self.cache else len(next(iter(self.cache.values())))

    def batches(self, *, batch_size: int, device: torch.device, shuffle: bool, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        if self.cache is None and not self.streaming:
            self._fill()
        if self.streaming:
            kwargs: dict[str, Any] = {"batch_size": batch_size, "device": device, "drop_last": False}
            if shuffle:
                kwargs["local_shuffle_buffer_size"] = max(4 * batch_size, 256)
                kwargs["local_shuffle_seed"] = seed
            yield from self.shard.iter_torch_batches(**kwargs)
            return
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield {k: v[idx].to(device, non_blocking=True) for k, v in self.cache.items()}


def to_float_images(t: torch.Tensor) -> torch.Tensor:
    """A uint8 (B, H, W, 3) batch column -> float (B, 3, H, W) in [0, 1] on the same device."""
    return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def make_optimizer(params, *, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class EpochTimer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t, self.t0 = time.perf_counter() - self.t0, time.perf_counter()
        return t
