"""The CUDA paths: attacks, bf16 training and Ray Data's GPU actor pool on a real GPU.

Skipped where ``torch.cuda.is_available()`` is False (CI, the 2-core development machine); run on
a GPU machine with ``python -m pytest -q tests/gpu`` (README, "GPU checks"). The CPU suite covers
the same code on CPU; these tests hold the GPU side to it.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EPS = 8 / 255


def _faces(n: int, size: int) -> torch.Tensor:
    from raydefense.data import render_identity_images

    per = max(1, n // 4)
    images = np.concatenate([render_identity_images(i, range(per), image_size=size, seed=0) for i in range(4)])[:n]
    return torch.as_tensor(images).permute(0, 3, 1, 2).float().div(255.0)


def _facenet() -> torch.nn.Module:
    from raydefense.models import create_model

    torch.manual_seed(0)
    return create_model("facenet", num_classes=12).eval()


@pytest.mark.parametrize("name", ["fgsm", "ifgsm4"])
def test_deterministic_attacks_on_cuda_match_the_cpu(name):
    """Same model, images and labels: the CUDA attack moves the same pixels the same way. fp32 on
    both sides (TF32 off), so only the order of float sums differs; that can flip the sign of a
    near-zero gradient, and a flip in one step of I-FGSM moves the later steps' gradients too.
    Seen on an H200: FGSM >= 99% of the pixels the same, I-FGSM4 97.7%."""
    from raydefense.attacks import create_attack

    model, x = _facenet(), _faces(16, 80)
    with torch.no_grad():
        y = model(x).argmax(1)
    adv_cpu = create_attack(name, model, eps=EPS)(x, y)
    gpu_model = copy.deepcopy(model).cuda()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            adv_gpu = create_attack(name, gpu_model, eps=EPS)(x.cuda(), y.cuda())
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    assert adv_gpu.is_cuda and adv_gpu.dtype == torch.float32
    adv_gpu = adv_gpu.cpu()
    assert float((adv_gpu - x).abs().max()) <= EPS + 1e-6 and float(adv_gpu.min()) >= 0 and float(adv_gpu.max()) <= 1
    agree = float(((adv_gpu - adv_cpu).abs() <= 1e-5).float().mean())
    assert agree >= {"fgsm": 0.99, "ifgsm4": 0.95}[name], f"{name}: only {agree:.4f} of the pixels agree between CPU and CUDA"


def test_bf16_autocast_runs_the_uddn_in_bf16_and_trains_it():
    """``scale.amp`` on CUDA: the convolutions run in bf16 (autocast is on; the UDDN's output is
    fp32 all the same, x_adv minus the predicted noise), the weights stay fp32, and the guided
    loss falls. Seen on an H200 (2026-12-04): after 40 steps the loss is 0.20 of its start in
    fp32 and 0.54 in bf16 (bf16's rounding also costs progress per step here; it is no faster per
    second either at this size, bench section 6), so the bar is 'falls by a quarter', not 'as far
    as fp32'."""
    from raydefense.config import load_config
    from raydefense.denoise import guided_loss
    from raydefense.pipeline.artifacts import build_network
    from raydefense.pipeline.worker import autocast

    dev = torch.device("cuda")
    target = _facenet().to(dev)
    for p in target.parameters():
        p.requires_grad_(False)
    x = _faces(16, 80).to(dev)
    noise = torch.empty_like(x).uniform_(-EPS, EPS, generator=torch.Generator(device=dev).manual_seed(1))
    x_adv = (x + noise).clamp(0, 1)
    falls = {}
    for amp in (False, True):
        cfg = load_config(overrides=[f"scale.amp={'true' if amp else 'false'}"])
        torch.manual_seed(0)
        uddn = build_network({"kind": "denoiser", "arch": "uddn", "widths": list(cfg.denoise.widths)}).to(dev).train()
        opt = torch.optim.Adam(uddn.parameters(), lr=1e-3)
        conv_dtypes: set = set()
        first_conv = next(m for m in uddn.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda m, i, o: conv_dtypes.add(o.dtype))
        losses = []
        for _ in range(40):
            with autocast(cfg, dev):
                out = uddn(x_adv)
                loss = guided_loss(cfg.denoise.guidance, target, out, x)
            losses.append(float(loss.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        assert conv_dtypes == {torch.bfloat16 if amp else torch.float32}
        assert all(p.dtype == torch.float32 for p in uddn.parameters())
        assert np.isfinite(losses).all()
        falls[amp] = np.mean(losses[-5:]) / np.mean(losses[:5])
    assert falls[False] < 0.75, f"fp32 loss did not fall: {falls}"
    assert falls[True] < 0.75, f"bf16 loss did not fall: {falls}"


class _Where:
    """A Ray Data actor that reports where it runs (pool_map passes ``gpu`` and ``threads``)."""

    def __init__(self, *, gpu: bool, threads: int) -> None:
        from raydefense.pipeline.runtime import device_for

        self.device = device_for(gpu)

    def __call__(self, batch: dict) -> dict:
        x = torch.as_tensor(batch["id"], device=self.device).float()
        import os

        return {"id": batch["id"], "doubled": (2 * x).cpu().numpy(), "device": np.array([str(x.device)] * len(x)),
                "visible": np.array([os.environ.get("CUDA_VISIBLE_DEVICES", "")] * len(x))}


def test_the_actor_pool_runs_on_the_gpu_and_shrinks_to_the_gpus_there_are():
    """The default preset's two CPU actors become one GPU actor on a one-GPU machine (runtime.pool_actors),
    Ray gives it the GPU (CUDA_VISIBLE_DEVICES) and the batches run on CUDA."""
    import ray

    from raydefense.config import load_config
    from raydefense.pipeline.runtime import pool_map, pool_actors

    cfg = load_config(overrides=["scale.attack_actors=64"])
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024 * 1024)
    try:
        assert pool_actors(cfg, gpu=True) == 1
        ds = ray.data.range(40)
        df = pool_map(ds, _Where, {}, cfg=cfg, gpu=True, batch_size=8).to_pandas()
    finally:
        if started:
            ray.shutdown()
    assert sorted(df["id"]) == list(range(40)) and (df["doubled"] == 2 * df["id"]).all()
    assert set(df["device"]) == {"cuda:0"} and all(v != "" for v in df["visible"])
