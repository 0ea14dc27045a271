"""The attack base class (torchattacks calling convention) and the attack registry.

An attack is called as ``attack(images, labels) -> adv_images``: images ``(B, C, H, W)`` float in
``[0, 1]``, labels ``(B,)`` integer class indices (the true classes, or the target classes when
``targeted=True``). Attacks work in ``[0, 1]`` pixel space; the model normalises its inputs
(see :class:`raydefense.models.Classifier`). The base class owns the dull parts: input checks,
device, eval mode and back, per-image epsilon, the loss and its input gradient, projection,
clamping. A subclass writes only :meth:`Attack.forward`.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydefense.models.fusion import FoldedBatchNorms

__all__ = ["Attack", "register_attack", "create_attack", "list_attacks", "attack_loss"]

EpsLike = float | Sequence[float] | Tensor


def _module_device(module: nn.Module) -> torch.device | None:
    """Device of the first parameter (or buffer) of ``module``; ``None`` if it has neither."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None


def _module_dtype(module: nn.Module) -> torch.dtype | None:
    """Floating dtype of the first floating parameter (or buffer) of ``module``; ``None`` if none."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _check_budget(value: EpsLike, *, what: str, owner: str) -> float | Tensor:
    """Validate an L-inf budget: a number in ``[0, 1]`` (Python, NumPy or a 0-d tensor of any real
    dtype) or a 1-D sequence/tensor of such (one per image). Returns a float or a float64 tensor."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{owner}: {what} must be a float or a 1-D sequence of floats, got {value!r}")
    if not isinstance(value, (int, float)) and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a 0-d tensor or a NumPy scalar is one budget for every image
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{owner}: {what} must be a real number, got {value!r}")
    if isinstance(value, (int, float)):
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{owner}: {what} must be finite and >= 0, got {value}")
        if value > 1:
            raise ValueError(f"{owner}: {what}={value} is above 1; attacks work in [0, 1] pixel space (did you mean {value:g}/255?)")
        return value
    try:
        tensor = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{owner}: {what} must be a float or a 1-D sequence of floats, got {type(value).__name__}") from exc
    if tensor.ndim != 1:
        raise ValueError(f"{owner}: per-image {what} must be 1-D (one value per image), got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all() or (tensor < 0).any() or (tensor > 1).any():
        raise ValueError(f"{owner}: per-image {what} must lie in [0, 1], got min {tensor.min().item():g}, max {tensor.max().item():g}")
    return tensor


def attack_loss(logits: Tensor, labels: Tensor, *, loss: str = "ce", targeted: bool = False) -> Tensor:
    """Per-image objective an attack *maximises*, ``(B, K), (B,) -> (B,)``.

    * ``'ce'``: cross-entropy on the true labels (untargeted), or minus the cross-entropy on the
      target labels (targeted).
    * ``'dlr'``: the Difference of Logits Ratio of Croce & Hein (ICML 2020), scale-invariant:
      untargeted ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, needs K >= 3. Targeted (labels
      are targets, the true class is not known here): ``(z_t - max_{i != t} z_i) /
      (z_pi1 - (z_pi3 + z_pi4) / 2)``, needs K >= 4 (a margin variant of their targeted DLR).
    """
    if labels.dtype != torch.long:
        # cross_entropy and gather take int64 indices only; any integer dtype means the same classes.
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"attack loss: labels must be integer class indices, got dtype {labels.dtype}")
        labels = labels.long()
    k = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"attack loss: labels must be class indices in [0, {k - 1}] for a model with {k} classes, "
                         f"got min {int(labels.min())}, max {int(labels.max())}")
    if loss == "ce":
        ce = F.cross_entropy(logits, labels, reduction="none")
        return -ce if targeted else ce
    if loss == "dlr":
        k = logits.shape[1]
        if k < (4 if targeted else 3):
            raise ValueError(f"dlr loss needs at least {4 if targeted else 3} classes, the model gives {k}")
        ordered = logits.sort(dim=1, descending=True).values
        z_y = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
        if targeted:
            return (z_y - others) / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12)
        return -(z_y - others) / (ordered[:, 0] - ordered[:, 2] + 1e-12)
    raise ValueError(f"unknown attack loss {loss!r}; known: 'ce', 'dlr'")


