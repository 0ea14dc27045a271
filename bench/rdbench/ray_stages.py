"""Sections 2 and 3: the Ray Data attack stage and Ray Train, each against a plain loop.

Both run on a local Ray started by the project (:func:`raydefense.pipeline.runtime.init_ray`,
through ``run_pipeline(cfg, stop_after='prepare')``, which also writes the run's clean Parquet
data under a temporary storage folder: the real layout, the real shards). The target is the
config's ``models.target`` (FaceNet by default) with random weights, stored as the run's
``models/target.pt`` artifact, which is how the stages load it.

**Section 2, attack stage** (seconds per pass, interleaved round by round), twice: on a
small subset (one split, the test methods, the target only: where Ray Data's fixed costs show)
and on the default run's whole stage (``attack_plan(cfg)``: every split, set and method, the
target and the surrogate: what ``python jobs/full_pipeline.py`` runs):

* *Ray Data*: what ``run_attack`` does: the stage's own pipeline
  (:func:`raydefense.pipeline.attack.attack_dataset`: one read of the plan's splits ->
  ``pool_map(..., AttackActor, ...)``: a streaming repartition to full batches, then the
  stage's actor pool and actor class) ->
  ``layout.write_dataset`` (Parquet partitioned by set + ``_SUCCESS``); with 1 actor holding
  the stage's CPUs (``scale.attack_actors x scale.cpus_per_actor``, 2 in the default) as torch
  threads, then with 2 actors sharing them (the default run's setting until 2026-12-04: 2 actors
  x 1 thread), then as a pool of 2 tasks x 1 thread whose worker processes keep the stage's
  ``AttackActor`` (``scale.map_compute: tasks``, the CPU default since the seventh session:
  :func:`raydefense.pipeline.runtime.map_compute`).
* *plain*: one process reads the same Parquet rows with pyarrow, calls the same
  ``AttackActor`` (same model artifacts, plan, per-image eps and batch size; the stage's CPUs
  as torch threads: what one would run without Ray)
  batch after batch, one split at a time, and writes the result with pyarrow, one file per
  set. The per-batch work is identical, so
  the ratio ``plain seconds / Ray seconds`` (Ray's speed relative to the plain loop) is the
  cost of Ray Data itself: actor start-up and model load, scheduling, object transfer, writes.
  The models have random weights (stored as the run's artifacts): FGSM and I-FGSM do the same
  work whatever the weights.

**Section 3, Ray Train**:

* *fixed cost*: wall seconds of ``training.fit`` (the project's TorchTrainer with its run config,
  checkpoint settings and callbacks) of a loop that does nothing, 1 worker, no datasets.
* *two trainings, one fit*: the models stage's two trainings (target and surrogate, 1 epoch
  each, the clean ``gnr`` + ``denoise`` rows) as one fit (``training.sequence_task``, what the
  pipeline runs) against two fits, interleaved; ratio: two fits' wall / one fit's wall (speed).
* *per epoch*: the target's training (``classifier_loop``, cross-entropy, the config's
  ``models.target_train`` with ``epochs`` set here) on Ray Train against the same epochs in a
  plain loop in this process: same model, data (the clean ``gnr`` + ``denoise`` rows, held by
  the same :class:`~raydefense.pipeline.worker.EpochData`, so the batches are identical),
  augmentation, loss, optimizer, schedule, validation and torch threads. Ray Train's epoch is
  the time between two consecutive epoch reports of rank 0 (``history[k].time`` in the artifact
  that ``classifier_loop`` writes), which includes the report and the checkpoints the config
  asks for; the first epoch (data loading, warm-up) is left out on both sides. Per fit the
  median over its epochs is taken (with 4 epochs the one interval that carries the first
  checkpoint drops out; the mean, which spreads it, is reported too). Ratio: Ray epoch / plain
  epoch, per round, the two interleaved.
* *checkpoint cost* (:func:`run_checkpoint`, in this process, no Ray): a checkpoint of the
  target (weights and Adam moments) followed by training steps, timed to the end of both, three
  ways interleaved: Ray Train's default ``CheckpointUploadMode.SYNC`` path (``torch.save`` to a
  temporary folder, then the copy into storage with ``pyarrow.fs.copy_files``, what Ray's
  ``StorageContext.persist_current_checkpoint`` does), the project's way
  (``training.checkpoint_state``, then ``training.save_state`` straight into storage in another
  thread, as Ray's ASYNC upload thread runs it, while the steps run), and the steps alone.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .results import Row, Section
from .stats import interleave, paired_ratios, summarize

__all__ = ["prepare_run", "run_attack_stage", "run_train", "run_checkpoint", "image_array", "LocalDataset",
           "plain_attack_pass", "plain_classifier_epochs"]


# ----------------------------------------------------------------------------- setup


def prepare_run(cfg, root: str, *, log: Callable[[str], None]):
    """Start the project's local Ray and run the prepare stage into ``<root>/bench``; store a
    random-init target and surrogate as ``models/target.pt`` and ``models/surrogate.pt``. Returns
    the run's ``RunContext``."""
    from raydefense.models import create_model
    from raydefense.pipeline.artifacts import save_artifact
    from raydefense.pipeline.run import RunContext
    from raydefense.pipeline.runner import open_storage, run_pipeline

    cfg = cfg.replace([f"storage.path={root}"], name="bench")
    run_pipeline(cfg, stop_after="prepare", echo=log)
    ctx = RunContext(cfg=cfg, storage=open_storage(cfg).child(cfg.name), echo=log)
    torch.manual_seed(0)
    n = ctx.layout.num_classes()
    model = create_model(cfg.models.target, num_classes=n)
    save_artifact(ctx.storage, "target", model, {"kind": "classifier", "arch": cfg.models.target, "num_classes": n},
                  config=cfg.to_dict())
    torch.manual_seed(1)  # the black-box sets of the whole stage attack the surrogate
    model = create_model(cfg.models.surrogate, num_classes=n)
    save_artifact(ctx.storage, "surrogate", model, {"kind": "classifier", "arch": cfg.models.surrogate,
                                                    "num_classes": n}, config=cfg.to_dict())
    return ctx


