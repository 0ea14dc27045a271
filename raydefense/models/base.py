"""The classifier contract, input normalisation and weight loading.

Every model in raydefense is a :class:`Classifier`: it takes images in ``[0, 1]`` of shape
``(B, 3, H, W)``, resizes them when they are smaller than the architecture allows, normalises
them (this module is the one place where normalisation happens), and exposes the two layer
taps that Li & Wang (2019) use to guide the denoiser (section 3, equation 5):

* ``l = -1``: the logits, ``forward(x) -> (B, num_classes)`` ("logits-guided");
* ``l = -2``: the globally pooled output of the last convolutional layer,
  ``features(x) -> (B, feature_dim)`` ("feature-guided"), i.e. the tensor fed to the head,
  so that ``head(features(x)) == forward(x)``.

The wrapped architecture lives in ``self.net`` with its original parameter names, so that
weights published for it (facenet-pytorch, torchvision) load without renaming.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydefense.errors import ModelError, StorageError

__all__ = [
    "Classifier",
    "Normalize",
    "normalize",
    "resize_to_min_size",
    "fetch_cached",
    "read_state_dict",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

logger = logging.getLogger(__name__)

#: ImageNet statistics used by torchvision's classifiers (RGB, inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Seconds to wait on a weight download before giving up with a clear error (offline machines).
DOWNLOAD_TIMEOUT_S = 30.0


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-channel ``(x - mean) / std``.

    Args:
        x: images ``(B, C, H, W)``.
        mean, std: ``(C,)`` or broadcastable ``(1, C, 1, 1)`` tensors.

    Returns:
        ``(B, C, H, W)`` tensor, differentiable in ``x``.
    """
    return (x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)


