"""Stage 6, distill: knowledge transfer (section 4.2); and the classifier baselines of Table 3.

1. The denoiser's training inputs (real and generated adversarial images) and the clean
   training images are denoised with the trained UDDN, once per row, in the training worker
   (``ClassifierArgs.denoise_inputs``; stored as 8-bit images, as a written dataset would be).
2. The teacher (the target's architecture) trains on those denoised images with their
   one-hot labels.
3. The student (same architecture) trains on the same images with equation 6:
   KL(Pt || Ps) + lambda * KL(Pt^T || Ps^T). UDDN + student is the published model.
   Teacher and student are one Ray Train fit (``training.sequence_task``); when the denoise stage
   runs just before in the same invocation, the UDDN's fit (:func:`kt_after_denoisers`).

With ``distill.init_from_target`` (the default) both start from the target's weights:
a fine-tune instead of a training from scratch, which keeps the CPU default within time.

Baselines (stage ``baselines``): DCN (contractive penalty, Gu & Rigazio 2015) and defensive
distillation (Papernot et al. 2016, teacher and student at temperature T, deployed at T=1),
both fine-tuned from the target on the clean training images.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from raydefense.pipeline.artifacts import load_artifact
from raydefense.pipeline.classifiers import train_classifiers
from raydefense.pipeline.loop_args import ClassifierArgs
from raydefense.pipeline.run import RunContext, RunLayout
from raydefense.pipeline.runtime import pool_map, device_for, images_to_tensor, tensor_to_images


class DenoiseActor:
    """map_batches actor: images -> UDDN-denoised images (``image`` column, with labels)."""

    def __init__(self, *, storage, denoiser: str, column: str, gpu: bool, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.device = device_for(gpu)
        self.model = load_artifact(storage, denoiser, self.device)
        self.column = column

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = images_to_tensor(batch[self.column], self.device)
        return {"image": tensor_to_images(self.model(x)), "label": batch["label"].astype(np.int64)}


def denoise_images(ctx: RunContext, ds, *, denoiser: str, column: str, gpu: bool):
    """``ds`` with ``column`` replaced by the output of the run's denoiser ``denoiser`` (a name under
    ``models/``), as ``image, label`` rows, on one Ray Data pool (:func:`~raydefense.pipeline.runtime.pool_map`)."""
    return pool_map(ds, DenoiseActor, {"storage": ctx.storage, "denoiser": denoiser, "column": column},
                    cfg=ctx.cfg, gpu=gpu, batch_size=ctx.cfg.attack.batch_size)


def kt_training_inputs(ctx: RunContext):
    """What the teacher and student train on once denoised: the denoiser's training inputs (real
    and generated adversarial images) and the clean training images, as ``image, label`` rows."""
    from raydefense.pipeline.gnr import training_pairs

    adv = training_pairs(ctx).select_columns(["adv", "label"]).rename_columns({"adv": "image"})
    return adv.union(ctx.layout.read_clean(["gnr", "denoise"], ["image", "label"]))


def denoised_training_set(ctx: RunContext, *, gpu: bool, denoiser: str, out: tuple[RunLayout, str]):
    """:func:`kt_training_inputs` denoised by ``denoiser`` on a Ray Data actor pool, written once
    to ``out`` (a layout and a folder in it) and read from there: a Tune trial's training set
    for its teacher and student, made with the trial's own UDDN. (The pipeline's distill stage
    denoises in the training worker instead: ``ClassifierArgs.denoise_inputs``.)"""
    layout, rel = out
    if not layout.has_dataset(rel):
        # One actor pool over the union of inputs (two pools in one job can starve each other of CPUs).
        ds = denoise_images(ctx, kt_training_inputs(ctx), denoiser=denoiser, column="image", gpu=gpu)
        layout.write_dataset(rel, ds, min_rows_per_file=ctx.cfg.data.shard_size)
    return layout.read(rel)


def teacher_args(cfg, *, num_classes: int, artifact: str = "teacher", val_sets: tuple[str, ...] = ("val",),
                 denoise_inputs: Optional[str] = None) -> ClassifierArgs:
    """The KT teacher (section 4.2): the target's architecture, cross-entropy on denoised images
    (a training set of denoised images, or ``denoise_inputs``: the denoiser that makes them
    in the training worker)."""
    return ClassifierArgs(task=artifact, artifact=artifact, arch=cfg.models.target, num_classes=num_classes,
                          train=cfg.distill.teacher, loss="ce", init=_kt_init(cfg), val_sets=val_sets,
                          denoise_inputs=denoise_inputs)


def student_args(cfg, *, num_classes: int, teacher: str = "teacher", artifact: str = "student",
                 val_sets: tuple[str, ...] = ("val",), denoise_inputs: Optional[str] = None) -> ClassifierArgs:
    """The KT student (equation 6, ``distill.lam`` and ``distill.T``) taught by ``teacher``, on
    denoised images as the teacher."""
    return ClassifierArgs(task=artifact, artifact=artifact, arch=cfg.models.target, num_classes=num_classes,
                          train=cfg.distill.student, loss="kt", init=_kt_init(cfg), teacher=teacher,
                          lam=cfg.distill.lam, T=cfg.distill.T, val_sets=val_sets, denoise_inputs=denoise_inputs)


def _kt_init(cfg) -> Optional[str]:
    return "target" if cfg.distill.init_from_target else None


def baseline_args(cfg, *, num_classes: int) -> list[ClassifierArgs]:
    """The classifier baselines of ``baselines.enabled``, in training order: DCN; defensive
    distillation's teacher (at T), then its student on the teacher's soft labels."""
    b = cfg.baselines
    common = {"arch": cfg.models.target, "num_classes": num_classes, "train": b.train, "init": "target"}
    out = []
    if "dcn" in b.enabled:
        out.append(ClassifierArgs(task="dcn", artifact="dcn", loss="dcn", dcn_weight=b.dcn_weight, **common))
    if "distillation" in b.enabled:
        out.append(ClassifierArgs(task="distill_teacher", artifact="distill_teacher", loss="temp_ce",
                                  T=b.distillation_T, **common))
        out.append(ClassifierArgs(task="distillation", artifact="distillation", loss="soft",
                                  teacher="distill_teacher", T=b.distillation_T, **common))
    return out


def kt_trainings(ctx: RunContext) -> tuple[list[ClassifierArgs], dict[str, Any]]:
    """The distill stage's trainings (teacher, then student, both on UDDN-denoised inputs) and
    their datasets: :func:`kt_training_inputs` and the clean validation images."""
    n_cls = ctx.layout.num_classes()
    datasets = {"train": kt_training_inputs(ctx), "val": ctx.layout.read_clean("val", ["image", "label"])}
    return [teacher_args(ctx.cfg, num_classes=n_cls, denoise_inputs="uddn"),
            student_args(ctx.cfg, num_classes=n_cls, denoise_inputs="uddn")], datasets


def kt_after_denoisers(ctx: RunContext):
    """The teacher's and student's Ray Train tasks and console lines, for the denoise stage to
    train after its denoisers in the same fit, when this invocation runs the distill stage right
    after it (``ctx.upcoming``); else ``([], {})``.

    One fit fewer: each costs 9-12 s before its first batch on the 2-core host (the controller,
    worker and helper processes, their imports, the first read of the data). A run stopped with
    ``--stop-after denoise`` trains the UDDN alone and, when resumed, the teacher and student in
    the distill stage's own fit, as before."""
    from raydefense.pipeline.classifiers import classifier_tasks

    if not ctx.cfg.distill.enabled or not ctx.upcoming or ctx.upcoming[0] != "distill":
        return [], {}
    trainings, datasets = kt_trainings(ctx)
    return classifier_tasks(ctx, trainings, datasets)