def image_array(column, image_size: int) -> np.ndarray:
    """A Parquet image column (Ray's tensor extension type or nested lists of uint8) as
    ``uint8 (N, S, S, 3)``, without a Python loop over rows."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if isinstance(arr.type, pa.BaseExtensionType):  # Ray's tensor types and Arrow's FixedShapeTensorType
        arr = arr.storage
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):  # one encoded buffer per row
        flat = np.frombuffer(b"".join(arr.to_pylist()), dtype=np.uint8)
    else:
        flat = arr.to_numpy(zero_copy_only=False)
    return flat.astype(np.uint8, copy=False).reshape(n, image_size, image_size, 3)


def _read_clean(ctx, splits: list[str], columns: list[str]) -> dict[str, np.ndarray]:
    """The clean rows of ``splits`` on this process (pyarrow, no Ray)."""
    import pyarrow.compute as pc

    table = ctx.layout.table(ctx.layout.CLEAN, columns=columns, filter=pc.field("split").isin(splits))
    out = {}
    for name in columns:
        if name == "image":
            out[name] = image_array(table.column(name), ctx.cfg.data.image_size)
        else:
            out[name] = table.column(name).to_numpy(zero_copy_only=False)
    return out


# ----------------------------------------------------------------------------- section 2


def _write_plain(ctx, rel: str, out: dict[str, np.ndarray]) -> int:
    """The attack rows as Parquet under ``<run>/<rel>/``, one file per adversarial set in the
    stage's Hive layout (``set=<name>/part-0.parquet``, the ``set`` column in the path, as
    ``run_attack`` writes them), with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sets = out["set"]
    for name in np.unique(sets):
        rows = np.flatnonzero(sets == name)
        cols = {}
        for k, v in out.items():
            if k == "set":
                continue
            v = v[rows]
            if v.ndim > 1:  # images: one fixed-size list of uint8 per row
                cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), int(np.prod(v.shape[1:])))
            else:
                cols[k] = pa.array(v.tolist() if v.dtype == object else v)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(cols), sink)
        ctx.storage.write_bytes(f"{rel}/set={name}/part-0.parquet", sink.getvalue().to_pybytes())
    return len(sets)


