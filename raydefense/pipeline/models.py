"""Stage 2, models: the target classifier (white-box, FaceNet by default) and the black-box
surrogate (Inception-v3 by default), trained data-parallel on Ray Train on the clean GNR +
denoise splits, or loaded from pretrained weights when the config names them."""
from __future__ import annotations

from typing import Any, Optional

from raydefense.pipeline.artifacts import save_artifact
from raydefense.pipeline.classifiers import train_classifier
from raydefense.pipeline.loop_args import ClassifierArgs
from raydefense.pipeline.run import RunContext


def _pretrained_init(ctx: RunContext, name: str, arch: str, num_classes: int, pretrained: str) -> str:
    """Build the model with its pretrained weights on the driver and store it as an artifact."""
    from raydefense.models import create_model

    art = f"{name}_pretrained"
    if not ctx.layout.has_model(art):
        kwargs: dict[str, Any] = {}
        if pretrained.startswith("s3://"):
            from raydefense.storage import resolve

            kwargs["filesystem"], _ = resolve(pretrained, endpoint_url=ctx.cfg.storage.endpoint_url,
                                                     region=ctx.cfg.storage.region)
        model = create_model(arch, num_classes=num_classes, pretrained=pretrained, **kwargs)
        spec = {"kind": "classifier", "arch": arch, "num_classes": num_classes}
        save_artifact(ctx.storage, art, model, spec, config=ctx.cfg.to_dict(), metrics={"pretrained": pretrained})
    return art


def classifier_model_args(ctx: RunContext, which: str, *, init: Optional[str] = None) -> ClassifierArgs:
    """The training of the target or the surrogate (``which``): cross-entropy, ``models.<which>_train``."""
    m = ctx.cfg.models
    return ClassifierArgs(task=which, artifact=which, arch=getattr(m, which), num_classes=ctx.layout.num_classes(),
                          train=getattr(m, f"{which}_train"), loss="ce", init=init)


def clean_training_sets(ctx: RunContext) -> dict[str, Any]:
    """The clean GNR + denoise splits (``train``) and the clean validation split (``val``):
    what the target, the surrogate and the classifier baselines train on."""
    return {"train": ctx.layout.read_clean(["gnr", "denoise"], ["image", "label"]),
            "val": ctx.layout.read_clean("val", ["image", "label"])}


def train_or_load(ctx: RunContext, which: str, *, gpu: bool) -> dict[str, Any]:
    """Train the target or surrogate (``which``), from its pretrained weights when the config names
    them, or keep those weights as they are (``models.finetune_pretrained: false``)."""
    m = ctx.cfg.models
    arch, pretrained = getattr(m, which), getattr(m, f"{which}_pretrained")
    num_classes = ctx.layout.num_classes()
    init = None
    if pretrained:
        init = _pretrained_init(ctx, which, arch, num_classes, pretrained)
        if not m.finetune_pretrained:
            from raydefense.pipeline.artifacts import load_artifact

            if not ctx.layout.has_model(which):
                model = load_artifact(ctx.storage, init, frozen=False)
                spec = {"kind": "classifier", "arch": arch, "num_classes": num_classes}
                save_artifact(ctx.storage, which, model, spec, config=ctx.cfg.to_dict(), metrics={"pretrained": pretrained})
            ctx.echo(f"  {which}: using pretrained '{pretrained}' weights as they are")
            return {}
    return train_classifier(ctx, classifier_model_args(ctx, which, init=init), clean_training_sets(ctx), gpu=gpu)


def run_models(ctx: RunContext, *, gpu: bool) -> dict[str, Any]:
    return {"target": train_or_load(ctx, "target", gpu=gpu), "surrogate": train_or_load(ctx, "surrogate", gpu=gpu)}
