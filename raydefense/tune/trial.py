"""One trial of a defense search: the pipeline's own training loops, run from a Tune trainable.

A trial takes sampled values (lambda, T, guidance layer, learning rates, width), applies
them to the run's config, and trains, on Ray Train, the pipeline's own training tasks (the
same functions build them; the trial adds only Tune's reporting and stopping):

1. ``uddn``: the denoiser of section 3 with the trial's guidance (``denoise.denoiser_task``);
2. ``teacher``: the target's architecture on images that trial's UDDN denoised, with
   one-hot labels (section 4.2; ``distill.teacher_args``);
3. ``student``: the same architecture with equation 6, KL(Pt||Ps) + lambda KL(Pt^T||Ps^T)
   (``distill.student_args``). UDDN + student is the model the paper publishes.

Every epoch of every phase becomes one Tune result with ``val_white_acc`` and
``val_clean_acc`` (the accuracy of that phase's model behind the trial's UDDN on the
white-box validation images and on their clean originals), ``objective`` (see
:func:`raydefense.tune.space.objective`), ``phase`` and ``complete`` (the student's last
epoch). Trials are compared phase by phase and epoch by epoch, which is what ASHA needs.

Why a class trainable and a handshake, not a function with ``TuneReportCallback``: each
phase is a ``TorchTrainer`` whose controller actor belongs to the trial actor. When ASHA
stops a function trial, Tune ends its actor at once; the controller dies with it and the
workers' placement group stays reserved (Ray Train's detached cleaner needs the state API,
which a local Ray without dashboard, or a host with several local Rays, does not offer), so
the next trial waits forever for CPUs. Here every result waits for Tune's decision before
training goes on: the inner run's report callback puts the result on a queue and blocks
until :meth:`DefenseTrial.step` (continue) or :meth:`DefenseTrial.cleanup` (stop) answers;
on stop the controller aborts itself, which releases its workers, and ``cleanup`` waits for
that before the actor ends. A new phase never starts before Tune accepted the last epoch of
the previous one.

Resumption: everything a trial writes is named by its Tune trial id. Each inner Ray Train
run resumes from its last checkpoint (same storage path and name); a finished phase (its
``models/...pt`` exists) is not trained again, and the epochs it reported are replayed to
Tune from ``trials/<id>/history.json`` so the trial's curve stays whole; a trial whose
``trials/<id>/result.json`` exists only replays.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from ray import tune

from raydefense.config import from_dict
from raydefense.pipeline.run import RunContext
from raydefense.storage import Storage
from raydefense.tune.space import Knob, apply_params, objective, overrides_for

PHASES = ("uddn", "teacher", "student")
# tune.defense = uddn_kt_adv (issue 13): the adversarially trained UDDN, then the ARD-style student
# behind it (raydefense.pipeline.robust), on the base run's UDDN, teacher and student.
ROBUST_PHASES = ("uddn_adv", "student_adv")
_END = "__end__"  # the runner thread finished (or failed)
_CONTINUE, _STOP = "continue", "stop"
# How long cleanup waits for a stopped trial's inner run to release its workers.
STOP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of one search shares (pickled into each trial actor).

    Args:
        cfg: the search's config as a dict (``Config.to_dict``); a trial applies its values to it.
        run: the base run's root (data, target model): ``<storage>/<run name>``.
        search: the search's root: ``<run>/tune/<search name>``.
        name: the search name (names artifacts ``models/tune/<search>/<trial id>/<phase>.pt``).
        knobs: the search space (fixed knobs included).
        metric, mode, clean_floor: the objective (``tune.metric``, ``tune.mode``, ``tune.clean_floor``).
        gpu: train on GPUs (``scale.use_gpu`` and the cluster has GPUs).
        num_classes: identities in the run's data.
    """

    cfg: dict[str, Any]
    run: Storage
    search: Storage
    name: str
    knobs: tuple[Knob, ...]
    metric: str
    mode: str
    clean_floor: float
    gpu: bool
    num_classes: int
    defense: str = "uddn_kt"  # tune.defense

    @property
    def phases(self) -> tuple[str, ...]:
        return ROBUST_PHASES if self.defense == "uddn_kt_adv" else PHASES

    def artifact(self, trial_id: str, phase: str) -> str:
        return f"tune/{self.name}/{trial_id}/{phase}"


