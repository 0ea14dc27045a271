"""One training loop for every classifier the defense needs.

``loss`` picks the objective from :data:`raydefense.pipeline.classifier_losses.CLASSIFIER_LOSSES`
(ce, kt, dcn, temp_ce, soft); the loop's arguments are a
:class:`~raydefense.pipeline.loop_args.ClassifierArgs`.

The same function runs as a plain Ray Train task and inside a Tune trial.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from raydefense.config import from_dict
from raydefense.pipeline import training as T
from raydefense.pipeline.artifacts import load_artifact, save_artifact, unwrap
from raydefense.pipeline.classifier_losses import CLASSIFIER_LOSSES, LOSSES, LossInputs, RobustInputs  # noqa: F401  (re-exported)
from raydefense.pipeline.loop_args import ClassifierArgs
from raydefense.pipeline.runtime import images_to_tensor, tensor_to_images
from raydefense.seeding import epoch_seed, seed_everything, torch_generator, worker_seed
from raydefense.pipeline.run import RunContext, RunLayout


def augment(x: torch.Tensor, step: T.Step) -> torch.Tensor:
    """Random horizontal flip (per image) and a random shift of up to 1/16 of the side (per
    batch, reflect padding); the draws are the global batch's, so they do not depend on how
    many workers share it."""
    b, _, h, w = x.shape
    flip = step.rand(device=x.device) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    pad = max(1, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = step.shared_randint(0, 2 * pad + 1, 2)
    return padded[:, :, dy:dy + h, dx:dx + w]


def initial_model(seed: int, args: ClassifierArgs, rank: int = 0) -> torch.nn.Module:
    """The weights :func:`classifier_loop` starts worker ``rank`` from before any ``args.init``:
    ``args.arch`` built right after seeding the global generators with the training's
    :func:`~raydefense.seeding.worker_seed` (Ray Train's ``prepare_model`` then hands rank 0's
    weights to every worker). Seeds the global generators; wrap in
    :func:`~raydefense.seeding.isolated_rng` outside a training worker."""
    from raydefense.models import create_model

    seed_everything(worker_seed(seed, "classifier", rank, task=args.task))
    return create_model(args.arch, num_classes=args.num_classes, **args.arch_options)


@torch.no_grad()
def accuracy(model, data: T.EpochData, *, batch_size: int, device: torch.device, image_col: str = "image",
             preprocess: torch.nn.Module | None = None) -> float:
    """Accuracy over the whole dataset: each worker scores its share, the counts are summed.
    ``preprocess`` (a frozen denoiser) is applied to the images first."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    correct = total = 0.0
    for batch in data.eval_batches(batch_size=batch_size, device=device):
        x = images_to_tensor(batch[image_col], device)
        logits = model(preprocess(x) if preprocess is not None else x)
        correct += (logits.argmax(1) == batch["label"]).sum().item()
        total += len(batch["label"])
    model.train(was_training)
    correct, total = T.allreduce_sum([correct, total], device)
    return correct / total if total else float("nan")


def robust_accuracy(model, data: T.EpochData, *, batch_size: int, device: torch.device, eps: float, steps: int,
                    seed: int, preprocess: torch.nn.Module | None = None) -> float:
    """Whole-model robust accuracy over the whole dataset: an image counts if ``preprocess`` +
    ``model`` is right on it and on its PGD example (``steps`` steps, random start, L-inf ``eps``,
    :func:`raydefense.robust.online_pgd`) made through the whole model. Each worker scores its
    share, the counts are summed. What a Tune search over the robust knobs maximises."""
    from raydefense.robust import online_pgd

    net = unwrap(model)
    whole = torch.nn.Sequential(preprocess, net) if preprocess is not None else net
    was_training = net.training
    gen = torch_generator(seed)
    correct = total = 0.0
    for batch in data.eval_batches(batch_size=batch_size, device=device):
        x, y = images_to_tensor(batch["image"], device), batch["label"]
        adv = online_pgd(whole, x, y, eps=eps, steps=steps, generator=gen)
        whole.eval()
        with torch.no_grad():
            correct += ((whole(x).argmax(1) == y) & (whole(adv).argmax(1) == y)).sum().item()
        total += len(y)
    net.train(was_training)
    correct, total = T.allreduce_sum([correct, total], device)
    return correct / total if total else float("nan")


