"""GNR networks: the WGAN-GP generator and critic of Li & Wang (2019), section 2, Figure 1.

The generator maps a latent code z ~ N(0, I) to an adversarial-noise image bounded by
``max_noise``; the critic F(.) scores a noise image with an unbounded real number (a
Wasserstein critic, so no sigmoid). Losses and the gradient penalty live in
:mod:`raydefense.gnr.losses`; nothing here knows about training.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from raydefense.errors import ConfigError

__all__ = ["CRITIC_NORMS", "ConvUnit", "Critic", "DeconvUnit", "Generator"]

#: Normalization layers the critic accepts (see :class:`Critic`).
CRITIC_NORMS = ("batch", "layer", "instance", "none")


def _pair(image_size: int | Sequence[int], name: str = "image_size") -> tuple[int, int]:
    """Return ``image_size`` as ``(H, W)``; an int means a square image."""
    if isinstance(image_size, bool):
        raise ConfigError(f"{name} must be an int or (H, W), got {image_size!r}")
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(image_size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in size):
            raise ConfigError(f"{name} must be an int or (H, W) of ints, got {image_size!r}")
    if min(size) < 1:
        raise ConfigError(f"{name} must be positive, got {image_size!r}")
    return size  # type: ignore[return-value]


def _check_positive_ints(values: Sequence[int], name: str, length: int) -> tuple[int, ...]:
    values = tuple(values)
    if len(values) != length or not all(isinstance(v, int) and v > 0 for v in values):
        raise ConfigError(f"{name} must be {length} positive ints, got {values!r}")
    return values


def _check_odd_kernel(kernel_size: int) -> None:
    # An odd kernel with padding k // 2 keeps "same" sizes and exact x2 up/down-sampling.
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"kernel_size must be a positive odd int, got {kernel_size!r}")


class DeconvUnit(nn.Module):
    """One generator stage of Li & Wang (2019), Figure 1: upsample x2, then three convolutions.

    ``up``: transposed conv (``kernel_size``, stride 2) + BN + ReLU, doubling H and W exactly.
    ``body``: three (conv ``kernel_size`` + BN + ReLU) layers. The paper's "connection"
    (shortcut against gradient dispersion and degradation) is one residual connection
    around the three convolutions: ``out = up(x) + body(up(x))``.

    Shapes: ``(B, in_channels, h, w) -> (B, out_channels, 2h, 2w)``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 5) -> None:
        super().__init__()
        _check_odd_kernel(kernel_size)
        pad = kernel_size // 2
        # output = (h - 1) * 2 - 2 * pad + k + output_padding = 2h when output_padding = 1.
        self.up = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride=2, padding=pad,
                               output_padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        for _ in range(3):
            layers += [
                nn.Conv2d(out_channels, out_channels, kernel_size, padding=pad, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(x)
        return y + self.body(y)


class Generator(nn.Module):
    """GNR noise generator (Li & Wang 2019, section 2.2, Figure 1).

    z ~ N(0, I) of shape ``(B, z_dim)`` -> linear projection to a ``widths[0]`` x
    ceil(H/8) x ceil(W/8) map (+ BN + ReLU) -> three :class:`DeconvUnit` with
    ``widths`` filters (256, 128, 64 in the paper, 5x5) -> a final conv to ``channels``
    -> ``max_noise * tanh``. Sizes that are not multiples of 8 are generated at the next
    multiple of 8 and centre-cropped (cropping keeps the noise's pixel statistics, where
    resizing would blur them).

    Args:
        image_size: output size, an int (square) or ``(H, W)``.
        channels: output channels (3 for RGB noise).
        z_dim: latent size (not stated in the paper; 128 is the WGAN-GP reference value).
        widths: filters of the three DeconvUnits (paper: 256, 128, 64).
        kernel_size: conv / deconv kernel (paper: 5x5).
        max_noise: the output lies in ``[-max_noise, max_noise]``; set it to the largest
            perturbation in the real-noise data (default 16/255, the upper end of the
            attacks' epsilon range).

    Shapes: ``forward(z: (B, z_dim)) -> (B, channels, H, W)``.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        channels: int = 3,
        z_dim: int = 128,
        widths: Sequence[int] = (256, 128, 64),
        kernel_size: int = 5,
        max_noise: float = 16 / 255,
    ) -> None:
        super().__init__()
        self.image_size = _pair(image_size)
        self.channels = _check_positive_ints((channels,), "channels", 1)[0]
        self.z_dim = _check_positive_ints((z_dim,), "z_dim", 1)[0]
        self.widths = _check_positive_ints(widths, "widths", 3)
        _check_odd_kernel(kernel_size)
        if not (isinstance(max_noise, (int, float)) and math.isfinite(max_noise) and max_noise > 0):
            raise ConfigError(f"max_noise must be a positive finite number, got {max_noise!r}")
        self.max_noise = float(max_noise)

        h, w = self.image_size
        self._base = (math.ceil(h / 8), math.ceil(w / 8))
        self.project = nn.Linear(self.z_dim, self.widths[0] * self._base[0] * self._base[1])
        self.project_norm = nn.Sequential(nn.BatchNorm2d(self.widths[0]), nn.ReLU(inplace=True))
        ins = (self.widths[0],) + self.widths[:-1]
        self.units = nn.Sequential(
            *(DeconvUnit(i, o, kernel_size=kernel_size) for i, o in zip(ins, self.widths))
        )
        self.to_noise = nn.Conv2d(self.widths[-1], self.channels, kernel_size, padding=kernel_size // 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"Generator expects z of shape (B, {self.z_dim}), got {tuple(z.shape)}")
        b = z.shape[0]
        x = self.project(z).view(b, self.widths[0], *self._base)
        x = self.units(self.project_norm(x))
        x = self.max_noise * torch.tanh(self.to_noise(x))
        h, w = self.image_size
        top = (x.shape[-2] - h) // 2
        left = (x.shape[-1] - w) // 2
        return x[..., top:top + h, left:left + w]

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw ``n`` noise images ``(n, channels, H, W)`` from z ~ N(0, I).

        ``generator`` seeds z (it may live on another device than the model: z is drawn on
        the generator's device and moved). ``device`` defaults to the model's device. The
        result keeps its autograd graph; wrap the call in ``torch.no_grad()`` for inference.
        """
        param = next(self.parameters())
        device = torch.device(device) if device is not None else param.device
        draw_device = generator.device if generator is not None else device
        z = torch.randn(n, self.z_dim, generator=generator, device=draw_device, dtype=param.dtype)
        return self(z.to(device))


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)  # normalizes each sample over (C, H, W)
    if norm == "instance":
        return nn.GroupNorm(channels, channels)  # per sample and channel, with affine
    return nn.Identity()


class ConvUnit(nn.Module):
    """One critic stage (Li & Wang 2019, Figure 1): conv (stride 2) + norm + LeakyReLU.

    Shapes: ``(B, in_channels, h, w) -> (B, out_channels, ceil(h/2), ceil(w/2))``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 5,
                 norm: str = "layer", negative_slope: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=2,
                              padding=kernel_size // 2, bias=norm == "none")
        self.norm = _norm_layer(norm, out_channels)
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Critic(nn.Module):
    """GNR critic F(.) (Li & Wang 2019, section 2.2, Figure 1; the WGAN-GP discriminator).

    A first conv to ``widths[0]`` (stride 1, LeakyReLU, no norm, as in DCGAN-style
    critics), then three :class:`ConvUnit` (stride 2) to ``widths[1:]`` (paper: 64, 128,
    256, 512), then a linear layer to one unbounded score per sample (no sigmoid: it
    estimates the Wasserstein distance of eq. 1, not a probability).

    Args:
        image_size: input size, an int or ``(H, W)``.
        channels: input channels.
        widths: filters of the first conv and the three ConvUnits.
        kernel_size: conv kernel (the paper does not say; 5 like the generator).
        norm: normalization inside the ConvUnits, one of ``CRITIC_NORMS``.
            The paper uses ``'batch'``. Batch norm makes each sample's score depend on the
            rest of the batch, so the per-sample gradient penalty of eq. 3 no longer
            penalizes the function it is meant to (Gulrajani et al. 2017, "Improved
            Training of Wasserstein GANs", section 4, recommend layer norm). The default
            is therefore ``'layer'`` (GroupNorm(1, C), per-sample layer norm);
            ``'batch'`` keeps the paper's layout; ``'instance'`` and ``'none'`` are also
            valid per-sample choices.
        negative_slope: LeakyReLU slope (0.2, DCGAN / WGAN-GP convention).

    Shapes: ``forward(x: (B, channels, H, W)) -> (B,)``.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        kernel_size: int = 5,
        norm: str = "layer",
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if norm not in CRITIC_NORMS:
            raise ConfigError(f"Critic norm {norm!r} is unknown; choose one of {', '.join(CRITIC_NORMS)}")
        self.image_size = _pair(image_size)
        self.channels = _check_positive_ints((channels,), "channels", 1)[0]
        self.widths = _check_positive_ints(widths, "widths", 4)
        _check_odd_kernel(kernel_size)
        self.norm = norm

        self.stem = nn.Sequential(
            nn.Conv2d(self.channels, self.widths[0], kernel_size, padding=kernel_size // 2),
            nn.LeakyReLU(negative_slope),
        )
        self.units = nn.Sequential(
            *(ConvUnit(i, o, kernel_size=kernel_size, norm=norm, negative_slope=negative_slope)
              for i, o in zip(self.widths[:-1], self.widths[1:]))
        )
        h, w = self.image_size
        for _ in range(3):  # each stride-2 conv with "same" padding maps s -> ceil(s / 2)
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        self.score = nn.Linear(self.widths[-1] * h * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"Critic expects (B, {self.channels}, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        h = self.units(self.stem(x))
        return self.score(h.flatten(1)).squeeze(1)
