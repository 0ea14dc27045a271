"""The stage runner: ``run_pipeline(cfg)`` is what ``jobs/full_pipeline.py`` calls."""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

from raydefense.config import Config
from raydefense.errors import ClusterError, ConfigError, RayDefenseError
from raydefense.pipeline.run import RunContext, RunLayout, check_run, commit_run, read_saved_config, saved_config
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
    from raydefense.pipeline.robust import run_robust

    return [
        ("prepare", run_prepare),
        ("models", run_models),
        ("attack", run_attack),
        ("gnr", run_gnr),
        ("denoise", run_denoise),
        ("distill", run_distill),
        ("baselines", run_baselines),
        ("robust", run_robust),
        ("evaluate", run_evaluate),
    ]


STAGE_NAMES = ("prepare", "models", "attack", "gnr", "denoise", "distill", "baselines", "robust", "evaluate")
# Stages a run saved before they existed may lack; evaluate_run treats them as done when disabled.
OPTIONAL_STAGES = {"robust": lambda cfg: not cfg.robust.defenses}


def open_storage(cfg: Config) -> Storage:
    return Storage.open(cfg.storage.path, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)


def start_ray(cfg: Config) -> dict[str, Any]:
    """``init_ray`` with its failures (a bad object store size, a cluster that does not answer,
    a timeout under load) as one ClusterError line; the exception stays as its ``__cause__``."""
    try:
        return init_ray(cfg)
    except RayDefenseError:
        raise
    except Exception as exc:  # ray.init raises ValueError, RuntimeError, ConnectionError, TimeoutError...
        import ray

        if ray.is_initialized():
            ray.shutdown()
        address = os.environ.get("RAY_ADDRESS")
        where = (f"connecting to the cluster at RAY_ADDRESS={address}" if address else
                 f"starting a local Ray (scale.object_store_memory_mb={cfg.scale.object_store_memory_mb}, "
                 f"scale.num_cpus={cfg.scale.num_cpus})")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ClusterError(f"Ray did not start ({where}): {type(exc).__name__}: {first[:300]}") from exc


def preflight(cfg: Config, *, echo: Callable[[str], None] = print,
              tune: bool = False) -> tuple[RunContext, dict[str, Any], bool]:
    """Everything checked before a stage runs, cheapest first, writing nothing of the run:
    the storage, the run's saved config and stage markers, the data, then Ray (started here)
    and whether the cluster can hold every request of the run. Returns the run (its
    ``config.yaml`` now written), the cluster's resources and whether training uses GPUs.
    ``tune``: the run feeds a Tune search, whose trials also hold a driver actor."""
    from raydefense.pipeline.prepare import check_source
    from raydefense.pipeline.resources import ensure_resources

    ctx: RunContext = check_run(cfg, open_storage(cfg))
    ctx.echo = echo
    done = ctx.check_markers(STAGE_NAMES)
    if "prepare" not in done:
        check_source(cfg)  # a bad data path or too few images fails before Ray starts
    resources = start_ray(cfg)
    gpu = use_gpu(cfg)
    ensure_resources(cfg, gpu=gpu, tune=tune, echo=echo)
    commit_run(ctx)
    return ctx, resources, gpu


def run_stages(ctx: RunContext, *, gpu: bool, stop_after: Optional[str] = None,
               echo_skips: bool = True) -> list[str]:
    """The stages in order on an opened run (Ray already started): a stage with a marker is
    skipped (``echo_skips``: say so), a finished one gets its marker; stops after ``stop_after``.
    A running stage sees in ``ctx.upcoming`` which stages this call runs after it.
    Returns the stages run now. What :func:`run_pipeline` and the ablation's runs execute."""
    stages = _stages()
    names = [name for name, _ in stages]
    last = names.index(stop_after) + 1 if stop_after in names else len(names)
    todo = [name for name in names[:last] if not ctx.is_done(name)]  # one marker check per stage
    ran = []
    for i, (name, fn) in enumerate(stages[:last], 1):
        if name not in todo:
            ctx.timings[name] = float(ctx.marker(name).get("duration_s", 0.0))
            if echo_skips:
                ctx.echo(f"[{i}/{len(stages)}] {name}: finished earlier, skipping")
            continue
        ctx.echo(f"[{i}/{len(stages)}] {name}")
        ctx.upcoming = tuple(todo[todo.index(name) + 1:])
        t0 = time.perf_counter()
        outputs = fn(ctx, gpu=gpu)
        ctx.timings[name] = time.perf_counter() - t0
        ctx.mark_done(name, duration_s=ctx.timings[name], outputs=outputs)
        ctx.echo(f"[{i}/{len(stages)}] {name}: done in {ctx.timings[name]:.1f} s")
        ran.append(name)
    return ran


