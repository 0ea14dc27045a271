"""Running the ablation on Ray: ``run_ablation(cfg)`` is what ``jobs/ablate.py`` calls.

Per seed, one **base** run does the stages every variant shares (prepare, models, attack,
gnr); then each variant's run does the rest (denoise, distill, evaluate; see
:mod:`raydefense.ablation.variants` for which runs borrow what). Each run is one **Ray task**
that runs the pipeline's own stage functions, unchanged, on a
:class:`~raydefense.ablation.shared.SharedStorage` that reads the shared outputs from the
base run's folder (nothing is copied). The task itself holds a sliver of a CPU, like a Tune
trial's driver; its Ray Train fits and Ray Data actor pools reserve the real resources, so as
many runs go at once as the cluster fits (``--concurrency``).

Why Ray tasks and not Tune with fixed configs:

- The work is a graph, not a flat set of trials: a seed's variants can start only once its
  base run finished, and the KT / DAE runs only once that seed's full run trained the UDDN and
  teacher they reuse. The driver submits each run when the runs it needs are done, so seed 1's
  base trains while seed 0's variants do; Tune would need a barrier between the two (a first
  experiment of bases) and a second one before the KT runs.
- Nothing is searched or stopped early, so Tune's searcher, scheduler and per-epoch results
  would be unused, and its experiment state would be a second record of what finished beside
  the stage markers. Here the markers are the only one: a run is finished when its last
  stage's marker exists, whatever command made it, so a rerun with more seeds or more variants
  reuses every finished run (``Tuner.restore`` keeps the trial set of the first call).
- Failures: a task whose worker or node dies is retried by Ray (``scale.max_failures``) and
  resumes from its markers and Ray Train checkpoints, which is what Tune's FailureConfig would
  give; each fit also retries its own worker group.

Layout, under ``<storage>/<ablation name>/``::

    s<seed>-base/          a pipeline run stopped after gnr (config.yaml, stages/, data/, models/)
    s<seed>-<run>/         a variant run: its own config.yaml, stages/, models/, train/, report/;
                           the shared stages' markers and outputs are read from s<seed>-base/
    ablation.json          written last: every number of ablation.md, per seed and summarized
    ablation.md, ablation.png

Resumption: running the same command again skips every finished run (its last stage's marker
exists) without starting Ray when nothing is left, resumes unfinished ones from their own
markers and checkpoints, and rewrites the summary. Each run checks its saved config like any
pipeline run, so a changed setting fails with the run and key named.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from raydefense.ablation.shared import SharedStorage, stage_outputs
from raydefense.ablation.summary import DEFINITIONS, METRICS, console_table, render_markdown, row_values, summarize
from raydefense.ablation.variants import (BASE, COMMON_OVERRIDES, DEFAULT_KT, FULL, Plan, RunSpec, build_plan,
                                          run_config, run_name)
from raydefense.config import Config, from_dict, run_name_problem
from raydefense.errors import ConfigError, CorruptFileError, RayDefenseError, StorageError
from raydefense.pipeline.resources import TRIAL_DRIVER_CPU
from raydefense.pipeline.run import RunContext, RunLayout, check_run, commit_run
from raydefense.pipeline.runner import STAGE_NAMES, open_storage, run_stages, start_ray
from raydefense.storage import Storage

LAST_STAGE = "evaluate"


class AblationLayout:
    """Where an ablation's files live (see the module docstring)."""

    JSON = "ablation.json"
    MARKDOWN = "ablation.md"
    PLOT = "ablation.png"

    def __init__(self, root: Storage) -> None:
        self.root = root

    def run(self, seed: int, key: str) -> Storage:
        return self.root.child(run_name(seed, key))

    def finished(self, seed: int, spec: RunSpec) -> bool:
        return self.run(seed, spec.key).exists(RunLayout.marker_rel(spec.stop_after or LAST_STAGE))


@dataclass(frozen=True)
class Job:
    """One run of one seed: what a Ray task is given."""

    seed: int
    spec: RunSpec
    cfg: dict[str, Any]  # the run's resolved config (Config.to_dict)

    @property
    def name(self) -> str:
        return run_name(self.seed, self.spec.key)

    @property
    def deps(self) -> tuple[str, ...]:
        return tuple(run_name(self.seed, k) for k in self.spec.after)


