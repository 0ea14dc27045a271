"""torchvision classifiers: Inception-v3 (black-box surrogate) and the Table 5 targets.

Li & Wang (2019), section 5: the black-box test set is made with Inception-v3 (Szegedy et al.,
CVPR 2016) as surrogate; Table 5 repeats the evaluation with MobileNet (we use MobileNet-v2,
Sandler et al., CVPR 2018), GoogLeNet (Szegedy et al., CVPR 2015) and VGG16 (Simonyan &
Zisserman, ICLR 2015) as targets.

Each wrapper keeps the torchvision module as ``self.net`` (so torchvision's ImageNet weights
load by key), splits its forward pass into ``trunk`` (to the globally pooled last conv map,
layer -2) and ``head`` (dropout + linear, layer -1), and replaces the classifier for
``num_classes``. ``pretrained='imagenet'`` fetches torchvision's weights URL into torch hub's
cache (``$TORCH_HOME/hub/checkpoints``), reading the cache offline; the ImageNet head is
replaced unless ``num_classes == 1000``.

Normalisation: ImageNet mean/std, except Inception-v3 and GoogLeNet, whose ImageNet weights
(ported from TensorFlow) expect ``(x - 0.5) / 0.5``; torchvision reaches that through
``transform_input=True`` after ImageNet normalisation, we normalise with 0.5/0.5 directly
and keep ``transform_input=False`` (the same numbers, one step).
"""
from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import vgg as tv_vgg

from raydefense.models.base import IMAGENET_MEAN, IMAGENET_STD, Classifier
from raydefense.models.registry import register_model

__all__ = ["InceptionV3Classifier", "MobileNetV2Classifier", "GoogLeNetClassifier", "VGG16Classifier"]

_HALF = (0.5, 0.5, 0.5)


class InceptionV3Classifier(Classifier):
    """torchvision Inception-v3 without the auxiliary classifier.

    Shapes: input ``(B, 3, H, W)`` in ``[0, 1]`` (upsampled to >= 75 px, torchvision's minimum);
    features ``(B, 2048)`` (avgpool of ``Mixed_7c``); logits ``(B, num_classes)``.
    """

    head_prefixes = ("fc.",)
    ignore_prefixes = ("AuxLogits.",)
    pretrained_check_hash = True
    pretrained_urls = {"imagenet": torchvision.models.Inception_V3_Weights.IMAGENET1K_V1.url}

    def __init__(self, *, num_classes: int) -> None:
        net = torchvision.models.inception_v3(
            weights=None, num_classes=num_classes, aux_logits=False, init_weights=True, transform_input=False
        )
        # torchvision's init_weights draws every conv and linear weight from a truncated normal
        # with std 0.1 unless the module carries a ``stddev`` (only the auxiliary head's do). For
        # the 2048 -> C classifier that makes initial logits with a std of several units: on the
        # default preset (12 identities, 80 px) the first epoch's loss was 6.5 against ln 12 = 2.5,
        # and after 8 epochs the validation accuracy was 50% (train loss 2.5). PyTorch's default
        # Linear init (uniform, bound 1/sqrt(2048)) starts at ~ln C: 57-65% after the same 8
        # epochs (train loss 0.95). ImageNet weights, when loaded, replace it anyway.
        net.fc.reset_parameters()
        super().__init__(net, name="inception_v3", num_classes=num_classes, feature_dim=2048, min_size=75, mean=_HALF, std=_HALF)

    def trunk(self, x: Tensor) -> Tensor:
        """Normalised ``(B, 3, H, W)`` -> ``(B, 2048)``."""
        n = self.net
        for layer in (
            n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, n.maxpool2,
            n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
            n.Mixed_7a, n.Mixed_7b, n.Mixed_7c, n.avgpool,
        ):
            x = layer(x)
        return torch.flatten(x, 1)

    def head(self, features: Tensor) -> Tensor:
        """``(B, 2048)`` -> dropout -> fc -> ``(B, num_classes)``."""
        return self.net.fc(self.net.dropout(features))


