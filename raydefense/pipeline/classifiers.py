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

from typing import Any

import torch
import torch.nn.functional as F

from raydefense.config import TrainConfig, from_dict
from raydefense.pipeline import training as T
from raydefense.pipeline.artifacts import load_artifact, save_artifact, unwrap

LOSSES = ("ce", "kt", "dcn", "temp_ce", "soft")


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 1/16 of the side (reflect padding)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(3), x)
    pad = max(1, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]


@torch.no_grad()
def accuracy(model, shard, *, batch_size: int, device: torch.device, image_col: str = "image") -> float:
    model.eval()
    correct = total = 0.0
    for batch in shard.batches(batch_size=batch_size, device=device, shuffle=False, seed=0):
        logits = model(T.to_float_images(batch[image_col]))
        correct += (logits.argmax(1) == batch["label"]).sum().item()
        total += len(batch["label"])
    correct, total = T.allreduce_sum([correct, total], device)
    return correct / max(total, 1.0)


def classifier_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop. See ``train_classifier`` for the keys of ``config``."""
    import ray.train
    import ray.train.torch

    from raydefense import distill
    from raydefense.defenses import contractive_penalty
    from raydefense.models import create_model

    cfg = from_dict(config["cfg"])
    tc = TrainConfig(**config["train"])
    loss_kind = config["loss"]
    storage = config["storage"]
    T.setup_worker(cfg)
    device = T.worker_device()
    rank, _ = T.world()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 17)
    torch.manual_seed(cfg.seed + rank)

    model = create_model(config["arch"], num_classes=config["num_classes"])
    if config.get("init"):
        init = load_artifact(storage, config["init"], frozen=False)
        model.load_state_dict(init.state_dict())
    model.to(device)
    teacher = load_artifact(storage, config["teacher"], device) if config.get("teacher") else None
    model = ray.train.torch.prepare_model(model)
    opt = T.make_optimizer(model.parameters(), name=tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.epochs)
    start, _ = T.restore({"model": model, "opt": opt, "sched": sched})

    train_shard = T.EpochData(ray.train.get_dataset_shard("train"), cache_mb=cfg.scale.cache_mb)
    # Every dataset named val* is evaluated each epoch and reported as <name>_acc: "val" holds
    # clean images; a Tune trial adds e.g. "val_white" (denoised white-box images).
    vals = {name: T.EpochData(ray.train.get_dataset_shard(name), cache_mb=cfg.scale.cache_mb)
            for name in config["val_sets"]}
    temp = float(config.get("T", 1.0))
    metrics: dict[str, float] = {}
    for epoch in range(start, tc.epochs):
        model.train()
        timer = T.EpochTimer()
        loss_sum = seen = 0.0
        for batch in train_shard.batches(batch_size=tc.batch_size, device=device, shuffle=True, seed=cfg.seed + epoch):
            x = augment(T.to_float_images(batch["image"]), gen)
            y = batch["label"]
            with T.autocast(cfg, device):
                logits = model(x)
                if loss_kind == "ce":
                    loss = F.cross_entropy(logits, y, label_smoothing=tc.label_smoothing)
                elif loss_kind == "kt":
                    with torch.no_grad():
                        t_logits = teacher(x)
                    loss = distill.knowledge_transfer_loss(logits.float(), t_logits.float(), lam=float(config["lam"]), T=temp)
                elif loss_kind == "dcn":
                    loss = F.cross_entropy(logits, y) + float(config["dcn_weight"]) * contractive_penalty(unwrap(model), x, generator=gen)
                elif loss_kind == "temp_ce":
                    loss = distill.temperature_ce(logits.float(), y, temp)
                elif loss_kind == "soft":
                    with torch.no_grad():
                        soft = distill.distillation_soft_targets(teacher(x).float(), temp)
                    loss = distill.defensive_distillation_loss(logits.float(), soft, temp)
                else:
                    raise ValueError(f"unknown classifier loss '{loss_kind}' (known: {', '.join(LOSSES)})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
        sched.step()
        loss_sum, seen = T.allreduce_sum([loss_sum, seen], device)
        metrics = {"train_loss": loss_sum / max(seen, 1.0)}
        for name, shard in vals.items():
            metrics[f"{name}_acc"] = accuracy(model, shard, batch_size=tc.batch_size * 2, device=device)
        metrics["epoch_s"] = timer.lap()
        T.report_epoch(epoch, metrics, {"model": model, "opt": opt, "sched": sched}, config=config["cfg"],
                       final=epoch == tc.epochs - 1)

    if rank == 0:
        if not metrics:  # resumed after the last epoch: measure once more
            metrics = {f"{n}_acc": accuracy(model, s, batch_size=tc.batch_size * 2, device=device) for n, s in vals.items()}
        spec = {"kind": "classifier", "arch": config["arch"], "num_classes": config["num_classes"]}
        # start_epoch > 0 records that this training resumed from a checkpoint.
        save_artifact(storage, config["artifact"], model, spec, config=config["cfg"], metrics={**metrics, "start_epoch": start})


def train_classifier(ctx, *, task: str, arch: str, num_classes: int, train: TrainConfig,
                     train_ds, val_ds, loss: str = "ce", init: str | None = None,
                     teacher: str | None = None, gpu: bool = False, extra_val: dict[str, Any] | None = None,
                     **extra: Any) -> dict[str, Any]:
    """Train (or resume) one classifier on Ray Train and write ``models/<task>.pt``.

    Skips the work when the artifact already exists (it is written last, atomically).
    ``extra_val`` adds validation sets (name -> dataset with image, label; names start with "val").
    """
    if ctx.storage.exists(f"models/{task}.pt"):
        ctx.echo(f"  {task}: already trained, skipping")
        return {}
    if loss not in LOSSES:
        raise ValueError(f"unknown classifier loss '{loss}' (known: {', '.join(LOSSES)})")
    from dataclasses import asdict

    loop_config = {
        "cfg": ctx.cfg.to_dict(), "task": task, "arch": arch, "num_classes": num_classes,
        "train": asdict(train), "loss": loss, "init": init, "teacher": teacher,
        "storage": ctx.storage, "artifact": task, "val_sets": ["val", *(extra_val or {})], **extra,
    }
    ctx.echo(f"  {task}: training {arch} ({loss}) for {train.epochs} epochs on Ray Train")
    metrics = T.fit(ctx, task, classifier_loop, loop_config, {"train": train_ds, "val": val_ds, **(extra_val or {})}, gpu=gpu)
    if "val_acc" in metrics:
        ctx.echo(f"  {task}: val accuracy {metrics['val_acc']:.3f}")
    return metrics
