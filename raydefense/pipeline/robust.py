"""Stage ``robust``: defenses trained against an attacker who knows them (issue 13), on Ray Train.

Each batch's adversarial examples are made *online*, by PGD with a random start against the
current weights of the whole model being trained (:func:`raydefense.robust.online_pgd`), never
taken from the precomputed attack sets. What ``robust.defenses`` lists is trained:

``pgd_at`` (``models/pgd_at.pt``)
    PGD adversarial training of the target's architecture (Madry et al., ICLR 2018), the loss
    ``pgd_at`` of :mod:`raydefense.pipeline.classifier_losses`, on the clean training images.
    Fine-tuned from the trained target by default (``robust.pgd_at_init``): on 2 CPU cores a
    training from scratch with a 5-step attack costs about 6x the target's own training, while
    adversarial fine-tuning of a converged model reaches comparable robustness in a few epochs
    (Jeddi et al., "A Simple Fine-tuning Is All You Need", 2020); ``null`` trains from scratch.
``uddn_kt_adv`` (``models/uddn_adv.pt`` + ``models/student_adv.pt``)
    1. The UDDN, fine-tuned from ``uddn`` with the paper's guided loss (Li & Wang 2019, eq. 5)
       on PGD examples made through UDDN + target (:func:`robust_denoiser_loop`);
    2. the student, fine-tuned from the KT student behind the frozen new UDDN with the KT loss
       (eq. 6) ARD-style (Goldblum et al., AAAI 2020, eq. 3): the student's answer on the
       attacked image is pulled to the teacher's answer on the clean one, the attack made through
       UDDN + student (loss ``ard_kt``).

Both run data-parallel on ``scale.num_workers`` Ray Train workers, checkpoint and resume like
every other training (:mod:`raydefense.pipeline.training`), and report ``val_pgd_acc`` each
epoch: whole-model PGD accuracy at the training eps on the clean validation split.
"""
from __future__ import annotations

from typing import Any

import torch

from raydefense.config import Config, TrainConfig, from_dict
from raydefense.pipeline import training as T
from raydefense.pipeline.artifacts import load_artifact, save_artifact, unwrap
from raydefense.pipeline.classifiers import accuracy, robust_accuracy
from raydefense.pipeline.loop_args import ClassifierArgs, RobustDenoiserArgs
from raydefense.pipeline.run import RunContext, RunLayout
from raydefense.pipeline.runtime import images_to_tensor
from raydefense.seeding import seed_everything, torch_generator, worker_seed

#: Artifacts each robust defense trains, in training order (see pipeline.defended.DEFENSES).
ROBUST_ARTIFACTS = {"pgd_at": ("pgd_at",), "uddn_kt_adv": ("uddn_adv", "student_adv")}


def robust_settings(cfg: Config) -> dict[str, Any]:
    """``robust.*`` as the loops' ``robust`` dict (:class:`~raydefense.pipeline.classifier_losses.RobustInputs`
    fields plus ``val_steps``)."""
    r = cfg.robust
    return {"eps": r.eps, "steps": r.steps, "eps_min": r.eps_min, "step_size": r.step_size, "loss": r.loss,
            "weight": r.weight, "beta": r.beta, "val_steps": r.val_steps}


def pgd_at_args(cfg: Config, *, num_classes: int, artifact: str = "pgd_at") -> ClassifierArgs:
    """PGD adversarial training of the target's architecture (``robust.pgd_at``, ``robust.pgd_at_init``)."""
    return ClassifierArgs(task=artifact, artifact=artifact, arch=cfg.models.target, num_classes=num_classes,
                          train=cfg.robust.pgd_at, loss="pgd_at", init=cfg.robust.pgd_at_init,
                          robust=robust_settings(cfg))


def student_adv_args(cfg: Config, *, num_classes: int, init: str = "student", preprocess: str = "uddn_adv",
                     artifact: str = "student_adv") -> ClassifierArgs:
    """The ARD-style student behind the adversarially trained UDDN, taught by the KT teacher."""
    return ClassifierArgs(task=artifact, artifact=artifact, arch=cfg.models.target, num_classes=num_classes,
                          train=cfg.robust.student, loss="ard_kt", init=init, teacher="teacher",
                          lam=cfg.distill.lam, T=cfg.distill.T, preprocess=preprocess, robust=robust_settings(cfg))


