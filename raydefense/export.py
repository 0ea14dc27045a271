"""Export a finished run's defended model for use outside raydefense: TorchScript, ONNX, a model card.

``export_defense(storage, run, defense=...)`` writes ``<run>/export/<defense>/``::

    model.pt     TorchScript (torch.jit.load; no raydefense needed to run it)
    model.onnx   ONNX, where the graph exports (not for JPEG: see below)
    card.json    the model card, written LAST: its presence is the proof of a finished export

The exported function is exactly the one the report evaluated. It is assembled by
:func:`raydefense.pipeline.defended.build_defended_models`, the same assembly the
whole-model attacks use (``DefendedModel(classifier, Sequential(denoiser, clamp to [0, 1]))``,
which on every input equals the tables' :class:`~raydefense.pipeline.evaluate.DefenseBank`),
traced with ``torch.jit.trace`` at the run's image size (the batch dimension stays free), and
checked against that model on the run's test images before anything is written: the largest
logit difference goes into the card, and an export further off than ``TOLERANCE`` is refused.

JPEG: the tables evaluate the **real** codec (Pillow/libjpeg at ``baselines.jpeg_quality``),
not kornia's differentiable approximation, which is a different function (it exists so attacks
can take gradients). Pillow cannot be traced, so the export runs the same libjpeg round trip
through torchvision's TorchScript operators (``torchvision.io.encode_jpeg``/``decode_jpeg``,
same rounding to uint8, same 4:2:0 subsampling). Both link libjpeg-turbo; the export-time
check measures the agreement on the run's test images (bit-identical on this project's
machines) and refuses the export if it is off. Loading a JPEG export needs ``import
torchvision`` before ``torch.jit.load`` (it registers the codec operators); the card says so.
ONNX has no JPEG codec operator, so a JPEG export has no ONNX file (the card says why).

Card fields: input shape, dtype, range and layout; output; ``classes`` (identity names from
``<run>/data/meta.json``, index = logit index); ``preprocessing`` (how the run made its
images, which a caller must repeat); ``config_sha256`` (see :func:`config_hash`) and the
config itself; ``accuracy`` (this defense's row of ``report/metrics.json``: clean, white-box,
black-box and, where run, the whole-model attacks) with the image counts; ``verification``;
file sizes and SHA-256 digests.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from raydefense.errors import ConfigError, CorruptFileError, ModelError, StorageError
from raydefense.pipeline.run import RunLayout, saved_config
from raydefense.storage import Storage
from raydefense.seeding import torch_generator

__all__ = ["EXPORT_FORMATS", "TOLERANCE", "TorchvisionJPEG", "config_hash", "export_defense", "export_dir", "main"]

#: Formats ``export_defense`` writes.
EXPORT_FORMATS = ("torchscript", "onnx")
#: Largest logit difference an export may show against the evaluated model on the check images.
TOLERANCE = 1e-4
#: Images the export-time check runs (the run's first test images; seeded noise if the run's data is gone).
CHECK_IMAGES = 6
CARD_VERSION = 1


def export_dir(defense: str) -> str:
    """Run-relative folder of one defense's export (:meth:`RunLayout.export_rel`)."""
    return RunLayout.export_rel(defense)


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of the settings that determine a run's trained models.

    The canonical JSON (sorted keys) of the config without the keys a run may change when it
    resumes (``scale.*``, ``storage.*``, ``name``, ``eval.*``, ``tune.*``; see
    :mod:`raydefense.pipeline.run`): two runs with equal hashes trained the same way.
    """
    from raydefense.config import flatten
    from raydefense.pipeline.run import _RESUMABLE_PREFIXES

    kept = {k: v for k, v in flatten(config).items() if not k.startswith(_RESUMABLE_PREFIXES)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


class TorchvisionJPEG(nn.Module):
    """The real JPEG round trip as TorchScript: the exportable twin of ``JPEG(mode='real')``.

    Per image: round ``x * 255`` to uint8, libjpeg encode at ``quality`` (4:2:0), decode to RGB,
    divide by 255; as :func:`raydefense.defenses.jpeg.jpeg_compress` does with Pillow.
    Shapes: ``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, H, W)`` in [0, 1]. Not differentiable.
    """

    def __init__(self, quality: int) -> None:
        super().__init__()
        from torchvision.io import ImageReadMode

        self.quality = int(quality)
        self.rgb = int(ImageReadMode.RGB.value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
        out: list[torch.Tensor] = []
        for i in range(pixels.shape[0]):
            data = torch.ops.image.encode_jpeg(pixels[i].contiguous(), self.quality)
            out.append(torch.ops.image.decode_jpeg(data, self.rgb, False))
        return torch.stack(out).to(device=x.device, dtype=x.dtype) / 255


def _open_run(storage: Storage | str, run: str) -> Storage:
    root = Storage.open(storage) if isinstance(storage, str) else storage
    return root.child(run)


def _read_json(run: Storage, rel: str, what: str) -> Any:
    if not run.exists(rel):
        raise StorageError(f"run '{run.display()}': no {rel} ({what})")
    # read_json raises CorruptFileError naming the file (and keeping the parser's error as cause).
    return run.read_json(rel, hint="re-run the stage that writes it")


def _check_images(run: Storage, image_size: int, n: int) -> tuple[torch.Tensor, str]:
    """Up to ``n`` clean test images of the run ``(n, 3, S, S)`` in [0, 1], or seeded noise."""
    layout = RunLayout(run)
    if run.exists(layout.CLEAN):
        import pyarrow.compute as pc

        table = layout.table(layout.CLEAN, columns=["image"], filter=pc.field("split") == "test").slice(0, n)
        if table.num_rows:
            images = np.stack([np.asarray(v, dtype=np.uint8).reshape(image_size, image_size, 3)
                               for v in table.column("image").to_pylist()])
            from raydefense.pipeline.runtime import images_to_tensor

            return images_to_tensor(images), f"{len(images)} clean test images of the run"
    gen = torch_generator(0)
    return torch.rand(n, 3, image_size, image_size, generator=gen), f"{n} seeded uniform-noise images (no data/clean in the run)"


def _exportable(model: nn.Module, jpeg_quality: int) -> nn.Module:
    """The evaluated model with a BPDA/real JPEG swapped for its TorchScript twin (same function)."""
    from raydefense.defenses import JPEG, DefendedModel

    if isinstance(model.preprocess, JPEG):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
            codec = torch.jit.script(TorchvisionJPEG(jpeg_quality))
        return DefendedModel(model.classifier, codec).eval()
    return model


def _trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    # torch.jit.trace warns that it is deprecated and that shape checks become constants: the
    # input size is fixed by the card and the result is checked against the eager model below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(model, example, check_trace=False)


def _jit_bytes(module: torch.jit.ScriptModule) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(module, buf)
    return buf.getvalue()


def _onnx_bytes(traced: torch.jit.ScriptModule, example: torch.Tensor) -> bytes:
    """ONNX (opset 17, batch dimension free) from the same trace as the TorchScript file.

    PyTorch's TorchScript-based exporter (``dynamo=False``) is deprecated in favour of the
    torch.export one, which we tried: it took ~30 s for the test's tiny UDDN + CNN on this
    2-core machine against 0.6 s here, and needs onnxscript besides. This one exports the very
    graph we save as TorchScript; both files are checked against the evaluated model.
    """
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(traced, (example,), buf, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    return buf.getvalue()


def _onnx_logits(data: bytes, x: torch.Tensor) -> Optional[np.ndarray]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _missing_onnx() -> Optional[str]:
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        return f"ONNX export needs the 'export' extra (pip install 'raydefense[export]'): {exc}"
    return None


def export_defense(storage: Storage | str, run: str, *, defense: str = "uddn_kt",
                   formats: Sequence[str] = EXPORT_FORMATS, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Export the defended model ``defense`` of the finished run ``run`` to ``<run>/export/<defense>/``.

    Args:
        storage: the runs' root (a :class:`Storage`, a folder or an ``s3://`` URI).
        run: run name.
        defense: a defense key of the run's ``report/metrics.json`` (``none``, ``uddn``,
            ``uddn_kt``, ``jpeg``, ``dcn``, ...).
        formats: any of :data:`EXPORT_FORMATS`. ONNX is skipped, with the reason in the card,
            where the graph does not export (JPEG) or the ``export`` extra is missing, unless it
            was the only format asked for (then that is an error).
        echo: where progress lines go.

    Returns:
        The model card (also written to ``<run>/export/<defense>/card.json``).

    Raises:
        StorageError: the run, its report, its data/meta.json or a model file is missing.
        ConfigError: unknown defense or format, or ONNX alone asked for where it cannot be written.
        ModelError: the exported model differs from the evaluated one by more than ``TOLERANCE``.
    """
    from raydefense.pipeline.defended import DEFENSES

    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad or not formats:
        raise ConfigError(f"--format {','.join(bad) or '(none)'}: choose from {', '.join(EXPORT_FORMATS)}")
    if defense not in DEFENSES:
        raise ConfigError(f"--defense '{defense}' is unknown; known defenses: {', '.join(DEFENSES)}")
    run_st = _open_run(storage, run)
    layout = RunLayout(run_st)
    if not run_st.exists(layout.CONFIG):
        raise StorageError(f"run '{run}' not found at {run_st.display()} (no {layout.CONFIG})")
    cfg = saved_config(run_st)
    metrics = _read_json(run_st, layout.METRICS,
                         f"the run is not evaluated yet; finish it with jobs/full_pipeline.py --name {run}")
    meta = _read_json(run_st, layout.META, "written by the prepare stage")
    evaluated = metrics.get("accuracy", {})
    if defense not in evaluated:
        raise ConfigError(f"--defense '{defense}' was not evaluated in run '{run}'; "
                          f"evaluated: {', '.join(evaluated) or 'none'}")
    pre, clf = DEFENSES[defense]
    for part in (clf, pre):
        if part and part != "jpeg" and not layout.has_model(part):
            raise StorageError(f"run '{run}': {layout.model_rel(part)} is missing (needed by defense '{defense}')")

    onnx_skipped = None
    if "onnx" in formats:
        onnx_skipped = "ONNX has no JPEG codec operator; use the TorchScript file" if pre == "jpeg" else _missing_onnx()
        if onnx_skipped and formats == ("onnx",):
            raise ConfigError(f"--format onnx for '{defense}': {onnx_skipped}")
    with torch.no_grad():
        return _export(run_st, run, cfg, metrics, meta, defense=defense, pre=pre, clf=clf, formats=formats,
                       onnx_skipped=onnx_skipped, echo=echo)


