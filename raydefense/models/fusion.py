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

__all__ = ["fold_batch_norm", "count_foldable", "inference_form", "InferenceFormCache", "conv_bn_units"]


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


def _foldable_pairs(model: nn.Module):
    """Yield ``(parent, conv_key, bn_key)`` for each foldable convolution + BatchNorm of ``model``
    (see the module docstring for the patterns), without changing anything."""
    for module in list(model.modules()):
        if isinstance(module, conv_bn_units()) and _fusable(module.conv, module.bn):
            yield module, "conv", "bn"
        elif isinstance(module, nn.Sequential):
            keys = list(module._modules)
            for a, b in zip(keys, keys[1:]):
                if _fusable(module._modules[a], module._modules[b]):  # False for None children too
                    yield module, a, b


def count_foldable(model: nn.Module) -> int:
    """How many BatchNorm layers :func:`fold_batch_norm` would fold in ``model`` (which it leaves
    unchanged, in whatever mode it is in)."""
    return sum(1 for _ in _foldable_pairs(model))


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
    for parent, a, b in list(_foldable_pairs(model)):
        conv, bn = parent._modules[a], parent._modules[b]
        if isinstance(parent, nn.Sequential):
            parent._modules[a] = _fold(conv, bn)
            parent._modules[b] = nn.Identity()
        else:
            parent.conv = _fold(conv, bn)
            parent.bn = nn.Identity()
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


# Bumped by torch's global registration hooks whenever any module anywhere gains or replaces a
# parameter, buffer or submodule (``setattr``, ``register_*``, ``load_state_dict(assign=True)``):
# while it is unchanged, a module tree walked before still has the same tensors and children.
_structure_generation = 0
_hooks_installed = False


def _bump(*_args: object) -> None:
    global _structure_generation
    _structure_generation += 1


def _install_structure_hooks() -> None:
    global _hooks_installed
    if not _hooks_installed:
        from torch.nn.modules import module as torch_module

        torch_module.register_module_parameter_registration_hook(_bump)
        torch_module.register_module_buffer_registration_hook(_bump)
        torch_module.register_module_module_registration_hook(_bump)
        _hooks_installed = True


class InferenceFormCache:
    """The inference form (:func:`inference_form`) of a model that is not ours to change: a
    folded deep copy, rebuilt when the model's weights change.

    :meth:`get` returns ``model`` itself when it has no BatchNorm to fold (e.g. a model
    :func:`~raydefense.pipeline.artifacts.load_artifact` already put in inference form), or
    when it is wrapped for data-parallel training (``DistributedDataParallel`` and
    ``DataParallel`` are not copied). Otherwise it returns a copy in inference form, made on
    the first call and reused while every parameter and buffer of ``model`` is the same tensor
    with the same storage and the same in-place version (``Tensor._version``, which an
    optimiser step, ``load_state_dict`` or any in-place update bumps) and no module has gained or
    replaced a parameter, buffer or child since (torch's global registration hooks; after one,
    a new walk of the tree, ~2 ms for FaceNet, decides). A check costs one read of each
    tensor's version and pointer (~0.2 ms for FaceNet's 718 tensors); a rebuild one deep copy
    and fold (~0.1 s for FaceNet on 2 CPU threads). The copy holds a second set of weights for
    as long as the cache lives.

    Used by :class:`~raydefense.attacks.Attack`: an attack differentiates the same function
    with less work (one elementwise pass fewer per BatchNorm in every forward and backward).
    """

    def __init__(self) -> None:
        self._model: nn.Module | None = None
        self._generation = -1
        self._modules: list[nn.Module] = []
        self._tensors: list[torch.Tensor] = []
        self._foldable = False
        self._key: tuple | None = None
        self._form: nn.Module | None = None

    def _state(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in self._tensors)

    def get(self, model: nn.Module) -> nn.Module:
        """``model``'s inference form, or ``model`` itself (see the class docstring)."""
        _install_structure_hooks()
        if model is not self._model or _structure_generation != self._generation:
            # Something, somewhere, registered a module or tensor (torchattacks does on every
            # call): walk the tree again. The copy is only remade if the walk finds other modules
            # or tensors (the references held here keep their ids from being reused).
            self._model, self._generation = model, _structure_generation
            self._modules = list(model.modules())
            self._tensors = [*model.parameters(), *model.buffers()]
            parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
            self._foldable = (not any(isinstance(m, parallel) for m in self._modules)
                              and count_foldable(model) > 0)
        if not self._foldable:
            return model
        key = (tuple(map(id, self._modules)), self._state())
        if key != self._key:
            import copy

            self._form = None  # free the stale copy before making the new one
            try:
                # Outside inference mode: a copy made inside it would hold inference tensors,
                # which autograd cannot save for the backward an attack needs.
                with torch.inference_mode(False), torch.no_grad():
                    form = copy.deepcopy(model)
            except Exception:  # a module that cannot be copied (open handles, ...): use it as given
                self._foldable = False
                return model
            for p in form.parameters():
                p.grad = None
            with torch.inference_mode(False):
                self._form = inference_form(form)
            self._key = key
            # Folding replaced children of the copy, which bumped the generation: not a change
            # of ``model``, whose tensors were walked above.
            self._generation = _structure_generation
        return self._form
