"""Stage 4, gnr: train the WGAN-GP on real adversarial noise (section 2), then grow the
denoiser's training set with generated noise.

Training runs on Ray Train over ``data/adv/set=train`` (real noise n = x* - x). Augmentation is
a Ray Data stage: each clean image of the denoise split gets ``k`` generated noises, with
``k`` chosen so that generated pairs / real pairs = ``gnr.augment_ratio`` (the paper: 80k
generated from 40k real). x* = clip(x + n, 0, 1). Output ``data/gnr_aug`` has the
columns of the attack sets, with ``method = 'gnr'``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from raydefense.config import from_dict
from raydefense.pipeline import training as T
from raydefense.pipeline.artifacts import load_artifact, save_artifact
from raydefense.pipeline.loop_args import GnrArgs
from raydefense.pipeline.run import RunContext, RunLayout
from raydefense.pipeline.runtime import pool_map, device_for, images_to_tensor, tensor_to_images
from raydefense.seeding import seed_everything, torch_generator, worker_seed


def _generator_spec(cfg) -> dict[str, Any]:
    return {"kind": "generator", "image_size": cfg.data.image_size, "z_dim": cfg.gnr.z_dim,
            "widths": list(cfg.gnr.widths), "max_noise": cfg.attack.eps_max}


def gnr_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop for the WGAN-GP (equation 3), n_critic critic steps per generator step."""
    from raydefense.gnr import Critic, critic_step, generator_step, make_optimizers
    from raydefense.pipeline.artifacts import build_network, unwrap

    cfg = from_dict(config["cfg"])
    args = GnrArgs.from_loop_config(config)
    g = cfg.gnr
    T.setup_worker(cfg)
    device = T.worker_device()
    rank, _ = T.world()
    seed_everything(worker_seed(cfg.seed, "gnr", rank))
    spec = _generator_spec(cfg)
    gen = T.prepare_model(build_network(spec), device)
    critic = T.prepare_model(Critic(image_size=cfg.data.image_size, widths=tuple(g.critic_widths), norm=g.critic_norm),
                             device)
    opt_g, opt_c = make_optimizers(gen, critic, lr=g.lr)
    objects = {"gen": gen, "critic": critic, "opt_g": opt_g, "opt_c": opt_c}
    progress = T.Progress(cfg, objects, config=config["cfg"], epochs=g.epochs)
    data = T.epoch_data("train", cache_mb=cfg.scale.cache_mb, name="gnr")
    metrics: dict[str, float] = {}
    for epoch in progress.epoch_range():
        gen.train(); critic.train()
        timer = T.EpochTimer()
        w_sum = gp_sum = g_sum = steps = g_steps = 0.0
        for i, step in enumerate(data.steps(batch_size=g.batch_size, device=device, shuffle=True, seed=cfg.seed * 1000 + 11 + epoch)):
            real = images_to_tensor(step["adv"], device) - images_to_tensor(step["clean"], device)
            z = step.randn(g.z_dim, device=device)
            with torch.no_grad():
                fake = gen(z)
            stats = critic_step(critic, opt_c, real, fake, gp_weight=g.gp_weight, loss_weight=step.loss_weight)
            w_sum += float(stats["wasserstein"]); gp_sum += float(stats["gradient_penalty"]); steps += 1
            if (i + 1) % g.n_critic == 0:
                z = step.randn(g.z_dim, device=device)
                # The bare critic: frozen for this step, it takes no part in DDP's gradient sync.
                loss_g = generator_step(unwrap(critic), opt_g, lambda: gen(z), loss_weight=step.loss_weight)
                g_sum += loss_g.item(); g_steps += 1
        w_sum, gp_sum, g_sum, steps, g_steps = T.allreduce_sum([w_sum, gp_sum, g_sum, steps, g_steps], device)
        metrics = {"wasserstein": w_sum / max(steps, 1), "gp": gp_sum / max(steps, 1),
                   "g_loss": g_sum / max(g_steps, 1), "epoch_s": timer.lap()}
        progress.report(epoch, metrics)
    if rank == 0:
        save_artifact(config["storage"], args.artifact, gen, spec, config=config["cfg"],
                      metrics={**metrics, **progress.summary()})