def phase_result(metrics: dict[str, Any], *, phase: str, last_epoch: int, spec: TrialSpec) -> dict[str, Any]:
    """A Tune result from one epoch's report of an inner training loop.

    ``last_epoch`` is the student's last epoch: its result is the trial's final one (``complete``).
    """
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    if "val_clean_acc" not in out and "val_acc" in out:  # the robust student: clean images behind its UDDN
        out["val_clean_acc"] = out["val_acc"]
    out["phase"] = phase
    out["phase_index"] = spec.phases.index(phase)
    out["phase_epoch"] = int(metrics.get("epoch", 0))
    out["complete"] = phase == spec.phases[-1] and out["phase_epoch"] == last_epoch
    out["objective"] = objective(out, metric=spec.metric, mode=spec.mode, clean_floor=spec.clean_floor)
    return out


class _Stopped(Exception):
    """Tune stopped the trial (ASHA): end the runner without an error."""


@dataclass
class Channel:
    """Two Ray queues between a trial actor and the inner runs' report callbacks.

    ``send`` puts one result and blocks until the trial answers: True to go on, False when
    Tune stopped the trial. It works from the trial actor (replayed epochs) and from a Ray
    Train controller (live epochs) alike.
    """

    results: Any  # ray.util.queue.Queue of result dicts (and _END)
    answers: Any  # ray.util.queue.Queue of _CONTINUE / _STOP

    def send(self, result: dict[str, Any]) -> bool:
        self.results.put(result)
        return self.answers.get() == _CONTINUE


def _reporter(*, phase: str, last_epoch: int, spec: TrialSpec, trial: Storage, history: list[dict[str, Any]],
              channel: Channel):
    """The inner ``TorchTrainer``'s callback: each epoch's report becomes a Tune result, is
    appended to ``history.json``, and waits for Tune's decision; on stop, the controller aborts
    itself (its workers and their placement group are released)."""
    from ray.train import UserCallback

    class TrialReporter(UserCallback):
        def __init__(self) -> None:
            self.history = list(history)

        def after_report(self, run_context, metrics, checkpoint):
            import ray

            result = phase_result(metrics[0], phase=phase, last_epoch=last_epoch, spec=spec)
            if any(h["phase"] == phase and h["phase_epoch"] == result["phase_epoch"] for h in self.history):
                return  # reported (and replayed) before the trial restarted
            self.history.append(result)
            trial.write_json("history.json", self.history)
            if not channel.send(result):
                ray.get_runtime_context().current_actor.abort.remote()

    return TrialReporter()


def _fit(spec: TrialSpec, cfg, task, *, callback, stopping: threading.Event) -> None:
    """One inner Ray Train run of the pipeline's ``task`` (a TrainingTask), plus Tune's callback,
    under ``<search>/train/<task.name>``."""
    from raydefense.pipeline.runtime import user_errors

    trainer = task.trainer(cfg, spec.search, gpu=spec.gpu, callbacks=[callback])
    try:
        with user_errors():
            trainer.fit()
    except Exception as exc:
        if stopping.is_set():
            # The controller aborted itself as asked, and the run fails because of that abort;
            # the failure is kept as the cause so a real error at the same moment stays visible.
            raise _Stopped() from exc
        raise
    if stopping.is_set():
        raise _Stopped()


def _denoised_sets(ctx: RunContext, *, spec: TrialSpec, trial: Storage, denoiser: str) -> dict[str, Any]:
    """Training and validation sets for the teacher and student, denoised by the trial's UDDN.

    The training set is the pipeline's (:func:`raydefense.pipeline.distill.denoised_training_set`),
    written once under ``trials/<id>/denoised``; the small validation sets are computed once per
    trial and kept in the object store. Each Ray Data execution has a single denoising actor
    pool, so that it fits beside the other trials' workers on a small cluster.
    """
    from raydefense.pipeline.distill import denoise_images, denoised_training_set
    from raydefense.pipeline.run import RunLayout
    from raydefense.pipeline.runtime import user_errors

    train = denoised_training_set(ctx, gpu=spec.gpu, denoiser=denoiser, out=(RunLayout(trial), "denoised"))
    with user_errors():
        val_white = denoise_images(ctx, ctx.layout.read_adv("val_white", ["adv", "label"]), denoiser=denoiser,
                                   column="adv", gpu=spec.gpu).materialize()
        val_clean = denoise_images(ctx, ctx.layout.read_adv("val_white", ["clean", "label"]), denoiser=denoiser,
                                   column="clean", gpu=spec.gpu).materialize()
    return {"train": train, "val": ctx.layout.read_clean("val", ["image", "label"]), "val_white": val_white,
            "val_clean": val_clean}