def _model_card(run_st: Storage, run: str, cfg, metrics: dict[str, Any], *, defense: str, pre: Optional[str],
                clf: str, quality: int, size: int, num_classes: int, classes: list, files: dict[str, Any],
                skipped: dict[str, str], check: dict[str, Any]) -> dict[str, Any]:
    """``card.json``: what the files are, how to feed them, and how the defense was evaluated."""
    accuracy = dict(metrics["accuracy"][defense])
    detail = metrics.get("accuracy_detail", {}).get(defense, {})
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "run": run,
        "run_uri": run_st.display(),
        "defense": defense,
        "pipeline": _describe_pipeline(pre, clf, quality),
        "parts": {"preprocess": pre, "classifier": clf, "target_arch": cfg.models.target},
        "files": files,
        "skipped": skipped,
        "requires": ["torch", "torchvision"] if pre == "jpeg" else ["torch"],
        "input": {"name": "image", "shape": [None, 3, size, size], "dtype": "float32", "range": [0.0, 1.0],
                  "layout": "NCHW, RGB", "value": "uint8 pixel / 255"},
        "output": {"name": "logits", "shape": [None, num_classes], "dtype": "float32",
                   "meaning": "logits; softmax gives the identity probabilities, classes[i] names logit i"},
        "classes": classes,
        "preprocessing": _describe_preprocessing(cfg, size),
        "config_sha256": config_hash(cfg.to_dict()),
        "config": cfg.to_dict(),
        "accuracy": accuracy,
        "accuracy_ci95": {k: {"n": v["n"], "ci95": v.get("ci95")} for k, v in detail.items()
                          if isinstance(v, dict) and "n" in v},
        "n_images": metrics.get("n_images", {}),
        "verification": check,
        "torch_version": torch.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return card


