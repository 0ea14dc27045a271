"""One training loop for every classifier the defense needs.

``loss`` picks the objective:

- ``ce``: cross-entropy on labels: the target and surrogate (section 5), the KT teacher
  trained on denoised images (section 4.2);
- ``kt``: knowledge transfer (equation 6) from a frozen teacher at temperature T with weight
  lambda: the published student;
- ``dcn``: cross-entropy plus the contractive penalty of Gu & Rigazio (2015);
- ``temp_ce`` / ``soft``: defensive distillation (Papernot et al. 2016): a teacher trained
  at temperature T, then a student on its soft labels at the same T, deployed at T = 1.

The same function runs as a plain Ray Train task and inside a Tune trial.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from raydefense.config import TrainConfig, from_dict
from raydefense.pipeline import training as T
from raydefense.pipeline.artifacts import load_artifact, save_artifact, unwrap
from raydefense.pipeline.runtime import images_to_tensor
from raydefense.seeding import seed_everything, torch_generator, worker_seed



@dataclass(frozen=True)
class LossInputs:
    """What a classifier loss may need beyond the model, the batch and its labels."""

    teacher: Optional[torch.nn.Module] = None  # frozen, for 'kt' and 'soft'
    T: float = 1.0  # temperature of 'kt', 'temp_ce' and 'soft'
    lam: float = 0.0  # lambda of equation 6 ('kt')
    dcn_weight: float = 0.0  # contractive strength ('dcn')
    label_smoothing: float = 0.0  # 'ce'
    generator: Optional[torch.Generator] = None  # DCN's random projections


def _ce(model, x, y, a: LossInputs) -> torch.Tensor:
    return F.cross_entropy(model(x), y, label_smoothing=a.label_smoothing)


def _kt(model, x, y, a: LossInputs) -> torch.Tensor:
    from raydefense.distill import knowledge_transfer_loss

    with torch.no_grad():
        t_logits = a.teacher(x)
    return knowledge_transfer_loss(model(x).float(), t_logits.float(), lam=a.lam, T=a.T)


def _dcn(model, x, y, a: LossInputs) -> torch.Tensor:
    from raydefense.defenses import dcn_loss

    # One forward pass through the (data-parallel) model serves both terms.
    return dcn_loss(model, x, y, weight=a.dcn_weight, generator=a.generator)


def _temp_ce(model, x, y, a: LossInputs) -> torch.Tensor:
    from raydefense.distill import temperature_ce

    return temperature_ce(model(x).float(), y, a.T)


def _soft(model, x, y, a: LossInputs) -> torch.Tensor:
    from raydefense.distill import defensive_distillation_loss, distillation_soft_targets

    with torch.no_grad():
        soft = distillation_soft_targets(a.teacher(x).float(), a.T)
    return defensive_distillation_loss(model(x).float(), soft, a.T)


#: Registry: loss name -> ``fn(model, x, y, inputs) -> scalar`` (see the module docstring).
CLASSIFIER_LOSSES: dict[str, Callable[[Any, torch.Tensor, torch.Tensor, LossInputs], torch.Tensor]] = {
    "ce": _ce,
    "kt": _kt,
    "dcn": _dcn,
    "temp_ce": _temp_ce,
    "soft": _soft,
}
LOSSES = tuple(CLASSIFIER_LOSSES)


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


@torch.no_grad()
def accuracy(model, data: T.EpochData, *, batch_size: int, device: torch.device, image_col: str = "image") -> float:
    """Accuracy over the whole dataset: each worker scores its share, the counts are summed."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    correct = total = 0.0
    for batch in data.eval_batches(batch_size=batch_size, device=device):
        logits = model(images_to_tensor(batch[image_col], device))
        correct += (logits.argmax(1) == batch["label"]).sum().item()
        total += len(batch["label"])
    model.train(was_training)
    correct, total = T.allreduce_sum([correct, total], device)
    return correct / total if total else float("nan")


