"""Stage 6, distill: knowledge transfer (section 4.2); and the classifier baselines of Table 3.

1. A Ray Data stage denoises the denoiser's training inputs (real and generated adversarial
   images) and the clean training images with the trained UDDN: ``data/denoised``.
2. The teacher (the target's architecture) trains on those denoised images with their
   one-hot labels.
3. The student (same architecture) trains on the same images with equation 6:
   KL(Pt || Ps) + lambda * KL(Pt^T || Ps^T). UDDN + student is the published model.

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
from raydefense.pipeline.runtime import actor_map, device_for, images_to_tensor, tensor_to_images


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
    ``models/``), as ``image, label`` rows, on one Ray Data actor pool."""
    return actor_map(ds, DenoiseActor, {"storage": ctx.storage, "denoiser": denoiser, "column": column},
                     cfg=ctx.cfg, gpu=gpu, batch_size=ctx.cfg.attack.batch_size)


def denoised_training_set(ctx: RunContext, *, gpu: bool, denoiser: str = "uddn", out: Optional[tuple[RunLayout, str]] = None):
    """The teacher's and student's training set: the denoiser's training inputs (real and generated
    adversarial images) and the clean training images, denoised by ``denoiser``; written once to
    ``out`` (a layout and a folder in it; default the run's ``data/denoised``) and read from there.

    The pipeline's distill stage and each Tune trial (with its own UDDN and folder) call this.
    """
    from raydefense.pipeline.denoise import training_pairs

    layout, rel = out or (ctx.layout, ctx.layout.DENOISED)
    if not layout.has_dataset(rel):
        # One actor pool over the union of inputs (two pools in one job can starve each other of CPUs).
        adv = training_pairs(ctx).select_columns(["adv", "label"]).rename_columns({"adv": "image"})
        clean = ctx.layout.read_clean(["gnr", "denoise"], ["image", "label"])
        ds = denoise_images(ctx, adv.union(clean), denoiser=denoiser, column="image", gpu=gpu)
        layout.write_dataset(rel, ds, min_rows_per_file=ctx.cfg.data.shard_size)
    return layout.read(rel)


def teacher_args(cfg, *, num_classes: int, artifact: str = "teacher",
                 val_sets: tuple[str, ...] = ("val",)) -> ClassifierArgs:
    """The KT teacher (section 4.2): the target's architecture, cross-entropy on denoised images."""
    return ClassifierArgs(task=artifact, artifact=artifact, arch=cfg.models.target, num_classes=num_classes,
                          train=cfg.distill.teacher, loss="ce", init=_kt_init(cfg), val_sets=val_sets)


def student_args(cfg, *, num_classes: int, teacher: str = "teacher", artifact: str = "student",
                 val_sets: tuple[str, ...] = ("val",)) -> ClassifierArgs:
    """The KT student (equation 6, ``distill.lam`` and ``distill.T``) taught by ``teacher``."""
    return ClassifierArgs(task=artifact, artifact=artifact, arch=cfg.models.target, num_classes=num_classes,
                          train=cfg.distill.student, loss="kt", init=_kt_init(cfg), teacher=teacher,
                          lam=cfg.distill.lam, T=cfg.distill.T, val_sets=val_sets)


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


def run_distill(ctx: RunContext, *, gpu: bool) -> dict[str, Any]:
    cfg = ctx.cfg
    if not cfg.distill.enabled:
        ctx.echo("  knowledge transfer disabled (distill.enabled: false)")
        return {"enabled": False}
    n_cls = ctx.layout.num_classes()
    datasets = {"train": denoised_training_set(ctx, gpu=gpu), "val": ctx.layout.read_clean("val", ["image", "label"])}
    # One Ray Train fit for both (train_classifiers); the student's workers load the teacher
    # once rank 0 has written it.
    out = train_classifiers(ctx, [teacher_args(cfg, num_classes=n_cls), student_args(cfg, num_classes=n_cls)],
                            datasets, gpu=gpu)
    return {"teacher": out["teacher"], "student": out["student"]}


def run_baselines(ctx: RunContext, *, gpu: bool) -> dict[str, Any]:
    from raydefense.pipeline.models import clean_training_sets

    datasets = clean_training_sets(ctx)
    trainings = baseline_args(ctx.cfg, num_classes=ctx.layout.num_classes())
    out = train_classifiers(ctx, trainings, datasets, gpu=gpu) if trainings else {}
    if not out:
        ctx.echo("  no trained baselines enabled (baselines.enabled lists none of dcn, distillation)")
    return out
