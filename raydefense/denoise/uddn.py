"""UDDN and DAE denoisers of Li & Wang (2019), section 3.2, Figure 3, equation 4.

The UDDN is a U-Net that predicts the adversarial noise dx_hat and subtracts it
(eq. 4: x_hat = x* - dx_hat). The DAE baseline is the same network without the lateral
(encoder -> decoder) connections, reconstructing the whole image instead of the noise.
Building blocks: ``C`` = 3x3 conv + BN + ReLU; ``C2`` = two C with a residual connection;
``C3`` = three C with dense-style connections; ``F`` = upsample the deeper map to the lateral
map's size and concatenate. The layout follows HGD
(Liao et al. 2018, "Defense against Adversarial Attacks Using High-Level Representation
Guided Denoiser"), which the paper builds on.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.errors import ConfigError

__all__ = ["C", "C2", "C3", "DAE", "Fuse", "UDDN", "UPSAMPLE_MODES"]

#: Interpolation modes :class:`Fuse` accepts.
UPSAMPLE_MODES = ("bilinear", "nearest")


class C(nn.Module):
    """The basic unit ``C`` (Li & Wang 2019, Figure 3): 3x3 conv + BN + ReLU.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, ceil(H/stride), ceil(W/stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class C2(nn.Module):
    """``C2`` (Li & Wang 2019, Figure 3): two C, residual connection at the second.

    ``out = c2(c1(x)) + c1(x)``; the first C may be strided.
    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, ceil(H/stride), ceil(W/stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.c1 = C(in_channels, out_channels, stride=stride)
        self.c2 = C(out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.c1(x)
        return self.c2(h1) + h1


class C3(nn.Module):
    """``C3`` (Li & Wang 2019, Figure 3): three C with dense-style connections.

    ``h1 = c1(x)``, ``h2 = c2(h1)``, ``h3 = c3(cat(h1, h2))`` and the output is
    ``h1 + h2 + h3``. The third C sees the concatenation of both earlier outputs (a
    DenseNet-style connection; its 3x3 conv maps 2*out -> out channels, so no extra 1x1
    is needed) and the block sums the three outputs so its width stays ``out_channels``
    (the "connections at the second and third C positions" of the paper). The first C
    carries the stride (2 in the encoder, 1 in the decoder).

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, ceil(H/stride), ceil(W/stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.c1 = C(in_channels, out_channels, stride=stride)
        self.c2 = C(out_channels, out_channels)
        self.c3 = C(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.c1(x)
        h2 = self.c2(h1)
        h3 = self.c3(torch.cat((h1, h2), dim=1))
        return h1 + h2 + h3


class Fuse(nn.Module):
    """The fusion unit ``F`` (Li & Wang 2019, Figure 3; the U-Net skip join).

    Upsamples the feedback (deeper) map to the lateral map's exact spatial size, so odd
    sizes work (e.g. 75 -> 38 -> 19 -> 10 -> 5 and back), then concatenates
    ``(feedback, lateral)`` on channels. With ``lateral=None`` (the DAE) only the upsampled
    feedback is returned and ``size`` must be given.

    Shapes: ``(B, Cf, h, w), (B, Cl, H, W) -> (B, Cf + Cl, H, W)``.
    """

    def __init__(self, *, mode: str = "bilinear") -> None:
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ConfigError(f"upsample mode {mode!r} is unknown; choose one of {', '.join(UPSAMPLE_MODES)}")
        self.mode = mode

    def forward(self, feedback: torch.Tensor, lateral: torch.Tensor | None = None,
                *, size: tuple[int, int] | None = None) -> torch.Tensor:
        if lateral is not None:
            size = (lateral.shape[-2], lateral.shape[-1])
        if size is None:
            raise ValueError("Fuse needs a lateral map or an explicit size")
        kwargs = {"align_corners": False} if self.mode == "bilinear" else {}
        up = F.interpolate(feedback, size=size, mode=self.mode, **kwargs)
        return up if lateral is None else torch.cat((up, lateral), dim=1)


class UDDN(nn.Module):
    """U-Net deep denoising network (Li & Wang 2019, section 3.2, Figure 3, eq. 4).

    Encoder: ``C2`` at full resolution, then four ``C3`` whose first conv has stride 2.
    Decoder, deep to shallow: ``C3, C3, C3, C2`` (stride 1), each after a :class:`Fuse`
    that upsamples the feedback and concatenates the same-scale encoder map (the lateral
    connection; ``lateral=False`` drops it, which is the DAE). The decoder block at scale
    ``i`` outputs ``widths[i]`` channels. A 1x1 conv maps ``widths[0]`` channels to the
    noise estimate ``dx_hat`` and ``forward`` returns ``x - dx_hat`` (eq. 4).

    Args:
        in_channels: image channels.
        widths: encoder widths at scales 1, 1/2, 1/4, 1/8, 1/16. The paper does not state
            them; the default is HGD's (64, 128, 256, 256, 256) (Liao et al. 2018).
        lateral: keep the lateral connections (UDDN) or not (DAE).
        clamp_output: clamp ``x_hat`` to [0, 1]. Off by default so eq. 4 holds exactly
            (``forward(x) == x - predict_noise(x)``) and the guided losses see the raw
            output; turn on at deployment if the classifier needs valid pixels.
        upsample: interpolation of the fusion unit, ``'bilinear'`` or ``'nearest'``.

    The final 1x1 conv is zero-initialized, so an untrained network is the identity
    (x_hat = x): training starts from "no denoising" instead of random noise, which keeps
    the guided loss small and stable at the start.

    Shapes: ``forward(x: (B, in_channels, H, W)) -> (B, in_channels, H, W)``, any H, W >= 1.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 256, 256),
        lateral: bool = True,
        clamp_output: bool = False,
        upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        if len(widths) != 5 or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ConfigError(f"UDDN widths must be 5 positive ints, got {widths!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ConfigError(f"UDDN in_channels must be a positive int, got {in_channels!r}")
        self.in_channels = in_channels
        self.widths = widths
        self.lateral = bool(lateral)
        self.clamp_output = bool(clamp_output)

        # Encoder (contracting path): C2 at full resolution, then four stride-2 C3.
        self.encoder = nn.ModuleList([C2(in_channels, widths[0])])
        for i in range(1, 5):
            self.encoder.append(C3(widths[i - 1], widths[i], stride=2))

        # Decoder (expanding path), listed deep to shallow: scales 3, 2, 1 (C3), then 0 (C2).
        self.fuse = Fuse(mode=upsample)
        self.decoder = nn.ModuleList()
        feedback = widths[4]
        for i in (3, 2, 1, 0):
            in_ch = feedback + (widths[i] if self.lateral else 0)
            block = C3 if i > 0 else C2
            self.decoder.append(block(in_ch, widths[i]))
            feedback = widths[i]

        self.to_noise = nn.Conv2d(widths[0], in_channels, 1)
        nn.init.zeros_(self.to_noise.weight)
        nn.init.zeros_(self.to_noise.bias)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )

    def predict_noise(self, x: torch.Tensor) -> torch.Tensor:
        """The noise estimate dx_hat of eq. 4, ``(B, C, H, W) -> (B, C, H, W)``."""
        return self.to_noise(self._decode(x))

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder block's map, ``(B, C, H, W) -> (B, widths[0], H, W)``."""
        self._check(x)
        skips = []
        h = x
        for block in self.encoder:
            h = block(h)
            skips.append(h)
        h = skips.pop()  # the bottleneck (scale 1/16)
        for block in self.decoder:
            skip = skips.pop()
            if self.lateral:
                h = block(self.fuse(h, skip))
            else:  # DAE: only the skip's size is used, never its values
                h = block(self.fuse(h, size=(skip.shape[-2], skip.shape[-1])))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise: ``x_hat = x - predict_noise(x)`` (eq. 4), clamped only if ``clamp_output``."""
        x_hat = x - self.predict_noise(x)
        return x_hat.clamp(0.0, 1.0) if self.clamp_output else x_hat


class DAE(UDDN):
    """Denoising autoencoder baseline (Li & Wang 2019, section 3.2): the UDDN without lateral
    paths, reconstructing the whole image.

    Same arguments as :class:`UDDN` except ``lateral`` (always False): every decoder block
    sees only the upsampled feedback, so the input reaches the output only through the
    bottleneck (1/16 of the input's side). As the paper describes it ("the learning target of
    UDDN is to obtain noise instead of reconstructing the entire image, which is different from
    DAE"), the DAE has no residual output: its 1x1 head ``to_image`` returns x_hat itself, and
    :meth:`predict_noise` is defined as ``x - x_hat`` so both denoisers share eq. 4's interface.

    Why not keep the residual: a residual DAE starts at the identity (the head is zero-initialised
    like the UDDN's), and under the pixel loss the noise it cannot see through the bottleneck has
    median 0, so it stays there. Measured on the default preset (seed 0, 2026-12-03): head
    weights below 1e-3 after training, L1(x_hat, x) 0.0001 on clean images, and exactly the
    undefended target's accuracies, where the paper's DAE reconstructs (clean L1 0.0153).

    Shapes: ``(B, in_channels, H, W) -> (B, in_channels, H, W)``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 256, 256),
        clamp_output: bool = False,
        upsample: str = "bilinear",
    ) -> None:
        super().__init__(in_channels=in_channels, widths=widths, lateral=False,
                         clamp_output=clamp_output, upsample=upsample)
        # The reconstruction head replaces the noise head (a different name, so a residual
        # DAE's weights from before this change fail to load instead of loading silently).
        del self.to_noise
        self.to_image = nn.Conv2d(self.widths[0], in_channels, 1)
        nn.init.zeros_(self.to_image.weight)
        nn.init.constant_(self.to_image.bias, 0.5)  # start at mid-grey, the middle of [0, 1]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x_hat, unclamped, ``(B, C, H, W) -> (B, C, H, W)``."""
        return self.to_image(self._decode(x))

    def predict_noise(self, x: torch.Tensor) -> torch.Tensor:
        """``x - x_hat``: the noise the reconstruction removes, ``(B, C, H, W) -> (B, C, H, W)``."""
        return x - self.reconstruct(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct: ``x_hat``, clamped to [0, 1] only if ``clamp_output``."""
        x_hat = self.reconstruct(x)
        return x_hat.clamp(0.0, 1.0) if self.clamp_output else x_hat