def plain_attack_pass(ctx, actor_kwargs: dict[str, Any], *, batch_size: int, threads: int, rel: str) -> int:
    """Section 2's plain loop: read the clean rows of every split of ``actor_kwargs["plan"]`` with
    pyarrow, run the stage's
    :class:`~raydefense.pipeline.attack.AttackActor` on batches of ``batch_size`` of one split at
    a time (the prepare stage writes the rows ordered by split, so the stage's batches hold one
    split too, except the two or three where splits meet), in this
    process (``threads`` torch threads), and write the rows as Parquet under ``rel``, one file per
    adversarial set. Returns the row count."""
    from raydefense.pipeline.attack import AttackActor

    saved = torch.get_num_threads()
    try:
        splits = sorted(actor_kwargs["plan"])
        data = _read_clean(ctx, splits, ["image", "label", "split", "index"])
        actor = AttackActor(**actor_kwargs, gpu=False, threads=threads)
        parts = []
        for split in splits:
            rows = np.flatnonzero(data["split"] == split)
            for i in range(0, len(rows), batch_size):
                parts.append(actor({k: v[rows[i:i + batch_size]] for k, v in data.items()}))
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return _write_plain(ctx, rel, out)
    finally:
        torch.set_num_threads(saved)


def run_attack_stage(section: Section, ctx, *, plan: dict[str, list[tuple[str, str, list[str]]]], rounds: int,
                     warmup: int = 1, two_actors: bool = True, label: str = "Ray Data stage",
                     log: Callable[[str], None] = print) -> None:
    """Fill ``section`` with section 2's rows for one attack ``plan`` (split -> [(set, model,
    methods)], as :func:`raydefense.pipeline.attack.attack_plan` gives): the stage's own Ray Data
    pipeline (:func:`~raydefense.pipeline.attack.attack_dataset`, written as the stage writes it)
    with 1 actor, with 2 actors if ``two_actors``, and the plain loop, interleaved."""
    from raydefense.pipeline.attack import attack_dataset

    cfg = ctx.cfg
    a = cfg.attack
    kwargs = {"storage": ctx.storage, "plan": plan, "seed": a.seed, "eps_min": a.eps_min, "eps_max": a.eps_max}
    # The stage's CPUs (the default: 2 actors x 1 CPU), as one process's torch threads on the
    # plain side and in the 1-actor pool, and split between 2 actors.
    threads = max(1, int(cfg.scale.attack_actors * cfg.scale.cpus_per_actor))
    one = cfg.replace(["scale.attack_actors=1", f"scale.cpus_per_actor={threads}", "scale.map_compute=actors"])
    two = cfg.replace(["scale.attack_actors=2", f"scale.cpus_per_actor={max(1, threads // 2)}",
                       "scale.map_compute=actors"])
    # The same pool of 2 as tasks whose worker processes keep the instance (scale.map_compute:
    # tasks, the CPU default since 2026-12-04: runtime.map_compute).
    two_tasks = two.replace(["scale.map_compute=tasks"])
    keys = ["ray_1_actor", "plain"] + (["ray_2_actors", "ray_2_tasks"] if two_actors else [])
    rows: dict[str, list[int]] = {k: [] for k in keys}

    def ray_stage(run_cfg, key: str) -> Callable[[], None]:
        def run() -> None:
            rel = f"bench/{key}"
            ctx.layout.write_dataset(rel, attack_dataset(ctx, plan, gpu=False, cfg=run_cfg), partition_cols=["set"])
            rows[key].append(ctx.layout.count_rows(rel))
        return run

    def plain() -> None:
        rows["plain"].append(plain_attack_pass(ctx, kwargs, batch_size=a.batch_size, threads=threads,
                                               rel="bench/plain"))

    contenders = {"ray_1_actor": ray_stage(one, "ray_1_actor"), "plain": plain}
    if two_actors:
        contenders["ray_2_actors"] = ray_stage(two, "ray_2_actors")
        contenders["ray_2_tasks"] = ray_stage(two_tasks, "ray_2_tasks")
    times = interleave(contenders, rounds=rounds, warmup=warmup)
    if len({n for k in keys for n in rows[k]}) != 1:
        raise RuntimeError(f"the attack passes wrote different row counts: {rows}")
    sets = "; ".join(f"{split}: " + ", ".join(f"{name} ({'/'.join(methods)} vs {model})" for name, model, methods in sets_)
                     for split, sets_ in sorted(plan.items()))
    section.notes.append(f"{label}: {rows['plain'][0]} adversarial rows ({sets}) against random-init "
                         f"{cfg.models.target} / {cfg.models.surrogate} at {cfg.data.image_size} px, batch {a.batch_size}; "
                         f"1 actor x {threads} CPU(s)" + (f" and 2 actors x {max(1, threads // 2)}" if two_actors else "")
                           + (f" and 2 tasks x {max(1, threads // 2)}" if two_actors else "")
                         + f" vs 1 process x {threads} torch thread(s); seconds per pass including Parquet read and "
                         "write; ratio = plain seconds / Ray seconds (Ray's relative speed)")
    new_rows = [Row.of(f"{label}, 1 actor / plain loop speed", paired_ratios(times["plain"], times["ray_1_actor"]),
                       "x", ratio=True)]
    if two_actors:
        new_rows.append(Row.of(f"{label}, 2 actors / plain loop speed",
                               paired_ratios(times["plain"], times["ray_2_actors"]), "x", ratio=True))
        new_rows.append(Row.of(f"{label}, 2 tasks / plain loop speed",
                               paired_ratios(times["plain"], times["ray_2_tasks"]), "x", ratio=True))
        new_rows.append(Row.of(f"{label}, 2 tasks / 2 actors speed",
                               paired_ratios(times["ray_2_actors"], times["ray_2_tasks"]), "x", ratio=True))
    names = {"ray_1_actor": f"{label}, 1 actor", "ray_2_actors": f"{label}, 2 actors",
             "ray_2_tasks": f"{label}, 2 tasks", "plain": f"{label}, plain loop"}
    for key in keys:
        new_rows.append(Row.of(names[key], [rows[key][0] / t for t in times[key]], "adv img/s", seconds=times[key]))
    section.rows.extend(new_rows)
    for r in new_rows:
        log(f"  {r.name}: {r.summary.median:.4g} {r.unit}")


