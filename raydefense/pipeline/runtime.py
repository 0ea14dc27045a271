"""Ray plumbing shared by every stage: connecting to Ray, batch conversion, error unwrapping."""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import sys
import threading
import time
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch

from raydefense.config import Config
from raydefense.errors import ConfigError, RayDefenseError

log = logging.getLogger("raydefense")


def init_ray(cfg: Config) -> dict[str, Any]:
    """Connect to the cluster (``RAY_ADDRESS``, e.g. under ``ray job submit``, or one started on
    this machine with ``ray start``) or else start a local Ray.

    Returns the cluster's resources. On a small machine the local Ray gets a small object
    store and a couple of logical CPUs beyond the physical ones, so that Ray Data's read
    tasks still run while a training worker holds the physical cores. Inside a submitted job
    the job's runtime environment (working_dir, pip, env_vars) is what every worker gets; see
    ``_driver_runtime_env``.
    """
    import ray

    verbose = cfg.scale.worker_logs
    ray_notices(verbose=verbose)
    if not ray.is_initialized():
        runtime_env = _driver_runtime_env()
        # log_to_driver: workers' stdout/stderr; logging_level: the driver's "ray" logger (Ray's
        # INFO lines: which cluster, Tune's result folders). Both stay off the console unless
        # scale.worker_logs / --verbose.
        quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, **quiet)
        elif _running_local_cluster():
            ray.init(address="auto", runtime_env=runtime_env, **quiet)
        else:
            num_cpus = cfg.scale.num_cpus or max(2, (os.cpu_count() or 2) + 2)
            ray.init(
                num_cpus=num_cpus,
                object_store_memory=cfg.scale.object_store_memory_mb * 1024 * 1024,
                include_dashboard=False,
                runtime_env=runtime_env,
                **quiet,
            )
    ray_data_console(verbose=verbose, tty=sys.stdout.isatty())
    configure_data_context(ray.data.DataContext.get_current())  # every dataset this driver makes from now on
    return ray.cluster_resources()


def configure_data_context(context) -> None:
    """The project's Ray Data settings on ``context`` (a ``DataContext``): rows in order
    (:func:`keep_order`) and Parquet through Ray Data's V1 reader (``use_datasource_v2 = False``).

    Why V1: Ray 2.60's V2 Parquet reader lists files through a ``FooterFileIndexer`` that starts
    a pool of ``FooterReaderActor`` processes for every read and kills them after listing
    (``_RAY_DATA_DEFAULTS`` below trims the pool to 2; it is 32 by default). Footer statistics
    pay off for large remote datasets with predicate push-down; ours are a few Parquet shards read
    whole, and each read paid for starting those processes (``ListFiles`` 5.3 s of a 24 s attack
    pass over 120 images, 2026-12-03). The reader is chosen when ``read_parquet`` is called, so
    this must be set before."""
    keep_order(context)
    context.use_datasource_v2 = False


def keep_order(context) -> None:
    """Make the datasets of Ray Data ``context`` (a ``DataContext``) execute in order, so that two
    runs of one config batch and write the same rows the same way.

    Ray Data's default (``preserve_order`` off) passes blocks on as they finish: which rows share
    a ``map_batches`` batch, the batch sizes, and which rows land in which Parquet shard vary from
    run to run (four executions of one actor-pool ``map_batches`` over six files gave three
    different batchings). Per-row randomness is keyed by row id (``raydefense.seeding.row_seeds``),
    but float results still depend on the batch: FaceNet's logits differ by ~2e-8 between
    batches of 8 and 32, which an attack's sign() or an argmax can turn into another pixel or
    label. In order, a slow batch holds back the ones after it: a small cost for small runs."""
    context.execution_options.preserve_order = True


# Ray Data logs its progress through this logger when stdout is not a terminal (a job's log).
_RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress.logging_progress"
# ... and says through this one (its parent) how it chose what to show.
_RAY_DATA_PROGRESS_NOTICE_LOGGER = "ray.data._internal.progress"