def train_trial(params: dict[str, Any], spec: TrialSpec, *, trial_id: str, channel: Channel,
                stopping: threading.Event) -> None:
    """Train (or resume, or only replay) one trial's three phases, sending every epoch's result.

    Raises ``_Stopped`` when Tune stopped the trial.
    """
    from raydefense.pipeline.classifiers import classifier_task
    from raydefense.pipeline.denoise import denoiser_args, denoiser_task
    from raydefense.pipeline.distill import student_args, teacher_args
    from raydefense.pipeline.run import RunLayout

    t0 = time.perf_counter()
    base = from_dict(spec.cfg)
    cfg = apply_params(base, params, spec.knobs)
    if spec.defense == "uddn_kt_adv":
        return _train_robust_trial(params, spec, base=base, cfg=cfg, trial_id=trial_id, channel=channel,
                                   stopping=stopping, t0=t0)
    last_epoch = cfg.distill.student.epochs - 1
    trial = spec.search.child("trials", trial_id)
    if not trial.exists(RunLayout.CONFIG):
        trial.write_text(RunLayout.CONFIG, cfg.to_yaml())
    ctx = RunContext(cfg=cfg, storage=spec.run, echo=lambda _msg: None)

    def history() -> list[dict[str, Any]]:
        return trial.read_json("history.json") if trial.exists("history.json") else []

    def replay(phase: str) -> list[dict[str, Any]]:
        done = history()
        for h in done:
            if h["phase"] == phase and not channel.send(dict(h)):
                raise _Stopped()
        return done

    if trial.exists("result.json"):  # finished before the driver was killed: only replay
        for phase in PHASES:
            replay(phase)
        return

    uddn, teacher, student = (spec.artifact(trial_id, p) for p in PHASES)
    done = replay("uddn")
    if not ctx.layout.has_model(uddn):
        task = denoiser_task(ctx, denoiser_args(cfg, "uddn", artifact=uddn), name=f"{trial_id}_uddn")
        _fit(spec, cfg, task, callback=_reporter(phase="uddn", last_epoch=last_epoch, spec=spec, trial=trial,
                                                 history=done, channel=channel),
             stopping=stopping)

    sets: Optional[dict[str, Any]] = None
    val_sets = ("val", "val_white", "val_clean")
    for phase, args in (
        ("teacher", teacher_args(cfg, num_classes=spec.num_classes, artifact=teacher, val_sets=val_sets)),
        ("student", student_args(cfg, num_classes=spec.num_classes, teacher=teacher, artifact=student,
                                 val_sets=val_sets)),
    ):
        done = replay(phase)
        if ctx.layout.has_model(args.artifact):
            continue
        if sets is None:
            sets = _denoised_sets(ctx, spec=spec, trial=trial, denoiser=uddn)
        task = classifier_task(ctx, args, sets, name=f"{trial_id}_{phase}")
        _fit(spec, cfg, task, callback=_reporter(phase=phase, last_epoch=last_epoch, spec=spec, trial=trial,
                                                 history=done, channel=channel),
             stopping=stopping)

    final = [h for h in history() if h["phase"] == PHASES[-1]]
    trial.write_json("result.json", {
        "trial_id": trial_id, "params": dict(params), "overrides": overrides_for(base, params, spec.knobs),
        "metrics": final[-1] if final else {}, "duration_s": time.perf_counter() - t0, "finished_at": time.time(),
    })


