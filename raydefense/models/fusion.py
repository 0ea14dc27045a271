"""Inference form of a frozen network: each BatchNorm folded into the convolution before it.

A frozen model in eval mode applies BatchNorm as a fixed per-channel affine map,
``y = gamma * (conv(x) - mu) / sqrt(var + eps) + beta``, which equals one convolution with
rescaled weights and a bias (Ioffe & Szegedy 2015; torch's ``fuse_conv_bn_eval`` does the
arithmetic). Folding removes one elementwise pass per layer from every forward and, which
matters more here, from every backward to the input: attacks (FGSM, I-FGSM, PGD, APGD), the
UDDN's guidance loss (equation 5) and the evaluation's whole-model attacks all differentiate
through frozen classifiers. Measured on FaceNet at 80 px, batch 32, 2 CPU threads: one input
gradient 1.14-1.20x faster; outputs equal to ~2e-8 (float rounding).

Why our own walk instead of ``torch.fx.experimental.optimization.fuse``: that function returns
a traced ``GraphModule`` whose submodules keep their original ``forward``; our
:class:`~raydefense.models.base.Classifier` taps ``trunk``/``features``/``head`` through those
submodules (equation 5's layer ``l = -2``), which would then apply the BatchNorm twice. Folding
in place keeps every path through the model consistent.

Only patterns whose data flow is known are folded: adjacent ``Conv2d``/``ConvTranspose2d`` and
``BatchNorm2d`` children of an ``nn.Sequential`` (the convolution's output goes nowhere else),
and the units :func:`conv_bn_units` lists, whose ``forward`` is ``bn(conv(x))`` followed
by an activation.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batch_norm", "inference_form", "conv_bn_units"]


@functools.cache
def conv_bn_units() -> tuple[type, ...]:
    """Module classes whose forward is ``act(bn(conv(x)))`` with attributes ``conv`` and ``bn``
    (imported on first use: the imports are heavy and this module is imported by every
    artifact load)."""
    units: list[type] = []
    from facenet_pytorch.models.inception_resnet_v1 import BasicConv2d as FaceNetBasicConv2d
    units.append(FaceNetBasicConv2d)
    from torchvision.models.googlenet import BasicConv2d as GoogLeNetBasicConv2d
    from torchvision.models.inception import BasicConv2d as InceptionBasicConv2d
    units += [InceptionBasicConv2d, GoogLeNetBasicConv2d]
    from raydefense.denoise.uddn import C as UDDNUnit
    units.append(UDDNUnit)
    return tuple(units)


_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def _fusable(conv: nn.Module, bn: nn.Module) -> bool:
    # A grouped transposed convolution keeps out_channels / groups per weight slice, which the
    # per-output-channel scale of torch's fuse_conv_bn_weights does not broadcast over.
    grouped_transposed = isinstance(conv, nn.ConvTranspose2d) and conv.groups != 1
    return (isinstance(conv, _CONVS) and not grouped_transposed and type(bn) is nn.BatchNorm2d
            and bn.track_running_stats and bn.running_mean is not None and conv.out_channels == bn.num_features)


def _fold(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    return fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))


def fold_batch_norm(model: nn.Module) -> int:
    """Fold every foldable eval-mode BatchNorm2d of ``model`` into its convolution, in place.

    Args:
        model: a network in eval mode (``model.training`` False for it and every submodule);
            its parameters should be frozen: the folded network has no BatchNorm to train.

    Returns:
        the number of BatchNorm layers folded (each replaced by ``nn.Identity``).

    Raises:
        ValueError: ``model`` or one of its submodules is in training mode (BatchNorm then
            normalises with batch statistics, which no fixed convolution reproduces).

    Outputs agree with the unfolded network's to float rounding (~1e-7 relative).
    """
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"fold_batch_norm needs an eval-mode model; in training mode: {training[0]}")
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, conv_bn_units()) and _fusable(module.conv, module.bn):
            module.conv = _fold(module.conv, module.bn)
            module.bn = nn.Identity()
            folded += 1
        elif isinstance(module, nn.Sequential):
            keys = list(module._modules)
            for a, b in zip(keys, keys[1:]):
                conv, bn = module._modules[a], module._modules[b]
                if _fusable(conv, bn):  # False for None children too
                    module._modules[a] = _fold(conv, bn)
                    module._modules[b] = nn.Identity()
                    folded += 1
    return folded


def inference_form(model: nn.Module) -> nn.Module:
    """``model`` made ready to be run, not trained, in place: eval mode, parameters frozen, each
    BatchNorm folded (:func:`fold_batch_norm`), and for a
    :class:`~raydefense.models.base.Classifier` channels-last weights (its convolutions then run
    in NHWC whatever the input's layout; outputs and input gradients keep the caller's layout).

    Measured on FaceNet, batch 32, 2 CPU threads, interleaved (bench section 1): our FGSM /
    I-FGSM4 on the inference form against the model as built 1.22x / 1.20x at 80 px, 1.30x /
    1.28x at 160 px (one input gradient in a probe: folding alone 1.14-1.20x).

    Returns:
        ``model`` itself.
    """
    from raydefense.models.base import Classifier

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fold_batch_norm(model)
    if isinstance(model, Classifier):
        model.to(memory_format=torch.channels_last)
    return model
