"""Serve an exported defended model over HTTP with Ray Serve.

``python jobs/serve.py --model PATH_OR_S3_URI`` (or ``raydefense serve``) deploys
:class:`DefenseServer` on Ray Serve for the export folder ``PATH_OR_S3_URI``
(``<run>/export/<defense>/`` as written by :mod:`raydefense.export`: ``model.pt`` +
``card.json``) and answers:

``POST /`` with an image file's bytes as the body (PNG or JPEG; BMP and WebP too, which the
training loader also reads), e.g. ``curl --data-binary @face.png http://127.0.0.1:8000/``
    ``200 {"predictions": [{"identity": str, "index": int, "probability": float}, ...],
    "defense": str, "run": str}``: the ``top_k`` identities, most probable first
    (probabilities are the softmax of the exported model's logits).
``GET /``
    ``200``: the model card without its config (classes, input, accuracies, ...).

The image goes through the run's own preprocessing (:mod:`raydefense.data.folder`: EXIF
orientation, conversion to RGB, centre square crop or MTCNN face crop as the run did, resize
to the model's input size), then to the TorchScript model. Requests are batched with Ray
Serve's own ``@serve.batch``. Importing this module needs Ray Serve (the ``serve`` extra:
``pip install 'raydefense[serve]'``). Bad requests get a 4xx and a one-line reason in
``{"error": ...}``; the replica keeps serving:

- empty body: 400; more than ``max_bytes`` bytes: 413;
- not an image, corrupt or truncated file: 400 (``cannot decode image: ...``);
- a format other than PNG / JPEG / BMP / WebP: 415;
- more than ``max_pixels`` pixels (checked from the header, before decoding, so a small
  file that decompresses to a huge bitmap costs nothing): 413;
- grayscale, palette, CMYK, 16-bit, or with transparency: **converted** to RGB exactly as the
  training images were (``raydefense.data.folder``), not rejected: a grayscale photo is a
  valid face, and the model only takes RGB.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import time
from typing import Any, Sequence

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from raydefense.errors import ConfigError, CorruptFileError, StorageError
from raydefense.storage import Storage

__all__ = ["BadImage", "DefenseServer", "build_app", "decode_request", "load_export", "main",
           "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_BYTES", "ACCEPTED_FORMATS"]

#: Largest image accepted, in pixels (width x height): 25 MP, a large phone photo. Far above any
#: face crop's need, far below what would let one request take the replica's memory.
DEFAULT_MAX_PIXELS = 25_000_000
#: Largest request body accepted, in bytes.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
#: PIL format names accepted (the training loader's extensions: raydefense.data.folder).
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
#: The Serve application's name (``serve status`` lists it).
APP_NAME = "raydefense"


class BadImage(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line ``reason``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def load_export(uri: str) -> tuple[Any, dict[str, Any]]:
    """Load ``(TorchScript module in eval mode, card)`` from an export folder (local or ``s3://``).

    Raises:
        StorageError: no ``card.json`` (not a finished export) or no ``model.pt``.
        CorruptFileError: ``model.pt`` does not match the card's SHA-256.
    """
    import torch

    st = Storage.open(uri)
    if not st.exists("card.json"):
        raise StorageError(f"--model '{uri}': no card.json, so not a finished export "
                           f"(write one with jobs/export.py --name RUN; point --model at <run>/export/<defense>)")
    card = st.read_json("card.json", hint="export again")
    entry = card.get("files", {}).get("torchscript")
    if not entry:
        raise StorageError(f"--model '{uri}': the export has no TorchScript file (export with --format torchscript)")
    blob = st.read_bytes(entry["path"])
    if hashlib.sha256(blob).hexdigest() != entry.get("sha256"):
        raise CorruptFileError(f"{st.display(entry['path'])} does not match its card's SHA-256; export again")
    if "torchvision" in card.get("requires", []):
        import torchvision  # noqa: F401  (registers the JPEG codec operators a JPEG export calls)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        model = torch.jit.load(io.BytesIO(blob), map_location="cpu").eval()
    return model, card


def decode_request(body: bytes, *, image_size: int, align: bool = False, aligner=None,
                   max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Request body (image file bytes) -> uint8 ``(image_size, image_size, 3)`` RGB, as the run made its images.

    Raises:
        BadImage: empty, too many bytes, not decodable, unsupported format, too many pixels
            (see the module docstring for the status codes).
    """
    from PIL import Image, UnidentifiedImageError

    # The run's own decoding and crop (one place for it: raydefense.data.folder).
    from raydefense.data.folder import _center_crop_resize, _decode
    from raydefense.errors import DataError

    if not body:
        raise BadImage(400, "empty request body: POST the image file's bytes (e.g. curl --data-binary @face.png)")
    if len(body) > max_bytes:
        raise BadImage(413, f"request body is {len(body)} bytes, above the limit of {max_bytes}")
    try:
        with Image.open(io.BytesIO(body)) as probe:  # reads the header only
            fmt, (w, h) = probe.format, probe.size
    except UnidentifiedImageError as exc:  # its message names a BytesIO object, not the problem
        raise BadImage(400, "cannot decode image: not an image file (send PNG or JPEG bytes)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(400, f"cannot decode image: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if fmt not in ACCEPTED_FORMATS:
        raise BadImage(415, f"unsupported image format {fmt}: send {', '.join(ACCEPTED_FORMATS)}")
    if w * h > max_pixels:
        raise BadImage(413, f"image is {w} x {h} = {w * h} pixels, above the limit of {max_pixels}")
    try:
        img = _decode(body, "in the request")
        if align:
            return aligner(img)[0]
        return _center_crop_resize(img, image_size)
    except DataError as exc:
        raise BadImage(400, str(exc).replace("cannot decode image in the request:", "cannot decode image:")) from exc


def _top(probs: np.ndarray, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"identity": classes[i], "index": int(i), "probability": float(probs[i])} for i in order]


@serve.deployment(name="DefenseServer")
class DefenseServer:
    """Ray Serve replica for one exported defended model (see the module docstring).

    Args:
        model: export folder (local path or ``s3://`` URI) with ``card.json`` and ``model.pt``.
        top_k: identities per answer (at most the number of classes).
        max_pixels, max_bytes: limits on a request's image (413 beyond them).
        max_batch_size, batch_wait_timeout_s: Ray Serve batching (``@serve.batch``).
        threads: torch intra-op threads in the replica.
    """

    def __init__(self, model: str, *, top_k: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, threads: int = 1):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.model, self.card = load_export(model)
        self.classes = list(self.card["classes"])
        self.image_size = int(self.card["input"]["shape"][-1])
        self.align = bool(self.card.get("preprocessing", {}).get("align", False))
        self.aligner = None
        if self.align:
            from raydefense.data import FaceAligner

            self.aligner = FaceAligner(image_size=self.image_size)
        self.top_k = max(1, min(int(top_k), len(self.classes)))
        self.max_pixels, self.max_bytes = int(max_pixels), int(max_bytes)
        self.predict.set_max_batch_size(int(max_batch_size))
        self.predict.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self.summary = {k: v for k, v in self.card.items() if k != "config"}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """One forward pass for the batch Serve gathered: uint8 (S, S, 3) images -> answers."""
        import torch

        from raydefense.pipeline.runtime import images_to_tensor

        x = images_to_tensor(np.stack(images))
        with torch.no_grad():
            probs = torch.softmax(self.model(x), dim=1).numpy()
        return [{"predictions": _top(p, self.classes, self.top_k), "defense": self.card["defense"],
                 "run": self.card["run"], "batch_size": len(images)} for p in probs]

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse(self.summary)
        if request.method != "POST":
            return JSONResponse({"error": f"method {request.method} not allowed: POST an image"}, status_code=405)
        body = await request.body()
        try:
            # Decoding is CPU work: off the event loop, so other requests keep flowing.
            image = await asyncio.to_thread(decode_request, body, image_size=self.image_size, align=self.align,
                                            aligner=self.aligner, max_pixels=self.max_pixels,
                                            max_bytes=self.max_bytes)
        except BadImage as exc:
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        return JSONResponse(await self.predict(image))


def build_app(model: str, *, replicas: int = 1, **options: Any):
    """The Serve application for export folder ``model`` (``options``: see :class:`DefenseServer`)."""
    load_export(model)  # fail here, with one line, rather than inside a replica
    return DefenseServer.options(num_replicas=int(replicas)).bind(model, **options)


def main(argv: Sequence[str]) -> int:
    """``jobs/serve.py`` / ``raydefense serve``: deploy, print the address, serve until Ctrl-C."""
    import argparse

    p = argparse.ArgumentParser(description="Serve an exported defended model over HTTP with Ray Serve: POST an "
                                            "image (PNG/JPEG bytes), get the top identities and probabilities.")
    p.add_argument("--model", required=True, metavar="PATH_OR_S3_URI",
                   help="export folder written by jobs/export.py: <storage>/<run>/export/<defense>")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--top-k", type=int, default=5, help="identities per answer (default 5)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest image in pixels; larger ones get 413 (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--max-batch-size", type=int, default=8, help="Serve batching: images per forward pass (default 8)")
    p.add_argument("--batch-wait-s", type=float, default=0.01,
                   help="Serve batching: seconds to wait for a fuller batch (default 0.01)")
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas (default 1)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's and Serve's own INFO lines and the Ray workers' output on the console")
    args = p.parse_args(list(argv))
    for flag, value in (("--port", args.port), ("--top-k", args.top_k), ("--max-pixels", args.max_pixels),
                        ("--max-batch-size", args.max_batch_size), ("--replicas", args.replicas)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    app = build_app(args.model, replicas=args.replicas, top_k=args.top_k, max_pixels=args.max_pixels,
                    max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_s)
    import ray

    from raydefense.config import DEFAULT_CONFIG
    from raydefense.config import load_config
    from raydefense.pipeline.runtime import connects_to_cluster, init_ray, serve_console

    own_ray = not ray.is_initialized() and not connects_to_cluster()
    init_ray(load_config(DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None,
                         overrides=["scale.worker_logs=true"] if args.verbose else ()))
    serve_console(verbose=args.verbose)
    serve.start(http_options={"host": args.host, "port": args.port})
    t0 = time.perf_counter()
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{args.host}:{args.port}/"
    print(f"serving {args.model} at {url} (ready in {time.perf_counter() - t0:.1f} s); "
          f"try: curl --data-binary @face.png {url}   Ctrl-C stops", flush=True)
    import signal

    def _on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_sigterm)  # `kill PID` stops as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
        _take_down(own_ray)
    return 0


def _take_down(own_ray: bool) -> None:
    """Take the application down. A local Ray this process started ends, Serve and the
    application with it (nothing to delete first: when a supervisor's SIGTERM reached Ray's
    own processes too, a delete would wait a minute for a GCS that is gone). On a cluster, only
    the application is deleted: Serve and the other applications keep running. Not
    ``serve.shutdown()``: it tears down every application on the cluster, and its controller's
    shutdown task is retried as the controller kills itself, which Ray reports on the console
    ("(raylet) Task ServeController.graceful_shutdown failed. There are infinite retries
    remaining").
    """
    import ray

    if own_ray:
        ray.shutdown()
    else:
        serve.delete(APP_NAME)
        print(f"deleted application '{APP_NAME}'; Serve keeps running on the cluster (`serve shutdown` stops it)",
              flush=True)