def run_distill(ctx: RunContext, *, gpu: bool) -> dict[str, Any]:
    cfg = ctx.cfg
    if not cfg.distill.enabled:
        ctx.echo("  knowledge transfer disabled (distill.enabled: false)")
        return {"enabled": False}
    if "distill" in ctx.handover:
        out = ctx.handover.pop("distill")
        ctx.echo("  teacher, student: trained after the UDDN in the denoise stage's Ray Train fit (above)")
        return {"teacher": out["teacher"], "student": out["student"], "trained_in_stage": "denoise"}
    # One Ray Train fit for both (train_classifiers): the UDDN denoises the training images once,
    # in the worker (classifiers.denoised_inputs), for the teacher and then the student, whose
    # workers load the teacher once rank 0 has written it.
    trainings, datasets = kt_trainings(ctx)
    out = train_classifiers(ctx, trainings, datasets, gpu=gpu)
    return {"teacher": out["teacher"], "student": out["student"]}


def run_baselines(ctx: RunContext, *, gpu: bool) -> dict[str, Any]:
    from raydefense.pipeline.models import clean_training_sets

    trainings = baseline_args(ctx.cfg, num_classes=ctx.layout.num_classes())
    if not trainings:
        # Before any dataset is made: each Ray Data read samples its Parquet files in remote
        # tasks (3.4 s of the default run's stage went there with nothing to train).
        ctx.echo("  no trained baselines enabled (baselines.enabled lists none of dcn, distillation)")
        return {}
    return train_classifiers(ctx, trainings, clean_training_sets(ctx), gpu=gpu)