# ----------------------------------------------------------------------------- section 3


def _noop_loop(config: dict[str, Any]) -> None:
    """A Ray Train loop that does nothing: what is left of a fit is its fixed cost."""
    return None


class LocalDataset:
    """The one method of a Ray dataset shard that :class:`~raydefense.pipeline.worker.EpochData`
    calls to fill its cache, over tensors held in this process."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False, **_: Any):
        n = len(next(iter(self.tensors.values())))
        for i in range(0, n, batch_size):
            if drop_last and i + batch_size > n:
                break
            yield {k: v[i:i + batch_size] for k, v in self.tensors.items()}

    def count(self) -> int:
        return len(next(iter(self.tensors.values())))


def plain_classifier_epochs(cfg, args, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor], *,
                            storage=None) -> tuple[list[float], list[float]]:
    """``classifier_loop`` without Ray: the same model, optimizer, schedule, batches (one
    :class:`EpochData` over the same rows), augmentation, loss and validation, one process with
    ``scale.cpus_per_worker`` torch threads. Returns each epoch's seconds (train + validation)
    and mean training loss (which equals the Ray Train run's when both did the same work).
    ``storage``: the run's, where ``args.init`` (the starting weights artifact, if any) is read."""
    from raydefense.pipeline import training as T
    from raydefense.pipeline.artifacts import load_artifact
    from raydefense.pipeline.classifier_losses import CLASSIFIER_LOSSES, LossInputs
    from raydefense.pipeline.classifiers import accuracy, augment, initial_model
    from raydefense.pipeline.runtime import images_to_tensor
    from raydefense.seeding import epoch_seed, torch_generator

    tc = args.train
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    try:
        device = torch.device("cpu")
        gen = torch_generator(cfg.seed * 1000 + 17)
        model = initial_model(cfg.seed, args)  # the worker's starting weights (seeded by args.task)
        if args.init:
            model.load_state_dict(load_artifact(storage, args.init, frozen=False).state_dict())
        model.to(device, memory_format=torch.channels_last)  # as T.prepare_model lays it out in the worker
        opt = T.make_optimizer(model.parameters(), name=tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.epochs)
        train_data = T.EpochData(LocalDataset(train), cache_mb=cfg.scale.cache_mb, name="train", rank=0, world_size=1)
        val_data = T.EpochData(LocalDataset(val), cache_mb=cfg.scale.cache_mb, name="val", rank=0, world_size=1)
        loss_fn = CLASSIFIER_LOSSES[args.loss]
        inputs = LossInputs(teacher=None, T=float(args.T), lam=float(args.lam), dcn_weight=float(args.dcn_weight),
                            label_smoothing=tc.label_smoothing, generator=gen)
        seconds, losses = [], []
        for epoch in range(tc.epochs):
            model.train()
            timer = T.EpochTimer()
            loss_sum = seen = 0.0
            for step in train_data.steps(batch_size=tc.batch_size, device=device, shuffle=True,
                                         seed=epoch_seed(cfg.seed, epoch, args.stream)):
                x = augment(images_to_tensor(step["image"], device), step)
                with T.autocast(cfg, device):  # the worker's precision (bf16 where scale.amp decides so)
                    loss = loss_fn(model, x, step["label"], inputs)
                opt.zero_grad(set_to_none=True)
                (loss * step.loss_weight).backward()
                opt.step()
                loss_sum += loss.item() * len(step)
                seen += len(step)
            sched.step()
            accuracy(model, val_data, batch_size=tc.batch_size * 2, device=device)
            seconds.append(timer.lap())
            losses.append(loss_sum / max(seen, 1.0))
        return seconds, losses
    finally:
        torch.set_num_threads(saved)


def run_train(section: Section, ctx, *, fixed_rounds: int, epochs: int, rounds: int, warmup: int = 1,
              log: Callable[[str], None] = print) -> None:
    """Fill ``section`` with section 3's rows (module docstring)."""
    from raydefense.pipeline import training as T
    from raydefense.pipeline.classifiers import classifier_task
    from raydefense.pipeline.models import classifier_model_args, clean_training_sets
    from raydefense.pipeline.run import RunLayout

    cfg = ctx.cfg
    count = {"noop": 0, "fit": 0}

    def noop_fit() -> None:
        count["noop"] += 1
        T.fit(ctx, f"bench_noop_{count['noop']}", _noop_loop, {}, {}, gpu=False)

    fixed = interleave({"noop": noop_fit}, rounds=fixed_rounds, warmup=warmup)["noop"]
    section.rows.append(Row.of("Ray Train fixed cost: fit of an empty loop, 1 worker", fixed, "s"))
    log(f"  Ray Train fixed cost: {summarize(fixed).median:.2f} s")

    def pair(*, one_fit: bool) -> None:
        count["fit"] += 1
        tasks = []
        for which in ("target", "surrogate"):
            name = f"bench_{which}_{count['fit']}"
            args = classifier_model_args(ctx, which)
            args = dataclasses.replace(args, task=name, artifact=name, train=dataclasses.replace(args.train, epochs=1))
            tasks.append(classifier_task(ctx, args, sets))
        if one_fit:
            T.run_task(ctx, T.sequence_task("-".join(t.name for t in tasks), tasks), gpu=False)
        else:
            for t in tasks:
                T.run_task(ctx, t, gpu=False)

    sets = clean_training_sets(ctx)
    both = interleave({"one": lambda: pair(one_fit=True), "two": lambda: pair(one_fit=False)},
                      rounds=fixed_rounds, warmup=warmup)
    section.rows.append(Row.of("two trainings (target, surrogate; 1 epoch each): two fits / one fit (speed)",
                               paired_ratios(both["two"], both["one"]), "x", ratio=True))
    section.rows.append(Row.of("two trainings as one fit (training.sequence_task), wall", both["one"], "s"))
    section.rows.append(Row.of("two trainings as two fits, wall", both["two"], "s"))
    log(f"  two trainings: one fit {summarize(both['one']).median:.1f} s, two fits {summarize(both['two']).median:.1f} s")

    base = classifier_model_args(ctx, "target")
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, epochs=epochs))
    as_tensors = {"image": lambda v: torch.from_numpy(np.array(v, copy=True)),
                  "label": lambda v: torch.as_tensor(v, dtype=torch.int64)}
    train_np = _read_clean(ctx, ["gnr", "denoise"], ["image", "label"])
    val_np = _read_clean(ctx, ["val"], ["image", "label"])
    train = {k: as_tensors[k](v) for k, v in train_np.items()}
    val = {k: as_tensors[k](v) for k, v in val_np.items()}
    extra: dict[str, list[float]] = {"fit_wall": [], "worker_epoch": [], "plain_first": [], "ray_mean": [],
                                     "ray_loss": [], "plain_loss": []}

    def ray_epoch(_: Callable[[], None]) -> float:
        count["fit"] += 1
        name = f"bench_target_{count['fit']}"
        # Its own fit folder and artifact, the target's task name: the same starting weights,
        # batches and augmentation draws as the plain loop (the same-work check below).
        args = dataclasses.replace(base, artifact=name)
        t0 = time.perf_counter()
        T.run_task(ctx, classifier_task(ctx, args, clean_training_sets(ctx)), gpu=False)
        extra["fit_wall"].append(time.perf_counter() - t0)
        history = ctx.storage.load_torch(RunLayout.model_rel(name))["metrics"]["history"]
        stamps = [h["time"] for h in history]
        extra["worker_epoch"].append(float(np.median([h["epoch_s"] for h in history[1:]])))
        extra["ray_mean"].append(float(np.mean(np.diff(stamps))))
        extra["ray_loss"].append(float(history[-1]["train_loss"]))
        return float(np.median(np.diff(stamps)))

    def plain_epoch(_: Callable[[], None]) -> float:
        seconds, losses = plain_classifier_epochs(cfg, base, train, val, storage=ctx.storage)
        extra["plain_first"].append(seconds[0])
        extra["plain_loss"].append(losses[-1])
        return float(np.median(seconds[1:]))

    if epochs < 2:
        raise ValueError("the per-epoch comparison needs at least 2 epochs (the first is left out)")
    per_epoch = interleave({"ray": lambda: None, "plain": lambda: None}, rounds=rounds, warmup=warmup,
                           measure=lambda name, fn: ray_epoch(fn) if name == "ray" else plain_epoch(fn))
    warm = slice(warmup, None)
    n_train = len(train["label"])
    section.notes.append(f"{cfg.models.target} at {cfg.data.image_size} px, {n_train} training / {len(val['label'])} "
                         f"validation images, batch {base.train.batch_size}, {epochs} epochs per fit (epochs 2..{epochs} "
                         f"timed), {max(1, int(cfg.scale.cpus_per_worker))} torch threads, 1 worker; checkpoint "
                         f"every {cfg.scale.checkpoint_interval_s:g} s + first and last epoch; controller poll "
                         f"{cfg.scale.health_check_interval_s:g} s")
    # Same work on both sides: the last epoch's mean training loss agrees (same seeds, batches, model).
    same_work = {"last_train_loss_ray": extra["ray_loss"][-1], "last_train_loss_plain": extra["plain_loss"][-1]}
    section.rows.insert(0, Row.of("Ray Train epoch / plain PyTorch epoch",
                                  paired_ratios(per_epoch["ray"], per_epoch["plain"]), "x", ratio=True, **same_work))
    log(f"  same work: last-epoch training loss {same_work['last_train_loss_ray']:.6f} on Ray Train, "
        f"{same_work['last_train_loss_plain']:.6f} in the plain loop")
    if not np.isclose(same_work["last_train_loss_ray"], same_work["last_train_loss_plain"], rtol=1e-3, atol=1e-5):
        # Before 2026-12-04 the plain loop started from other weights (seeded without the task
        # name, no init artifact): its losses were 0.291 against Ray's 0.343-0.404.
        section.notes.append("WARNING: the two sides' last-epoch training losses differ, so they did not do the same "
                             "work (seeds, starting weights or batches); the per-epoch ratio compares unlike epochs")
        log("  " + section.notes[-1])
    section.rows.append(Row.of("Ray Train epoch (report to report, median over the fit)", per_epoch["ray"], "s"))
    section.rows.append(Row.of("Ray Train epoch (report to report, mean: the first checkpoint spread)",
                               extra["ray_mean"][warm], "s"))
    section.rows.append(Row.of("Ray Train epoch inside the worker (train + val)", extra["worker_epoch"][warm], "s"))
    section.rows.append(Row.of("plain PyTorch epoch (train + val)", per_epoch["plain"], "s"))
    section.rows.append(Row.of(f"Ray Train fit of {epochs} epochs, wall", extra["fit_wall"][warm], "s"))
    section.rows.append(Row.of("plain PyTorch first epoch", extra["plain_first"][warm], "s"))
    for r in section.rows:
        log(f"  {r.name}: {r.summary.median:.4g} {r.unit}")


