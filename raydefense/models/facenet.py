"""FaceNet (facenet-pytorch ``InceptionResnetV1``) as a face-identity classifier: the target model.

Li & Wang (2019), section 5, attack FaceNet (Schroff et al., "FaceNet: A Unified Embedding for
Face Recognition and Clustering", CVPR 2015). We use facenet-pytorch's Inception-ResNet-v1 and
put a linear identity classifier on its 512-d embedding:

    conv trunk -> block8 -> avgpool -> [features, 1792-d]            (layer l = -2)
    -> dropout -> last_linear (1792->512) -> last_bn -> logits (512->num_classes)   (l = -1)

``features`` is the pooled output of the last convolutional block (``block8``), the tensor
that feeds the embedding layers; ``head`` is everything after it. The embedding itself is not
L2-normalised on the classification path (as in facenet-pytorch with ``classify=True``).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from facenet_pytorch import InceptionResnetV1
from facenet_pytorch.models.inception_resnet_v1 import get_torch_home
from torch import Tensor

from raydefense.models.base import Classifier
from raydefense.models.registry import register_model

__all__ = ["FaceNetClassifier", "facenet"]

#: facenet-pytorch's published weights (its own download URLs; cached in $TORCH_HOME/checkpoints).
FACENET_URLS = {
    "vggface2": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
    "casia-webface": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180408-102900-casia-webface.pt",
}

# facenet-pytorch's fixed standardisation (x*255 - 127.5) / 128 == (x - 0.5) / (128/255).
FACENET_MEAN = (0.5, 0.5, 0.5)
FACENET_STD = (128 / 255,) * 3

# Smallest side InceptionResnetV1 accepts (measured: 74 px fails in mixed_7a, 75 px works).
FACENET_MIN_SIZE = 75


class FaceNetClassifier(Classifier):
    """InceptionResnetV1 with a ``Linear(512, num_classes)`` identity head.

    Args:
        num_classes: number of identities.
        dropout_prob: dropout before ``last_linear`` (facenet-pytorch default 0.6).

    Shapes: input ``(B, 3, H, W)`` in ``[0, 1]`` (upsampled to >= 75 px); features
    ``(B, 1792)``; logits ``(B, num_classes)``.
    """

    head_prefixes = ("logits.",)
    pretrained_urls = FACENET_URLS

    def __init__(self, *, num_classes: int, dropout_prob: float = 0.6) -> None:
        # classify=True makes facenet-pytorch create `logits` (512 -> num_classes) itself,
        # so our state-dict keys equal the published files' keys.
        net = InceptionResnetV1(classify=True, num_classes=num_classes, dropout_prob=dropout_prob)
        super().__init__(
            net,
            name="facenet",
            num_classes=num_classes,
            feature_dim=1792,
            min_size=FACENET_MIN_SIZE,
            mean=FACENET_MEAN,
            std=FACENET_STD,
        )

    def pretrained_cache_dir(self) -> str:
        """facenet-pytorch's cache: ``$TORCH_HOME/checkpoints`` (not torch hub's ``hub/checkpoints``)."""
        return os.path.join(get_torch_home(), "checkpoints")

    def trunk(self, x: Tensor) -> Tensor:
        """Normalised ``(B, 3, H, W)`` -> pooled ``block8`` output ``(B, 1792)``."""
        n = self.net
        for layer in (
            n.conv2d_1a, n.conv2d_2a, n.conv2d_2b, n.maxpool_3a, n.conv2d_3b, n.conv2d_4a, n.conv2d_4b,
            n.repeat_1, n.mixed_6a, n.repeat_2, n.mixed_7a, n.repeat_3, n.block8, n.avgpool_1a,
        ):
            x = layer(x)
        return torch.flatten(x, 1)

    def head(self, features: Tensor) -> Tensor:
        """``(B, 1792)`` -> dropout -> last_linear -> last_bn -> logits ``(B, num_classes)``."""
        n = self.net
        return n.logits(n.last_bn(n.last_linear(n.dropout(features))))


@register_model("facenet")
def facenet(*, num_classes: int, pretrained: Any = None, filesystem: Any = None, dropout_prob: float = 0.6) -> FaceNetClassifier:
    """Build the FaceNet target model.

    Args:
        num_classes: number of identities.
        pretrained: ``None`` (random init), ``'vggface2'`` or ``'casia-webface'`` (facenet-pytorch
            weights from ``$TORCH_HOME/checkpoints``; downloaded only if absent, a clear
            ``ModelError`` offline), a local path / ``s3://`` URI / state dict. The published
            heads (8631 / 10575 classes) are replaced when ``num_classes`` differs.
        filesystem: ``pyarrow.fs.FileSystem`` for URIs.
        dropout_prob: dropout before the embedding layer.
    """
    model = FaceNetClassifier(num_classes=num_classes, dropout_prob=dropout_prob)
    model.load_pretrained(pretrained, filesystem=filesystem)
    return model
