"""Section 6 (CUDA only): bf16 against fp32, and model FLOP utilisation.

Runs only when ``torch.cuda.is_available()``; on a CPU machine the section says it was skipped.

What is measured, on ``cuda:0``, each pair interleaved round by round (CUDA-synchronised
``time.perf_counter`` around ``steps`` calls, one warm-up round dropped):

* attack generation: our I-FGSM4 and PGD-10 (registry ``ifgsm4``, ``pgd``; eps 8/255) on FaceNet
  (random init) at 160 px, fp32 against bf16 autocast (``torch.autocast('cuda',
  dtype=torch.bfloat16)`` around the call; the attack's arithmetic on the image stays fp32);
* UDDN training steps (section 4's step) at the config's image size, fp32 against bf16 autocast
  as ``scale.amp`` applies it (:func:`raydefense.pipeline.worker.autocast`).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one call (forward and
backward: matrix multiplications and convolutions, 2 FLOPs per multiply-add; elementwise
operations are not counted, so the utilisation is a lower bound). Achieved FLOP/s = FLOPs /
median seconds; model FLOP utilisation = achieved / peak. Peaks are dense (no sparsity) vendor
figures for the device's name (:data:`PEAK_TFLOPS`), or ``--gpu-peak-tflops`` for bf16: bf16 runs
against the bf16 peak, fp32 runs against the TF32 peak, because cuDNN runs fp32 convolutions on
TF32 tensor cores by default (``torch.backends.cudnn.allow_tf32``; recorded in the notes).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Optional

import torch

from .results import Row, Section
from .stats import interleave, paired_ratios

__all__ = ["PEAK_TFLOPS", "peak_for", "count_flops", "run_gpu"]

#: Dense peak TFLOP/s by device-name substring (first match wins): NVIDIA datasheets, SXM parts.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7}),
    ("H100", {"bf16": 989.4, "tf32": 494.7}),
    ("A100", {"bf16": 312.0, "tf32": 156.0}),
    ("L40S", {"bf16": 362.05, "tf32": 183.0}),
    ("L4", {"bf16": 121.0, "tf32": 60.0}),
]


def peak_for(device_name: str, *, override_bf16: Optional[float] = None) -> Optional[dict[str, float]]:
    """``{'bf16': TFLOP/s, 'tf32': TFLOP/s}`` for ``device_name``; ``override_bf16`` replaces the
    bf16 figure (and sets TF32 to half of it when the device is unknown). None when unknown."""
    for key, peaks in PEAK_TFLOPS:
        if key in device_name:
            return {**peaks, **({"bf16": override_bf16} if override_bf16 else {})}
    if override_bf16:
        return {"bf16": override_bf16, "tf32": override_bf16 / 2}
    return None


class _TotalsOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: every FLOP goes to the 'Global' total.

    The tracker attributes FLOPs to modules with backward hooks, and those fail under
    ``torch.autograd.grad`` on a leaf input ("A leaf node was passed to _will_engine_execute_node
    ...", torch 2.14), which is how every attack takes its input gradient. Only the total is used."""

    parents = frozenset({"Global"})

    def __enter__(self) -> "_TotalsOnly":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as ``FlopCounterMode`` counts them (forward and backward;
    totals only, see :class:`_TotalsOnly`)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalsOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())


def _bf16(device_type: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, dtype=torch.bfloat16)


def run_gpu(section: Section, cfg, *, num_classes: int, batch: int, steps: int, rounds: int, warmup: int = 1,
            peak_override: Optional[float] = None, log: Callable[[str], None] = print, device: Optional[str] = None,
            model_name: str = "facenet", attack_size: int = 160) -> None:
    """Fill ``section`` (module docstring), or mark it skipped without CUDA. ``device``,
    ``model_name`` and ``attack_size`` exist for the suite's own tests (``device='cpu'`` runs the
    same code with CPU bf16 autocast, the UDDN step included: ``scale.amp`` applies on CPU too)."""
    if device is None:
        if not torch.cuda.is_available():
            section.skipped = ("no CUDA device (torch.cuda.is_available() is False): bf16 and FLOP-utilisation "
                               "figures need a GPU")
            log(f"  skipped: {section.skipped}")
            return
        device = "cuda"
    from raydefense.attacks import create_attack
    from raydefense.models import create_model

    from .attacks import EPS, PGD_ALPHA, _images
    from .throughput import uddn_trainer

    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(0) if cuda else device
    peaks = peak_for(name, override_bf16=peak_override)
    sync = torch.cuda.synchronize if cuda else None
    device_type = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes).to(device).eval()
    x = _images(batch, attack_size).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    attacks = {"I-FGSM4": create_attack("ifgsm4", model, eps=EPS),
               "PGD-10": create_attack("pgd", model, eps=EPS, alpha=PGD_ALPHA, steps=10)}
    contenders: dict[str, tuple[Callable[[], Any], int]] = {}
    for label, attack in attacks.items():
        contenders[f"{label} fp32"] = ((lambda a=attack: a(x, y)), batch)

        def bf16_call(a=attack) -> Any:
            with _bf16(device_type):
                return a(x, y)
        contenders[f"{label} bf16"] = (bf16_call, batch)
    for precision in ("fp32", "bf16"):
        step, n = uddn_trainer(cfg, num_classes=num_classes, device=device, amp=precision == "bf16", batch=batch)
        contenders[f"UDDN training {precision}"] = (step, n)

    def repeat(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps):
                fn()
        return run

    flops = {k: count_flops(fn) for k, (fn, _) in contenders.items()}
    times = interleave({k: repeat(fn) for k, (fn, _) in contenders.items()}, rounds=rounds, warmup=warmup, sync=sync)
    section.notes.append(f"{name}; {model_name} attacks at {attack_size} px and UDDN training at {cfg.data.image_size} px, batch {batch}, "
                         f"{steps} calls per measurement; cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                         f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}; peaks (dense TFLOP/s) {peaks}")
    for label in ("I-FGSM4", "PGD-10", "UDDN training"):
        section.rows.append(Row.of(f"{label}: bf16 / fp32 speed",
                                   paired_ratios(times[f"{label} fp32"], times[f"{label} bf16"]), "x", ratio=True))
    for key, (_, n) in contenders.items():
        section.rows.append(Row.of(f"{key}{f' @ {attack_size} px' if 'UDDN' not in key else ''}",
                                   [steps * n / t for t in times[key]], "img/s", flops_per_call=flops[key]))
        achieved = [steps * flops[key] / t / 1e12 for t in times[key]]
        section.rows.append(Row.of(f"{key}: achieved", achieved, "TFLOP/s"))
        if peaks:
            peak = peaks["bf16" if key.endswith("bf16") else "tf32"]
            section.rows.append(Row.of(f"{key}: model FLOP utilisation", [100 * a / peak for a in achieved], "%",
                                       peak_tflops=peak))
    for r in section.rows:
        log(f"  {r.name}: {r.summary.median:.4g} {r.unit}")