def _export(run_st: Storage, run: str, cfg, metrics: dict[str, Any], meta: dict[str, Any], *, defense: str,
            pre: Optional[str], clf: str, formats: tuple[str, ...], onnx_skipped: Optional[str],
            echo: Callable[[str], None]) -> dict[str, Any]:
    from raydefense.pipeline.defended import build_defended_models

    size = int(meta.get("image_size", cfg.data.image_size))
    quality = int(cfg.baselines.jpeg_quality)
    evaluated_model = build_defended_models(run_st, {defense: (pre, clf)}, jpeg_quality=quality, device="cpu")[defense]
    model = _exportable(evaluated_model, quality)
    x, source = _check_images(run_st, size, CHECK_IMAGES)
    reference = evaluated_model(x)
    num_classes = int(reference.shape[1])
    classes = list(meta.get("classes", []))
    if len(classes) != num_classes:
        raise CorruptFileError(f"{run_st.display(RunLayout.META)} lists {len(classes)} classes but the "
                               f"'{defense}' classifier has {num_classes} outputs")

    files: dict[str, dict[str, Any]] = {}
    payloads: dict[str, bytes] = {}
    skipped: dict[str, str] = {}
    check: dict[str, Any] = {"images": source, "tolerance": TOLERANCE}
    t0 = time.perf_counter()
    traced = _trace(model, x[:2])
    if "torchscript" in formats:
        data = _jit_bytes(traced)
        # Check the file, not the in-memory trace: what a user loads is what is measured.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            loaded = torch.jit.load(io.BytesIO(data)).eval()
        diff = float((loaded(x) - reference).abs().max())
        check["torchscript_max_abs_logit_diff"] = diff
        if not diff <= TOLERANCE:
            raise ModelError(f"TorchScript export of '{defense}' differs from the evaluated model by {diff:.3g} "
                             f"(> {TOLERANCE}); not written")
        payloads["model.pt"] = data
        files["torchscript"] = {"path": "model.pt", "load": "torch.jit.load('model.pt').eval()"}
        echo(f"  torchscript: traced and checked in {time.perf_counter() - t0:.1f} s, max |logit diff| {diff:.2g}")
    if onnx_skipped:
        skipped["onnx"] = onnx_skipped
        echo(f"  onnx: not written ({onnx_skipped})")
    elif "onnx" in formats:
        t0 = time.perf_counter()
        data = _onnx_bytes(traced, x[:2])
        out = _onnx_logits(data, x)
        if out is None:
            check["onnx_max_abs_logit_diff"] = None
            check["onnx_note"] = "not checked: onnxruntime is not installed"
        else:
            diff = float(np.abs(out - reference.numpy()).max())
            check["onnx_max_abs_logit_diff"] = diff
            if not diff <= TOLERANCE:
                raise ModelError(f"ONNX export of '{defense}' differs from the evaluated model by {diff:.3g} "
                                 f"(> {TOLERANCE}); not written")
        payloads["model.onnx"] = data
        files["onnx"] = {"path": "model.onnx", "input": "image", "output": "logits"}
        echo(f"  onnx: exported in {time.perf_counter() - t0:.1f} s"
             + (f", max |logit diff| {check['onnx_max_abs_logit_diff']:.2g}" if out is not None else ""))
    for fmt, entry in files.items():
        blob = payloads[entry["path"]]
        entry.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())

    card = _model_card(run_st, run, cfg, metrics, defense=defense, pre=pre, clf=clf, quality=quality, size=size,
                       num_classes=num_classes, classes=classes, files=files, skipped=skipped, check=check)
    out_dir = export_dir(defense)
    # The card is the proof of a finished export: remove an old one first and write it last, so
    # an interrupted export never pairs a stale card with new model files (or the reverse).
    run_st.delete_file(f"{out_dir}/card.json")
    for name in ("model.pt", "model.onnx"):
        if name not in payloads:
            run_st.delete_file(f"{out_dir}/{name}")
    for name, blob in payloads.items():
        run_st.write_bytes(f"{out_dir}/{name}", blob)
    run_st.write_json(f"{out_dir}/card.json", card)
    echo(f"exported '{defense}' of run '{run}' to {run_st.display(out_dir)} ({', '.join(files) or 'no model file'})")
    return card