def plan_jobs(cfg: Config, plan: Plan) -> list[Job]:
    """Every run of every seed, seed by seed, each seed in the plan's order (base first)."""
    return [Job(seed, spec, run_config(cfg, spec, seed).to_dict()) for seed in plan.seeds for spec in plan.runs]


# ----------------------------------------------------------------------------- one run (a Ray task)


def shared_paths(job: Job, root: Storage) -> dict[str, Storage]:
    """Run-relative path -> the run it is read from: the base run's outputs of the shared stages
    (with their markers), and the paths the run borrows from other runs of its seed."""
    base = root.child(run_name(job.seed, BASE))
    shared = {rel: base for rel in stage_outputs(base, job.spec.base_stages)}
    for key, rel in job.spec.borrows:
        src = root.child(run_name(job.seed, key))
        if not src.exists(rel):
            raise StorageError(f"storage '{src.display(rel)}': not found; run '{run_name(job.seed, key)}' must finish "
                               f"before '{job.name}', which reads it")
        shared[rel] = src
    return shared


def run_job(job: Job, root: Storage, *, gpu: bool, log: Any = None) -> dict[str, Any]:
    """Run (or resume) one run of the ablation; what each Ray task does.

    ``log``: a ``ray.util.queue.Queue`` that carries the run's progress lines to the driver
    (None: printed). Returns the run's name, the stages run now and the seconds taken.
    """
    t0 = time.perf_counter()
    cfg = from_dict(job.cfg)

    def echo(line: str) -> None:
        text = "\n".join(f"[{job.name}] {part}" for part in line.split("\n"))
        if log is None:
            print(text, flush=True)
        else:
            log.put(text)

    own = check_run(cfg, root).storage
    shared = shared_paths(job, root)
    ctx = RunContext(cfg=cfg, storage=SharedStorage(own, shared) if shared else own, echo=echo)
    ctx.check_markers(STAGE_NAMES)
    commit_run(ctx)
    ran = run_stages(ctx, gpu=gpu, stop_after=job.spec.stop_after, echo_skips=False)
    return {"run": job.name, "stages_run": ran, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- the driver


def job_concurrency(cfg: Config, *, requested: int, gpu: bool) -> int:
    """Runs at once. 0: as many as the cluster fits, counting a local machine's cores (like a
    Tune search's trials, ``tune.search.trial_concurrency``); N: N, capped by what the
    cluster's logical resources hold (more runs than cores on a local Ray is then the user's
    choice)."""
    import ray

    from raydefense.tune.search import trial_concurrency

    local = None if (requested > 0 or os.environ.get("RAY_ADDRESS")) else os.cpu_count()
    return trial_concurrency(cfg, requested=requested, resources=ray.cluster_resources(), gpu=gpu, local_cpus=local)


def _drain(log: Any, echo: Callable[[str], None]) -> None:
    n = log.size()
    if n:
        for line in log.get_nowait_batch(n):
            echo(line)


def execute(jobs: Sequence[Job], root: Storage, *, cfg: Config, gpu: bool, concurrency: int, finished: set[str],
            echo: Callable[[str], None]) -> None:
    """Run ``jobs`` as Ray tasks, at most ``concurrency`` at once, each once the runs it needs
    (``Job.deps``) are in ``finished``; earlier seeds first. The first failure cancels the
    runs in flight (their work so far is kept) and is raised, with the run named."""
    import ray
    from ray.util.queue import Queue

    from raydefense.pipeline.runtime import user_errors

    log = Queue(actor_options={"num_cpus": 0})
    retries = cfg.scale.max_failures if cfg.scale.max_failures >= 0 else -1
    task = ray.remote(num_cpus=TRIAL_DRIVER_CPU, max_retries=retries)(run_job)
    waiting = list(jobs)
    running: dict[Any, Job] = {}
    started: dict[str, float] = {}
    while waiting or running:
        ready = [j for j in waiting if all(d in finished for d in j.deps)]
        while ready and len(running) < concurrency:
            job = ready.pop(0)
            waiting.remove(job)
            running[task.options(name=f"ablation:{job.name}").remote(job, root, gpu=gpu, log=log)] = job
            started[job.name] = time.perf_counter()
            echo(f"[{job.name}] started")
        if not running:  # nothing can start: a run they need is not in this plan (a bug)
            raise RuntimeError(f"ablation: runs {[j.name for j in waiting]} wait for runs that never finish")
        done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        _drain(log, echo)
        for ref in done:
            job = running.pop(ref)
            try:
                with user_errors():
                    ray.get(ref)
            except BaseException as exc:
                for other in running:
                    ray.cancel(other, force=True)
                _drain(log, echo)
                if isinstance(exc, RayDefenseError):
                    raise type(exc)(f"ablation run '{job.name}': {exc}; run the same command again to resume") from exc
                raise
            finished.add(job.name)
            echo(f"[{job.name}] finished in {time.perf_counter() - started[job.name]:.0f} s")
    _drain(log, echo)


def collect(plan: Plan, layout: AblationLayout, *, name: str, cfg: Config) -> dict[str, Any]:
    """``ablation.json``'s content from the finished runs' ``metrics.json``."""
    per_seed: dict[str, dict[int, dict[str, Optional[float]]]] = {}
    for v in plan.variants:
        per_seed[v.name] = {}
        for seed in plan.seeds:
            run = layout.run(seed, v.run)
            metrics = run.read_json(RunLayout.METRICS, expect=dict)
            try:
                per_seed[v.name][seed] = row_values(metrics, v.defense)
            except KeyError as exc:
                raise CorruptFileError(f"{run.display(RunLayout.METRICS)}: {exc.args[0]}; delete the run folder "
                                       f"{run.display()} to redo it") from None
    stats = summarize(per_seed, seeds=plan.seeds, full=FULL)
    variants = {}
    for v in plan.variants:
        spec = plan.run(v.run)
        variants[v.name] = {
            "changes": v.changes, "run": v.run, "defense": v.defense,
            "overrides": list(COMMON_OVERRIDES + spec.overrides),
            "per_seed": {str(s): per_seed[v.name][s] for s in plan.seeds},
            **stats[v.name],
        }
    runs = {}
    for seed in plan.seeds:
        for spec in plan.runs:
            own = layout.run(seed, spec.key)
            stages = {s: float(own.read_json(RunLayout.marker_rel(s), expect=dict).get("duration_s", 0.0))
                      for s in STAGE_NAMES if own.exists(RunLayout.marker_rel(s))}
            runs[run_name(seed, spec.key)] = {
                "seed": seed, "run": spec.key, "path": own.display(), "stages_s": stages,
                "shares_from_base": list(spec.base_stages), "borrows": [list(b) for b in spec.borrows],
            }
    informative = {}
    for seed in plan.seeds:
        check = layout.run(seed, FULL).read_json(RunLayout.METRICS, expect=dict).get("black_box_check") or {}
        informative[str(seed)] = check.get("informative")
    return {
        "name": name,
        "root": layout.root.display(),
        "seeds": list(plan.seeds),
        "full": FULL,
        "order": [v.name for v in plan.variants],
        "metrics": list(METRICS),
        "definitions": DEFINITIONS,
        "statistics": {
            "summary": "mean over seeds with the 95% Student-t interval mean +- t(0.975, n-1) sd / sqrt(n) "
                       "(report.seeds.seed_summary); n = number of seeds",
            "vs_full": "per seed variant - full; mean, 95% Student-t interval and two-sided paired t-test p-value "
                       "of those differences (report.seeds.paired_seed_difference); n = number of seeds",
        },
        "variants": variants,
        "runs": runs,
        "black_box_informative": informative,
        "notes": list(plan.notes),
        "config": cfg.to_dict(),
    }


def write_outputs(layout: AblationLayout, result: dict[str, Any]) -> None:
    """The plot and ``ablation.md``, then ``ablation.json`` last (its presence means all three are whole)."""
    from raydefense.ablation.plot import ablation_figure

    layout.root.delete_file(layout.JSON)
    layout.root.write_bytes(layout.PLOT, ablation_figure(result))
    layout.root.write_text(layout.MARKDOWN, render_markdown(result))
    layout.root.write_json(layout.JSON, result)


def open_ablation(cfg: Config, name: str) -> AblationLayout:
    """The ablation's root ``<storage>/<name>``; ConfigError when ``name`` is no run name or
    names a pipeline run (a folder with its own config.yaml)."""
    problem = run_name_problem(name)
    if problem:
        raise ConfigError(f"--name {name!r}: an ablation name {problem}")
    root = open_storage(cfg).child(name)
    if root.exists(RunLayout.CONFIG):
        raise ConfigError(f"{root.display()} is a pipeline run, not an ablation; use another --name")
    return AblationLayout(root)


def run_ablation(cfg: Config, *, name: Optional[str] = None, seeds: int = 3, variants: Sequence[str] = (),
                 kt: Sequence[tuple[float, float]] = DEFAULT_KT, custom: Sequence[tuple[str, Sequence[str]]] = (),
                 concurrency: int = 0, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the ablation of ``cfg``; returns ``ablation.json``'s content.

    Args:
        cfg: the config of the full defense; every run is this config plus its overrides.
        name: the ablation's folder under ``storage.path`` (default ``<cfg.name>-ablation``).
        seeds: replicates: seeds ``cfg.seed`` .. ``cfg.seed + seeds - 1``.
        variants, kt, custom: see :func:`raydefense.ablation.variants.build_plan`.
        concurrency: runs at once; 0 = as many as the cluster fits (see :func:`job_concurrency`).
        echo: progress lines.
    """
    if concurrency < 0:
        raise ConfigError(f"--concurrency {concurrency}: must be >= 0 (0 = as many as the cluster fits)")
    name = name or f"{cfg.name}-ablation"
    plan = build_plan(cfg, seeds=seeds, variants=variants, kt=kt, custom=custom)
    layout = open_ablation(cfg, name)
    jobs = plan_jobs(cfg, plan)
    for job in jobs:  # a changed setting fails now, naming the run and key, before Ray starts
        check_run(from_dict(job.cfg), layout.root)
    finished = {j.name for j in jobs if layout.finished(j.seed, j.spec)}
    todo = [j for j in jobs if j.name not in finished]
    echo(f"ablation '{name}' at {layout.root.display()}: {len(plan.variants)} variants x {len(plan.seeds)} seeds "
         f"({', '.join(map(str, plan.seeds))}) from {len(jobs)} runs, {len(todo)} to do")
    echo("  variants: " + ", ".join(v.name for v in plan.variants))
    for note in plan.notes:
        echo(f"  note: {note}")
    if todo:
        from raydefense.pipeline.prepare import check_source
        from raydefense.pipeline.resources import ensure_resources
        from raydefense.pipeline.runtime import use_gpu

        if any(j.spec.key == BASE and not layout.run(j.seed, BASE).exists(RunLayout.marker_rel("prepare"))
               for j in todo):
            check_source(cfg)
        start_ray(cfg)
        gpu = use_gpu(cfg)
        ensure_resources(cfg, gpu=gpu, tune=True, echo=echo)
        at_once = job_concurrency(cfg, requested=concurrency, gpu=gpu)
        echo(f"  {at_once} run{'s' if at_once != 1 else ''} at a time on {'GPU' if gpu else 'CPU'}; "
             "finished runs are kept (the same command resumes)")
        t0 = time.perf_counter()
        execute(todo, layout.root, cfg=cfg, gpu=gpu, concurrency=at_once, finished=finished, echo=echo)
        echo(f"ablation '{name}': {len(todo)} runs in {time.perf_counter() - t0:.0f} s")
    else:
        echo("  every run finished earlier; summarizing")
    result = collect(plan, layout, name=name, cfg=cfg)
    write_outputs(layout, result)
    echo(console_table(result))
    echo(f"\nwrote {layout.root.display(layout.MARKDOWN)}, {layout.JSON}, {layout.PLOT}")
    return result