class Attack:
    """Base of all attacks: ``attack(images, labels) -> adv_images``.

    Args:
        model: any ``nn.Module`` mapping ``[0, 1]`` images ``(B, C, H, W)`` to logits ``(B, K)``
            (a :class:`~raydefense.models.Classifier`, or a defence pipeline around one).
        eps: L-inf budget in ``[0, 1]`` pixel units: a float, or one value per image (a 1-D
            sequence or tensor of length B, broadcast as ``(B, 1, 1, 1)``).
        targeted: if ``True`` the labels are target classes and the attack pulls towards them;
            otherwise it pushes away from the (true) labels.

    Random starts (PGD, APGD) draw from torch's global generator, unless the attack is keyed by
    image with :meth:`with_image_seeds`: then image i's start is a function of its seed only.

    ``__call__`` checks the inputs (4-D float tensor in ``[0, 1]``, labels ``(B,)`` integers),
    moves them to the model's device, puts every submodule of the model in eval mode and
    restores each one's mode afterwards, runs :meth:`forward` with gradients enabled (also
    inside ``torch.no_grad``/``inference_mode``), clamps to ``[0, 1]`` and returns a detached
    tensor on the model's device. It never changes the model's parameters, their ``.grad``, or
    the caller's tensors.

    The attack differentiates the model with its BatchNorms folded (``fold_batch_norm = True``,
    the default): for the length of the call, each BatchNorm right after a convolution is folded
    into it, in the model itself, from the weights as they are at the call, and put back after
    (:class:`~raydefense.models.fusion.FoldedBatchNorms`). In eval mode that is the same
    function to float rounding, with one elementwise pass fewer per layer in every forward and
    backward (FaceNet, batch 32, 2 CPU threads: FGSM 1.15x / 1.33x faster at 80 / 160 px).
    A convolution or BatchNorm with forward hooks is left alone, and two threads' attacks take
    turns; set ``attack.fold_batch_norm = False`` to differentiate the model exactly as given.
    """

    fold_batch_norm: bool = True

    def __init__(self, model: nn.Module, *, eps: EpsLike = 8 / 255, targeted: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.eps = _check_budget(eps, what="eps", owner=type(self).__name__)
        self.targeted = bool(targeted)
        self.image_seeds: Tensor | None = None  # see with_image_seeds
        self._folded = FoldedBatchNorms()

    def with_image_seeds(self, seeds: Sequence[int] | Tensor) -> "Attack":
        """Key this attack's random starts by image: ``seeds`` ``(B,)`` integers in ``[0, 2**63)``, one
        per image of the batch it is called with (e.g. :func:`raydefense.seeding.row_seeds` of a
        stable row id). Image i's start in restart r is then a function of ``(seeds[i], r)`` only:
        the same whichever other images share its batch and at whatever position, so a pipeline
        that batches rows differently from run to run still attacks each image the same way.
        Returns ``self``."""
        t = torch.as_tensor(seeds, dtype=torch.int64).detach().cpu()
        if t.ndim != 1:
            raise ValueError(f"{type(self).__name__}: image seeds must be 1-D (one per image), got shape {tuple(t.shape)}")
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"{type(self).__name__}: image seeds must be >= 0, got min {int(t.min())}")
        self.image_seeds = t
        return self

    # ------------------------------------------------------------------ to implement
    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Return adversarial images ``(B, C, H, W)``; inputs are checked and on the model's device."""
        raise NotImplementedError

    # ------------------------------------------------------------------ calling
    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        """Attack ``images`` ``(B, C, H, W)`` in ``[0, 1]`` with ``labels`` ``(B,)``; returns ``(B, C, H, W)``."""
        self._check_inputs(images, labels)
        device = _module_device(self.model)
        device = images.device if device is None else device
        # The attack computes in the model's dtype (a float32 model given float16 or float64
        # images computes in float32) and returns the caller's dtype; labels of any integer dtype
        # become int64, the only index dtype cross_entropy and gather take.
        work = _module_dtype(self.model) or (images.dtype if images.dtype in (torch.float32, torch.float64)
                                              else torch.float32)
        modes = [(m, m.training) for m in self.model.modules()]
        with torch.inference_mode(False), torch.enable_grad():
            # clone: a fresh autograd-capable tensor even if the caller made it under inference_mode
            x = images.to(device=device, dtype=work).clone()
            y = labels.to(device=device, dtype=torch.long).clone()
            self.model.eval()
            try:
                folded = self._folded.applied(self.model) if self.fold_batch_norm else contextlib.nullcontext()
                with folded:
                    adv = self.forward(x, y)
            finally:
                for module, training in modes:
                    module.training = training
        adv = adv.detach().clamp(0, 1)
        if adv.dtype != images.dtype:
            adv = self._to_caller_dtype(adv, images)
        return adv

    def _to_caller_dtype(self, adv: Tensor, images: Tensor) -> Tensor:
        """``adv`` in ``images``' dtype, still inside the eps-ball and ``[0, 1]``, exactly.

        Rounding to a coarser dtype (float16, bfloat16) can step out of the ball by half a unit
        in the last place; such entries move one representable value towards the clean image.
        """
        out = adv.to(images.dtype)
        ref = images.detach().to(out.device)
        eps = self.budget(self.eps, ref.double())
        for _ in range(2):  # one step suffices; the second only guards a change of binade
            outside = (out.double() - ref.double()).abs() > eps
            if not bool(outside.any()):
                break
            out = torch.where(outside, torch.nextafter(out, ref), out)
        return out.clamp(0, 1)

    def _check_inputs(self, images: Tensor, labels: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(images, Tensor):
            raise ValueError(f"{name}: images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"{name}: images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"{name}: images must be a float tensor in [0, 1], got dtype {images.dtype}")
        if images.numel() and not bool(((images >= 0) & (images <= 1)).all()):
            lo, hi = images.detach().min().item(), images.detach().max().item()
            raise ValueError(f"{name}: images must lie in [0, 1], got min {lo:g}, max {hi:g} (NaN counts as outside)")
        if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"{name}: labels must be a 1-D tensor with one entry per image ({images.shape[0]}), got {shape}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"{name}: labels must be integer class indices, got dtype {labels.dtype}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"{name}: labels must be class indices >= 0, got min {int(labels.min())}")
        for what in ("eps", "alpha", "image_seeds"):
            value = getattr(self, what, None)
            if isinstance(value, Tensor) and value.shape[0] != images.shape[0]:
                raise ValueError(f"{name}: per-image {what} has {value.shape[0]} values for a batch of {images.shape[0]} images")

    # ------------------------------------------------------------------ helpers for subclasses
    def budget(self, value: float | Tensor, images: Tensor) -> Tensor:
        """A validated budget as a ``(B, 1, 1, 1)`` (or scalar) tensor with ``images``' dtype and device."""
        if isinstance(value, Tensor):
            return value.to(device=images.device, dtype=images.dtype).reshape(-1, 1, 1, 1)
        return torch.tensor(value, device=images.device, dtype=images.dtype)

    def gradient(self, images: Tensor, labels: Tensor, *, loss: str = "ce", samples: int = 1) -> Tensor:
        """Gradient of the summed objective (:func:`attack_loss`) w.r.t. ``images``, ``(B, C, H, W)``.

        With ``samples > 1`` the gradient is averaged over that many forward passes
        (Expectation over Transformation, Athalye et al., ICML 2018). Only the input's gradient
        is computed; parameters' ``.grad`` are left alone.
        """
        return self.loss_logits_gradient(images, labels, loss=loss, samples=samples)[2]

    def loss_logits_gradient(self, images: Tensor, labels: Tensor, *, loss: str = "ce",
                             samples: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image objective ``(B,)``, logits ``(B, K)`` and the input gradient of the summed
        objective ``(B, C, H, W)``, each averaged over ``samples`` forward passes (EOT), from the
        same passes; see :meth:`gradient`."""
        x = images.detach().requires_grad_(True)
        grad = torch.zeros_like(x)
        loss_sum = logits_sum = None
        for _ in range(samples):
            logits = self.model(x)
            objective = attack_loss(logits, labels, loss=loss, targeted=self.targeted)
            grad += torch.autograd.grad(objective.sum(), x)[0]
            loss_sum = objective.detach() if loss_sum is None else loss_sum + objective.detach()
            logits_sum = logits.detach() if logits_sum is None else logits_sum + logits.detach()
        return loss_sum / samples, logits_sum / samples, grad / samples

    def uniform_start(self, images: Tensor, eps: Tensor, *, restart: int = 0, rows: Tensor | None = None) -> Tensor:
        """A uniform random point of the eps-ball around ``images``, inside ``[0, 1]``: the random
        start of restart ``restart``. Drawn from torch's global generator, or with image seeds
        (:meth:`with_image_seeds`) from one generator per image seeded by (its seed, ``restart``).
        ``rows``: the positions, in the batch the attack was called with, of ``images``' rows
        when they are a subset of it (APGD's later restarts)."""
        if self.image_seeds is None:
            noise = torch.rand_like(images)
        else:
            seeds = self.image_seeds if rows is None else self.image_seeds[rows.cpu()]
            gen = torch.Generator()
            # splitmix64's increment separates the restarts of one image (a 64-bit seed).
            draws = [torch.rand(images.shape[1:], generator=gen.manual_seed((s + restart * 0x9E3779B97F4A7C15) % 2**64),
                                dtype=images.dtype) for s in seeds.tolist()]
            noise = torch.stack(draws).to(images.device) if draws else torch.empty_like(images)
        return self.project(images + (2 * noise - 1) * eps, images, eps)

    @staticmethod
    def project(adv: Tensor, images: Tensor, eps: Tensor) -> Tensor:
        """Project ``adv`` onto the L-inf ball of radius ``eps`` around ``images``, then onto ``[0, 1]``."""
        return torch.min(torch.max(adv, images - eps), images + eps).clamp(0, 1)

    def __repr__(self) -> str:
        eps = self.eps if isinstance(self.eps, float) else f"<{self.eps.numel()} per-image values>"
        return f"{type(self).__name__}(eps={eps}, targeted={self.targeted})"


# ---------------------------------------------------------------------- registry
_ATTACKS: dict[str, Callable[..., Attack]] = {}


def register_attack(name: str) -> Callable[[Callable[..., Attack]], Callable[..., Attack]]:
    """Decorator registering an attack factory ``factory(model, **kwargs) -> Attack`` under ``name``."""

    def decorator(factory: Callable[..., Attack]) -> Callable[..., Attack]:
        if name in _ATTACKS and _ATTACKS[name] is not factory:
            raise ValueError(f"attack name '{name}' is already registered")
        _ATTACKS[name] = factory
        return factory

    return decorator


def list_attacks() -> list[str]:
    """Sorted names of the registered attacks."""
    return sorted(_ATTACKS)


def create_attack(name: str, model: nn.Module, **kwargs: Any) -> Attack:
    """Build the attack registered as ``name`` against ``model``.

    Names: ``'fgsm'``; ``'ifgsm'`` (steps from kwargs); ``'ifgsm2'``, ``'ifgsm4'``, ``'ifgsm8'``
    (I-FGSM with that many steps, as in Li & Wang 2019, section 5); ``'pgd'``.

    Raises:
        ValueError: unknown name (the message lists the known ones) or a bad argument.
    """
    if name not in _ATTACKS:
        raise ValueError(f"unknown attack '{name}'; known attacks: {', '.join(list_attacks())}")
    return _ATTACKS[name](model, **kwargs)
