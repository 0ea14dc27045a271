"""The stage runner: ``run_pipeline(cfg)`` is what ``jobs/full_pipeline.py`` calls."""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

from raydefense.config import Config
from raydefense.errors import ConfigError
from raydefense.pipeline.run import RunContext, open_run
from raydefense.pipeline.runtime import init_ray, use_gpu
from raydefense.storage import Storage


def _stages() -> list[tuple[str, Callable[..., dict[str, Any]]]]:
    from raydefense.pipeline.attack import run_attack
    from raydefense.pipeline.denoise import run_denoise
    from raydefense.pipeline.distill import run_baselines, run_distill
    from raydefense.pipeline.evaluate import run_evaluate
    from raydefense.pipeline.gnr import run_gnr
    from raydefense.pipeline.models import run_models
    from raydefense.pipeline.prepare import run_prepare

    return [
        ("prepare", run_prepare),
        ("models", run_models),
        ("attack", run_attack),
        ("gnr", run_gnr),
        ("denoise", run_denoise),
        ("distill", run_distill),
        ("baselines", run_baselines),
        ("evaluate", run_evaluate),
    ]


STAGE_NAMES = ("prepare", "models", "attack", "gnr", "denoise", "distill", "baselines", "evaluate")


def open_storage(cfg: Config) -> Storage:
    return Storage.open(cfg.storage.path, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)


def run_pipeline(cfg: Config, *, stop_after: Optional[str] = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every stage of the defense; returns metrics.json's content."""
    if stop_after is not None and stop_after not in STAGE_NAMES:
        raise ConfigError(f"--stop-after '{stop_after}': unknown stage (known: {', '.join(STAGE_NAMES)})")
    storage = open_storage(cfg)
    ctx: RunContext = open_run(cfg, storage)
    ctx.echo = echo
    if cfg.data.source != "synthetic" and not ctx.is_done("prepare"):
        from raydefense.pipeline.prepare import list_source

        list_source(cfg)  # fail fast on a bad data path, before starting Ray
    resources = init_ray(cfg)
    gpu = use_gpu(cfg)
    echo(f"raydefense run '{cfg.name}' at {ctx.storage.display()} on Ray "
         f"({resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU; training on {'GPU' if gpu else 'CPU'})")
    stages = _stages()
    for i, (name, fn) in enumerate(stages, 1):
        if ctx.is_done(name):
            ctx.timings[name] = float(ctx.marker(name).get("duration_s", 0.0))
            echo(f"[{i}/{len(stages)}] {name}: finished earlier, skipping")
        else:
            echo(f"[{i}/{len(stages)}] {name}")
            t0 = time.perf_counter()
            outputs = fn(ctx, gpu=gpu)
            ctx.timings[name] = time.perf_counter() - t0
            ctx.mark_done(name, duration_s=ctx.timings[name], outputs=outputs)
            echo(f"[{i}/{len(stages)}] {name}: done in {ctx.timings[name]:.1f} s")
        if name == stop_after:
            echo(f"stopping after '{name}' as asked; run again with the same --name to go on")
            return {}
    return ctx.storage.read_json("report/metrics.json")


def evaluate_run(cfg: Config, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-run the evaluate stage of a run whose training stages have finished.

    The run's own saved config is used for everything but ``eval.*``, ``scale.*`` and
    ``storage.*``, which come from ``cfg`` (so a user can attack harder after the fact).
    """
    import yaml

    from raydefense.config import from_dict
    from raydefense.pipeline.evaluate import run_evaluate

    storage = open_storage(cfg)
    run = storage.child(cfg.name)
    if not run.exists("config.yaml"):
        raise ConfigError(f"run '{cfg.name}' not found at {run.display()} (no config.yaml)")
    saved = yaml.safe_load(run.read_text("config.yaml"))
    fresh = cfg.to_dict()
    for key in ("eval", "scale", "storage"):
        saved[key] = fresh[key]
    run_cfg = from_dict(saved)
    ctx = RunContext(cfg=run_cfg, storage=run, echo=echo)
    missing = [s for s in STAGE_NAMES[:-1] if not ctx.is_done(s)]
    if missing:
        raise ConfigError(f"run '{cfg.name}' has unfinished stages ({', '.join(missing)}); "
                          f"finish it with jobs/full_pipeline.py --name {cfg.name}")
    for s in STAGE_NAMES[:-1]:
        ctx.timings[s] = float(ctx.marker(s).get("duration_s", 0.0))
    init_ray(run_cfg)
    t0 = time.perf_counter()
    out = run_evaluate(ctx, gpu=use_gpu(run_cfg))
    ctx.mark_done("evaluate", duration_s=time.perf_counter() - t0, outputs=out)
    return ctx.storage.read_json("report/metrics.json")