def _describe_pipeline(pre: Optional[str], clf: str, quality: int) -> str:
    if pre is None:
        return f"{clf} classifier (no preprocessing defense)"
    if pre == "jpeg":
        return (f"real JPEG round trip (libjpeg, quality {quality}, 4:2:0, uint8 rounding) -> {clf} classifier; "
                "evaluated with Pillow's codec, exported with torchvision's (agreement in 'verification')")
    return f"{pre} denoiser -> clamp to [0, 1] -> {clf} classifier"


def _describe_preprocessing(cfg, size: int) -> dict[str, Any]:
    """How the run turned image files into model inputs (raydefense.data.folder); callers must repeat it."""
    crop = ("MTCNN face crop (facenet-pytorch, margin 14 px, largest face; centre crop when no face is found)"
            if cfg.data.align else "centre square crop")
    return {
        "decode": "RGB; EXIF orientation applied; grayscale/palette/CMYK converted to RGB; alpha composited on white",
        "crop": crop,
        "resize": f"{size} x {size}, bilinear with antialiasing (PIL.Image.resize, BILINEAR)",
        "scale": "float32 = uint8 / 255, NCHW",
        "align": bool(cfg.data.align),
        "data_source": cfg.data.source,
        "note": ("the run's images are synthetic faces rendered by raydefense.data.synthetic; real photos are "
                 "outside the training distribution") if cfg.data.source == "synthetic" else "",
    }


