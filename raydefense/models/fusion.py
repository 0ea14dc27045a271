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

import contextlib
import functools
import threading

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batch_norm", "count_foldable", "inference_form", "FoldedBatchNorms", "conv_bn_units"]


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
    # per-output-channel scale of torch's fuse_conv_bn_weights does not broadcast over. A
    # parametrized convolution (weight_norm, spectral_norm) computes its weight on access, and
    # an exact type check keeps out subclasses whose forward may differ.
    # Forward (pre-)hooks: the legacy weight_norm, spectral_norm and pruning compute the weight
    # in one, and a user's hook would silently not run on a folded pair.
    grouped_transposed = type(conv) is nn.ConvTranspose2d and conv.groups != 1
    hooked = any(m._forward_pre_hooks or m._forward_hooks for m in (conv, bn))
    return (type(conv) in _CONVS and not grouped_transposed and not parametrize.is_parametrized(conv)
            and not hooked and type(bn) is nn.BatchNorm2d and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features)


def _fold(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    return fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))


def _foldable_pairs(model: nn.Module):
    """Yield ``(parent, conv_key, bn_key)`` for each foldable convolution + BatchNorm of ``model``
    (see the module docstring for the patterns), without changing anything."""
    for module in list(model.modules()):
        if type(module) in conv_bn_units() and _fusable(module.conv, module.bn):
            yield module, "conv", "bn"
        elif isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            # (a subclass with its own forward may use a child's output twice)
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
# while it is unchanged, a module tree walked before most likely has the same children (which
# FoldedBatchNorms then checks child by child before each swap).
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


