"""The defense search: Ray Tune + Optuna (TPE, seeded) + ASHA over lambda, T, the guidance
layer and the other knobs of :mod:`raydefense.tune.space`.

``run_search(cfg)`` is what ``jobs/tune_defense.py`` calls:

1. runs (or resumes) the base run's stages prepare, models, attack and gnr: the data, the
   target and surrogate, the adversarial sets and the GNR pairs that every trial shares;
2. runs (or, after the driver was killed, restores) a Tune experiment whose trials are
   :class:`raydefense.tune.trial.DefenseTrial`: each trains a UDDN, a teacher and a student with
   the pipeline's own loops on Ray Train and reports every epoch;
3. writes the summary: ``best.json``, ``best_config.yaml`` (the config with the best values,
   under a new run name: ``jobs/full_pipeline.py --config best_config.yaml`` trains with
   them), ``trials.png`` and ``optuna_trials.json`` (the Optuna study's own record).

Layout, on the run's storage (local or S3)::

    <storage>/<run>/tune/<search>/
        search.json            the space, budget and objective (a rerun must match it)
        experiment/            Ray Tune's experiment: state, searcher, one folder per trial
        train/<trial>_<phase>/ Ray Train checkpoints of each trial's phases
        trials/<trial>/        config.yaml, history.json (every reported epoch), result.json
                               (written last: the trial finished), denoised/ (its KT data)
        optuna_trials.json     Optuna's trials: state, params, value, intermediate values
        best.json              written last: the search finished
        best_config.yaml, trials.png
    <storage>/<run>/models/tune/<search>/<trial>/{uddn,teacher,student}.pt

Running the same command again resumes: a finished search only prints its summary; an
interrupted one is restored with ``Tuner.restore`` (finished trials are kept, unfinished and
failed ones resume from their Ray Train checkpoints).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from ray import tune
from ray.tune.search.optuna import OptunaSearch

from raydefense.config import Config, from_dict
from raydefense.errors import ConfigError, RayDefenseError
from raydefense.storage import Storage
from raydefense.tracking import tune_callbacks
from raydefense.tune.space import Knob, build_knobs, param_space, resolve_metric
from raydefense.tune.summary import (  # noqa: F401  (re-exported)
    _fmt,
    _write_local_copy,
    console,
    format_summary,
    pick_best,
    summarize,
    trial_rows,
)
from raydefense.tune.trial import DefenseTrial, TrialSpec

# Resources of the trial function itself: it only drives the inner Ray Train runs, whose
# workers reserve their own CPUs/GPUs. Ray cannot schedule an actor with no resources at
# all, so it takes a sliver of a CPU (the Ray Train docs use the same trick).
from raydefense.pipeline.resources import GPU_ACTOR_CPU, TRIAL_DRIVER_CPU  # noqa: E402  checked before a search
from raydefense.pipeline.run import RunLayout  # noqa: E402
# Sections of the run's config that stages prepare..gnr do not read: a search may change them.
_TRIAL_ONLY_SECTIONS = ("denoise", "distill", "baselines", "robust")


# ----------------------------------------------------------------------------- Optuna


class RecordingOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna which trials ASHA stopped, and keeps a record.

    Tune reports an early-stopped trial as complete (``done``) with its last, earlier-phase
    result; here it becomes a PRUNED Optuna trial (TPE ranks pruned trials by their
    intermediate values, which every result was reported as), and only trials whose last
    result is the student's last epoch (``complete``) are COMPLETE with their final
    objective. After every finished trial the study's trials are written to
    ``optuna_trials.json`` on the search's storage.
    """

    def __init__(self, *, record: Storage, seed: int, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self._record = record
        self._last_step: dict[str, int] = {}  # the last step reported to Optuna, per trial

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)
        self._last_step[trial_id] = int(result.get("training_iteration", 0))

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        stopped_early = (result is not None and not error and not result.get("complete", False)
                         and trial_id in self._ot_trials and trial_id not in self._completed_trials)
        if stopped_early:
            from optuna.trial import TrialState

            ot_trial = self._ot_trials[trial_id]
            step = int(result.get("training_iteration", 0))
            # Tune does not pass the result that ASHA stopped on to the searcher: report it here.
            if result.get(self._metric) is not None and step > self._last_step.get(trial_id, 0):
                ot_trial.report(float(result[self._metric]), step)
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
        else:
            super().on_trial_complete(trial_id, result=result, error=error)
        self.export()

    def export(self) -> None:
        """Write the study's trials (Optuna's own record) to ``optuna_trials.json``."""
        if self._ot_study is None:
            return
        tune_ids = {t.number: tid for tid, t in self._ot_trials.items()}
        rows = [{
            "number": t.number,
            "tune_trial_id": tune_ids.get(t.number),
            "state": t.state.name,
            "params": t.params,
            "value": t.value if t.state.name == "COMPLETE" else None,
            "intermediate_values": {str(k): v for k, v in sorted(t.intermediate_values.items())},
        } for t in self._ot_study.trials]
        self._record.write_json("optuna_trials.json", {
            "study_name": self._ot_study.study_name,
            "direction": self._ot_study.direction.name,
            "sampler": type(self._ot_study.sampler).__name__,
            "trials": rows,
        })


