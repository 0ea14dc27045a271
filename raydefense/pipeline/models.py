"""Stage 2, models: the target classifier (white-box, FaceNet by default) and the black-box
surrogate (Inception-v3 by default), trained data-parallel on Ray Train on the clean GNR +
denoise splits, or loaded from pretrained weights when the config names them."""
from __future__ import annotations

from typing import Any, Optional

from raydefense.pipeline.artifacts import save_artifact
from raydefense.pipeline.classifiers import train_classifier


def _pretrained_init(ctx, name: str, arch: str, num_classes: int, pretrained: str) -> str:
    """Build the model with its pretrained weights on the driver and store it as an artifact."""
    from raydefense.models import create_model

    art = f"{name}_pretrained"
    if not ctx.layout.has_model(art):
        kwargs: dict[str, Any] = {}
        if pretrained.startswith("s3://"):
            from raydefense.storage import filesystem_for

            kwargs["filesystem"], _ = filesystem_for(pretrained, endpoint_url=ctx.cfg.storage.endpoint_url,
                                                     region=ctx.cfg.storage.region)
        model = create_model(arch, num_classes=num_classes, pretrained=pretrained, **kwargs)
        spec = {"kind": "classifier", "arch": arch, "num_classes": num_classes}
        save_artifact(ctx.storage, art, model, spec, config=ctx.cfg.to_dict(), metrics={"pretrained": pretrained})
    return art


def train_or_load(ctx, *, task: str, arch: str, pretrained: Optional[str], train_cfg, num_classes: int, gpu: bool) -> dict[str, Any]:
    train = ctx.layout.read_clean(["gnr", "denoise"], ["image", "label"])
    val = ctx.layout.read_clean("val", ["image", "label"])
    init = None
    if pretrained:
        init = _pretrained_init(ctx, task, arch, num_classes, pretrained)
        if not ctx.cfg.models.finetune_pretrained:
            from raydefense.pipeline.artifacts import load_artifact

            if not ctx.layout.has_model(task):
                model = load_artifact(ctx.storage, init, frozen=False)
                spec = {"kind": "classifier", "arch": arch, "num_classes": num_classes}
                save_artifact(ctx.storage, task, model, spec, config=ctx.cfg.to_dict(), metrics={"pretrained": pretrained})
            ctx.echo(f"  {task}: using pretrained '{pretrained}' weights as they are")
            return {}
    return train_classifier(ctx, task=task, arch=arch, num_classes=num_classes, train=train_cfg, train_ds=train,
                            val_ds=val, loss="ce", init=init, gpu=gpu)


def run_models(ctx, *, gpu: bool) -> dict[str, Any]:
    m = ctx.cfg.models
    n_cls = ctx.layout.num_classes()
    out = {
        "target": train_or_load(ctx, task="target", arch=m.target, pretrained=m.target_pretrained,
                                train_cfg=m.target_train, num_classes=n_cls, gpu=gpu),
        "surrogate": train_or_load(ctx, task="surrogate", arch=m.surrogate, pretrained=m.surrogate_pretrained,
                                   train_cfg=m.surrogate_train, num_classes=n_cls, gpu=gpu),
    }
    return out
