"""Models: the :class:`Classifier` contract, its registry, and the built-in architectures.

Importing this package registers ``facenet`` (the target, Li & Wang 2019), ``inception_v3``
(black-box surrogate), ``mobilenet_v2``, ``googlenet``, ``vgg16`` (Table 5 targets) and
``small_cnn`` (tests and smoke runs). Build one with
``create_model(name, num_classes=..., pretrained=None)``.
"""
from raydefense.models.base import Classifier, Normalize, normalize, read_state_dict, resize_to_min_size
from raydefense.models.registry import create_model, list_models, register_model

# Registering the built-in models (import side effect limited to filling the registry).
from raydefense.models import facenet as _facenet  # noqa: E402,F401  isort: skip
from raydefense.models import small as _small  # noqa: E402,F401  isort: skip
from raydefense.models import zoo as _zoo  # noqa: E402,F401  isort: skip

__all__ = [
    "Classifier",
    "Normalize",
    "normalize",
    "resize_to_min_size",
    "read_state_dict",
    "create_model",
    "list_models",
    "register_model",
]
