"""Image folders in the LFW layout: one sub-folder per identity, image files inside.

This is how Labeled Faces in the Wild (Huang et al. 2007), the data set of Li & Wang
(2019, section 5.1), ships: ``root/<identity>/<identity>_0001.jpg``. The root is a local
path or a URI (``s3://bucket/prefix``, ``file://...``). For S3 pass a configured
``filesystem`` (``pyarrow.fs.S3FileSystem``), or leave it out and the project's one resolver,
:func:`raydefense.storage.resolve`, builds one (endpoint and region from the AWS variables).

Documented behaviour (each one is tested in ``tests/data/test_folder.py``):

- Image files are ``.jpg``, ``.jpeg``, ``.png``, ``.bmp`` and ``.webp``, in any letter
  case. Other files (``.txt``, ``Thumbs.db``, ...) and hidden files or folders (name
  starting with ``.``) are ignored, and so are files directly in the root and anything
  nested deeper than ``root/<identity>/<file>``.
- Classes are the identity folder names sorted by name; labels are 0..C-1 in that order;
  records are sorted by (identity, file name).
- Identities with fewer than ``min_images_per_identity`` images are dropped and listed in
  ``FolderListing.skipped_identities``; that is not an error.
- A root that does not exist, is a file, has no identity folders, or has no image files at
  all: :class:`~raydefense.errors.DataError` naming the root. If every identity is dropped
  by ``min_images_per_identity``: ``DataError`` naming the root.
- An identity folder with no image files: ``DataError`` naming the folder and saying it is
  empty.
- An image path that does not exist: ``DataError`` naming it. A file that cannot be decoded
  (corrupt, truncated, not an image): ``DataError`` naming the file.
- Storage that cannot be reached or read (network, credentials, permissions on a URI):
  :class:`~raydefense.errors.StorageError` naming the URI.
- Grayscale (``1``, ``L``), palette (``P``), CMYK and the like are converted to RGB;
  images with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) are
  composited onto white; 16-bit images (``I;16``, ``I``) are scaled from 0..65535 to
  0..255. The EXIF orientation is applied. The result is always uint8 (H, W, 3) RGB.
- Without alignment an image is centre-cropped to a square and resized to ``image_size``
  (bilinear, antialiased: PIL's filter widens its support when it shrinks). With alignment
  MTCNN (Zhang et al. 2016; facenet-pytorch, weights inside its wheel, works offline)
  finds the largest face and crops it with a margin; an image where no face is found is
  centre-cropped instead, flagged ``face_found=False`` and counted by
  :func:`load_images`, never dropped silently.
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageOps

from raydefense.errors import ConfigError, DataError, StorageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageRecord",
    "FolderListing",
    "list_image_folder",
    "load_image",
    "load_images",
    "FaceAligner",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

# Everything PIL raises for a file it cannot decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageRecord:
    """One image of an identity folder: its full path (or URI), identity name and label."""

    path: str
    identity: str
    label: int


@dataclass
class FolderListing:
    """What :func:`list_image_folder` found.

    Attributes:
        records: images of the kept identities, sorted by (identity, file name).
        classes: kept identity names, sorted; ``classes[label]`` is the identity.
        skipped_identities: identities dropped for having fewer than
            ``min_images_per_identity`` images, sorted.
    """

    records: list[ImageRecord]
    classes: list[str]
    skipped_identities: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- filesystems


def _is_uri(path: str) -> bool:
    return "://" in path


def _resolve(path: str, filesystem=None):
    """``(filesystem, path inside it)`` by :func:`raydefense.storage.resolve`, without a trailing '/'."""
    from raydefense.storage import resolve

    fs, inner = resolve(path, filesystem)
    return fs, inner.rstrip("/") if _is_uri(path) else inner


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _access_error(path: str, err: OSError) -> Exception:
    """Storage trouble on a URI is a StorageError; on a local path, a DataError."""
    cls = StorageError if _is_uri(path) else DataError
    return cls(f"cannot read {path}: {_one_line(err)}")


# ----------------------------------------------------------------------------- listing


def list_image_folder(root: str, *, min_images_per_identity: int = 1, filesystem=None) -> FolderListing:
    """List an image folder in the LFW layout (``root/<identity>/<image>``).

    Args:
        root: local folder or URI (``s3://bucket/prefix``).
        min_images_per_identity: identities with fewer images are dropped and reported in
            ``skipped_identities`` (default 1 keeps all). Li & Wang (2019, section 5.1) use
            40 images per class (10 GNR + 20 denoiser + 5 validation + 5 test).
        filesystem: a ``pyarrow.fs.FileSystem`` to use instead of resolving ``root``.

    Returns:
        A :class:`FolderListing`; record paths keep the root's form (URI or absolute path).

    Raises:
        DataError: see the module docstring (missing root, no identities, empty identity
            folder, nothing left after ``min_images_per_identity``).
        StorageError: the URI cannot be reached or read.
    """
    import pyarrow.fs as pafs

    if isinstance(min_images_per_identity, bool) or not isinstance(min_images_per_identity, (int, np.integer)) \
            or min_images_per_identity < 1:
        raise ConfigError(f"min_images_per_identity must be an integer >= 1, got {min_images_per_identity!r}")
    fs, base = _resolve(root, filesystem)
    prefix = root.split("://", 1)[0] + "://" if _is_uri(root) else ""
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data folder {root} does not exist")
        if info.type != pafs.FileType.Directory:
            raise DataError(f"data folder {root} is a file, not a folder of identity folders")
        entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as err:
        raise _access_error(root, err) from err

    identities: dict[str, list[str]] = {}
    for entry in entries:
        rel = entry.path[len(base):].lstrip("/") if entry.path.startswith(base) else entry.path
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):
            continue  # hidden files and folders
        if entry.type == pafs.FileType.Directory and len(parts) == 1:
            identities.setdefault(parts[0], [])
        elif entry.type == pafs.FileType.File and len(parts) == 2:
            identities.setdefault(parts[0], [])
            if os.path.splitext(parts[1])[1].lower() in IMAGE_EXTENSIONS:
                identities[parts[0]].append(parts[1])

    if not identities:
        raise DataError(f"data folder {root} has no identity sub-folders (expected root/<identity>/<image>)")
    if not any(identities.values()):
        raise DataError(
            f"data folder {root} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in any identity folder"
        )
    for name in sorted(identities):
        if not identities[name]:
            raise DataError(f"identity folder {_join(root, name)} is empty: it holds no image files")

    kept = sorted(n for n, files in identities.items() if len(files) >= min_images_per_identity)
    skipped = sorted(n for n, files in identities.items() if len(files) < min_images_per_identity)
    if not kept:
        raise DataError(
            f"data folder {root}: no identity has at least {min_images_per_identity} images "
            f"(min_images_per_identity); {len(skipped)} identities were all dropped"
        )
    records = [
        ImageRecord(path=_child(prefix, base, name, file), identity=name, label=label)
        for label, name in enumerate(kept)
        for file in sorted(identities[name])
    ]
    return FolderListing(records=records, classes=kept, skipped_identities=skipped)


def _child(prefix: str, base: str, *names: str) -> str:
    """A path under ``base`` in the root's form: ``scheme://base/...`` for URIs, else a local path."""
    if prefix:
        return prefix + "/".join([base.rstrip("/"), *names])
    return os.path.join(base, *names)


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if _is_uri(root) else os.path.join(root, name)


# ----------------------------------------------------------------------------- decoding


def _read_bytes(path: str, filesystem=None) -> bytes:
    import pyarrow.fs as pafs

    if not _is_uri(path) and filesystem is None:
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError as err:
            raise DataError(f"image file {path} does not exist") from err
        except OSError as err:
            raise _access_error(path, err) from err
    fs, inner = _resolve(path, filesystem)
    try:
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except OSError as err:
        try:
            missing = fs.get_file_info(inner).type == pafs.FileType.NotFound
        except OSError:
            missing = False
        if missing:
            raise DataError(f"image file {path} does not exist") from err
        raise _access_error(path, err) from err


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see the module docstring for the rules)."""
    if img.mode.startswith("I"):  # 16-bit (I;16, I;16B, ...) or 32-bit integer: 0..65535 -> 0..255
        arr = np.asarray(img).astype(np.float64)
        grey = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")
    if img.mode == "F":  # floating point: taken as 0..255
        grey = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _decode(data: bytes, path: str) -> Image.Image:
    """Decode image bytes into an RGB PIL image; DataError naming ``path`` when that fails."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except _DECODE_ERRORS as err:
        raise DataError(f"cannot decode image {path}: {_one_line(err)}") from err