class _Progress(tune.Callback):
    """One console line per trial event, instead of Tune's status table."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo

    @staticmethod
    def _params(trial) -> str:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items())

    def on_trial_start(self, iteration, trials, trial, **info):
        self.echo(f"  trial {trial.trial_id}: started ({self._params(trial)})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        how = "finished" if last.get("complete") else "stopped early by ASHA"
        obj = last.get("objective")
        self.echo(f"  trial {trial.trial_id}: {how} after {last.get('training_iteration', 0)} epochs, "
                  f"objective {_fmt(obj)} (white-box {_fmt(last.get('val_white_acc'))}, "
                  f"whole-model PGD {_fmt(last.get('val_pgd_acc'))}, "
                  f"clean {_fmt(last.get('val_clean_acc'))}, phase {last.get('phase', '-')})")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.echo(f"  trial {trial.trial_id}: failed (see {trial.error_file or 'its error.txt'})")


def trial_dirname(trial) -> str:
    """Trial folders are named by the trial id, like everything else a trial writes."""
    return trial.trial_id


# ----------------------------------------------------------------------------- resources


def trial_concurrency(cfg: Config, *, requested: int, resources: Mapping[str, float], gpu: bool,
                      local_cpus: Optional[int] = None) -> int:
    """How many trials run at once: ``requested`` (0 = as many as fit), never more than the
    cluster holds.

    One trial at a time needs ``scale.num_workers`` Ray Train workers of
    ``scale.cpus_per_worker`` CPUs (or ``scale.gpus_per_worker`` GPUs), and an actor pool of
    ``scale.attack_actors`` x ``scale.cpus_per_actor`` CPUs while it denoises its KT data (on GPU
    one actor per GPU, at most ``scale.attack_actors``, of 1 CPU each: ``runtime.pool_actors``).
    On a local Ray, ``local_cpus`` (the machine's cores) caps the CPUs counted: the local
    cluster advertises a few logical CPUs more than there are cores.
    """
    s = cfg.scale
    cpus = resources.get("CPU", 0.0)
    if local_cpus:
        cpus = min(cpus, float(local_cpus))
    if gpu:
        from raydefense.pipeline.runtime import pool_actors

        actor_cpu = pool_actors(cfg, gpu=True, gpus=resources.get("GPU", 0.0)) * GPU_ACTOR_CPU
    else:
        actor_cpu = s.attack_actors * s.cpus_per_actor
    cpu_need = max(s.num_workers * (0.0 if gpu else s.cpus_per_worker), actor_cpu)
    fits = int(cpus // (cpu_need + TRIAL_DRIVER_CPU)) if cpu_need > 0 else requested or 1
    if gpu:
        gpu_fits = int(resources.get("GPU", 0.0) // (s.num_workers * s.gpus_per_worker))
        fits = min(fits, gpu_fits)
    fits = max(1, fits)
    return fits if requested <= 0 else min(requested, fits)


# ----------------------------------------------------------------------------- storage


def _open_storage(cfg: Config) -> Storage:
    """The storage root with an absolute local path: trial actors run in their own working
    directories, and a pickled Storage reopens its URI there."""
    path = cfg.storage.path
    if not path.startswith("s3://"):
        path = os.path.abspath(os.path.expanduser(path[len("file://"):] if path.startswith("file://") else path))
    return Storage.open(path, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)


def stage_config(cfg: Config, storage: Storage) -> Config:
    """The config for the base run's stages prepare..gnr.

    They do not read ``denoise``, ``distill`` or ``baselines``; when the run exists, those
    sections are taken from its saved config, so that a search may train its trials with other
    values (fewer epochs, say) than the run was made with. Everything the shared stages read
    (data, models, attack, gnr, seed) must still match: ``open_run`` says which key does not.
    """
    run = storage.child(cfg.name)
    if not run.exists(RunLayout.CONFIG):
        return cfg
    from raydefense.pipeline.run import read_saved_config  # the one guarded reader of a run's config.yaml

    saved = read_saved_config(run)
    data = cfg.to_dict()
    for section in _TRIAL_ONLY_SECTIONS:
        if section in saved:
            data[section] = saved[section]
    return from_dict(data)


def search_record(cfg: Config, knobs: Sequence[Knob], *, requested_concurrency: int) -> dict[str, Any]:
    """What defines a search: a rerun under the same name must match it to resume."""
    t = cfg.tune
    return {
        "space": [k.to_dict() for k in knobs],
        "num_samples": t.num_samples,
        "max_concurrent": requested_concurrency,
        "metric": t.metric, "mode": t.mode, "clean_floor": t.clean_floor,
        "grace_period": t.grace_period, "reduction_factor": t.reduction_factor, "seed": t.seed,
        "trial_config": {"seed": cfg.seed, "denoise": cfg.to_dict()["denoise"], "distill": cfg.to_dict()["distill"]},
    }


# A resumed search may run on other resources (scale.*), like a resumed run; its concurrency
# limit is the first run's (Tuner.restore keeps the searcher it saved).
_RESUMABLE_RECORD_KEYS = ("max_concurrent", "effective_concurrency")


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _changed(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "<all>"]


# ----------------------------------------------------------------------------- the search


def _keep_or_refuse_record(cfg: Config, sdir: Storage, search: str, record: dict[str, Any]) -> None:
    """Write ``search.json`` for a new search; for a resumed one, refuse another space, budget or
    trial config (ConfigError naming the changed keys)."""
    if not sdir.exists("search.json"):
        sdir.write_json("search.json", record)
        return
    saved = sdir.read_json("search.json")
    changed = [k for k in _changed(saved, json.loads(json.dumps(record))) if k not in _RESUMABLE_RECORD_KEYS]
    if changed:
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        raise ConfigError(f"search '{search}' of run '{cfg.name}' already exists at {sdir.display()} with another "
                          f"space, budget or trial config ({shown}); use another --search to start a new search")


def run_search(cfg: Config, *, search: str = "search", space: Iterable[str] = (),
               max_concurrent: Optional[int] = None, best_config_path: Optional[str] = None,
               echo: Callable[[str], None] = console) -> dict[str, Any]:
    """Run (or resume) a defense search; returns the content of ``best.json``.

    One cohesive thing read top to bottom (checks, the base stages, resume or start, the
    Tuner, the summary), so it stays one function at a little over 80 lines.

    Args:
        cfg: the config; ``cfg.tune`` gives the space (lam, T, guidance, denoise_lr), the budget
            (num_samples, max_concurrent), the objective (metric, mode, clean_floor), ASHA's
            grace_period and reduction_factor, and the sampler's seed. Trials train with
            ``cfg.denoise`` / ``cfg.distill`` plus their sampled values.
        search: the search's name; it lives in ``<storage>/<cfg.name>/tune/<search>/``.
        space: extra knobs, ``KEY=KIND(ARGS)`` strings (see :mod:`raydefense.tune.space`).
        max_concurrent: trials at once; ``None``: ``cfg.tune.max_concurrent``; 0: as many as
            the cluster fits. Always capped by what the cluster holds (:func:`trial_concurrency`).
        best_config_path: also write ``best_config.yaml`` to this local file.
        echo: progress lines (a builtin such as ``print`` is replaced by :func:`console`).
    """
    import types

    import ray

    from raydefense.pipeline.runner import run_pipeline
    from raydefense.pipeline.runtime import tune_console, use_gpu, user_errors

    if isinstance(echo, types.BuiltinFunctionType):
        echo = console
    if not search or "/" in search or search.startswith("."):
        raise ConfigError(f"--search '{search}' is not a valid search name (no '/', not empty, not starting with '.')")
    knobs = build_knobs(cfg, space)
    metric = resolve_metric(cfg.tune.metric)
    requested = cfg.tune.max_concurrent if max_concurrent is None else int(max_concurrent)
    if requested < 0:
        raise ConfigError(f"--max-concurrent {requested}: must be >= 0 (0 = as many as the cluster fits)")

    storage = _open_storage(cfg)
    base_cfg = stage_config(cfg, storage)
    # A uddn_kt_adv trial fine-tunes the base run's UDDN and KT student, taught by its teacher.
    base_stages = "distill" if cfg.tune.defense == "uddn_kt_adv" else "gnr"
    run_pipeline(base_cfg, stop_after=base_stages, tune=True,
                 echo=lambda line: None if line.startswith("stopping after") else echo(line))
    run = storage.child(cfg.name)
    sdir = run.child("tune", search)

    record = search_record(cfg, knobs, requested_concurrency=requested)
    _keep_or_refuse_record(cfg, sdir, search, record)
    if sdir.exists("best.json"):
        echo(f"search '{search}': finished earlier ({sdir.display('best.json')})")
        best = sdir.read_json("best.json")
        _write_local_copy(sdir, best_config_path)
        return best

    t0 = time.perf_counter()
    gpu = use_gpu(cfg)
    exp_path = sdir.path("experiment")
    with user_errors():
        restoring = tune.Tuner.can_restore(exp_path, storage_filesystem=sdir.fs)
    if restoring:  # Tuner.restore keeps the searcher, and so the concurrency limit, it saved
        concurrency = saved_concurrency(sdir, 1)
    else:
        local = None if os.environ.get("RAY_ADDRESS") else os.cpu_count()
        concurrency = trial_concurrency(cfg, requested=requested, resources=ray.cluster_resources(), gpu=gpu,
                                        local_cpus=local)
        sdir.write_json("search.json", {**record, "effective_concurrency": concurrency})
    spec = TrialSpec(cfg=cfg.to_dict(), run=run, search=sdir, name=search, knobs=tuple(knobs), metric=metric,
                     mode=cfg.tune.mode, clean_floor=cfg.tune.clean_floor, gpu=gpu,
                     num_classes=RunLayout(run).num_classes(), defense=cfg.tune.defense)
    trainable = tune.with_resources(tune.with_parameters(DefenseTrial, spec=spec), {"CPU": TRIAL_DRIVER_CPU})
    searched = [k for k in knobs if not k.fixed]
    fixed = [k for k in knobs if k.fixed]
    echo(f"search '{search}' of run '{cfg.name}' at {sdir.display()}: {cfg.tune.num_samples} trials, "
         f"{concurrency} at a time, objective {metric} ({cfg.tune.mode}, clean floor {cfg.tune.clean_floor:g}), "
         f"each trial trains {'UDDN_adv and student_adv' if spec.defense == 'uddn_kt_adv' else 'UDDN, teacher and student'} "
         f"on {'GPU' if gpu else 'CPU'}")
    echo("  space: " + "; ".join(k.describe() for k in searched) + ("" if not fixed else
         "; fixed: " + ", ".join(k.describe() for k in fixed)))
    with user_errors(), tune_console(verbose=cfg.scale.worker_logs):
        if restoring:
            echo("  resuming the interrupted search (finished trials are kept)")
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=sdir.fs)
        else:
            tuner = _new_tuner(cfg, trainable, knobs=knobs, sdir=sdir, concurrency=concurrency, echo=echo)
        results = tuner.fit()
    best = summarize(cfg, results, knobs=knobs, sdir=sdir, search=search, metric=metric, concurrency=concurrency,
                     wall_s=time.perf_counter() - t0)
    _write_local_copy(sdir, best_config_path)
    return best


def saved_concurrency(sdir: Storage, default: int) -> int:
    """The concurrency a search started with (``search.json``), which a restored Tuner keeps."""
    try:
        return int(sdir.read_json("search.json").get("effective_concurrency", default))
    except RayDefenseError:
        return default


def _new_tuner(cfg: Config, trainable, *, knobs: Sequence[Knob], sdir: Storage, concurrency: int,
               echo: Callable[[str], None]):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    t = cfg.tune
    # Every trial reports the same epochs in the same order, so iteration i compares like with like.
    max_t = cfg.denoise.epochs + cfg.distill.teacher.epochs + cfg.distill.student.epochs
    searcher = RecordingOptunaSearch(record=sdir, seed=t.seed)
    return tune.Tuner(
        trainable,
        param_space=param_space(knobs),
        tune_config=tune.TuneConfig(
            metric="objective",
            mode=t.mode,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(t.grace_period, max_t),
                                    reduction_factor=t.reduction_factor),
            num_samples=t.num_samples,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name="experiment",
            storage_path=sdir.path(),
            storage_filesystem=sdir.fs,
            # A failed trial (its actor or node lost) restarts and replays its recorded epochs;
            # each inner TorchTrainer also retries its own worker group (training.make_trainer).
            failure_config=tune.FailureConfig(max_failures=cfg.scale.max_failures),
            verbose=0,
            callbacks=[_Progress(echo), *tune_callbacks(cfg.tracking, run_name=f"{cfg.name}/tune")],
        ),
    )