# Ray's notice, each time a driver starts a local cluster, that token authentication is on (a
# WARNING of this logger): about Ray's defaults, not the run. --verbose shows it.
_RAY_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def ray_notices(*, verbose: bool) -> None:
    """Ray's start-up notices on the driver's console: only with ``verbose``, by logging level."""
    logging.getLogger(_RAY_TOKEN_NOTICE_LOGGER).setLevel(logging.NOTSET if verbose else logging.ERROR)


# Ray Tune's switch between its two console engines (ray/tune/experimental/output.py,
# get_air_verbosity): "0" is the first engine, which honours RunConfig(verbose=0).
_TUNE_OUTPUT_ENGINE = "RAY_AIR_NEW_OUTPUT"


@contextlib.contextmanager
def tune_console(*, verbose: bool) -> Iterator[None]:
    """What Ray Tune and Optuna print on the driver's console while a search is set up and run
    inside this block, set with their own switches (no text filtering).

    The search prints its own line per trial start and end and a summary
    (``raydefense.tune.search``); the Tuner runs with ``RunConfig(verbose=0)``. Ray 2.60's
    default console engine still prints, at the start of every fit and whatever ``verbose`` says,
    a "Configuration for experiment" table, "View detailed results here" and a TensorBoard hint
    that points at the driver's staging folder under ``/tmp/ray`` rather than where Tune's logs
    end up (``<run>/tune/<search>/experiment``). Tune's documented ``RAY_AIR_NEW_OUTPUT=0``
    selects its first engine, which prints nothing at ``verbose=0``; it is set for the length of
    the block only, and a value the user exported wins. Optuna announces each study it creates
    ("A new study created in memory", INFO on stderr); its logging verbosity is WARNING inside
    the block. ``verbose`` (``scale.worker_logs``, ``--verbose``) leaves both as they are.
    Errors still show: Tune logs a failed trial at ERROR and raises when the search fails."""
    if verbose:
        yield
        return
    import optuna

    optuna_level = optuna.logging.get_verbosity()
    engine_was = os.environ.get(_TUNE_OUTPUT_ENGINE)
    if engine_was is None:
        os.environ[_TUNE_OUTPUT_ENGINE] = "0"
    optuna.logging.set_verbosity(max(optuna_level, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(optuna_level)
        if engine_was is None:
            os.environ.pop(_TUNE_OUTPUT_ENGINE, None)


# Ray Serve's logger on the driver (ray/serve/_private/logging_utils.py: a console handler only;
# the controller and replicas write their own files under <session>/logs/serve/).
_RAY_SERVE_LOGGER = "ray.serve"


def serve_console(*, verbose: bool) -> None:
    """What Ray Serve prints on the driver's console: its WARNINGs and errors, and its INFO
    lines ("Started Serve in namespace", "Connecting to existing Serve app ... New http_options
    will not be applied", "Application ... is ready at") only with ``verbose``. Set on the console
    handler Serve gives its driver-side logger, as for Ray Data's (:func:`ray_data_console`).
    What Serve deployed, and one access line per request, stay in the controller's and
    replicas' log files (``<session>/logs/serve/``)."""
    import ray.serve  # noqa: F401  (configures the logger on import)

    _set_console_level(_RAY_SERVE_LOGGER, logging.INFO if verbose else logging.WARNING)


def _set_console_level(logger: str, level: int) -> None:
    """``level`` on the console handlers (stream handlers, not file ones) of ``logger``."""
    for handler in logging.getLogger(logger).handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(level)


def connects_to_cluster() -> bool:
    """Whether :func:`init_ray` joins a running cluster (``RAY_ADDRESS``, or a ``ray start``
    cluster on this machine) rather than starting a local Ray of its own, which ends with
    this process."""
    return bool(os.environ.get("RAY_ADDRESS")) or _running_local_cluster()


def ray_data_console(*, verbose: bool, tty: bool) -> None:
    """What Ray Data shows on the driver's console, set through Ray Data's own switches and
    logging levels (no text filtering).

    On a terminal: Ray Data's progress bars (one per operator), as always. Without one (``ray
    job submit``, a CI log), Ray Data logs its progress every
    ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` seconds instead; that stays, but as the dataset's
    total only (``enable_operator_progress_bars`` off: per-operator lines are a dozen lines
    every 10 s). Ray Data's other INFO records (execution summaries, sink statistics) go to its
    own log file (``ray-data.log`` in the session's logs) and not to the console; ``verbose``
    (``scale.worker_logs``, ``--verbose``) shows everything.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.enable_operator_progress_bars = tty or verbose
    ctx.print_on_execution_start = False
    # Ray Data's console handler is a StreamHandler; its ray-data.log handler is a file one.
    _set_console_level("ray.data", logging.INFO if verbose else logging.WARNING)
    # With the operator bars off on purpose, Ray Data's notice that they are off ("Progress bars
    # for operators disabled. To enable, ...", a WARNING of this logger, logged once) is not for
    # the user; its child logger, which carries the progress lines, keeps INFO.
    logging.getLogger(_RAY_DATA_PROGRESS_NOTICE_LOGGER).setLevel(
        logging.NOTSET if ctx.enable_operator_progress_bars else logging.ERROR)
    progress = logging.getLogger(_RAY_DATA_PROGRESS_LOGGER)
    progress.setLevel(logging.INFO)
    if not verbose and not any(getattr(h, "_raydefense_progress", False) for h in progress.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("  %(message)s"))
        handler._raydefense_progress = True  # type: ignore[attr-defined]  (added once per process)
        progress.addHandler(handler)  # and it still propagates to ray-data.log


def _driver_runtime_env() -> dict[str, Any] | None:
    """The ``runtime_env`` this driver passes to ``ray.init``: environment variables for every
    worker: quiet DeprecationWarnings and Ray Data's knobs (``_RAY_DATA_DEFAULTS``). Nothing
    else of this process's environment is forwarded (tests inject faults by killing processes
    or with trainer callbacks, never through variables read in product code).

    Inside a job started by ``ray job submit`` (or a KubeRay RayJob), Ray merges a driver's
    ``runtime_env`` into the job's own: field by field, env var by env var, and it refuses to
    connect (``ValueError: Failed to merge the Job's runtime env ...``) when both name the same
    field or variable (``ray/_private/worker.py`` ``init``, ``ray/runtime_env/runtime_env.py``
    ``_merge_runtime_env``). So within a job this returns only the variables the job's runtime
    env does not set (the job's value wins) and never a working_dir or pip: the job's
    working_dir, pip and env_vars reach the workers unchanged. None when there is nothing to add.
    """
    env = {"PYTHONWARNINGS": "ignore::DeprecationWarning", **_ray_data_env()}
    job_env_vars = _submitted_job_env_vars()
    if job_env_vars is not None:
        env = {k: v for k, v in env.items() if k not in job_env_vars}
    return {"env_vars": env} if env else None


# Ray Data 2.60 reads Parquet footers through a pool of 32 FooterReader actors per read, made
# and killed anew for every read_parquet execution (ray/data/_internal/datasource_v2/formats/
# parquet/footer_file_indexer.py). Every training worker reads its datasets, so one 2-worker fit
# started over a hundred Python processes; on a small node that worker storm took minutes and
# starved the stage (raylet: "N PYTHON worker processes have been started ... Nx the maximum
# expected startup concurrency"). Our runs read tens of files, not thousands: a pool of two
# is plenty. Ray's own knob; a value set by the user or the job wins.
_RAY_DATA_DEFAULTS = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}


def _ray_data_env() -> dict[str, str]:
    """Ray Data settings for this driver and every worker (see ``_RAY_DATA_DEFAULTS``)."""
    env = {k: os.environ.get(k, v) for k, v in _RAY_DATA_DEFAULTS.items()}
    for k, v in env.items():
        os.environ.setdefault(k, v)  # reads listed from this process
    return env


def _submitted_job_env_vars() -> dict[str, str] | None:
    """The env_vars of the job's runtime env when this driver runs as a submitted job's
    entrypoint, else None. Ray's job supervisor hands the job's config to the entrypoint in
    ``RAY_JOB_CONFIG_JSON_ENV_VAR``; ``ray.init`` reads it the same way (there is no public API
    for it in Ray 2.60)."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.job_config import JobConfig

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if raw is None:
        return None
    runtime_env = JobConfig.from_json(json.loads(raw)).runtime_env or {}
    return dict(runtime_env.get("env_vars") or {})


def _running_local_cluster() -> bool:
    """Whether a ``ray start`` cluster runs on this machine for ``address='auto'``: its address
    file exists and its GCS answers. A cluster stopped by killing its processes (not by
    ``ray stop``) leaves the file behind; joining that address would fail, so a stale file
    means "no cluster" and a local Ray is started."""
    import socket

    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            host, _, port = f.read().strip().rpartition(":")
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def use_gpu(cfg: Config) -> bool:
    """GPU work only where the config asks for it and the cluster has GPUs."""
    if not cfg.scale.use_gpu:
        return False
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def pool_map(ds, cls, kwargs: dict[str, Any], *, cfg: Config, gpu: bool, batch_size: int):
    """``ds.map_batches`` of ``cls`` instances (:func:`map_instances`) on a pool of
    :func:`pool_actors` workers: one GPU (and the one CPU Ray Data reserves beside it) per actor
    when ``gpu``, else ``scale.cpus_per_actor`` CPUs each; ``cls`` uses ``scale.cpus_per_actor``
    torch threads (it takes ``gpu`` and ``threads`` keyword arguments besides ``kwargs``). The
    rows reach the pool in order and re-cut into blocks of ``batch_size`` (Ray's streaming
    repartition), so every batch but the last is full.

    Fault tolerance is Ray's own. In an actor pool, an actor that dies (its process killed, its
    node lost) is restarted and its unfinished batches are retried on the pool: Ray Data gives
    actor pools ``max_restarts=-1`` and ``max_task_retries=-1`` unless told otherwise
    (ray/data/_internal/execution/operators/actor_pool_map_operator.py; passing them again is a
    deprecated ``ray_remote_args`` in Ray 2.60, so they are not restated here). In a task pool a
    task whose worker dies is retried by Ray (its default ``max_retries`` for a lost worker).
    tests/distributed/test_faults.py kills a map process mid-stage in both. An exception raised by
    ``cls`` itself is a user error and is not retried."""
    keep_order(ds.context)  # also where no init_ray ran in this process (a Tune trial, a test)
    # Ray Data cuts batches within a block bundle and never carries a block's remainder over to
    # the next one: blocks of 36 rows (a Parquet shard split for read parallelism) gave batches of
    # 32 + 4, and on CPU a batch of 4 costs several times per image what a batch of 32 does.
    # Ray's streaming repartition (no shuffle; strict: every block but the last has exactly this
    # many rows) makes every batch but the last a full one.
    ds = ds.repartition(target_num_rows_per_block=batch_size, strict=True)
    return map_instances(ds, cls, {**kwargs, "gpu": gpu, "threads": int(cfg.scale.cpus_per_actor)}, cfg=cfg, gpu=gpu,
                         batch_size=batch_size, size=pool_actors(cfg, gpu=gpu))


def map_compute(cfg: Config, *, gpu: bool) -> str:
    """``"tasks"`` or ``"actors"``: how :func:`map_instances` holds its ``cls`` instances
    (``scale.map_compute``; ``auto``: actors on GPU, tasks on CPU).

    Why tasks on CPU: an actor pool's processes live for one Dataset execution, so every model
    stage paid a process start and the imports of torch, torchvision and facenet-pytorch per
    actor (5-7 CPU-seconds each, 9 actors a default run), and Ray Core prints an ERROR line on
    the console at the driver's first actor pool ("constructor arguments in the object store",
    once per process; ray-project/ray#57733). Task workers are Ray's
    pooled processes: a stage's tasks share them, and later stages reuse those still alive.
    Measured (README, Performance): the whole attack stage 1.10x faster on 2 tasks than on 2
    actors (bench section 2, interleaved); the default run 404-414 s against 419 s, same report.
    Ray's worker-pool defaults stay: keeping idle workers alive longer made a 2-thread training
    step 1.32x slower (10 idle Ray workers, interleaved probe).

    Why actors on GPU: an actor holds the GPU Ray gave it for its whole life, so its CUDA context
    and models sit on the right device. A task gets its GPU per task: Ray ends a GPU task's
    process after one task (``max_calls=1`` for GPU remote functions, ray/remote_function.py, to
    free the device's memory), so every GPU batch would pay a process start, the imports and the
    model load; :func:`map_instances` keeps its GPU task processes (``max_calls=0``), and then a
    reused process on a node with several GPUs is given GPU 0 for one task and GPU 1 for the next
    (Ray 2.60, seen with two GPU resources: tests/pipeline/gpu_task_pool_probe.py) while CUDA
    stays on the first. So ``scale.map_compute: tasks`` on GPU is refused on multi-GPU nodes
    (:func:`_refuse_multi_gpu_nodes`, and per task :func:`_check_gpu_assignment`), and ``auto``
    picks actors on GPU. The price: Ray Core's one "constructor arguments in the object store"
    line per GPU run (README, Watch a run). Where it is allowed (one GPU per node), a GPU task
    process frees an execution's instance and torch's CUDA cache once it has been idle for
    ``GPU_IDLE_RELEASE_S`` (:func:`_release_idle_gpu_instances`), so the next stage's training
    finds the device as an actor pool would leave it, but for the process's CUDA context.
    """
    if cfg.scale.map_compute != "auto":
        return cfg.scale.map_compute
    return "actors" if gpu else "tasks"


# Per worker process: the instances map tasks built, by execution (map_instances), newest last.
_INSTANCES: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
# Two: one execution's, and one more for two executions sharing the processes (parallel trials).
_INSTANCES_KEPT = 2


# Per worker process: the CUDA_VISIBLE_DEVICES Ray set for the first GPU map task run here (the
# device its CUDA context and every instance it built live on); None until then.
_CUDA_DEVICES: Optional[str] = None


def _check_gpu_assignment() -> None:
    """Refuse a GPU map task that Ray gave another GPU than the one this reused process
    initialised CUDA on (see :func:`map_instances`): it would run on the wrong device, beside
    the task that owns that one.

    Raises:
        ConfigError: the GPU Ray assigned (``CUDA_VISIBLE_DEVICES``, set per task) is not the
            one this process's CUDA context was made for.
    """
    global _CUDA_DEVICES
    assigned = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if _CUDA_DEVICES is None:
        _CUDA_DEVICES = assigned
    elif assigned != _CUDA_DEVICES:
        raise ConfigError(
            f"scale.map_compute=tasks on GPUs: Ray gave this reused task process GPU '{assigned}', but its CUDA "
            f"context is on GPU '{_CUDA_DEVICES}' (a process keeps the devices it first saw); on nodes with several "
            f"GPUs use scale.map_compute=actors (what auto picks on GPU)")


def _call_instance(batch: dict[str, np.ndarray], *, key: str, cls: type, kwargs: dict[str, Any],
                   gpu: bool = False) -> Any:
    """Ray Data map task of :func:`map_instances`: the process's ``cls(**kwargs)`` for the
    execution ``key`` (built on its first batch here) called on ``batch``; on GPU only if Ray
    gave the task the GPU this process uses (:func:`_check_gpu_assignment`), and the instance is
    freed once idle (:func:`_release_idle_gpu_instances`)."""
    if gpu:
        _check_gpu_assignment()
    with _INSTANCES_LOCK:
        instance = _INSTANCES.get(key)
        if instance is None:
            instance = cls(**kwargs)
            _INSTANCES[key] = instance
            while len(_INSTANCES) > _INSTANCES_KEPT:
                _INSTANCES.popitem(last=False)
        else:
            _INSTANCES.move_to_end(key)
        if gpu:
            _GPU_IN_USE[key] = _GPU_IN_USE.get(key, 0) + 1
            _start_gpu_releaser()
    try:
        return instance(batch)
    finally:
        if gpu:
            with _INSTANCES_LOCK:
                _GPU_IN_USE[key] -= 1
                _GPU_LAST_USE[key] = time.monotonic()


# A GPU task process outlives its stage in Ray's worker pool (max_calls=0), and with it the
# instance's models and torch's CUDA cache, while the next stage trains on the same GPU. An
# execution never reuses another's instance (a new key each), so freeing an idle one costs
# nothing: after this many seconds without a batch it is dropped and the cache emptied. What
# stays is the process's CUDA context.
GPU_IDLE_RELEASE_S = 10.0
_INSTANCES_LOCK = threading.RLock()
_GPU_IN_USE: dict[str, int] = {}
_GPU_LAST_USE: dict[str, float] = {}
_GPU_RELEASER: Optional[threading.Thread] = None


def _start_gpu_releaser() -> None:
    global _GPU_RELEASER
    if _GPU_RELEASER is None or not _GPU_RELEASER.is_alive():
        _GPU_RELEASER = threading.Thread(target=_gpu_releaser_loop, name="raydefense-gpu-release", daemon=True)
        _GPU_RELEASER.start()


def _gpu_releaser_loop() -> None:
    while True:
        time.sleep(max(GPU_IDLE_RELEASE_S / 4, 0.01))
        _release_idle_gpu_instances()


def _release_idle_gpu_instances(now: Optional[float] = None) -> list[str]:
    """Drop the GPU instances of this process that no batch has used for
    ``GPU_IDLE_RELEASE_S`` seconds and none is using now, then empty torch's CUDA cache so the
    memory goes back to the device; returns the executions dropped."""
    now = time.monotonic() if now is None else now
    with _INSTANCES_LOCK:
        idle = [k for k, t in _GPU_LAST_USE.items()
                if _GPU_IN_USE.get(k, 0) == 0 and now - t >= GPU_IDLE_RELEASE_S]
        for k in idle:
            _INSTANCES.pop(k, None)
            _GPU_LAST_USE.pop(k, None)
            _GPU_IN_USE.pop(k, None)
    if idle:
        import gc

        gc.collect()
        torch.cuda.empty_cache()  # a no-op where CUDA was never initialised
    return idle


def map_instances(ds, cls, kwargs: dict[str, Any], *, cfg: Config, gpu: bool, batch_size: int, size: int):
    """``ds.map_batches`` with ``cls(**kwargs)`` called on each batch of ``batch_size`` rows, on
    ``size`` workers of ``scale.cpus_per_actor`` CPUs (on GPU: one GPU each and Ray Data's CPU
    beside it), held as :func:`map_compute` says: an ``ActorPoolStrategy`` of ``cls`` (one
    instance per actor), or a ``TaskPoolStrategy`` of at most ``size`` concurrent tasks whose
    worker processes build ``cls`` once per execution and keep it for the next batches
    (:func:`_call_instance`; an execution is one call of this function)."""
    import uuid

    import ray

    resources = {"num_gpus": 1} if gpu else {"num_cpus": cfg.scale.cpus_per_actor}
    if map_compute(cfg, gpu=gpu) == "actors":
        # On GPU Ray Data's own default: 1 GPU and 1 CPU per actor (it reserves the CPU itself
        # and warns on the console when both are given).
        return ds.map_batches(cls, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                              compute=ray.data.ActorPoolStrategy(size=size), **resources)
    key = f"{cls.__module__}.{cls.__qualname__}:{uuid.uuid4().hex}"
    if gpu:
        # Ray's default for a GPU task ends its process after the task (max_calls=1); 0 keeps the
        # process, and with it the instance this execution built, as on CPU. Safe only where a node
        # has one GPU: Ray hands a reused process whichever GPU is free, task by task.
        _refuse_multi_gpu_nodes()
        resources["max_calls"] = 0
    return ds.map_batches(_call_instance, fn_kwargs={"key": key, "cls": cls, "kwargs": kwargs, "gpu": gpu},
                          batch_size=batch_size, compute=ray.data.TaskPoolStrategy(size=size), **resources)


def _refuse_multi_gpu_nodes(nodes: Optional[list[dict[str, Any]]] = None) -> None:
    """Refuse GPU task pools on a cluster with a node of several GPUs (``nodes``: default
    ``ray.nodes()``), before the stage starts: Ray sets ``CUDA_VISIBLE_DEVICES`` per task, so a
    reused task process is given GPU 0 for one task and GPU 1 for the next (seen on Ray 2.60,
    tests/pipeline/gpu_task_pool_probe.py), while CUDA keeps the device it first saw.
    :func:`_check_gpu_assignment` is the guard for a node that joins later.

    Raises:
        ConfigError: naming the node and its GPUs, and ``scale.map_compute``.
    """
    if nodes is None:
        import ray

        nodes = ray.nodes()
    for node in nodes:
        gpus = float(node.get("Resources", {}).get("GPU", 0.0))
        if node.get("Alive", True) and gpus > 1:
            raise ConfigError(
                f"scale.map_compute=tasks on GPUs: node {node.get('NodeManagerAddress', '?')} has {gpus:g} GPUs, and "
                f"Ray hands a reused task process a different GPU from one task to the next while its CUDA context "
                f"stays on the first; use scale.map_compute=actors (what auto picks on GPU)")


def pool_actors(cfg: Config, *, gpu: bool, gpus: Optional[float] = None) -> int:
    """How many workers :func:`pool_map` starts: ``scale.attack_actors`` on CPU; on GPU one per
    GPU, at most ``scale.attack_actors`` and at most the whole GPUs the cluster has when the
    stage starts (``gpus``, default ``ray.cluster_resources()``), so that a CPU-tuned preset
    (the default's two 1-thread actors) also runs on a one-GPU machine instead of leaving an
    actor pending forever. Ray Data's usual GPU pool: ``num_gpus=1``, one actor per device."""
    actors = max(1, int(cfg.scale.attack_actors))
    if not gpu:
        return actors
    if gpus is None:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0.0)
    return max(1, min(actors, int(math.floor(float(gpus) + 1e-9))))


def pool_batch_size(rows: int, *, cfg: Config, batch_size: int, batches_per_actor: int = 1,
                    actors: Optional[int] = None) -> int:
    """The batch size for ``rows`` rows on :func:`pool_map`'s pool of ``actors`` actors
    (default ``scale.attack_actors``; pass :func:`pool_actors`' count on GPU): ``batch_size``,
    or less where ``rows`` would otherwise give an actor fewer than ``batches_per_actor`` batches.
    More batches than actors balance rows of unequal cost: Ray Data hands an actor its next
    batch when one of its two in flight is done. A single actor keeps whole batches (nothing to
    balance; a GPU wants them large). Only for stages whose rows do
    not depend on their batch (per-row seeds). Measured: the default's whole-model attacks, 48
    rows, were one batch at ``eval.batch_size`` 64, then two of 24 on two actors, one of which
    finished ~30 s before the other (early-stopped rows; two cores 60% busy)."""
    actors = max(1, int(cfg.scale.attack_actors if actors is None else actors))
    per = actors * (max(1, int(batches_per_actor)) if actors > 1 else 1)
    return max(1, min(int(batch_size), math.ceil(int(rows) / per)))


def device_for(gpu: bool) -> torch.device:
    return torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")


def find_user_error(exc: BaseException) -> RayDefenseError | None:
    """Walk Ray's exception wrappers (RayTaskError, UserCodeException, WorkerGroupError...)."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RayDefenseError):
            return e
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
        # Train V2's WorkerGroupError keeps per-worker errors in a dict.
        worker_failures = getattr(e, "worker_failures", None)
        if isinstance(worker_failures, Mapping):
            stack.extend(worker_failures.values())
        # Ray Data re-raises an error of a map UDF as UserCodeException("UDF failed to process a
        # data block") from the original, and the cause does not survive the pickling back to the
        # driver; only the remote traceback's text (in RayTaskError's str) names our class. Ray
        # Data's own switch (DataContext.raise_original_map_exception) keeps the type but then
        # logs the whole traceback on the console (tried: test_identity_folder_of_unreadable_files
        # fails), so the class is recovered from its name here.
        text = str(e)
        for cls in _user_error_classes():
            marker = f"{cls.__module__}.{cls.__name__}: "
            short = f"{cls.__name__}: "
            for m in (marker, short):
                if m in text:
                    msg = text.split(m, 1)[1].strip().splitlines()[0]
                    return cls(msg)
    return None


def _user_error_classes() -> list[type[RayDefenseError]]:
    from raydefense.errors import ConfigError, DataError, ModelError, StorageError

    return [DataError, StorageError, ConfigError, ModelError]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a RayDefenseError raised inside a Ray task/actor/worker as itself."""
    try:
        yield
    except RayDefenseError:
        raise
    except Exception as exc:
        found = find_user_error(exc)
        if found is not None:
            raise found from None
        raise


def images_to_tensor(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1]."""
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(images))
    if t.dtype == torch.uint8:
        t = t.float().div_(255.0)
    return t.permute(0, 3, 1, 2).contiguous().to(device)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), rounded to the nearest level."""
    return (x.detach().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