def _center_crop_resize(img: Image.Image, image_size: int) -> np.ndarray:
    """Centre square crop, then a bilinear antialiased resize: uint8 (S, S, 3)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != image_size:
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _check_size(image_size) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")


# ----------------------------------------------------------------------------- alignment


class FaceAligner:
    """Crop faces with MTCNN (Zhang et al. 2016) as FaceNet's LFW pipeline does.

    Wraps ``facenet_pytorch.MTCNN(image_size, margin, post_process=False)``, built lazily
    on the first call (its weights ship inside the facenet-pytorch wheel: no download).
    The largest face is kept. An image where no face is found (or one smaller than MTCNN's
    20-pixel minimum face) is centre-cropped and resized instead, with ``face_found`` False.
    Pickles without the built network, so it travels cheaply to Ray workers.

    Args:
        image_size: side of the square output in pixels.
        margin: pixels of context around the detected box, counted in the output image
            (facenet-pytorch scales it back to the input); 14, as facenet-pytorch's
            fine-tuning example uses for 160-pixel crops.
        device: ``"cpu"`` or a CUDA device for the detector.

    Call: ``aligner(img: PIL.Image) -> (uint8 (S, S, 3) RGB, face_found: bool)``.
    """

    def __init__(self, *, image_size: int, margin: int = 14, device: str = "cpu"):
        _check_size(image_size)
        if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
            raise ConfigError(f"margin must be a non-negative integer, got {margin!r}")
        self.image_size = int(image_size)
        self.margin = int(margin)
        self.device = str(device)
        self._mtcnn = None

    @property
    def mtcnn(self):
        """The facenet-pytorch MTCNN detector, built on first use."""
        if self._mtcnn is None:
            from facenet_pytorch import MTCNN

            self._mtcnn = MTCNN(
                image_size=self.image_size, margin=self.margin, post_process=False,
                select_largest=True, keep_all=False, device=self.device,
            )
        return self._mtcnn

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mtcnn"] = None
        return state

    def __call__(self, img: Image.Image) -> tuple[np.ndarray, bool]:
        img = _to_rgb(img)
        if min(img.size) >= self.mtcnn.min_face_size:  # smaller images break MTCNN's image pyramid
            face = self.mtcnn(img)  # float (3, S, S) in 0..255, or None
            if face is not None:
                arr = face.detach().round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
                return np.ascontiguousarray(arr), True
        return _center_crop_resize(img, self.image_size), False

    def __repr__(self) -> str:
        return f"FaceAligner(image_size={self.image_size}, margin={self.margin}, device={self.device!r})"


# ----------------------------------------------------------------------------- loading


def load_image(
    path: str,
    *,
    image_size: int,
    align: bool = False,
    mtcnn: FaceAligner | None = None,
    filesystem=None,
) -> tuple[np.ndarray, bool]:
    """Load one image as uint8 (image_size, image_size, 3) RGB.

    Args:
        path: local path or URI of the image.
        image_size: side of the square output in pixels.
        align: crop the face with MTCNN (else centre crop).
        mtcnn: a :class:`FaceAligner` (or any callable PIL image -> (array, found)) to
            reuse; built for ``image_size`` when ``align`` is set and none is given.
        filesystem: a ``pyarrow.fs.FileSystem`` for URIs.

    Returns:
        ``(image, face_found)``; ``face_found`` is True without alignment (nothing was
        looked for, so nothing is missing).

    Raises:
        DataError: the file does not exist or cannot be decoded (names the path).
    """
    _check_size(image_size)
    img = _decode(_read_bytes(path, filesystem), path)
    if not align:
        return _center_crop_resize(img, image_size), True
    aligner = mtcnn if mtcnn is not None else FaceAligner(image_size=image_size)
    if getattr(aligner, "image_size", image_size) != image_size:
        raise ConfigError(f"aligner image_size {aligner.image_size} differs from image_size {image_size}")
    return aligner(img)


def load_images(
    paths: Iterable[str],
    *,
    image_size: int,
    align: bool = False,
    aligner: FaceAligner | None = None,
    filesystem=None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Load many images; one aligner and one filesystem per bucket serve them all.

    Args:
        paths: local paths or URIs.
        image_size: side of the square outputs.
        align: crop faces with MTCNN; images with no face are centre-cropped and counted.
        aligner: a :class:`FaceAligner` to reuse (built when ``align`` and none given).
        filesystem: a ``pyarrow.fs.FileSystem`` for URIs (else resolved from the first
            URI of each scheme and bucket).

    Returns:
        ``(images, face_found, no_face)``: uint8 (N, S, S, 3), bool (N,), and the number of
        images in which no face was found (0 without alignment).
    """
    _check_size(image_size)
    paths = list(paths)
    if align and aligner is None:
        aligner = FaceAligner(image_size=image_size)
    filesystems: dict[str, object] = {}
    images = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    found = np.ones(len(paths), dtype=bool)
    for n, path in enumerate(paths):
        fs = filesystem
        if fs is None and _is_uri(path):
            scheme, rest = path.split("://", 1)
            key = scheme + "://" + rest.split("/", 1)[0]
            if key not in filesystems:
                filesystems[key] = _resolve(path)[0]
            fs = filesystems[key]
        images[n], found[n] = load_image(path, image_size=image_size, align=align, mtcnn=aligner, filesystem=fs)
    return images, found, int((~found).sum())
