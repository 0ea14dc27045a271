"""Model artifacts: ``<run>/models/<name>.pt`` holds the weights, how to rebuild the network,
the resolved config that made it and its final metrics. Loaded with ``weights_only=True``."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from raydefense.pipeline.run import RunLayout
from raydefense.storage import Storage


def build_network(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a network from its spec: classifier, denoiser (uddn | dae) or generator."""
    kind = spec["kind"]
    if kind == "classifier":
        from raydefense.models import create_model

        return create_model(spec["arch"], num_classes=int(spec["num_classes"]), **spec.get("options", {}))
    if kind == "denoiser":
        from raydefense.denoise import DAE, UDDN

        cls = DAE if spec["arch"] == "dae" else UDDN
        return cls(widths=tuple(spec["widths"]))
    if kind == "generator":
        from raydefense.gnr import Generator

        return Generator(
            image_size=int(spec["image_size"]),
            z_dim=int(spec["z_dim"]),
            widths=tuple(spec["widths"]),
            max_noise=float(spec["max_noise"]),
        )
    raise ValueError(f"unknown artifact kind '{kind}'")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def save_artifact(storage: Storage, name: str, model: nn.Module, spec: dict[str, Any], *,
                  config: dict[str, Any], metrics: Optional[dict[str, Any]] = None) -> None:
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    storage.save_torch(RunLayout.model_rel(name), {"spec": spec, "state_dict": state, "config": config, "metrics": metrics or {}})


def load_artifact(storage: Storage, name: str, device: torch.device | str = "cpu", *, frozen: bool = True) -> nn.Module:
    """The network saved as ``models/<name>.pt``, on ``device``, in eval mode.

    ``frozen=True`` (the default; every consumer that only runs the network: attacks, guidance,
    soft targets, evaluation) also freezes its parameters and returns it in inference form
    (:func:`raydefense.models.fusion.inference_form`: each BatchNorm folded into its convolution,
    a classifier's weights channels-last; same outputs to float rounding, our attacks on FaceNet
    1.2-1.3x faster on 2 CPU threads). Such a network must stay in eval mode. ``frozen=False``
    returns the network as saved, to train or to save.

    Raises:
        StorageError: the artifact cannot be read (CorruptFileError: truncated or not a torch file).
        ValueError: the artifact names an unknown network kind.
    """
    blob = storage.load_torch(RunLayout.model_rel(name))
    model = build_network(blob["spec"])
    model.load_state_dict(blob["state_dict"])
    model.to(device).eval()
    if frozen:
        from raydefense.models.fusion import inference_form

        inference_form(model)
    return model

