"""A small, fast CNN for tests and smoke runs (not from the paper).

Three conv-BN-ReLU stages (3x3 kernels, the last two with stride 2), global average pooling and
a dropout + linear head. At the default ``width=32`` it has about 94 k parameters plus
``128 * num_classes + num_classes`` in the head.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from raydefense.models.base import Classifier
from raydefense.models.registry import register_model

__all__ = ["SmallCNN", "SmallCNNClassifier", "small_cnn"]

_HALF = (0.5, 0.5, 0.5)  # inputs normalised to [-1, 1]


def _conv_bn_relu(c_in: int, c_out: int, stride: int, batch_norm: bool = True) -> nn.Sequential:
    if not batch_norm:  # a per-sample network (no cross-sample statistics), e.g. for exact DDP checks
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Conv stages ``3 -> w -> 2w (stride 2) -> 4w (stride 2)``, global avgpool, dropout, linear.

    Args:
        num_classes: output classes.
        width: channels of the first stage (w).
        dropout: dropout before the linear layer.
        batch_norm: False drops the BatchNorm layers (convolutions get biases instead).
    """

    def __init__(self, num_classes: int, *, width: int = 32, dropout: float = 0.1, batch_norm: bool = True) -> None:
        super().__init__()
        bn = batch_norm
        self.features = nn.Sequential(
            _conv_bn_relu(3, width, 1, bn), _conv_bn_relu(width, 2 * width, 2, bn), _conv_bn_relu(2 * width, 4 * width, 2, bn)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Normalised ``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SmallCNNClassifier(Classifier):
    """:class:`SmallCNN` as a :class:`Classifier`.

    Shapes: input ``(B, 3, H, W)`` in ``[0, 1]`` (upsampled to >= 16 px); features
    ``(B, 4 * width)``; logits ``(B, num_classes)``.
    """

    head_prefixes = ("classifier.",)

    def __init__(self, *, num_classes: int, width: int = 32, dropout: float = 0.1, batch_norm: bool = True) -> None:
        super().__init__(
            SmallCNN(num_classes, width=width, dropout=dropout, batch_norm=batch_norm),
            name="small_cnn",
            num_classes=num_classes,
            feature_dim=4 * width,
            min_size=16,
            mean=_HALF,
            std=_HALF,
        )

    def trunk(self, x: Tensor) -> Tensor:
        """Normalised ``(B, 3, H, W)`` -> ``(B, 4 * width)``."""
        return torch.flatten(self.net.pool(self.net.features(x)), 1)

    def head(self, features: Tensor) -> Tensor:
        """``(B, 4 * width)`` -> dropout -> linear -> ``(B, num_classes)``."""
        return self.net.classifier(features)


@register_model("small_cnn")
def small_cnn(
    *, num_classes: int, pretrained: Any = None, filesystem: Any = None, width: int = 32, dropout: float = 0.1,
    batch_norm: bool = True,
) -> SmallCNNClassifier:
    """Build the small test CNN.

    Args:
        num_classes: output classes.
        pretrained: ``None`` or a local path / ``s3://`` URI / state dict (no published weights).
        filesystem: ``pyarrow.fs.FileSystem`` for URIs.
        width: first-stage channels; 32 gives about 94 k parameters, 8 about 6 k.
        dropout: dropout before the linear layer.
        batch_norm: False builds it without BatchNorm (a per-sample network).
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"small_cnn: width must be a positive int, got {width!r}")
    model = SmallCNNClassifier(num_classes=num_classes, width=width, dropout=dropout, batch_norm=batch_norm)
    model.load_pretrained(pretrained, filesystem=filesystem)
    return model