def main(argv: Sequence[str]) -> int:
    """``jobs/export.py`` / ``raydefense export``: parse, export, print where it went."""
    import argparse

    p = argparse.ArgumentParser(description="Export a finished run's defended model (denoiser + clamp + classifier, "
                                            "exactly as evaluated) as TorchScript and ONNX with a JSON model card, "
                                            "to <storage>/<run>/export/<defense>/.")
    p.add_argument("--name", required=True, help="the run to export")
    p.add_argument("--storage", help="where the runs live: a folder or s3://bucket/prefix "
                                     "(default: storage.path of the default preset)")
    p.add_argument("--defense", default="uddn_kt", help="defense to export (default: uddn_kt, the published model)")
    p.add_argument("--format", dest="formats", action="append", choices=EXPORT_FORMATS,
                   help="torchscript or onnx (repeatable; default: both, ONNX where the graph exports)")
    args = p.parse_args(list(argv))
    storage = args.storage
    if storage is None:
        from raydefense.config import DEFAULT_CONFIG
        from raydefense.config import load_config

        storage = load_config(DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None).storage.path
    card = export_defense(Storage.open(storage), args.name, defense=args.defense,
                          formats=tuple(args.formats or EXPORT_FORMATS))
    acc = card["accuracy"]
    print("accuracy as evaluated: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items()))
    return 0
