"""Stage 5, denoise: train the UDDN (section 3) and the denoiser baselines on Ray Train.

The training set is the real adversarial pairs (``data/adv/set=train``) plus the GNR's
generated pairs (``data/gnr_aug``). Losses: ``uddn`` uses the configured guidance
(logits, l = -1, or features, l = -2, of the frozen target: equation 5); ``pixel_guided``
is the same network with an L1 pixel loss; ``dae`` is the network without lateral
connections, with the pixel loss (the standard denoiser the paper compares with).
Learning rate: ``denoise.lr`` (0.001), decayed to ``denoise.lr_min`` (0.0001) when the
training loss stops improving (section 5.1). Every epoch reports the target's accuracy on
denoised validation images, adversarial (``val_white_acc``) and clean (``val_clean_acc``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from raydefense.config import from_dict
from raydefense.pipeline import training as T
from raydefense.pipeline.artifacts import load_artifact, save_artifact, unwrap
from raydefense.pipeline.gnr import training_pairs
from raydefense.pipeline.loop_args import DenoiserArgs
from raydefense.pipeline.runtime import images_to_tensor
from raydefense.seeding import seed_everything, worker_seed
from raydefense.pipeline.run import RunContext, RunLayout

DENOISERS = {
    # task: (architecture, loss)
    "uddn": ("uddn", None),  # None: the configured guidance
    "pixel_guided": ("uddn", "pixel"),
    "dae": ("dae", "pixel"),
}


@torch.no_grad()
def denoised_accuracy(denoiser, classifier, data: T.EpochData, *, batch_size: int, device) -> tuple[float, float]:
    """Classifier accuracy on denoised adversarial and denoised clean validation images, over
    the whole validation set (each worker scores its share; the counts are summed)."""
    denoiser = unwrap(denoiser)
    was_training = denoiser.training
    denoiser.eval()
    adv_ok = clean_ok = total = 0.0
    for batch in data.eval_batches(batch_size=batch_size, device=device):
        y = batch["label"]
        adv_ok += (classifier(denoiser(images_to_tensor(batch["adv"], device))).argmax(1) == y).sum().item()
        clean_ok += (classifier(denoiser(images_to_tensor(batch["clean"], device))).argmax(1) == y).sum().item()
        total += len(y)
    denoiser.train(was_training)
    adv_ok, clean_ok, total = T.allreduce_sum([adv_ok, clean_ok, total], device)
    if not total:
        return float("nan"), float("nan")
    return adv_ok / total, clean_ok / total


def denoiser_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop for one denoiser (also the inner loop of a Tune trial); ``config`` is
    :meth:`DenoiserArgs.loop_config`'s dict. One cohesive loop (setup, epochs, artifact)."""
    from raydefense.denoise import guidance_reference, guided_loss
    from raydefense.pipeline.artifacts import build_network

    cfg = from_dict(config["cfg"])
    args = DenoiserArgs.from_loop_config(config)
    d = cfg.denoise
    T.setup_worker(cfg)
    device = T.worker_device()
    rank, _ = T.world()
    seed_everything(worker_seed(cfg.seed, "denoiser", rank))
    storage = config["storage"]
    target = load_artifact(storage, args.classifier, device)
    spec = {"kind": "denoiser", "arch": args.arch, "widths": list(d.widths)}
    model = T.prepare_model(build_network(spec), device)
    opt = torch.optim.Adam(model.parameters(), lr=d.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=d.plateau_patience,
                                                       min_lr=d.lr_min, threshold=1e-3)
    progress = T.Progress(cfg, {"model": model, "opt": opt, "sched": sched}, config=config["cfg"], epochs=d.epochs)
    data = T.epoch_data("train", cache_mb=cfg.scale.cache_mb, name=args.artifact or "train")
    val = T.epoch_data("val", cache_mb=cfg.scale.cache_mb, name="val")
    # Eq. 5 compares the denoised image's layer-l output with the frozen target's output on the
    # clean image, which is the same every epoch: computed once per row here (in eval batches,
    # as the loss would compute it per step) and carried by the steps, one target forward per
    # step fewer. Not where it would cost more than it saves: a dataset streamed each epoch, or
    # fewer epochs left than workers (each worker computes every row). The column is named after
    # the guidance and the classifier: a later denoiser of the same fit (training.sequence_task)
    # that shares this data reuses it when it is the same.
    reference_col = None
    _, workers = T.world()
    if args.loss != "pixel" and len(progress.epoch_range()) >= workers:
        def reference(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with T.autocast(cfg, device):
                return guidance_reference(args.loss, target, images_to_tensor(batch["clean"], device))

        name = f"guidance_reference:{args.loss}:{args.classifier}"
        if data.add_column(name, reference, batch_size=d.batch_size * 2, device=device):
            reference_col = name
    metrics: dict[str, float] = {}
    for epoch in progress.epoch_range():
        model.train()
        timer = T.EpochTimer()
        loss_sum = seen = 0.0
        for step in data.steps(batch_size=d.batch_size, device=device, shuffle=True, seed=cfg.seed * 1000 + 7 + epoch):
            x = images_to_tensor(step["clean"], device)
            x_adv = images_to_tensor(step["adv"], device)
            if d.include_clean:
                # A fifth of the inputs are clean images, so the denoiser learns to leave them alone.
                keep_clean = (step.rand(device=device) < 0.2).view(-1, 1, 1, 1)
                x_adv = torch.where(keep_clean, x, x_adv)
            with T.autocast(cfg, device):
                loss = guided_loss(args.loss, target, model(x_adv), x, pixel_weight=d.pixel_weight,
                                   reference=step[reference_col] if reference_col else None)
            opt.zero_grad(set_to_none=True)
            (loss * step.loss_weight).backward()
            opt.step()
            loss_sum += loss.item() * len(x)
            seen += len(x)
        loss_sum, seen = T.allreduce_sum([loss_sum, seen], device)
        train_loss = loss_sum / max(seen, 1)
        sched.step(train_loss)
        white, clean = denoised_accuracy(model, target, val, batch_size=d.batch_size * 2, device=device)
        metrics = {"train_loss": train_loss, "val_white_acc": white, "val_clean_acc": clean,
                   "lr": opt.param_groups[0]["lr"], "epoch_s": timer.lap()}
        progress.report(epoch, metrics)
    if rank == 0 and args.artifact:
        save_artifact(storage, args.artifact, model, spec, config=config["cfg"],
                      metrics={**metrics, **progress.summary(amp=T.amp_enabled(cfg, device))})


def denoiser_args(cfg, task: str, *, artifact: str | None = None) -> DenoiserArgs:
    """The denoiser ``task`` of :data:`DENOISERS` ('uddn' with ``denoise.guidance``; 'pixel_guided';
    'dae'), its weights to ``models/<artifact>.pt`` (default: ``task``)."""
    arch, loss = DENOISERS[task]
    return DenoiserArgs(arch=arch, loss=loss or cfg.denoise.guidance, artifact=artifact or task)


def denoiser_datasets(ctx: RunContext) -> dict[str, Any]:
    """What every denoiser trains on: :func:`training_pairs` and, as ``val``, the white-box
    validation set."""
    return {"train": training_pairs(ctx), "val": ctx.layout.read_adv("val_white", ["clean", "adv", "label"])}


def denoiser_task(ctx: RunContext, args: DenoiserArgs, *, name: str | None = None,
                  datasets: dict[str, Any] | None = None) -> T.TrainingTask:
    """The Ray Train task of one denoiser on ``datasets`` (default :func:`denoiser_datasets`),
    checkpoints under ``train/<name>`` (default: the artifact's name)."""
    return T.TrainingTask(name=name or args.artifact, loop=denoiser_loop, config=args.loop_config(ctx.cfg, ctx.storage),
                          datasets=datasets or denoiser_datasets(ctx), epochs=ctx.cfg.denoise.epochs,
                          done=RunLayout.model_rel(args.artifact) if args.artifact else None)


def train_denoisers(ctx: RunContext, tasks: list[str], *, gpu: bool, then: Sequence[T.TrainingTask] = (),
                    then_intro: Optional[dict[str, str]] = None) -> dict[str, dict[str, Any]]:
    """Train (or skip, when ``models/<task>.pt`` exists) the denoisers ``tasks`` of
    :data:`DENOISERS`, one after the other in one Ray Train fit (:func:`~raydefense.pipeline.
    training.run_trainings`, checkpoints under ``train/<task>-<task>...``; one alone:
    ``train/<task>``), then the classifier trainings ``then`` in the same fit (``then_intro``: the
    line before each one's epochs; after them, its validation accuracy); returns ``{task: its
    last metrics}`` for all of them (``{}`` for one already trained)."""
    from raydefense.pipeline.classifiers import val_accuracy_line

    intro = dict(then_intro or {})
    for task in tasks:
        args = denoiser_args(ctx.cfg, task)
        intro[task] = (f"  {task}: training {args.arch.upper()} with the {args.loss}-guided loss for "
                       f"{ctx.cfg.denoise.epochs} epochs on Ray Train")

    def conclude(task: str, m: dict[str, Any]) -> Optional[str]:
        if task not in tasks:
            return val_accuracy_line(task, m)
        if "val_white_acc" not in m:
            return None
        return (f"  {task}: target accuracy on denoised validation images: adversarial {m['val_white_acc']:.3f}, "
                f"clean {m['val_clean_acc']:.3f}")

    datasets = denoiser_datasets(ctx)
    parts = [denoiser_task(ctx, denoiser_args(ctx.cfg, t), datasets=datasets) for t in tasks] + list(then)
    return T.run_trainings(ctx, parts, gpu=gpu, intro=intro, conclude=conclude)


def run_denoise(ctx: RunContext, *, gpu: bool) -> dict[str, Any]:
    """The denoise stage: the UDDN and ``denoise.baselines``; when the distill stage runs next in
    this invocation, also its teacher and student, in the same Ray Train fit
    (:func:`~raydefense.pipeline.distill.kt_after_denoisers`), their results handed to it."""
    from raydefense.pipeline.distill import kt_after_denoisers

    then, then_intro = kt_after_denoisers(ctx)
    out = train_denoisers(ctx, ["uddn", *ctx.cfg.denoise.baselines], gpu=gpu, then=then, then_intro=then_intro)
    if then:
        ctx.handover["distill"] = {t.name: out.pop(t.name) for t in then}
    return out