def robust_denoiser_args(cfg: Config) -> RobustDenoiserArgs:
    return RobustDenoiserArgs(loss=cfg.denoise.guidance, robust=robust_settings(cfg), epochs=cfg.robust.uddn_epochs,
                              lr=cfg.denoise.lr_min)


def robust_denoiser_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop: the UDDN fine-tuned on online PGD examples through UDDN + target.

    Per batch of clean training images x (labels y): x_adv = PGD(UDDN + target, x, y) from a
    random start in the eps-ball, then ``(1 - w) L(UDDN(x), x) + w L(UDDN(x_adv), x)`` with L
    the guided loss (Li & Wang 2019, eq. 5; ``denoise.pixel_weight`` as in the UDDN stage) and
    w = ``robust.weight``; one forward pass of the denoiser over both halves. Each epoch reports
    ``val_clean_acc`` (target on denoised clean validation images) and ``val_pgd_acc``.
    """
    from raydefense.denoise import guidance_reference, guided_loss
    from raydefense.pipeline.classifier_losses import RobustInputs
    from raydefense.pipeline.defended import UnitClamp
    from raydefense.robust import online_pgd

    cfg = from_dict(config["cfg"])
    args = RobustDenoiserArgs.from_loop_config(config)
    T.setup_worker(cfg)
    device = T.worker_device()
    rank, _ = T.world()
    seed_everything(worker_seed(cfg.seed, "denoiser", rank, task=args.artifact))
    gen = torch_generator(cfg.seed * 1000 + rank + 31)  # random starts and per-image eps
    storage = config["storage"]
    target = load_artifact(storage, args.classifier, device)
    init = load_artifact(storage, args.init, frozen=False)
    spec = {"kind": "denoiser", "arch": "uddn", "widths": list(cfg.denoise.widths)}
    model = T.prepare_model(init, device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    progress = T.Progress(cfg, {"model": model, "opt": opt}, config=config["cfg"], epochs=args.epochs)
    r = RobustInputs(**{k: v for k, v in args.robust.items() if k != "val_steps"})
    data = T.epoch_data("train", cache_mb=cfg.scale.cache_mb, name=args.artifact)
    val = T.epoch_data("val", cache_mb=cfg.scale.cache_mb, name="val")
    batch_size = cfg.denoise.batch_size
    metrics: dict[str, float] = {}
    for epoch in progress.epoch_range():
        model.train()
        timer = T.EpochTimer()
        loss_sum = seen = 0.0
        for step in data.steps(batch_size=batch_size, device=device, shuffle=True, seed=cfg.seed * 1000 + 41 + epoch):
            x, y = images_to_tensor(step["image"], device), step["label"]
            whole = torch.nn.Sequential(unwrap(model), UnitClamp(), target)
            eps = r.budgets(len(x), device=device, generator=gen)
            x_adv = online_pgd(whole, x, y, eps=eps, steps=r.steps, alpha=r.alphas(eps), generator=gen)
            with T.autocast(cfg, device):
                x_hat_clean, x_hat_adv = model(torch.cat([x, x_adv])).chunk(2)
                # Both terms compare with the target's output on the same clean images: once.
                ref = guidance_reference(args.loss, target, x)
                loss = r.weight * guided_loss(args.loss, target, x_hat_adv, x, pixel_weight=cfg.denoise.pixel_weight,
                                              reference=ref)
                if r.weight < 1:
                    loss = loss + (1 - r.weight) * guided_loss(args.loss, target, x_hat_clean, x,
                                                               pixel_weight=cfg.denoise.pixel_weight, reference=ref)
            opt.zero_grad(set_to_none=True)
            (loss * step.loss_weight).backward()
            opt.step()
            loss_sum += loss.item() * len(x)
            seen += len(x)
        loss_sum, seen = T.allreduce_sum([loss_sum, seen], device)
        pre = torch.nn.Sequential(unwrap(model), UnitClamp())
        metrics = {"train_loss": loss_sum / max(seen, 1.0),
                   "val_clean_acc": accuracy(target, val, batch_size=batch_size * 2, device=device, preprocess=pre),
                   "val_pgd_acc": robust_accuracy(target, val, batch_size=batch_size * 2, device=device, eps=r.eps,
                                                  steps=int(args.robust["val_steps"]), seed=cfg.seed * 1000 + 29,
                                                  preprocess=pre),
                   "epoch_s": timer.lap()}
        progress.report(epoch, metrics)
    if rank == 0:
        save_artifact(storage, args.artifact, model, spec, config=config["cfg"],
                      metrics={**metrics, **progress.summary(amp=T.amp_enabled(cfg, device))})


def robust_denoiser_task(ctx: RunContext, args: RobustDenoiserArgs, *, name: str | None = None,
                         datasets: dict[str, Any] | None = None) -> T.TrainingTask:
    """The Ray Train task of the adversarially trained UDDN on the clean training images
    (``datasets``, default :func:`~raydefense.pipeline.models.clean_training_sets`)."""
    from raydefense.pipeline.models import clean_training_sets
    return T.TrainingTask(name=name or args.artifact, loop=robust_denoiser_loop,
                          config=args.loop_config(ctx.cfg, ctx.storage), datasets=datasets or clean_training_sets(ctx),
                          epochs=args.epochs, done=RunLayout.model_rel(args.artifact))


def _train_config_line(tc: TrainConfig) -> str:
    return f"{tc.epochs} epochs at lr {tc.lr:g}"


def run_robust(ctx: RunContext, *, gpu: bool) -> dict[str, Any]:
    """Train every defense in ``robust.defenses`` (skipping artifacts that exist), all in one Ray
    Train fit on the clean training sets (:func:`~raydefense.pipeline.training.sequence_task`:
    ``pgd_at``, then ``uddn_adv`` and ``student_adv``); returns their last metrics and each
    defense's training time (``seconds``: the sum of its epochs' ``epoch_s``, from its artifact)."""
    from raydefense.pipeline.classifiers import classifier_task, val_accuracy_line
    from raydefense.pipeline.models import clean_training_sets

    cfg = ctx.cfg
    r = cfg.robust
    if not r.defenses:
        ctx.echo("  no robust defense enabled (robust.defenses is empty)")
        return {"defenses": []}
    n_cls = ctx.layout.num_classes()
    budget = (f"eps {255 * r.eps:g}/255" + (f" (per image from {255 * r.eps_min:g}/255)" if r.eps_min is not None else "")
              + f", PGD-{r.steps}, robust weight {r.weight:g}" + (f", TRADES beta {r.beta:g}" if r.loss == "trades" else ""))
    datasets = clean_training_sets(ctx)
    tasks: list[T.TrainingTask] = []
    intro: dict[str, str] = {}
    if "pgd_at" in r.defenses:
        tasks.append(classifier_task(ctx, pgd_at_args(cfg, num_classes=n_cls), datasets))
        intro["pgd_at"] = (f"  pgd_at: PGD adversarial training ({budget}), {_train_config_line(r.pgd_at)}, "
                           f"{'from the target' if r.pgd_at_init else 'from scratch'}")
    if "uddn_kt_adv" in r.defenses:
        args = robust_denoiser_args(cfg)
        tasks.append(robust_denoiser_task(ctx, args, datasets=datasets))
        intro[args.artifact] = (f"  uddn_adv: the UDDN on online PGD through UDDN + target ({budget}), {args.epochs} "
                                f"epochs at lr {args.lr:g}")
        init = "student" if ctx.layout.has_model("student") else None
        tasks.append(classifier_task(ctx, student_adv_args(cfg, num_classes=n_cls, init=init), datasets))
        intro["student_adv"] = (f"  student_adv: KT (ARD-style) on online PGD through UDDN_adv + student ({budget}), "
                                f"{_train_config_line(r.student)}")
    out: dict[str, Any] = {"defenses": list(r.defenses),
                           **T.run_trainings(ctx, tasks, gpu=gpu, intro=intro, conclude=val_accuracy_line)}

    def epochs_s(artifact: str) -> float:
        history = ctx.storage.load_torch(RunLayout.model_rel(artifact))["metrics"].get("history", [])
        return float(sum(h.get("epoch_s", 0.0) for h in history))

    out["seconds"] = {d: sum(epochs_s(a) for a in ROBUST_ARTIFACTS[d]) for d in r.defenses}
    return out