def gnr_task(ctx: RunContext) -> T.TrainingTask:
    """The WGAN-GP's Ray Train task on the real noise of the attack's ``train`` set (checkpoints
    under ``train/gnr``)."""
    return T.TrainingTask(name="gnr", loop=gnr_loop, config=GnrArgs().loop_config(ctx.cfg, ctx.storage),
                          datasets={"train": ctx.layout.read_adv("train", ["clean", "adv"])}, epochs=ctx.cfg.gnr.epochs)


class AugmentActor:
    """map_batches actor: clean images -> ``k`` GNR adversarial images each."""

    def __init__(self, *, storage, k: int, seed: int, gpu: bool, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.device = device_for(gpu)
        self.gen = load_artifact(storage, "gnr_generator", self.device)
        self.k, self.seed = k, seed

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = images_to_tensor(batch["image"], self.device)
        n = len(x)
        outs = []
        for j in range(self.k):
            # Noise for image i, draw j depends only on (seed, index, j): reproducible at any batching.
            z = torch.stack([
                torch.randn(self.gen.z_dim, generator=torch_generator(self.seed * 7919 + int(idx) * 31 + j))
                for idx in batch["index"]
            ]).to(self.device)
            noise = self.gen(z)
            adv = (x + noise).clamp(0, 1)
            outs.append((tensor_to_images(adv), noise.abs().amax(dim=(1, 2, 3)).cpu().numpy().astype(np.float32)))
        return {
            "clean": np.concatenate([batch["image"]] * self.k),
            "adv": np.concatenate([a for a, _ in outs]),
            "label": np.concatenate([batch["label"].astype(np.int64)] * self.k),
            "eps": np.concatenate([e for _, e in outs]),
            "method": np.array(["gnr"] * (n * self.k)),
            "index": np.concatenate([batch["index"].astype(np.int64)] * self.k),
        }


def run_gnr(ctx: RunContext, *, gpu: bool) -> dict[str, Any]:
    cfg = ctx.cfg
    if not cfg.gnr.enabled:
        ctx.echo("  gnr disabled (gnr.enabled: false): the denoiser trains on real adversarial pairs only")
        return {"enabled": False}
    if not ctx.layout.has_model("gnr_generator"):
        ctx.echo(f"  gnr: training the WGAN-GP for {cfg.gnr.epochs} epochs on Ray Train")
        metrics = T.run_task(ctx, gnr_task(ctx), gpu=gpu)
        if metrics:
            ctx.echo(f"  gnr: Wasserstein estimate {metrics.get('wasserstein', float('nan')):.4f}, GP {metrics.get('gp', float('nan')):.4f}")
    n_real = ctx.layout.count_rows(RunLayout.adv_rel("train"))
    n_clean = ctx.layout.count_clean("denoise")
    k = max(1, math.ceil(cfg.gnr.augment_ratio * n_real / max(n_clean, 1))) if cfg.gnr.augment_ratio > 0 else 0
    if k == 0 or n_clean == 0:
        ctx.echo("  gnr: augment_ratio is 0 or the denoise split is empty: no generated images")
        return {"generated": 0}
    ds = pool_map(ctx.layout.read_clean("denoise"), AugmentActor, {"storage": ctx.storage, "k": k, "seed": cfg.seed},
                  cfg=cfg, gpu=gpu, batch_size=cfg.attack.batch_size)
    ctx.layout.write_dataset(ctx.layout.GNR_AUG, ds, min_rows_per_file=cfg.data.shard_size)
    generated = ctx.layout.count_rows(ctx.layout.GNR_AUG)
    ctx.echo(f"  gnr: {generated} generated adversarial images ({k} per clean image) beside {n_real} real ones")
    return {"generated": generated, "real": n_real, "per_image": k}


def training_pairs(ctx: RunContext):
    """The denoisers' training set (and, denoised, the KT teacher's and student's inputs): the
    attack's real adversarial pairs (``data/adv/set=train``) plus the GNR's generated pairs
    (``data/gnr_aug``, when the GNR is on and made them), as ``clean, adv, label`` rows."""
    ds = ctx.layout.read_adv("train", ["clean", "adv", "label"])
    if ctx.cfg.gnr.enabled and ctx.layout.has_dataset(ctx.layout.GNR_AUG):
        ds = ds.union(ctx.layout.read_adv("gnr_aug", ["clean", "adv", "label"]))
    return ds
