"""The typed arguments of the three training loops, and their one conversion to Ray's loop config.

A Ray Train ``train_loop_per_worker`` takes one plain dict (``train_loop_config``). Each loop's
arguments are a small frozen dataclass here; :meth:`LoopArgs.loop_config` flattens one into
that dict beside the run's config and storage, and :meth:`LoopArgs.from_loop_config` rebuilds
it inside the worker, refusing unknown or missing keys (a typo is an error, never ignored).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from raydefense.config import Config, TrainConfig
from raydefense.pipeline.classifier_losses import CLASSIFIER_LOSSES

_CONTEXT_KEYS = ("cfg", "storage")


@dataclass(frozen=True)
class LoopArgs:
    """Base: conversion to and from a loop config."""

    def loop_config(self, cfg: Config, storage) -> dict[str, Any]:
        """``{"cfg": cfg.to_dict(), "storage": storage, <fields>}`` (nested dataclasses as dicts)."""
        out: dict[str, Any] = {"cfg": cfg.to_dict(), "storage": storage}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return out

    @classmethod
    def from_loop_config(cls, config: dict[str, Any]):
        """The arguments in ``config`` (a dict made by :meth:`loop_config`); ValueError naming
        unknown or missing keys."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - set(fields) - set(_CONTEXT_KEYS))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown loop config keys {unknown} (known: {sorted(fields)})")
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in config:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ValueError(f"{cls.__name__}: loop config key '{name}' is missing")
                continue
            value = config[name]
            if name == "train" and isinstance(value, dict):
                value = TrainConfig(**value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class ClassifierArgs(LoopArgs):
    """One classifier training (:func:`raydefense.pipeline.classifiers.classifier_loop`).

    ``loss`` names a :data:`~raydefense.pipeline.classifiers.CLASSIFIER_LOSSES` entry; ``teacher``
    (an artifact name) is needed by 'kt' and 'soft'; ``lam`` and ``T`` by 'kt', ``T`` by 'temp_ce'
    and 'soft', ``dcn_weight`` by 'dcn'. ``init`` is an artifact to start from; ``stream`` keys the
    batch order and augmentation draws (:func:`raydefense.seeding.epoch_seed`). Every dataset
    named in ``val_sets`` is scored each epoch as ``<name>_acc``. Weights go to
    ``models/<artifact>.pt``.
    """

    task: str
    arch: str
    num_classes: int
    train: TrainConfig
    artifact: str
    loss: str = "ce"
    init: Optional[str] = None
    teacher: Optional[str] = None
    lam: float = 0.0
    T: float = 1.0
    dcn_weight: float = 0.0
    arch_options: dict = field(default_factory=dict)
    val_sets: tuple[str, ...] = ("val",)
    # A frozen denoiser artifact in front of the model, in training and validation ('ard_kt').
    preprocess: Optional[str] = None
    # A frozen denoiser artifact whose outputs, stored as 8-bit images, are the training images
    # (the KT teacher and student train on denoised images); validation images stay as they are.
    denoise_inputs: Optional[str] = None
    # The online attack of 'pgd_at' / 'ard_kt': RobustInputs' fields (eps, steps, ...), plus
    # 'val_steps' for the per-epoch whole-model PGD accuracy on "val" (val_pgd_acc).
    robust: dict = field(default_factory=dict)
    # Batch order and augmentation stream (raydefense.seeding.epoch_seed): '' is the one the target
    # and the trainings derived from it share; the surrogate has its own.
    stream: str = ""

    def __post_init__(self) -> None:
        if self.loss not in CLASSIFIER_LOSSES:
            raise ValueError(f"unknown classifier loss '{self.loss}' (known: {', '.join(CLASSIFIER_LOSSES)})")
        if self.loss in ("kt", "soft", "ard_kt") and not self.teacher:
            raise ValueError(f"classifier loss '{self.loss}' needs a teacher")
        if self.loss in ("pgd_at", "ard_kt") and not self.robust:
            raise ValueError(f"classifier loss '{self.loss}' needs the robust settings (eps, steps, ...)")
        if self.loss == "ard_kt" and not self.preprocess:
            raise ValueError("classifier loss 'ard_kt' needs a preprocess (the denoiser in front of the student)")


@dataclass(frozen=True)
class DenoiserArgs(LoopArgs):
    """One denoiser training (:func:`raydefense.pipeline.denoise.denoiser_loop`): ``arch`` 'uddn' or
    'dae', ``loss`` a guided-loss kind ('logits', 'features', 'pixel'), guided by the artifact
    ``classifier``; weights to ``models/<artifact>.pt`` (none when empty)."""

    arch: str
    loss: str
    artifact: str = ""
    classifier: str = "target"


@dataclass(frozen=True)
class GnrArgs(LoopArgs):
    """The WGAN-GP training (:func:`raydefense.pipeline.gnr.gnr_loop`); the generator goes to
    ``models/<artifact>.pt``."""

    artifact: str = "gnr_generator"


@dataclass(frozen=True)
class RobustDenoiserArgs(LoopArgs):
    """The UDDN of ``uddn_kt_adv`` (:func:`raydefense.pipeline.robust.robust_denoiser_loop`):
    fine-tuned from the artifact ``init`` with the guided loss ``loss`` of the frozen ``classifier``
    on online PGD examples made through denoiser + classifier (``robust``: as
    :attr:`ClassifierArgs.robust`); ``epochs`` at learning rate ``lr``; weights to ``models/<artifact>.pt``."""

    loss: str
    robust: dict
    epochs: int
    lr: float
    artifact: str = "uddn_adv"
    init: str = "uddn"
    classifier: str = "target"