class MobileNetV2Classifier(Classifier):
    """torchvision MobileNet-v2.

    Shapes: input ``(B, 3, H, W)`` in ``[0, 1]`` (>= 32 px: five stride-2 stages); features
    ``(B, 1280)``; logits ``(B, num_classes)``.
    """

    head_prefixes = ("classifier.",)
    pretrained_check_hash = True
    pretrained_urls = {"imagenet": torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url}

    def __init__(self, *, num_classes: int) -> None:
        net = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
        super().__init__(net, name="mobilenet_v2", num_classes=num_classes, feature_dim=1280, min_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def trunk(self, x: Tensor) -> Tensor:
        """Normalised ``(B, 3, H, W)`` -> ``(B, 1280)``."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.net.features(x), 1), 1)

    def head(self, features: Tensor) -> Tensor:
        """``(B, 1280)`` -> dropout -> linear -> ``(B, num_classes)``."""
        return self.net.classifier(features)


class GoogLeNetClassifier(Classifier):
    """torchvision GoogLeNet (Inception-v1) without auxiliary classifiers.

    Shapes: input ``(B, 3, H, W)`` in ``[0, 1]`` (>= 32 px; 15 px is the measured minimum, we
    keep a margin); features ``(B, 1024)``; logits ``(B, num_classes)``.
    """

    head_prefixes = ("fc.",)
    ignore_prefixes = ("aux1.", "aux2.")
    pretrained_check_hash = True
    pretrained_urls = {"imagenet": torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.url}

    def __init__(self, *, num_classes: int) -> None:
        net = torchvision.models.googlenet(
            weights=None, num_classes=num_classes, aux_logits=False, init_weights=True, transform_input=False
        )
        super().__init__(net, name="googlenet", num_classes=num_classes, feature_dim=1024, min_size=32, mean=_HALF, std=_HALF)

    def trunk(self, x: Tensor) -> Tensor:
        """Normalised ``(B, 3, H, W)`` -> ``(B, 1024)``."""
        n = self.net
        for layer in (
            n.conv1, n.maxpool1, n.conv2, n.conv3, n.maxpool2, n.inception3a, n.inception3b, n.maxpool3,
            n.inception4a, n.inception4b, n.inception4c, n.inception4d, n.inception4e, n.maxpool4,
            n.inception5a, n.inception5b, n.avgpool,
        ):
            x = layer(x)
        return torch.flatten(x, 1)

    def head(self, features: Tensor) -> Tensor:
        """``(B, 1024)`` -> dropout -> fc -> ``(B, num_classes)``."""
        return self.net.fc(self.net.dropout(features))


class _VGGNet(nn.Module):
    """VGG16's 13 conv layers (torchvision layout, so ``features.*`` keys match its weights),
    global average pooling and a ``Dropout -> Linear(512, num_classes)`` classifier."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = tv_vgg.make_layers(tv_vgg.cfgs["D"], batch_norm=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.5), nn.Linear(512, num_classes))
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Normalised ``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VGG16Classifier(Classifier):
    """VGG16 with its 3-layer 4096-wide FC classifier replaced by global avgpool + linear.

    The original head (7x7 avgpool, 25088 -> 4096 -> 4096 -> 1000, 120 M parameters) dominates
    the model's size and memory but not its accuracy on small face crops; with the global pool
    the model has 14.7 M parameters and runs at 64-80 px on a CPU. ImageNet weights load for
    the 13 conv layers; the head is always new.

    Shapes: input ``(B, 3, H, W)`` in ``[0, 1]`` (>= 32 px: five max-pools); features
    ``(B, 512)``; logits ``(B, num_classes)``.
    """

    head_prefixes = ("classifier.",)
    pretrained_check_hash = True
    pretrained_urls = {"imagenet": torchvision.models.VGG16_Weights.IMAGENET1K_V1.url}

    def __init__(self, *, num_classes: int) -> None:
        super().__init__(_VGGNet(num_classes), name="vgg16", num_classes=num_classes, feature_dim=512, min_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def trunk(self, x: Tensor) -> Tensor:
        """Normalised ``(B, 3, H, W)`` -> ``(B, 512)``."""
        return torch.flatten(self.net.avgpool(self.net.features(x)), 1)

    def head(self, features: Tensor) -> Tensor:
        """``(B, 512)`` -> dropout -> linear -> ``(B, num_classes)``."""
        return self.net.classifier(features)


def _build(cls: type[Classifier], num_classes: int, pretrained: Any, filesystem: Any) -> Classifier:
    model = cls(num_classes=num_classes)
    model.load_pretrained(pretrained, filesystem=filesystem)
    return model


_PRETRAINED_DOC = """
    Args:
        num_classes: number of output classes.
        pretrained: ``None`` (random init), ``'imagenet'`` (torchvision's weights from torch hub's
            cache; downloaded only if absent, a clear ``ModelError`` offline), or a local path /
            ``s3://`` URI / state dict (torchvision or raydefense keys).
        filesystem: ``pyarrow.fs.FileSystem`` for URIs.
"""


@register_model("inception_v3")
def inception_v3(*, num_classes: int, pretrained: Any = None, filesystem: Any = None) -> InceptionV3Classifier:
    return _build(InceptionV3Classifier, num_classes, pretrained, filesystem)


@register_model("mobilenet_v2")
def mobilenet_v2(*, num_classes: int, pretrained: Any = None, filesystem: Any = None) -> MobileNetV2Classifier:
    return _build(MobileNetV2Classifier, num_classes, pretrained, filesystem)


@register_model("googlenet")
def googlenet(*, num_classes: int, pretrained: Any = None, filesystem: Any = None) -> GoogLeNetClassifier:
    return _build(GoogLeNetClassifier, num_classes, pretrained, filesystem)


@register_model("vgg16")
def vgg16(*, num_classes: int, pretrained: Any = None, filesystem: Any = None) -> VGG16Classifier:
    return _build(VGG16Classifier, num_classes, pretrained, filesystem)


inception_v3.__doc__ = "Build Inception-v3, the black-box surrogate (Li & Wang 2019, section 5)." + _PRETRAINED_DOC
mobilenet_v2.__doc__ = "Build MobileNet-v2, a Table 5 target (Li & Wang 2019)." + _PRETRAINED_DOC
googlenet.__doc__ = "Build GoogLeNet, a Table 5 target (Li & Wang 2019)." + _PRETRAINED_DOC
vgg16.__doc__ = "Build VGG16 (conv layers + global avgpool + linear), a Table 5 target (Li & Wang 2019)." + _PRETRAINED_DOC