def run_pipeline(cfg: Config, *, stop_after: Optional[str] = None, echo: Callable[[str], None] = print,
                 tune: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage of the defense; returns metrics.json's content (``{}`` with
    ``stop_after``). ``tune``: the stages feed a Tune search (resources are checked for its trials)."""
    if stop_after is not None and stop_after not in STAGE_NAMES:
        raise ConfigError(f"--stop-after '{stop_after}': unknown stage (known: {', '.join(STAGE_NAMES)})")
    ctx, resources, gpu = preflight(cfg, echo=echo, tune=tune)
    echo(f"raydefense run '{cfg.name}' at {ctx.storage.display()} on Ray "
         f"({resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU; training on {'GPU' if gpu else 'CPU'})")
    run_stages(ctx, gpu=gpu, stop_after=stop_after)
    if stop_after is not None:
        echo(f"stopping after '{stop_after}' as asked; run again with the same --name to go on")
        return {}
    if cfg.models.extra_targets:
        return run_extra_targets(cfg, echo=echo)
    return ctx.storage.read_json(RunLayout.METRICS, expect=dict, hint=_metrics_hint(cfg.name))


def load_run_config(name: str, *, storage: str, overrides: tuple[str, ...] | list[str] = (),
                    endpoint_url: Optional[str] = None, region: Optional[str] = None) -> Config:
    """The saved config of run ``name`` under ``storage``, pointed at that storage, with ``overrides``.

    What ``jobs/evaluate.py`` uses when no ``--config`` is given: the run is evaluated with its
    own ``eval.*`` settings unless ``--set eval...=`` says otherwise.
    """
    from raydefense.config import run_name_problem

    problem = run_name_problem(name)
    if problem:
        raise ConfigError(f"--name {name!r}: a run name {problem}")
    run = Storage.open(storage, endpoint_url=endpoint_url, region=region).child(name)
    if not run.exists(RunLayout.CONFIG):
        raise ConfigError(f"run '{name}' not found at {run.display()} (no config.yaml)")
    saved = read_saved_config(run)
    section = saved.get("storage")
    saved["storage"] = dict(section) if isinstance(section, dict) else {}
    saved["storage"]["path"] = storage
    if endpoint_url:
        saved["storage"]["endpoint_url"] = endpoint_url
    return saved_config(run, saved).replace(list(overrides))


def evaluate_run(cfg: Config, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-run the evaluate stage of a run whose training stages have finished.

    The run's own saved config is used for everything but ``eval.*``, ``scale.*`` and
    ``storage.*``, which come from ``cfg`` (so a user can attack harder after the fact).
    A multi-model run's report gets Table 5 from its finished child runs.
    """
    from raydefense.pipeline.evaluate import run_evaluate
    from raydefense.pipeline.resources import ensure_resources

    storage = open_storage(cfg)
    run = storage.child(cfg.name)
    if not run.exists(RunLayout.CONFIG):
        raise ConfigError(f"run '{cfg.name}' not found at {run.display()} (no config.yaml)")
    saved = read_saved_config(run)
    fresh = cfg.to_dict()
    for key in ("eval", "scale", "storage"):
        saved[key] = fresh[key]
    run_cfg = saved_config(run, saved)
    ctx = RunContext(cfg=run_cfg, storage=run, echo=echo)
    done = ctx.check_markers(STAGE_NAMES)  # a corrupt marker fails before Ray starts
    missing = [s for s in STAGE_NAMES[:-1] if s not in done
               and not (s in OPTIONAL_STAGES and OPTIONAL_STAGES[s](run_cfg))]
    if missing:
        raise ConfigError(f"run '{cfg.name}' has unfinished stages ({', '.join(missing)}); "
                          f"finish it with jobs/full_pipeline.py --name {cfg.name}")
    for s in STAGE_NAMES[:-1]:
        if s in done:
            ctx.timings[s] = float(ctx.marker(s).get("duration_s", 0.0))
    resources = start_ray(run_cfg)
    gpu = use_gpu(run_cfg)
    ensure_resources(run_cfg, gpu=gpu, echo=echo)
    echo(f"raydefense evaluate: run '{cfg.name}' at {run.display()} on Ray ({resources.get('CPU', 0):g} CPU, "
         f"{resources.get('GPU', 0):g} GPU; evaluating on {'GPU' if gpu else 'CPU'})")
    t0 = time.perf_counter()
    out = run_evaluate(ctx, gpu=gpu)
    ctx.mark_done("evaluate", duration_s=time.perf_counter() - t0, outputs=out)
    return ctx.storage.read_json(RunLayout.METRICS, expect=dict, hint=_metrics_hint(cfg.name))


