"""Measure how hard the embedded synthetic face dataset is, and how fast it renders.

The default difficulty of ``raydefense.data.synthetic`` is tuned so that a FaceNet-sized
model (facenet-pytorch ``InceptionResnetV1``, Schroff et al. 2015, the target model of
Li & Wang 2019), trained from scratch for a few epochs on ~30 images per identity,
reaches high but imperfect clean test accuracy, and FGSM (Goodfellow et al. 2015) at
L-inf 8/255 cuts that accuracy sharply. This script prints the figures that back that
claim (and go into the README):

    python bench/synthetic_difficulty.py                       # FaceNet + tiny CNN, d = 1
    python bench/synthetic_difficulty.py --difficulty 0.5 --models tiny

Runs on CPU with two threads in about 2-3 minutes on an idle 2-core machine. On a shared
one, two OpenMP threads stall whenever another process takes a core (one run took 15 minutes
under a load of 8); ``--threads 1`` is slower per step but steady (~9-10 s per FaceNet epoch).

Measured (2 cores, torch 2.14.1 CPU, difficulty 1.0, defaults otherwise):

    model     seed threads  clean test  FGSM 2/255  4/255  8/255
    FaceNet    0     1        0.887       0.619     0.456  0.256
    FaceNet    1     1        0.875       0.719     0.525  0.275
    FaceNet    2     1        0.869       0.650     0.431  0.237
    FaceNet    0     2        0.881       0.506     0.275  0.119
    tiny CNN   0     2        0.881       0.500     0.300  0.206
    tiny CNN   1     1        0.950       0.600     0.344  0.175
    tiny CNN   2     1        0.863       0.506     0.331  0.163

FaceNet at other difficulties (one thread; clean / FGSM 8/255): 0.8 -> 0.94 / 0.25;
0.93 -> 0.94, 0.94, 0.92 / 0.17, 0.22, 0.28 (seeds 0-2); 1.07 -> 0.84 / 0.09;
1.33 -> 0.77 / 0.14 (2 threads). Those runs predate the rescaling of difficulty 1 and were
made as 0.6, 0.7, 0.8 and 1.0; the images are identical. Rendering: ~1000 img/s at 32x32,
~530 at 80x80, ~210 at 160x160 on one core.

Protocol: 16 identities at 80x80; images 0..29 of each identity train, 30..39
test; inputs normalised as (x - 0.5) / 0.5; Adam, batch 32; FGSM on the cross-entropy of
the true label against the trained model in eval mode.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.data.synthetic import make_synthetic_faces, render_identity_images
from raydefense.seeding import seed_everything


class Normalized(nn.Module):
    """Feed [0, 1] images to ``net`` as (x - 0.5) / 0.5, the range FaceNet expects."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.5) / 0.5)


def tiny_cnn(num_classes: int) -> nn.Module:
    """Four conv blocks (16-32-64-128 channels) and a linear head: about 0.1 M parameters."""
    layers, cin = [], 3
    for cout in (16, 32, 64, 128):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def facenet(num_classes: int) -> nn.Module:
    from facenet_pytorch import InceptionResnetV1

    return InceptionResnetV1(classify=True, num_classes=num_classes)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    hits = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return hits / len(x)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, batch: int = 64) -> torch.Tensor:
    """x + eps * sign(grad_x CE(model(x), y)), clipped to [0, 1] (Goodfellow et al. 2015)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].clone().requires_grad_(True)
        loss = F.cross_entropy(model(xb), y[i:i + batch])
        (grad,) = torch.autograd.grad(loss, xb)
        out.append((xb + eps * grad.sign()).clamp(0.0, 1.0).detach())
    return torch.cat(out)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch: int, seed: int) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return times


def render_speed(image_size: int, seconds: float = 3.0) -> float:
    """Images per second of ``render_identity_images`` in this process (one thread)."""
    render_identity_images(0, range(4), image_size=image_size, seed=0)
    count, start, identity = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        render_identity_images(identity, range(20), image_size=image_size, seed=0)
        count += 20
        identity += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--difficulty", type=float, default=1.0)
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--train-per-identity", type=int, default=30)
    parser.add_argument("--test-per-identity", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=80)
    parser.add_argument("--models", default="facenet,tiny", help="comma list of facenet, tiny")
    parser.add_argument("--epochs", type=int, default=8, help="FaceNet epochs (the tiny CNN gets 3x)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    per_id = args.train_per_identity + args.test_per_identity
    start = time.perf_counter()
    images, labels = make_synthetic_faces(
        num_identities=args.identities, images_per_identity=per_id, image_size=args.image_size,
        seed=args.seed, difficulty=args.difficulty,
    )
    gen_s = time.perf_counter() - start
    is_train = (np.arange(len(labels)) % per_id) < args.train_per_identity
    x_train, y_train = to_tensor(images[is_train]), torch.from_numpy(labels[is_train])
    x_test, y_test = to_tensor(images[~is_train]), torch.from_numpy(labels[~is_train])
    print(f"data: {args.identities} identities, {len(x_train)} train / {len(x_test)} test images, "
          f"{args.image_size}x{args.image_size}, difficulty {args.difficulty}, seed {args.seed}; "
          f"rendered in {gen_s:.2f} s ({len(labels) / gen_s:.0f} img/s inside the run)")
    print(f"render speed, one core: {render_speed(args.image_size):.0f} img/s at {args.image_size}x{args.image_size}")

    builders = {"facenet": (facenet, args.epochs), "tiny": (tiny_cnn, 3 * args.epochs)}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        build, epochs = builders[name]
        seed_everything(args.seed)
        model = Normalized(build(args.identities))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        times = train(model, x_train, y_train, epochs=epochs, lr=args.lr, batch=args.batch, seed=args.seed)
        train_acc = accuracy(model, x_train, y_train)
        clean = accuracy(model, x_test, y_test)
        adv = {eps: accuracy(model, fgsm(model, x_test, y_test, eps / 255), y_test) for eps in (2, 4, 8)}
        print(f"{name:8s} {params:5.2f} M params, {epochs} epochs in {sum(times):.0f} s "
              f"({np.mean(times):.1f} s/epoch): train acc {train_acc:.3f}, clean test acc {clean:.3f}, "
              + ", ".join(f"FGSM {eps}/255 {acc:.3f}" for eps, acc in adv.items()))


if __name__ == "__main__":
    main()
