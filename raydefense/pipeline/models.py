"""Stage 2, models: the target classifier (white-box, FaceNet by default) and the black-box
surrogate (Inception-v3 by default), trained data-parallel on Ray Train on the clean GNR +
denoise splits, or loaded from pretrained weights when the config names them."""
from __future__ import annotations

from typing import Any, Optional

from raydefense.pipeline.artifacts import save_artifact
from raydefense.pipeline.classifiers import train_classifiers
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
    """The training of the target or the surrogate (``which``): cross-entropy, ``models.<which>_train``;
    the surrogate on a batch order and augmentation stream of its own."""
    m = ctx.cfg.models
    return ClassifierArgs(task=which, artifact=which, arch=getattr(m, which), num_classes=ctx.layout.num_classes(),
                          train=getattr(m, f"{which}_train"), loss="ce", init=init,
                          stream="surrogate" if which == "surrogate" else "")


TARGET_INIT = "target_init"


def target_start(ctx: RunContext) -> str:
    """The artifact holding the weights the target's training starts from, for a surrogate with
    ``models.surrogate_init: target``: the target's pretrained weights when the config names them,
    else ``models/target_init.pt``, the target's random initialisation as its training worker
    builds it (:func:`~raydefense.pipeline.classifiers.initial_model`, rank 0), made here on the
    driver without moving the driver's random streams."""
    from raydefense.pipeline.classifiers import initial_model
    from raydefense.seeding import isolated_rng

    m = ctx.cfg.models
    num_classes = ctx.layout.num_classes()
    if m.target_pretrained:
        return _pretrained_init(ctx, "target", m.target, num_classes, m.target_pretrained)
    if not ctx.layout.has_model(TARGET_INIT):
        with isolated_rng():
            model = initial_model(ctx.cfg.seed, classifier_model_args(ctx, "target"))
        spec = {"kind": "classifier", "arch": m.target, "num_classes": num_classes}
        save_artifact(ctx.storage, TARGET_INIT, model, spec, config=ctx.cfg.to_dict())
    return TARGET_INIT


def clean_training_sets(ctx: RunContext) -> dict[str, Any]:
    """The clean GNR + denoise splits (``train``) and the clean validation split (``val``):
    what the target, the surrogate and the classifier baselines train on."""
    return {"train": ctx.layout.read_clean(["gnr", "denoise"], ["image", "label"]),
            "val": ctx.layout.read_clean("val", ["image", "label"])}


def training_args(ctx: RunContext, which: str) -> Optional[ClassifierArgs]:
    """The training of the target or surrogate (``which``): from its pretrained weights when the
    config names them, a surrogate with ``models.surrogate_init: target`` from
    :func:`target_start`; None when the pretrained weights are kept as they are
    (``models.finetune_pretrained: false``; their artifact is then written here)."""
    m = ctx.cfg.models
    arch, pretrained = getattr(m, which), getattr(m, f"{which}_pretrained")
    num_classes = ctx.layout.num_classes()
    init = None
    if which == "surrogate" and m.surrogate_init == "target":  # surrogate_pretrained is then null (config check)
        init = target_start(ctx)
    elif pretrained:
        init = _pretrained_init(ctx, which, arch, num_classes, pretrained)
        if not m.finetune_pretrained:
            from raydefense.pipeline.artifacts import load_artifact

            if not ctx.layout.has_model(which):
                model = load_artifact(ctx.storage, init, frozen=False)
                spec = {"kind": "classifier", "arch": arch, "num_classes": num_classes}
                save_artifact(ctx.storage, which, model, spec, config=ctx.cfg.to_dict(), metrics={"pretrained": pretrained})
            ctx.echo(f"  {which}: using pretrained '{pretrained}' weights as they are")
            return None
    return classifier_model_args(ctx, which, init=init)


def run_models(ctx: RunContext, *, gpu: bool) -> dict[str, Any]:
    """The target and the surrogate, trained one after the other in one Ray Train fit
    (:func:`~raydefense.pipeline.classifiers.train_classifiers`: one fixed cost, one read of the
    clean sets)."""
    trainings = {which: training_args(ctx, which) for which in ("target", "surrogate")}
    todo = [a for a in trainings.values() if a is not None]
    done = train_classifiers(ctx, todo, clean_training_sets(ctx), gpu=gpu)
    return {which: done.get(which, {}) for which in trainings}