def _metrics_hint(name: str) -> str:
    return f"rewrite it with jobs/evaluate.py --name {name}"


# --------------------------------------------------------------------------- multi-model runs (Table 5)


def child_config(cfg: Config, model: str) -> Config:
    """The config of the child run that defends extra target ``model`` (Li & Wang 2019, Table 5).

    Same data, seed, attacks, GNR, UDDN, knowledge transfer and evaluation as the parent; the
    target is ``model`` (no pretrained weights unless it is the parent's own target); only
    what Table 5 needs is trained (no DAE / pixel-guided / JPEG / DCN / distillation baselines).
    """
    from raydefense.config import from_dict
    from raydefense.pipeline.evaluate import child_run_name

    data = cfg.to_dict()
    data["name"] = child_run_name(cfg.name, model)
    m = data["models"]
    if model != m["target"]:
        m["target_pretrained"] = None
    m["target"], m["extra_targets"] = model, []
    data["baselines"]["enabled"] = []
    data["denoise"]["baselines"] = []
    return from_dict(data)


def _share_prepared_data(parent: RunContext, child: Storage) -> None:
    """Give a child run the parent's prepared data (same data config and seed): copy, marker last."""
    if child.exists(RunLayout.marker_rel("prepare")):
        return
    clean = RunLayout.CLEAN
    child.delete_dir(clean)
    for fname in parent.storage.listdir(clean):
        child.write_bytes(f"{clean}/{fname}", parent.storage.read_bytes(f"{clean}/{fname}"))
    child.write_bytes(RunLayout.META, parent.storage.read_bytes(RunLayout.META))
    marker = parent.marker("prepare")
    marker["outputs"] = {**marker.get("outputs", {}), "shared_from": parent.cfg.name}
    child.write_json(RunLayout.marker_rel("prepare"), marker)


def run_extra_targets(cfg: Config, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the whole pipeline once per ``models.extra_targets`` as child runs
    ``<name>--<model>``, then put Table 5 into the parent run's report; returns its metrics.

    The parent must have finished. Children share the parent's prepared data and nothing else.
    """
    from raydefense.pipeline.evaluate import child_run_name, table5_rows
    from raydefense.report import rewrite_report

    root = open_storage(cfg)
    parent = RunContext(cfg=cfg, storage=root.child(cfg.name), echo=echo)
    for model in cfg.models.extra_targets:
        child_cfg = child_config(cfg, model)
        echo(f"Table 5: target '{model}' as run '{child_cfg.name}'")
        _share_prepared_data(parent, root.child(child_run_name(cfg.name, model)))
        run_pipeline(child_cfg, echo=lambda line, m=model: echo(f"  [{m}] {line}"))
    metrics = parent.storage.read_json(RunLayout.METRICS, expect=dict, hint=_metrics_hint(cfg.name))
    metrics["table5"] = table5_rows(cfg, metrics, root)
    rewrite_report(parent.storage, metrics)
    from raydefense.report.compare import format_rows

    echo("\nTable 5 (defended / no defense):\n" + format_rows(metrics["table5"]))
    return metrics