def denoised_inputs(data: T.EpochData, denoiser: torch.nn.Module, *, name: str, batch_size: int, device: torch.device):
    """The training images of ``data`` through the frozen ``denoiser`` (artifact ``name``), stored
    as 8-bit images (:func:`~raydefense.pipeline.runtime.tensor_to_images`: clamped to [0, 1],
    rounded), what the KT teacher and student train on (section 4.2).

    Computed once per row, in batches of ``batch_size``, as column ``denoised:<name>`` of the
    cached rows (shared with the next training of a sequence on the same data); returns
    (that column, None). For a dataset streamed each epoch: ("image", a function that denoises
    a batch's images in each step).
    """
    @torch.no_grad()
    def denoise(images) -> torch.Tensor:
        return torch.from_numpy(tensor_to_images(denoiser(images_to_tensor(images, device))))

    column = f"denoised:{name}"
    if data.add_column(column, lambda batch: denoise(batch["image"]), batch_size=batch_size, device=device):
        return column, None
    return "image", denoise


def classifier_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop; ``config`` is :meth:`ClassifierArgs.loop_config`'s dict.

    One cohesive loop, read top to bottom (setup, epochs, final artifact), hence its length."""
    cfg = from_dict(config["cfg"])
    args = ClassifierArgs.from_loop_config(config)
    tc = args.train
    storage = config["storage"]
    T.setup_worker(cfg)
    device = T.worker_device()
    rank, _ = T.world()
    gen = torch_generator(cfg.seed * 1000 + rank + 17)  # DCN's random projections
    model = initial_model(cfg.seed, args, rank)
    if args.init:
        init = load_artifact(storage, args.init, frozen=False)
        model.load_state_dict(init.state_dict())
    model.to(device)
    teacher = load_artifact(storage, args.teacher, device) if args.teacher else None
    pre = None
    if args.preprocess:  # a frozen denoiser in front of the model ('ard_kt'), output clamped as deployed
        from raydefense.pipeline.defended import UnitClamp

        pre = torch.nn.Sequential(load_artifact(storage, args.preprocess, device), UnitClamp()).eval()
    robust = {k: v for k, v in args.robust.items() if k != "val_steps"}
    model = T.prepare_model(model, device)
    opt = T.make_optimizer(model.parameters(), name=tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.epochs)
    progress = T.Progress(cfg, {"model": model, "opt": opt, "sched": sched}, config=config["cfg"], epochs=tc.epochs)

    train_data = T.epoch_data("train", cache_mb=cfg.scale.cache_mb, name=args.task)
    image_col, denoise = "image", None
    if args.denoise_inputs:
        image_col, denoise = denoised_inputs(train_data, load_artifact(storage, args.denoise_inputs, device),
                                             name=args.denoise_inputs, batch_size=cfg.attack.batch_size, device=device)
    # Every dataset named val* is evaluated each epoch and reported as <name>_acc: "val" holds
    # clean images; a Tune trial adds e.g. "val_white" (denoised white-box images).
    vals = {name: T.epoch_data(name, cache_mb=cfg.scale.cache_mb, name=name)
            for name in args.val_sets}
    loss_fn = CLASSIFIER_LOSSES[args.loss]
    loss_inputs = LossInputs(teacher=teacher, T=float(args.T), lam=float(args.lam), dcn_weight=float(args.dcn_weight),
                             label_smoothing=tc.label_smoothing, generator=gen,
                             robust=RobustInputs(**robust) if robust else None, preprocess=pre)
    metrics: dict[str, float] = {}
    for epoch in progress.epoch_range():
        model.train()
        timer = T.EpochTimer()
        loss_sum = seen = 0.0
        for step in train_data.steps(batch_size=tc.batch_size, device=device, shuffle=True,
                                     seed=epoch_seed(cfg.seed, epoch, args.stream)):
            x = step[image_col] if denoise is None else denoise(step["image"])
            x = augment(images_to_tensor(x, device), step)
            y = step["label"]
            with T.autocast(cfg, device):
                loss = loss_fn(model, x, y, loss_inputs)
            opt.zero_grad(set_to_none=True)
            (loss * step.loss_weight).backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
        sched.step()
        loss_sum, seen = T.allreduce_sum([loss_sum, seen], device)
        metrics = {"train_loss": loss_sum / max(seen, 1.0)}
        for name, data in vals.items():
            metrics[f"{name}_acc"] = accuracy(model, data, batch_size=tc.batch_size * 2, device=device, preprocess=pre)
        if args.robust and "val" in vals:  # whole-model PGD at the training eps, same start seeds each epoch
            metrics["val_pgd_acc"] = robust_accuracy(
                model, vals["val"], batch_size=tc.batch_size * 2, device=device, eps=float(args.robust["eps"]),
                steps=int(args.robust.get("val_steps", args.robust["steps"])), seed=cfg.seed * 1000 + 29, preprocess=pre)
        metrics["epoch_s"] = timer.lap()
        progress.report(epoch, metrics)

    if not metrics:  # resumed after the last epoch: measure once more (every worker takes part)
        metrics = {f"{n}_acc": accuracy(model, d, batch_size=tc.batch_size * 2, device=device, preprocess=pre)
                   for n, d in vals.items()}
    if rank == 0:
        spec = {"kind": "classifier", "arch": args.arch, "num_classes": args.num_classes,
                **({"options": dict(args.arch_options)} if args.arch_options else {})}
        # start_epoch > 0 records that this training resumed from a checkpoint.
        save_artifact(storage, args.artifact, model, spec, config=config["cfg"],
                      metrics={**metrics, **progress.summary(amp=T.amp_enabled(cfg, device))})


def classifier_task(ctx: RunContext, args: ClassifierArgs, datasets: dict[str, Any], *, name: str | None = None) -> T.TrainingTask:
    """The Ray Train task that trains ``args`` on ``datasets`` (``train`` and every ``args.val_sets``),
    its checkpoints under ``train/<name>`` (default: the artifact's name)."""
    return T.TrainingTask(name=name or args.artifact, loop=classifier_loop,
                          config=args.loop_config(ctx.cfg, ctx.storage), datasets=datasets, epochs=args.train.epochs,
                          done=RunLayout.model_rel(args.artifact))


def train_classifier(ctx: RunContext, args: ClassifierArgs, datasets: dict[str, Any], *, gpu: bool) -> dict[str, Any]:
    """Train (or resume) one classifier on Ray Train and write ``models/<artifact>.pt``; returns
    the last epoch's metrics. Skips the work when the artifact exists (it is written last, atomically)."""
    return train_classifiers(ctx, [args], datasets, gpu=gpu)[args.artifact]


def val_accuracy_line(name: str, record: dict[str, Any]) -> Optional[str]:
    """The line printed after a classifier's last epoch (its validation accuracy), if it has one."""
    return f"  {name}: val accuracy {record['val_acc']:.3f}" if "val_acc" in record else None


def train_classifiers(ctx: RunContext, trainings: list[ClassifierArgs], datasets: dict[str, Any], *,
                      gpu: bool) -> dict[str, dict[str, Any]]:
    """Train (or resume) ``trainings`` in order, all on ``datasets``, in one Ray Train fit
    (:func:`~raydefense.pipeline.training.run_trainings`, checkpoints under
    ``train/<artifact>-<artifact>...``; one training alone: ``train/<artifact>``), writing
    ``models/<artifact>.pt`` for each; returns ``{artifact: its last epoch's metrics}`` (``{}``
    for one that was already trained: artifacts are written last, atomically, and skipped)."""
    tasks, intro = classifier_tasks(ctx, trainings, datasets)
    return T.run_trainings(ctx, tasks, gpu=gpu, intro=intro, conclude=val_accuracy_line)


def classifier_tasks(ctx: RunContext, trainings: list[ClassifierArgs],
                     datasets: dict[str, Any]) -> tuple[list[T.TrainingTask], dict[str, str]]:
    """The Ray Train tasks of ``trainings`` on ``datasets`` (:func:`classifier_task`) and the
    console line before each one's epochs, by artifact name."""
    intro = {a.artifact: f"  {a.artifact}: training {a.arch} ({a.loss}) for {a.train.epochs} epochs on Ray Train"
             for a in trainings}
    return [classifier_task(ctx, a, datasets) for a in trainings], intro
