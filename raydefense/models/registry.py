"""Model registry (timm-style): a name maps to a builder; configs name models, code never branches on them.

Builders are keyword-only functions ``builder(*, num_classes, pretrained=None, **kwargs) -> Classifier``
registered with :func:`register_model`. The built-in ones register when ``raydefense.models`` is
imported.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from raydefense.errors import ModelError

__all__ = ["register_model", "create_model", "list_models"]

_MODELS: dict[str, Callable[..., Any]] = {}

B = TypeVar("B", bound=Callable[..., Any])


def register_model(name: str) -> Callable[[B], B]:
    """Decorator registering ``builder`` under ``name``; a name can be registered once."""

    def decorator(builder: B) -> B:
        if name in _MODELS and _MODELS[name] is not builder:
            raise ValueError(f"model name '{name}' is already registered by {_MODELS[name].__module__}")
        _MODELS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(_MODELS)


def create_model(name: str, *, num_classes: int, pretrained: Any = None, **kwargs: Any):
    """Build the model registered as ``name``.

    Args:
        name: a name from :func:`list_models`.
        num_classes: number of output classes (>= 1).
        pretrained: ``None`` (random init; never downloads), a tag the model publishes
            (e.g. ``'vggface2'``, ``'imagenet'``), a local path, an ``s3://`` URI or a state dict.
        **kwargs: builder-specific options (e.g. ``width`` for ``small_cnn``, ``filesystem``).

    Returns:
        a :class:`~raydefense.models.base.Classifier`.

    Raises:
        ModelError: unknown name (the message lists the known ones), bad ``num_classes``,
            an option the builder does not take, or weights that cannot be loaded.
    """
    if name not in _MODELS:
        raise ModelError(f"unknown model '{name}'; known models: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"model '{name}': num_classes must be a positive int, got {num_classes!r}")
    builder = _MODELS[name]
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown and not takes_any:
        accepted = sorted(k for k in params if k not in ("num_classes", "pretrained"))
        raise ModelError(f"model '{name}' takes no option {unknown[0]!r}; accepted options: {accepted}")
    return builder(num_classes=num_classes, pretrained=pretrained, **kwargs)