class Normalize(nn.Module):
    """Module form of :func:`normalize`; mean and std are non-persistent buffers.

    Buffers follow ``.to(device)`` and ``.double()`` but are not part of ``state_dict``
    (they are fixed by the architecture, not learnt), so weight files stay interchangeable
    with the upstream projects'.

    Args:
        mean: per-channel mean, a sequence of length C.
        std: per-channel standard deviation, a sequence of length C, all > 0.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"Normalize needs mean and std of equal length and std > 0, got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        return normalize(x, self.mean, self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def resize_to_min_size(x: Tensor, min_size: int) -> Tensor:
    """Upsample ``x`` so that its shorter side is at least ``min_size``; keep the aspect ratio.

    Bilinear with ``align_corners=False`` (differentiable, so attacks see through it). Inputs
    already large enough are returned unchanged (the same tensor object).

    Args:
        x: images ``(B, C, H, W)``.
        min_size: smallest side the model accepts.

    Returns:
        ``(B, C, H', W')`` with ``min(H', W') >= min_size``.
    """
    h, w = x.shape[-2:]
    if h >= min_size and w >= min_size:
        return x
    scale = min_size / min(h, w)
    size = (max(min_size, round(h * scale)), max(min_size, round(w * scale)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Classifier(nn.Module):
    """Base class of every model: ``[0, 1]`` images in, logits (layer -1) and features (layer -2) out.

    Subclasses wrap an architecture as ``self.net`` and implement :meth:`trunk` (normalised
    images -> pooled features) and :meth:`head` (features -> logits).

    Args:
        net: the wrapped architecture; its ``state_dict`` keys are the upstream ones.
        name: registry name.
        num_classes: number of output classes.
        feature_dim: D, the width of :meth:`features`.
        min_size: smallest H or W the architecture accepts; smaller inputs are upsampled.
        mean, std: per-channel normalisation applied inside (inputs are in ``[0, 1]``).

    Class attributes (set by subclasses):
        head_prefixes: ``self.net`` state-dict key prefixes of the classification head; a
            weight file whose head does not match is loaded without it (the head is re-initialised).
        ignore_prefixes: key prefixes of upstream weight files that this wrapper drops
            (auxiliary classifiers).
        pretrained_urls: tag -> URL of published weights (e.g. ``'imagenet'``).
        pretrained_check_hash: whether those URLs carry a SHA-256 prefix to verify downloads.
    """

    head_prefixes: tuple[str, ...] = ()
    ignore_prefixes: tuple[str, ...] = ()
    pretrained_urls: dict[str, str] = {}
    pretrained_check_hash: bool = False

    def __init__(
        self,
        net: nn.Module,
        *,
        name: str,
        num_classes: int,
        feature_dim: int,
        min_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.net = net
        self.normalize = Normalize(mean, std)
        self.name = name
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.min_size = int(min_size)

    # ----------------------------------------------------------------- subclass hooks
    def trunk(self, x: Tensor) -> Tensor:
        """Normalised images ``(B, 3, H, W)`` -> pooled last-conv features ``(B, feature_dim)``."""
        raise NotImplementedError

    def head(self, features: Tensor) -> Tensor:
        """Features ``(B, feature_dim)`` -> logits ``(B, num_classes)``."""
        raise NotImplementedError

    def pretrained_cache_dir(self) -> str:
        """Folder where published weights are cached (torch hub's ``checkpoints`` by default)."""
        return os.path.join(torch.hub.get_dir(), "checkpoints")

    # ----------------------------------------------------------------- public API
    def preprocess(self, x: Tensor) -> Tensor:
        """``[0, 1]`` images ``(B, 3, H, W)`` -> resized (if needed) and normalised network input."""
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"model '{self.name}' expects images of shape (B, 3, H, W), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"model '{self.name}' expects float images in [0, 1], got dtype {x.dtype} "
                             f"(for uint8 images pass x.float() / 255)")
        # Any float dtype is computed in the model's own (the normalisation buffers follow
        # .double() / .half()); the cast is differentiable, so attacks see through it.
        if x.dtype != self.normalize.mean.dtype:
            x = x.to(self.normalize.mean.dtype)
        return self.normalize(resize_to_min_size(x, self.min_size))

    def features(self, x: Tensor) -> Tensor:
        """Layer ``l = -2`` of the paper: ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, feature_dim)``."""
        return self.trunk(self.preprocess(x))

    def forward(self, x: Tensor) -> Tensor:
        """Layer ``l = -1`` of the paper: ``(B, 3, H, W)`` in ``[0, 1]`` -> logits ``(B, num_classes)``."""
        return self.head(self.features(x))

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One pass giving ``(logits (B, num_classes), features (B, feature_dim))``."""
        feats = self.features(x)
        return self.head(feats), feats

    def tap(self, x: Tensor, *, layer: int = -1) -> Tensor:
        """Activation of layer ``layer`` (Li & Wang eq. 5): ``-1`` logits, ``-2`` features."""
        if layer == -1:
            return self(x)
        if layer == -2:
            return self.features(x)
        raise ValueError(f"model '{self.name}' has taps at layer -1 (logits) and -2 (features), got layer={layer}")

    def reset_head(self) -> None:
        """Re-initialise the parameters under :attr:`head_prefixes` (modules with ``reset_parameters``)."""
        for name, module in self.net.named_modules():
            if name and any((name + ".").startswith(p) for p in self.head_prefixes):
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def load_pretrained(self, pretrained: Any, *, filesystem: Any = None) -> None:
        """Load weights into ``self.net``.

        Args:
            pretrained: a tag of :attr:`pretrained_urls` (read from the local cache, downloaded
                only if absent), a local path, an ``s3://`` URI, or a state dict. Files may hold
                a raw upstream state dict, ``Classifier.state_dict()`` (keys ``net.*``), a
                DDP one (``module.*``), or a checkpoint dict with a ``'model'`` or
                ``'state_dict'`` entry.
            filesystem: optional ``pyarrow.fs.FileSystem`` used for URIs (the scheme is
                stripped); by default resolved from the URI.

        Backbone keys load strictly; a head of another size (or absent) is re-initialised.

        Raises:
            ModelError: unknown tag, missing file, unreadable file, or weights that do not fit.
            StorageError: the storage holding the file cannot be reached.
        """
        if pretrained is None:
            return
        if isinstance(pretrained, Mapping):
            state, source = pretrained, "<state dict>"
        elif isinstance(pretrained, str) and pretrained in self.pretrained_urls:
            path = fetch_cached(
                self.pretrained_urls[pretrained],
                self.pretrained_cache_dir(),
                what=f"pretrained weights '{pretrained}' for model '{self.name}'",
                check_hash=self.pretrained_check_hash,
            )
            state, source = read_state_dict(path), path
        elif isinstance(pretrained, (str, os.PathLike)):
            source = os.fspath(pretrained)
            if "://" not in source and not os.path.exists(source):
                tags = sorted(self.pretrained_urls)
                raise ModelError(f"pretrained={source!r} for model '{self.name}' is neither a known tag {tags} nor an existing file")
            state = read_state_dict(source, filesystem=filesystem)
        else:
            raise ModelError(f"pretrained for model '{self.name}' must be a tag, path, URI or state dict, got {type(pretrained).__name__}")
        self._load_net_state(state, source=source)

    # ----------------------------------------------------------------- internals
    def _load_net_state(self, state: Mapping[str, Any], *, source: str) -> None:
        state = _unwrap_state_dict(state, source=source)
        state = {k: v for k, v in state.items() if not k.startswith(self.ignore_prefixes)} if self.ignore_prefixes else dict(state)
        own = self.net.state_dict()
        # What torch's own load_state_dict(strict=True) accepts: BatchNorm's num_batches_tracked
        # buffer may be absent (checkpoints from before PyTorch 0.4.1 or converted by hand);
        # torch then keeps the module's current count, and so do we.
        for key in _optional_buffers(self.net):
            if key in own and key not in state:
                state[key] = own[key]
        is_head = lambda k: k.startswith(self.head_prefixes) if self.head_prefixes else False  # noqa: E731
        own_backbone = {k for k in own if not is_head(k)}
        file_backbone = {k for k in state if not is_head(k)}
        missing = sorted(own_backbone - file_backbone)
        unexpected = sorted(file_backbone - own_backbone)
        wrong_shape = [
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            for k in sorted(own_backbone & file_backbone)
            if tuple(state[k].shape) != tuple(own[k].shape)
        ]
        if missing or unexpected or wrong_shape:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
            if wrong_shape:
                parts.append(f"{len(wrong_shape)} shape mismatches (e.g. {wrong_shape[:2]}, file vs model)")
            raise ModelError(f"weights {source} do not fit model '{self.name}': " + "; ".join(parts))
        own_head = {k for k in own if is_head(k)}
        file_head = {k for k in state if is_head(k)}
        head_fits = file_head == own_head and all(tuple(state[k].shape) == tuple(own[k].shape) for k in own_head)
        if head_fits:
            self.net.load_state_dict(state, strict=True)
        else:
            self.net.load_state_dict({k: state[k] for k in own_backbone}, strict=False)
            self.reset_head()
            logger.info("model '%s': loaded backbone from %s, classification head re-initialised", self.name, source)


def _optional_buffers(net: nn.Module) -> set[str]:
    """State-dict keys that torch's ``load_state_dict(strict=True)`` does not require: the
    ``num_batches_tracked`` counter of every normalisation layer that tracks running stats."""
    from torch.nn.modules.batchnorm import _NormBase

    return {f"{name}.num_batches_tracked" if name else "num_batches_tracked"
            for name, module in net.named_modules()
            if isinstance(module, _NormBase) and module.track_running_stats}


def _unwrap_state_dict(state: Mapping[str, Any], *, source: str) -> dict[str, Tensor]:
    """Accept a raw, ``net.``-prefixed, DDP (``module.``) or checkpoint-wrapped state dict."""
    if not any(isinstance(v, Tensor) for v in state.values()):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
        else:
            raise ModelError(f"weights {source} hold no tensors (keys: {sorted(state)[:5]})")
    out = dict(state)
    for prefix in ("module.", "net."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    bad = [k for k, v in out.items() if not isinstance(v, Tensor)]
    if bad:
        raise ModelError(f"weights {source} have non-tensor entries (e.g. {bad[:3]})")
    return out


def _open_url(url: str, timeout: float):
    """``urllib.request.urlopen`` with a timeout (indirection so tests can simulate offline)."""
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - URLs come from the code, not users


def fetch_cached(
    url: str, cache_dir: str, *, what: str = "weights", check_hash: bool = False, timeout: float = DOWNLOAD_TIMEOUT_S
) -> str:
    """Return the path of ``url``'s file in ``cache_dir``, downloading it only if absent.

    The file name is the URL's basename, as torch hub and facenet-pytorch use, so a cache they
    filled is found offline. A download writes to a temporary file and renames it, so an
    interrupted one never leaves a file that looks complete.

    Args:
        url: where the file is published.
        cache_dir: local cache folder.
        what: how to name the file in error messages.
        check_hash: verify a fresh download against the SHA-256 prefix in its file name
            (torch hub's ``name-<hash>.ext`` convention).
        timeout: seconds before a stalled download is abandoned.

    Raises:
        ModelError: the file is not cached and cannot be downloaded (one line naming both), or
            a download does not match its hash.
    """
    path = os.path.join(cache_dir, os.path.basename(url))
    if os.path.isfile(path):
        return path
    tmp = f"{path}.part{os.getpid()}"
    try:
        os.makedirs(cache_dir, exist_ok=True)
        digest = hashlib.sha256()
        with _open_url(url, timeout) as response, open(tmp, "wb") as fh:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                fh.write(chunk)
        expected = re.search(r"-([a-f0-9]+)\.", os.path.basename(url)) if check_hash else None
        if expected and not digest.hexdigest().startswith(expected.group(1)):
            raise ValueError(f"SHA-256 {digest.hexdigest()[:12]}... does not start with {expected.group(1)}")
        os.replace(tmp, path)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = getattr(exc, "reason", None) or exc
        raise ModelError(
            f"{what} are not in the local cache ({path}) and cannot be downloaded from {url} ({reason}); "
            "copy the file there or pass a local path"
        ) from exc
    return path


def read_state_dict(source: str | os.PathLike, *, filesystem: Any = None) -> dict[str, Any]:
    """Load a ``torch.save``'d state dict with ``weights_only=True`` onto the CPU.

    Args:
        source: a local path or a URI (``s3://bucket/key.pt``) readable by ``pyarrow.fs``.
        filesystem: a ``pyarrow.fs.FileSystem`` for URIs (path = URI without its scheme);
            resolved from the URI when omitted.

    Raises:
        ModelError: the file does not exist or is not a torch state dict.
        StorageError: the storage cannot be reached (credentials, network).
    """
    source = os.fspath(source)
    try:
        if "://" in source and not source.startswith("file://"):
            from raydefense.storage import resolve

            fs, path = resolve(source, filesystem)
            with fs.open_input_stream(path) as fh:
                data = io.BytesIO(fh.read())
            obj = torch.load(data, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(source.removeprefix("file://"), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"weights file not found: {source}") from exc
    except OSError as exc:
        raise StorageError(f"cannot read weights {source}: {exc}") from exc
    except Exception as exc:  # unpickling errors come in many types; re-raised with the file named
        raise ModelError(f"cannot load weights {source}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(obj, Mapping):
        raise ModelError(f"weights {source} hold a {type(obj).__name__}, not a state dict")
    return dict(obj)