class _ConvWith(nn.Module):
    """``conv`` (a ``Conv2d`` or ``ConvTranspose2d``, read live for its stride, padding, ...)
    computed with other weights: the folded ones of :class:`FoldedBatchNorms`."""

    def __init__(self, conv: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        # Plain attributes, not children or parameters: nothing is registered (no registration
        # hook fires) and the caller's module tree only sees this module while it is swapped in.
        object.__setattr__(self, "conv", conv)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if type(c) is nn.ConvTranspose2d:
            return torch.nn.functional.conv_transpose2d(x, self.weight, self.bias, c.stride, c.padding,
                                                        c.output_padding, c.groups, c.dilation)
        return c._conv_forward(x, self.weight, self.bias)


# One lock for every fold in the process: two models may share modules (a classifier and a
# Sequential holding it), so a lock per model would not keep two threads' swaps apart.
_FOLD_LOCK = threading.RLock()


class FoldedBatchNorms:
    """A model run with each foldable BatchNorm folded into its convolution, for the length of a
    ``with`` block, without copying it (what :class:`~raydefense.attacks.Attack` differentiates).

    ``with folded.applied(model):`` swaps, in ``model`` itself, each convolution + BatchNorm pair
    that :func:`fold_batch_norm` would fold for a convolution computed with the folded weights
    (Ioffe & Szegedy 2015; ``torch.nn.utils.fusion.fuse_conv_bn_weights``) and an
    ``nn.Identity``, and puts the originals back when the block ends, also on an exception. The
    folded weights are computed on entry from the tensors as they are then, so nothing can go
    stale: weights changed by an optimiser, through ``.data``, by ``load_state_dict`` or a new
    ``eps`` all count, and every other module (its attributes, its hooks) is the caller's own.
    For a :class:`~raydefense.models.base.Classifier` the folded weights are channels-last (as
    :func:`inference_form` lays them out; also swapping its BatchNorm-free convolutions for
    channels-last copies measured slower, the copies costing more than they saved).

    The model must be in eval mode inside the block (BatchNorm's eval-mode map is what is
    folded); the block holds one process-wide lock, so two threads' folds take turns (and a
    thread training the model while another attacks it sees the folded model: no gradients for
    the folded layers, as it already saw eval mode). A model with nothing to fold, or wrapped in
    ``DataParallel`` / ``DistributedDataParallel``, runs as it is; a convolution or BatchNorm
    with forward hooks (a user's, or the legacy ``weight_norm`` / ``spectral_norm`` / pruning,
    which compute the weight in one) is left alone.

    Cost per entry: one pass over the folded convolutions' weights into buffers kept between
    calls (a second copy of those weights while this object lives; the per-channel scales in
    torch's multi-tensor ``_foreach`` ops), ~8 ms for FaceNet's 111 pairs on 2 CPU threads,
    and a walk of the module tree only after a module somewhere registered a parameter, buffer
    or child (torch's global registration hooks).
    """

    def __init__(self) -> None:
        self._model: nn.Module | None = None
        self._generation = -1
        self._pairs: list[tuple[nn.Module, str, str, nn.Module, nn.Module]] = []
        self._channels_last = False
        self._folded: list[_ConvWith] = []
        self._swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # (parent, key, original, stand-in)

    def _walk(self, model: nn.Module) -> None:
        from raydefense.models.base import Classifier

        self._model, self._generation = model, _structure_generation
        self._channels_last = isinstance(model, Classifier)
        self._pairs, self._swaps = [], []
        if any(isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)) for m in model.modules()):
            return
        self._pairs = [(parent, a, b, parent._modules[a], parent._modules[b]) for parent, a, b in _foldable_pairs(model)]
        # The stand-ins, kept across walks (with their buffers) for the convolutions seen before;
        # each entry writes their weights into their buffers.
        before = {id(stand_in.conv): stand_in for stand_in in self._folded}
        self._folded = [before.get(id(conv)) or _ConvWith(conv, None, None) for _, _, _, conv, _ in self._pairs]
        self._swaps = ([(parent, a, conv, new) for (parent, a, _, conv, _), new in zip(self._pairs, self._folded)]
                       + [(parent, b, bn, _IDENTITY) for parent, _, b, _, bn in self._pairs])

    def _current(self, model: nn.Module) -> bool:
        """Whether the pairs found before are still ``model``'s, child for child."""
        # A forward hook added since (no registration hook sees it) makes a pair unfoldable too.
        return (model is self._model and _structure_generation == self._generation
                and all(parent._modules.get(key) is old for parent, key, old, _ in self._swaps)
                and not any(m._forward_pre_hooks or m._forward_hooks for _, _, _, *pair in self._pairs for m in pair))

    def _fold_weights(self) -> None:
        """Give each stand-in its folded weights: ``w' = w * s``, ``b' = (b - mean) * s + beta``
        with ``s = gamma / sqrt(var + eps)`` per output channel (torch's ``fuse_conv_bn_weights``
        arithmetic, over all pairs at once)."""
        convs = [conv for *_, conv, _ in self._pairs]
        bns = [bn for *_, bn in self._pairs]
        var = [bn.running_var for bn in bns]
        scale = torch._foreach_rsqrt(torch._foreach_add(var, [float(bn.eps) for bn in bns]))
        gamma = [bn.weight if bn.weight is not None else torch.ones_like(v) for bn, v in zip(bns, var)]
        torch._foreach_mul_(scale, gamma)
        bias = [conv.bias if conv.bias is not None else torch.zeros_like(v) for conv, v in zip(convs, var)]
        beta = [bn.bias if bn.bias is not None else torch.zeros_like(v) for bn, v in zip(bns, var)]
        new_bias = torch._foreach_add(torch._foreach_mul(torch._foreach_sub(bias, [bn.running_mean for bn in bns]),
                                                         scale), beta)
        shaped = [s.reshape(1, -1, 1, 1) if type(conv) is nn.ConvTranspose2d else s.reshape(-1, *([1] * (conv.weight.ndim - 1)))
                  for s, conv in zip(scale, convs)]
        for stand_in, conv, s, b in zip(self._folded, convs, shaped, new_bias):
            # One pass into the stand-in's own buffer: read the weights, write the product in the
            # layout wanted. Fresh 88 MB a call (FaceNet) cost more in page faults than the pass.
            torch.mul(conv.weight, s, out=self._buffer(stand_in, conv.weight))
            object.__setattr__(stand_in, "bias", b)

    def _buffer(self, stand_in: "_ConvWith", like: torch.Tensor) -> torch.Tensor:
        """``stand_in``'s weight tensor, shaped, typed and laid out for ``like``, kept between calls."""
        buf = stand_in.weight
        layout = torch.channels_last if self._channels_last and like.ndim == 4 else torch.contiguous_format
        if (buf is None or buf.shape != like.shape or buf.dtype != like.dtype
                or buf.device != like.device or not buf.is_contiguous(memory_format=layout)):
            buf = torch.empty_like(like, memory_format=layout, requires_grad=False)
            object.__setattr__(stand_in, "weight", buf)
        return buf

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Inside the block ``model`` computes with its BatchNorms folded; see the class docstring."""
        _install_structure_hooks()
        with _FOLD_LOCK:
            if not self._current(model):
                self._walk(model)
            if not self._pairs:
                yield model
                return
            with torch.inference_mode(False), torch.no_grad():
                self._fold_weights()
            done = []
            try:
                for parent, key, old, new in self._swaps:
                    # Straight into _modules: no registration hook fires and the generation stays.
                    parent._modules[key] = new
                    done.append((parent, key, old, new))
                yield model
            finally:
                for parent, key, old, new in reversed(done):
                    if parent._modules.get(key) is new:
                        parent._modules[key] = old


_IDENTITY = nn.Identity()