def _train_robust_trial(params: dict[str, Any], spec: TrialSpec, *, base, cfg, trial_id: str, channel: Channel,
                        stopping: threading.Event, t0: float) -> None:
    """A ``tune.defense: uddn_kt_adv`` trial (issue 13): the pipeline's own robust tasks with the
    trial's robust.* values: the UDDN on online PGD through UDDN + target, then the student
    ARD-style through the trial's UDDN + student; each epoch reports ``val_pgd_acc`` (whole-model
    PGD accuracy at the trial's training eps on the validation split) and ``val_clean_acc``."""
    import dataclasses

    from raydefense.pipeline.classifiers import classifier_task
    from raydefense.pipeline.models import clean_training_sets
    from raydefense.pipeline.robust import robust_denoiser_args, robust_denoiser_task, student_adv_args
    from raydefense.pipeline.run import RunLayout

    last_epoch = cfg.robust.student.epochs - 1
    trial = spec.search.child("trials", trial_id)
    if not trial.exists(RunLayout.CONFIG):
        trial.write_text(RunLayout.CONFIG, cfg.to_yaml())
    ctx = RunContext(cfg=cfg, storage=spec.run, echo=lambda _msg: None)

    def history() -> list[dict[str, Any]]:
        return trial.read_json("history.json") if trial.exists("history.json") else []

    def replay(phase: str) -> list[dict[str, Any]]:
        done = history()
        for h in done:
            if h["phase"] == phase and not channel.send(dict(h)):
                raise _Stopped()
        return done

    if trial.exists("result.json"):
        for phase in ROBUST_PHASES:
            replay(phase)
        return
    uddn, student = (spec.artifact(trial_id, p) for p in ROBUST_PHASES)
    tasks = (
        ("uddn_adv", uddn, lambda: robust_denoiser_task(
            ctx, dataclasses.replace(robust_denoiser_args(cfg), artifact=uddn), name=f"{trial_id}_uddn_adv")),
        ("student_adv", student, lambda: classifier_task(
            ctx, student_adv_args(cfg, num_classes=spec.num_classes, preprocess=uddn, artifact=student),
            clean_training_sets(ctx), name=f"{trial_id}_student_adv")),
    )
    for phase, artifact, make in tasks:
        done = replay(phase)
        if ctx.layout.has_model(artifact):
            continue
        _fit(spec, cfg, make(), callback=_reporter(phase=phase, last_epoch=last_epoch, spec=spec, trial=trial,
                                                   history=done, channel=channel), stopping=stopping)
    final = [h for h in history() if h["phase"] == ROBUST_PHASES[-1]]
    trial.write_json("result.json", {
        "trial_id": trial_id, "params": dict(params), "overrides": overrides_for(base, params, spec.knobs),
        "metrics": final[-1] if final else {}, "duration_s": time.perf_counter() - t0, "finished_at": time.time(),
    })


class DefenseTrial(tune.Trainable):
    """The Tune trainable of a defense search: ``step`` returns the next epoch's result.

    ``setup`` starts :func:`train_trial` in a thread; ``step`` answers the previous result
    (continue) and waits for the next; the student's last epoch ends the trial (``done``)
    once the thread has saved the student and ``result.json``. ``cleanup`` answers stop
    when Tune stopped the trial early and waits until the inner run has released its workers.
    """

    def setup(self, config: dict[str, Any], spec: TrialSpec) -> None:
        from ray.util.queue import Queue

        self.spec = spec
        self.channel = Channel(results=Queue(actor_options={"num_cpus": 0}),
                               answers=Queue(actor_options={"num_cpus": 0}))
        self.stopping = threading.Event()
        self.error: Optional[BaseException] = None
        self.waiting = False  # a result was handed to Tune and awaits its answer
        self.last: dict[str, Any] = {}
        params = {k: v for k, v in config.items()}
        self.runner = threading.Thread(target=self._run, args=(params,), name="defense-trial", daemon=True)
        self.runner.start()

    def _run(self, params: dict[str, Any]) -> None:
        try:
            train_trial(params, self.spec, trial_id=self.trial_id, channel=self.channel, stopping=self.stopping)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to Tune by step()
            self.error = exc
        finally:
            self.channel.results.put(_END)

    def _next(self) -> Any:
        while True:
            try:
                return self.channel.results.get(timeout=1.0)
            except queue.Empty:  # ray.util.queue.Empty is one
                continue

    def _end(self) -> dict[str, Any]:
        self.runner.join()
        if self.error is not None:
            raise self.error
        return {**self.last, "done": True}

    def step(self) -> dict[str, Any]:
        if self.waiting:
            self.channel.answers.put(_CONTINUE)
            self.waiting = False
        item = self._next()
        if item == _END:
            return self._end()
        self.last = item
        if item.get("complete"):
            # The last epoch: let the run finish (save the student, write result.json), then end.
            self.channel.answers.put(_CONTINUE)
            end = self._next()
            if end != _END:
                raise RuntimeError(f"trial {self.trial_id}: a result after the last epoch ({end})")
            return self._end()
        self.waiting = True
        return dict(item)

    def save_checkpoint(self, checkpoint_dir: str) -> dict[str, Any]:
        # A trial's state is its Ray Train checkpoints and history.json on the search's
        # storage (see the module docstring); Tune's checkpoint only names the trial.
        return {"trial_id": self.trial_id}

    def load_checkpoint(self, checkpoint: Any) -> None:
        pass  # train_trial resumes from the storage by itself

    def cleanup(self) -> None:
        if self.runner.is_alive():
            # Answer the pending result, or else the next one, with stop; the inner run
            # aborts (releasing its workers) and the runner ends.
            self.stopping.set()
            self.channel.answers.put(_STOP)
            self.waiting = False
            self.runner.join(timeout=STOP_TIMEOUT_S)
