"""Section 4: UDDN and GNR training throughput and defended-model evaluation throughput.

Plain PyTorch in this process (no Ray), with the project's own networks, losses and steps, at the
sizes of the config (``data.image_size``, ``denoise.widths`` / ``batch_size`` / ``guidance``,
``gnr.*``, ``eval.batch_size``, ``models.target``) and ``scale.cpus_per_worker`` torch threads
(what a Ray Train worker uses). The weights are random: the cost of a step does not depend on them.

* **UDDN training** (images/s): one step of ``denoiser_loop`` = ``guided_loss(guidance, target,
  uddn(x_adv), x)`` (equation 5; the frozen target's logits or features), ``backward``, Adam step.
  Beside it the same step with the target's output on the clean images computed beforehand
  (``reference``, as ``denoiser_loop`` does once per training row), as a speed ratio.
  Also against the same step with the UDDN's weights in NCHW instead of the channels-last layout
  the training workers use (ratio).
* **Target training** (images/s): one ``classifier_loop`` step of the target (cross-entropy, Adam)
  at ``models.target_train``'s batch, channels-last against NCHW weights (ratio).
* **GNR training** (images/s of real noise consumed): one round of ``gnr_loop`` = ``n_critic``
  ``critic_step`` calls (WGAN-GP critic loss with gradient penalty) and one ``generator_step``;
  channels-last against NCHW weights (ratio).
* **Evaluation** (images/s): ``DefendedModel(target, Sequential(UDDN, UnitClamp()))`` forward
  under ``torch.no_grad`` (the ``uddn`` / ``uddn_kt`` defense as the tables evaluate it), against
  the undefended target; their ratio is the defense's cost at inference.

Timing: ``steps`` steps per measurement (``time.perf_counter``), the three trainings/evaluations
interleaved round by round after a warm-up round; images/s = steps x batch / seconds.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .results import Row, Section
from .stats import interleave, paired_ratios

__all__ = ["run_throughput", "uddn_trainer", "classifier_trainer", "gnr_trainer", "evaluators"]


def _target(cfg, num_classes: int, device: str) -> torch.nn.Module:
    """The target classifier as ``load_artifact`` hands it to the loops: eval mode, frozen, in
    inference form (:func:`raydefense.models.fusion.inference_form`)."""
    from raydefense.models import create_model
    from raydefense.models.fusion import inference_form

    return inference_form(create_model(cfg.models.target, num_classes=num_classes).to(device))


def _uddn(cfg, device: str) -> torch.nn.Module:
    from raydefense.pipeline.artifacts import build_network

    return build_network({"kind": "denoiser", "arch": "uddn", "widths": list(cfg.denoise.widths)}).to(device)


def _batch(n: int, size: int, device: str, *, eps: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean images ``x`` and ``x_adv = clip(x + noise)`` with L-inf noise at most ``eps``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    noise = (torch.rand(n, 3, size, size, generator=g) * 2 - 1) * eps
    return x.to(device), (x + noise).clamp(0, 1).to(device)


def _with_amp(cfg, amp: bool | None):
    """``cfg`` with ``scale.amp`` forced on or off; unchanged for None (the config decides)."""
    return cfg if amp is None else cfg.replace([f"scale.amp={'true' if amp else 'false'}"])


def uddn_trainer(cfg, *, num_classes: int, device: str = "cpu", amp: bool | None = None,
                 batch: int | None = None, reference: bool = False,
                 channels_last: bool = True) -> tuple[Callable[[], None], int]:
    """``(step, batch)``: one UDDN training step of ``denoiser_loop`` (guided loss, Adam) on
    ``batch`` images (default ``denoise.batch_size``); ``amp``: bf16 autocast on or off, or None
    as ``cfg``'s ``scale.amp`` decides on ``device`` (:func:`raydefense.pipeline.worker.amp_enabled`,
    as ``denoiser_loop`` does); ``reference``: the target's
    output on the clean images computed once beforehand (:func:`raydefense.denoise.guidance_reference`,
    what ``denoiser_loop`` does once per row for a cached training set) instead of in every step;
    ``channels_last``: the UDDN's weights in the layout the training workers give it
    (:func:`raydefense.pipeline.worker.prepare_model`), False for PyTorch's default NCHW."""
    from raydefense.denoise import guidance_reference, guided_loss
    from raydefense.pipeline.worker import autocast

    d = cfg.denoise
    target, model = _target(cfg, num_classes, device), _uddn(cfg, device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=d.lr)
    batch = batch or d.batch_size
    x, x_adv = _batch(batch, cfg.data.image_size, device, eps=cfg.attack.eps_max, seed=1)
    run_cfg = _with_amp(cfg, amp)
    dev = torch.device(device)

    with autocast(run_cfg, dev):
        ref = guidance_reference(d.guidance, target, x) if reference else None

    def step() -> None:
        with autocast(run_cfg, dev):
            loss = guided_loss(d.guidance, target, model(x_adv), x, reference=ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, batch


def classifier_trainer(cfg, *, num_classes: int, device: str = "cpu", amp: bool | None = None,
                       channels_last: bool = True) -> tuple[Callable[[], None], int]:
    """``(step, batch)``: one training step of the target as ``classifier_loop`` takes it
    (cross-entropy, Adam at ``models.target_train``'s learning rate and batch, train mode) on random
    images; ``amp`` and ``channels_last`` as in :func:`uddn_trainer`."""
    from raydefense.models import create_model
    from raydefense.pipeline.worker import autocast

    tc = cfg.models.target_train
    model = create_model(cfg.models.target, num_classes=num_classes).to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    x, _ = _batch(tc.batch_size, cfg.data.image_size, device, eps=0.0, seed=5)
    y = torch.arange(tc.batch_size, device=device) % num_classes
    run_cfg = _with_amp(cfg, amp)
    dev = torch.device(device)

    def step() -> None:
        with autocast(run_cfg, dev):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, tc.batch_size


def gnr_trainer(cfg, *, device: str = "cpu", channels_last: bool = True) -> tuple[Callable[[], None], int]:
    """``(round, images)``: ``n_critic`` critic steps and one generator step of ``gnr_loop``;
    ``images`` is the real-noise images the round consumes (``n_critic x batch``);
    ``channels_last`` as in :func:`uddn_trainer`."""
    from raydefense.gnr import Critic, critic_step, generator_step, make_optimizers
    from raydefense.pipeline.artifacts import build_network

    g = cfg.gnr
    gen = build_network({"kind": "generator", "image_size": cfg.data.image_size, "z_dim": g.z_dim,
                         "widths": list(g.widths), "max_noise": cfg.attack.eps_max}).to(device).train()
    critic = Critic(image_size=cfg.data.image_size, widths=tuple(g.critic_widths), norm=g.critic_norm).to(device).train()
    if channels_last:
        gen.to(memory_format=torch.channels_last)
        critic.to(memory_format=torch.channels_last)
    opt_g, opt_c = make_optimizers(gen, critic, lr=g.lr)
    x, x_adv = _batch(g.batch_size, cfg.data.image_size, device, eps=cfg.attack.eps_max, seed=2)
    real = x_adv - x
    gen_rng = torch.Generator(device=device).manual_seed(3)

    def one_round() -> None:
        for _ in range(g.n_critic):
            z = torch.randn(g.batch_size, g.z_dim, device=device, generator=gen_rng)
            with torch.no_grad():
                fake = gen(z)
            critic_step(critic, opt_c, real, fake, gp_weight=g.gp_weight)
        z = torch.randn(g.batch_size, g.z_dim, device=device, generator=gen_rng)
        generator_step(critic, opt_g, lambda: gen(z))

    return one_round, g.n_critic * g.batch_size


def evaluators(cfg, *, num_classes: int, device: str = "cpu") -> tuple[dict[str, Callable[[], Any]], int]:
    """``({'defended': f, 'none': f}, batch)``: forward of UDDN + target as the tables build it
    (:class:`raydefense.defenses.DefendedModel` with :class:`raydefense.pipeline.defended.UnitClamp`)
    and of the bare target, under ``torch.no_grad``, at ``eval.batch_size``."""
    from raydefense.defenses import DefendedModel
    from raydefense.pipeline.defended import UnitClamp

    target = _target(cfg, num_classes, device)
    defended = DefendedModel(target, torch.nn.Sequential(_uddn(cfg, device).eval(), UnitClamp())).eval()
    n = cfg.eval.batch_size
    _, x_adv = _batch(n, cfg.data.image_size, device, eps=cfg.attack.eps_max, seed=4)

    def forward(model: torch.nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return model(x_adv)
        return call

    return {"defended": forward(defended), "none": forward(target)}, n


def run_throughput(section: Section, cfg, *, num_classes: int, steps: int, rounds: int, warmup: int = 1,
                   device: str = "cpu", log: Callable[[str], None] = print) -> None:
    """Fill ``section`` with the rows of the module docstring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    try:
        torch.manual_seed(0)
        uddn_step, uddn_batch = uddn_trainer(cfg, num_classes=num_classes, device=device)
        uddn_ref_step, _ = uddn_trainer(cfg, num_classes=num_classes, device=device, reference=True)
        uddn_nchw_step, _ = uddn_trainer(cfg, num_classes=num_classes, device=device, channels_last=False)
        uddn_bf16_step, _ = uddn_trainer(cfg, num_classes=num_classes, device=device, amp=True, reference=True)
        uddn_fp32_step, _ = uddn_trainer(cfg, num_classes=num_classes, device=device, amp=False, reference=True)
        clf_step, clf_batch = classifier_trainer(cfg, num_classes=num_classes, device=device)
        clf_nchw_step, _ = classifier_trainer(cfg, num_classes=num_classes, device=device, channels_last=False)
        clf_bf16_step, _ = classifier_trainer(cfg, num_classes=num_classes, device=device, amp=True)
        clf_fp32_step, _ = classifier_trainer(cfg, num_classes=num_classes, device=device, amp=False)
        gnr_round, gnr_images = gnr_trainer(cfg, device=device)
        gnr_nchw_round, _ = gnr_trainer(cfg, device=device, channels_last=False)
        evals, eval_batch = evaluators(cfg, num_classes=num_classes, device=device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else None

        def repeat(fn: Callable[[], Any]) -> Callable[[], None]:
            def run() -> None:
                for _ in range(steps):
                    fn()
            return run

        times = interleave({"uddn_train": repeat(uddn_step), "uddn_train_ref": repeat(uddn_ref_step),
                            "uddn_train_nchw": repeat(uddn_nchw_step),
                            "uddn_train_bf16": repeat(uddn_bf16_step), "uddn_train_fp32": repeat(uddn_fp32_step),
                            "clf_train": repeat(clf_step), "clf_train_nchw": repeat(clf_nchw_step),
                            "clf_train_bf16": repeat(clf_bf16_step), "clf_train_fp32": repeat(clf_fp32_step),
                            "gnr_train": repeat(gnr_round), "gnr_train_nchw": repeat(gnr_nchw_round),
                            "eval_defended": repeat(evals["defended"]), "eval_none": repeat(evals["none"])},
                           rounds=rounds, warmup=warmup, sync=sync)
    finally:
        torch.set_num_threads(threads)
    size = cfg.data.image_size
    section.notes.append(f"{cfg.models.target} target at {size} px, UDDN widths {list(cfg.denoise.widths)} "
                         f"({cfg.denoise.guidance}-guided), GNR widths {list(cfg.gnr.widths)} / critic "
                         f"{list(cfg.gnr.critic_widths)} (n_critic {cfg.gnr.n_critic}); {steps} steps per measurement, "
                         f"{max(1, int(cfg.scale.cpus_per_worker))} torch threads, device {device}")
    section.rows.append(Row.of("eval: UDDN + target / target alone speed",
                               paired_ratios(times["eval_none"], times["eval_defended"]), "x", ratio=True))
    section.rows.append(Row.of(f"UDDN training (batch {uddn_batch})", [steps * uddn_batch / t for t in times["uddn_train"]],
                               "img/s", seconds=times["uddn_train"]))
    section.rows.append(Row.of("UDDN training: eq. 5 reference once per row / once per step speed",
                               paired_ratios(times["uddn_train"], times["uddn_train_ref"]), "x", ratio=True))
    section.rows.append(Row.of("UDDN training: channels-last / NCHW weights speed",
                               paired_ratios(times["uddn_train_nchw"], times["uddn_train"]), "x", ratio=True))
    section.rows.append(Row.of("UDDN training: bf16 autocast / fp32 speed (reference once per row)",
                               paired_ratios(times["uddn_train_fp32"], times["uddn_train_bf16"]), "x", ratio=True))
    section.rows.append(Row.of(f"target training ({cfg.models.target}, batch {clf_batch})",
                               [steps * clf_batch / t for t in times["clf_train"]], "img/s", seconds=times["clf_train"]))
    section.rows.append(Row.of("target training: channels-last / NCHW weights speed",
                               paired_ratios(times["clf_train_nchw"], times["clf_train"]), "x", ratio=True))
    section.rows.append(Row.of("target training: bf16 autocast / fp32 speed",
                               paired_ratios(times["clf_train_fp32"], times["clf_train_bf16"]), "x", ratio=True))
    section.rows.append(Row.of(f"GNR training (batch {cfg.gnr.batch_size}, n_critic {cfg.gnr.n_critic})",
                               [steps * gnr_images / t for t in times["gnr_train"]], "img/s", seconds=times["gnr_train"]))
    section.rows.append(Row.of("GNR training: channels-last / NCHW weights speed",
                               paired_ratios(times["gnr_train_nchw"], times["gnr_train"]), "x", ratio=True))
    section.rows.append(Row.of(f"eval: UDDN + target forward (batch {eval_batch})",
                               [steps * eval_batch / t for t in times["eval_defended"]], "img/s"))
    section.rows.append(Row.of(f"eval: target alone forward (batch {eval_batch})",
                               [steps * eval_batch / t for t in times["eval_none"]], "img/s"))
    for r in section.rows:
        log(f"  {r.name}: {r.summary.median:.4g} {r.unit}")