def classifier_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop. See ``train_classifier`` for the keys of ``config``."""
    import ray.train
    import ray.train.torch

    from raydefense.models import create_model

    cfg = from_dict(config["cfg"])
    tc = TrainConfig(**config["train"])
    loss_kind = config["loss"]
    storage = config["storage"]
    T.setup_worker(cfg)
    device = T.worker_device()
    rank, _ = T.world()
    gen = torch_generator(cfg.seed * 1000 + rank + 17)  # DCN's random projections
    seed_everything(worker_seed(cfg.seed, "classifier", rank))

    model = create_model(config["arch"], num_classes=config["num_classes"], **config.get("arch_options", {}))
    if config.get("init"):
        init = load_artifact(storage, config["init"], frozen=False)
        model.load_state_dict(init.state_dict())
    model.to(device)
    teacher = load_artifact(storage, config["teacher"], device) if config.get("teacher") else None
    model = ray.train.torch.prepare_model(model)
    opt = T.make_optimizer(model.parameters(), name=tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.epochs)
    progress = T.Progress(cfg, {"model": model, "opt": opt, "sched": sched}, config=config["cfg"], epochs=tc.epochs)

    train_data = T.EpochData(ray.train.get_dataset_shard("train"), cache_mb=cfg.scale.cache_mb, name=config.get("task", "train"))
    # Every dataset named val* is evaluated each epoch and reported as <name>_acc: "val" holds
    # clean images; a Tune trial adds e.g. "val_white" (denoised white-box images).
    vals = {name: T.EpochData(ray.train.get_dataset_shard(name), cache_mb=cfg.scale.cache_mb, name=name)
            for name in config["val_sets"]}
    loss_fn = CLASSIFIER_LOSSES[loss_kind]
    loss_inputs = LossInputs(teacher=teacher, T=float(config.get("T", 1.0)), lam=float(config.get("lam", 0.0)),
                             dcn_weight=float(config.get("dcn_weight", 0.0)), label_smoothing=tc.label_smoothing,
                             generator=gen)
    metrics: dict[str, float] = {}
    for epoch in progress.epoch_range():
        model.train()
        timer = T.EpochTimer()
        loss_sum = seen = 0.0
        for step in train_data.steps(batch_size=tc.batch_size, device=device, shuffle=True, seed=cfg.seed * 1000 + epoch):
            x = augment(images_to_tensor(step["image"], device), step)
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
            metrics[f"{name}_acc"] = accuracy(model, data, batch_size=tc.batch_size * 2, device=device)
        metrics["epoch_s"] = timer.lap()
        progress.report(epoch, metrics)

    if not metrics:  # resumed after the last epoch: measure once more (every worker takes part)
        metrics = {f"{n}_acc": accuracy(model, d, batch_size=tc.batch_size * 2, device=device) for n, d in vals.items()}
    if rank == 0:
        spec = {"kind": "classifier", "arch": config["arch"], "num_classes": config["num_classes"],
                **({"options": config["arch_options"]} if config.get("arch_options") else {})}
        # start_epoch > 0 records that this training resumed from a checkpoint.
        save_artifact(storage, config["artifact"], model, spec, config=config["cfg"], metrics={**metrics, **progress.summary()})


def train_classifier(ctx, *, task: str, arch: str, num_classes: int, train: TrainConfig,
                     train_ds, val_ds, loss: str = "ce", init: str | None = None,
                     teacher: str | None = None, gpu: bool = False, extra_val: dict[str, Any] | None = None,
                     **extra: Any) -> dict[str, Any]:
    """Train (or resume) one classifier on Ray Train and write ``models/<task>.pt``.

    Skips the work when the artifact already exists (it is written last, atomically).
    ``extra_val`` adds validation sets (name -> dataset with image, label; names start with "val").
    """
    if ctx.layout.has_model(task):
        ctx.echo(f"  {task}: already trained, skipping")
        return {}
    if loss not in CLASSIFIER_LOSSES:
        raise ValueError(f"unknown classifier loss '{loss}' (known: {', '.join(LOSSES)})")
    from dataclasses import asdict

    loop_config = {
        "cfg": ctx.cfg.to_dict(), "task": task, "arch": arch, "num_classes": num_classes,
        "train": asdict(train), "loss": loss, "init": init, "teacher": teacher,
        "storage": ctx.storage, "artifact": task, "val_sets": ["val", *(extra_val or {})], **extra,
    }
    ctx.echo(f"  {task}: training {arch} ({loss}) for {train.epochs} epochs on Ray Train")
    metrics = T.fit(ctx, task, classifier_loop, loop_config, {"train": train_ds, "val": val_ds, **(extra_val or {})}, gpu=gpu,
                    epochs=train.epochs)
    if "val_acc" in metrics:
        ctx.echo(f"  {task}: val accuracy {metrics['val_acc']:.3f}")
    return metrics