def run_checkpoint(section: Section, cfg, *, rounds: int, steps: int, warmup: int = 1, root: str | None = None,
                   log: Callable[[str], None] = print) -> None:
    """Section 3's checkpoint rows (module docstring): ``cfg.models.target`` with Adam after one
    step, ``steps`` training steps of ``models.target_train.batch_size`` random images at
    ``data.image_size`` with ``scale.cpus_per_worker`` torch threads; checkpoints written under
    ``root`` (a temporary folder by default) on the local filesystem."""
    import os
    import shutil
    import tempfile
    import threading

    import pyarrow.fs as pafs

    from raydefense.models import create_model
    from raydefense.pipeline import training as T

    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    base = tempfile.mkdtemp(prefix="rdbench-ckpt-", dir=root)
    fs = pafs.LocalFileSystem()
    try:
        model = create_model(cfg.models.target, num_classes=cfg.data.num_identities)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        size, batch = cfg.data.image_size, cfg.models.target_train.batch_size
        x, y = torch.rand(batch, 3, size, size), torch.arange(batch) % cfg.data.num_identities

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()
        objects = {"model": model, "opt": opt}
        count = [0]

        def steps_after(checkpoint: Callable[[str], Any]) -> Callable[[], None]:
            def run() -> None:
                count[0] += 1
                pending = checkpoint(os.path.join(base, f"c{count[0]}"))
                for _ in range(steps):
                    step()
                if pending is not None:
                    pending.join()
            return run

        def sync(dest: str) -> None:
            # The live state_dicts, as the synchronous path saved them: no copy is needed when the
            # loop waits for the save (checkpoint_state's deep copy would charge it ~0.1 s more).
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({name: obj.state_dict() for name, obj in objects.items()}, os.path.join(tmp, "state.pt"))
                fs.create_dir(dest)
                pafs.copy_files(tmp, dest, source_filesystem=fs, destination_filesystem=fs)

        def background(dest: str) -> threading.Thread:
            state = T.checkpoint_state(0, objects, config={}, extra=None)
            writer = threading.Thread(target=T.save_state, args=(state, fs, f"{dest}/state.pt"))
            writer.start()
            return writer

        times = interleave({"sync": steps_after(sync), "background": steps_after(background),
                            "none": steps_after(lambda _: None)}, rounds=rounds, warmup=warmup)
        mb = os.path.getsize(os.path.join(base, f"c{count[0]}", "state.pt")) / 1e6
    finally:
        torch.set_num_threads(saved)
        shutil.rmtree(base, ignore_errors=True)
    what = f"{cfg.models.target} + Adam ({mb:.0f} MB) then {steps} steps of batch {batch} at {size} px"
    section.rows.append(Row.of(f"checkpoint + steps: Ray's synchronous save / in the background (speed; {what})",
                               paired_ratios(times["sync"], times["background"]), "x", ratio=True))
    section.rows.append(Row.of("checkpoint + steps in the background / the steps alone (the write's cost to the loop)",
                               paired_ratios(times["background"], times["none"]), "x", ratio=True))
    for name, label in (("sync", "Ray's synchronous save"), ("background", "in the background"),
                        ("none", "no checkpoint")):
        section.rows.append(Row.of(f"checkpoint + steps, {label}, wall", times[name], "s"))
    log(f"  checkpoint + {steps} steps: sync {summarize(times['sync']).median:.2f} s, background "
        f"{summarize(times['background']).median:.2f} s, none {summarize(times['none']).median:.2f} s")
