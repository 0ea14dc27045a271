"""A run: its storage, its config, its stages, and the markers that make reruns resume.

:class:`RunLayout` is the one place that knows where a run's files live and how its data is
read and written. Layout under ``<storage>/<name>/``::

    config.yaml            the resolved config (written first; a rerun must match it)
    stages/<stage>.json    written LAST by a stage, after all its outputs: the only proof
                           that the stage finished. A rerun skips stages that have one.
    data/meta.json         identities, image size, split counts (prepare)
    data/clean/            Parquet: image, label, split, index (prepare)
    data/adv/set=<set>/    Parquet: clean, adv, label, eps, method, index (attack)
    data/gnr_aug/          Parquet, as data/adv, method 'gnr' (gnr)
    models/<name>.pt       final weights with the config that made them
    train/<fit>/           Ray Train checkpoints of one fit (e.g. target-surrogate: a stage's trainings
                           in turn); an interrupted training resumes from here
    tensorboard/<task>/    per-epoch scalars
    report/                report.md, metrics.json, figures
    export/<defense>/      model.pt, model.onnx, card.json (jobs/export.py)

What counts as finished: a file when it exists (every file is written atomically: a temporary
name moved into place, or one S3 PUT); a dataset folder when its ``_SUCCESS`` exists
(:meth:`RunLayout.write_dataset` writes it after the last shard); a stage when its marker exists.
A stage that did not finish leaves no marker; the next run deletes its partial data
outputs before redoing it (training checkpoints are kept so training resumes).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from raydefense.config import Config, flatten, from_dict
from raydefense.errors import ConfigError, CorruptFileError
from raydefense.storage import Storage

log = logging.getLogger("raydefense")

# Keys that may change between a run and its resumption without invalidating finished stages.
_RESUMABLE_PREFIXES = ("scale.", "storage.", "name", "eval.", "tune.", "tracking.")


class RunLayout:
    """Where each file of a run (or of a Tune trial's folder) lives, and the one way to read and
    write its datasets. Paths are relative to ``storage`` (the run root); ``*_rel`` give them,
    the other methods act on them. Ray is imported only by the dataset methods."""

    CONFIG = "config.yaml"
    META = "data/meta.json"
    CLEAN = "data/clean"
    ADV = "data/adv"
    GNR_AUG = "data/gnr_aug"
    METRICS = "report/metrics.json"
    REPORT = "report/report.md"
    MODELS = "models"
    DONE = "_SUCCESS"  # a dataset folder's completion marker, written after its last shard

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    # ------------------------------------------------------------- relative paths

    @staticmethod
    def model_rel(name: str) -> str:
        return f"models/{name}.pt"

    @staticmethod
    def marker_rel(stage: str) -> str:
        return f"stages/{stage}.json"

    @staticmethod
    def adv_rel(name: str) -> str:
        """An adversarial set: a partition of ``data/adv``, or ``gnr_aug`` (the GNR's pairs)."""
        return RunLayout.GNR_AUG if name == "gnr_aug" else f"{RunLayout.ADV}/set={name}"

    @staticmethod
    def report_rel(name: str) -> str:
        return f"report/{name}"

    @staticmethod
    def export_rel(defense: str) -> str:
        """The folder of one defense's export (``model.pt``, ``model.onnx``, ``card.json``)."""
        return f"export/{defense}"

    @staticmethod
    def tensorboard_rel(task: str, name: str = "") -> str:
        return f"tensorboard/{task}/{name}" if name else f"tensorboard/{task}"

    # ------------------------------------------------------------- models and small files

    def has_model(self, name: str) -> bool:
        return self.storage.exists(self.model_rel(name))

    def model_names(self) -> list[str]:
        return [f[:-3] for f in self.storage.listdir(self.MODELS) if f.endswith(".pt")]

    def meta(self) -> dict[str, Any]:
        """``data/meta.json`` (written by prepare)."""
        return self.storage.read_json(self.META)

    def num_classes(self) -> int:
        return int(self.meta()["num_classes"])

    # ------------------------------------------------------------- datasets

    def has_dataset(self, rel: str) -> bool:
        """True when the dataset at ``rel`` was written to the end by :meth:`write_dataset`."""
        return self.storage.exists(f"{rel}/{self.DONE}")

    # A dataset this small (bytes of Parquet on storage) is read by this process instead of by
    # ray.data.read_parquet (see read).
    DRIVER_READ_MAX_BYTES = 128 * 2**20

    def read(self, rel: str, columns: Optional[list[str]] = None, *,
             where: Optional[tuple[str, list[str]]] = None):
        """A Ray Dataset of the Parquet shards under ``rel`` (markers are not read; Hive partition
        folders such as ``set=train`` below ``rel`` become a string column); ``where=(key, values)``
        keeps the rows whose ``key`` is one of ``values`` (``key`` need not be in ``columns``).

        A dataset of at most :attr:`DRIVER_READ_MAX_BYTES` is read here with pyarrow, one table per
        file, and handed to Ray Data with ``ray.data.from_arrow``: the same rows in the same order
        and the same schema as ``read_parquet`` gives, in one block per file. ``read_parquet``
        first samples the files' footers in remote tasks and then reads in more tasks; each needs
        a Ray worker process, and Ray ends idle ones while a training runs, so after one these are
        new processes (about 2.5 core-seconds each to start on the 2-core host). Measured on the
        default run (2026-12-04, p22a against p22b, one run each): 393 s -> 355 s, the report
        unchanged to the digit. Larger datasets stream through ``read_parquet``, so a cluster run
        on real data never funnels through the driver.
        """
        import ray

        from raydefense.pipeline.runtime import configure_data_context

        # Also in processes where init_ray did not run (a Tune trial, an ablation run's task).
        context = ray.data.DataContext.get_current()
        configure_data_context(context)
        tables = self._small_tables(rel, columns, where)
        if tables is not None:
            return ray.data.from_arrow(tables)
        # The V1 reader samples file footers inside read_parquet, behind a "Parquet dataset
        # sampling" bar (a fraction of a second, two console lines per read). Ray Data's own
        # switch turns that bar off for the call; the Dataset copies the context when it is made,
        # and its copy gets the bars back for the execution, whose progress stays on the console.
        # A filter on a Hive partition key fails in the read when the key is not read (Ray 2.60):
        # the key is read, and dropped after the filter.
        read_columns = columns if where is None or columns is None else list(dict.fromkeys([*columns, where[0]]))
        shown = context.enable_progress_bars
        context.enable_progress_bars = False
        try:
            ds = ray.data.read_parquet(self.storage.path(rel), filesystem=self.storage.fs, columns=read_columns,
                                       file_extensions=["parquet"])
        finally:
            context.enable_progress_bars = shown
        ds.context.enable_progress_bars = shown
        if where is not None:
            from ray.data.expressions import col

            ds = ds.filter(expr=col(where[0]).is_in(list(where[1])))
            if read_columns != columns:
                ds = ds.select_columns(columns)
        return ds

    def _small_tables(self, rel: str, columns: Optional[list[str]], where: Optional[tuple[str, list[str]]]):
        """The files under ``rel`` as pyarrow tables (one per file, in pyarrow's file order, the
        order read_parquet reads them in), filtered by ``where`` as they are read; None when the
        files hold more than :attr:`DRIVER_READ_MAX_BYTES` or there are none (read_parquet then
        raises its own error)."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        try:
            files = pads.dataset(self.storage.path(rel), filesystem=self.storage.fs, format="parquet",
                                 partitioning="hive")
        except (OSError, ValueError):  # missing or unreadable: read_parquet reports it as it always has
            return None
        paths = [f for f in files.files if f.endswith(".parquet")]
        if not paths or len(paths) != len(files.files):
            return None
        if sum(info.size or 0 for info in self.storage.fs.get_file_info(paths)) > self.DRIVER_READ_MAX_BYTES:
            return None
        keep = None if where is None else pc.field(where[0]).isin(list(where[1]))
        tables = [fragment.to_table(schema=files.schema, columns=columns, filter=keep)
                  for fragment in files.get_fragments()]
        return [t for t in tables if t.num_rows] or tables[:1]  # an empty result keeps its schema

    def table(self, rel: str, *, columns: Optional[list[str]] = None, filter=None, head: Optional[int] = None):
        """The Parquet shards under ``rel`` as a pyarrow Table, on the driver (small reads only)."""
        import pyarrow.dataset as pads

        ds = pads.dataset(self.storage.path(rel), filesystem=self.storage.fs, format="parquet")
        if head is not None:
            return ds.head(head, columns=columns, filter=filter)
        return ds.to_table(columns=columns, filter=filter)

    def count_rows(self, rel: str, filter=None) -> int:
        """Rows of the Parquet shards under ``rel`` (those matching the pyarrow expression
        ``filter``), read in this process from the files' metadata (and the filter's columns)."""
        import pyarrow.dataset as pads

        files = pads.dataset(self.storage.path(rel), filesystem=self.storage.fs, format="parquet")
        return files.count_rows(filter=filter)

    def count_clean(self, splits: list[str] | str) -> int:
        """Rows of the clean images of the given split(s) (:meth:`count_rows`; a Ray Data
        ``count()`` of :meth:`read_clean` runs a whole dataset execution: ~3 s of the default
        run's GNR stage)."""
        import pyarrow.compute as pc

        wanted = [splits] if isinstance(splits, str) else list(splits)
        return self.count_rows(self.CLEAN, filter=pc.field("split").isin(wanted))

    def read_clean(self, splits: list[str] | str, columns: Optional[list[str]] = None):
        """The clean images of the given split(s): ``image, label, split, index`` unless ``columns``."""
        wanted = [splits] if isinstance(splits, str) else list(splits)
        return self.read(self.CLEAN, columns or ["image", "label", "split", "index"], where=("split", wanted))

    def read_adv(self, name: str, columns: Optional[list[str]] = None):
        """An adversarial set by name (``train``, ``val_white``, ``test_black``, ``gnr_aug``, ...)."""
        return self.read(self.adv_rel(name), columns)

    def read_adv_sets(self, names: list[str], columns: Optional[list[str]] = None):
        """Several attack partitions in one read, with their ``set`` column."""
        return self.read(self.ADV, columns, where=("set", list(names)))

    def write_dataset(self, rel: str, ds, *, min_rows_per_file: Optional[int] = None,
                      partition_cols: Optional[list[str]] = None) -> None:
        """Write ``ds`` (a Ray Dataset) as Parquet under ``rel``, replacing what was there, then
        the ``_SUCCESS`` marker: a reader that finds the marker finds every shard. Runs the
        dataset under :func:`raydefense.pipeline.runtime.user_errors` (a bad image is one line)."""
        from raydefense.pipeline.runtime import user_errors

        self.storage.delete_dir(rel)
        kwargs: dict[str, Any] = {"filesystem": self.storage.fs}
        if min_rows_per_file is not None:
            kwargs["min_rows_per_file"] = min_rows_per_file
        if partition_cols:
            kwargs["partition_cols"] = partition_cols
        with user_errors():
            ds.write_parquet(self.storage.path(rel), **kwargs)
        self.storage.write_text(f"{rel}/{self.DONE}", "")


@dataclass
class RunContext:
    cfg: Config
    storage: Storage  # the run root: <storage>/<name>
    timings: dict[str, float] = field(default_factory=dict)
    echo: Callable[[str], None] = print
    # The stages this invocation runs after the running one (runner.run_stages sets it): a stage
    # may train the next one's models in its own Ray Train fit (denoise.run_denoise).
    upcoming: tuple[str, ...] = ()
    # What a stage did for a later stage of the same invocation: {that stage: its outputs}.
    handover: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.storage)

    # ------------------------------------------------------------- markers

    def is_done(self, stage: str) -> bool:
        return self.storage.exists(RunLayout.marker_rel(stage))

    def marker(self, stage: str) -> dict[str, Any]:
        """The stage's marker; CorruptFileError naming the file (and what to do) when it is
        empty, truncated or not a marker."""
        rel = RunLayout.marker_rel(stage)
        hint = f"delete it to redo stage '{stage}' (and the stages after it), or use another --name"
        marker = self.storage.read_json(rel, expect=dict, hint=hint)
        duration = marker.get("duration_s")
        if marker.get("stage") != stage or isinstance(duration, bool) or not isinstance(duration, (int, float)) \
                or not isinstance(marker.get("outputs", {}), dict):
            raise CorruptFileError(f"{self.storage.display(rel)} is corrupt (not the marker of stage '{stage}'); {hint}")
        return marker

    def check_markers(self, stages: tuple[str, ...] | list[str]) -> list[str]:
        """Read every existing marker of ``stages`` (before Ray starts, so a corrupt one fails
        at once); returns the finished stages."""
        done = [s for s in stages if self.is_done(s)]
        for s in done:
            self.marker(s)
        return done

    def mark_done(self, stage: str, *, duration_s: float, outputs: Optional[dict[str, Any]] = None) -> None:
        self.storage.write_json(
            RunLayout.marker_rel(stage),
            {"stage": stage, "finished_at": time.time(), "duration_s": duration_s, "outputs": outputs or {}},
        )


def config_hint(run: Storage) -> str:
    return f"delete the run folder {run.display()} to start it again, or use another --name"


def read_saved_config(run: Storage) -> dict[str, Any]:
    """The raw mapping of a run's ``config.yaml``; CorruptFileError naming the file when it is
    not UTF-8, not YAML or not a mapping (the one reader of saved configs)."""
    return run.read_yaml(RunLayout.CONFIG, hint=config_hint(run))


def saved_config(run: Storage, data: Optional[dict[str, Any]] = None) -> Config:
    """A run's saved config as a validated Config; ConfigError naming the file when a value in it
    is no longer valid (hand-edited, or written by another version)."""
    data = read_saved_config(run) if data is None else data
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{run.display(RunLayout.CONFIG)}: {exc}; {config_hint(run)}") from exc


def check_run(cfg: Config, storage: Storage) -> RunContext:
    """Check that the run can start or resume, writing nothing of the run: the storage is
    writable (a probe at its root) and an existing run was made by a compatible config.
    :func:`commit_run` then writes ``config.yaml``."""
    storage.check_writable()
    run = storage.child(cfg.name)
    if run.exists(RunLayout.CONFIG):
        saved = saved_config(run)
        old, new = flatten(saved.to_dict()), flatten(cfg.to_dict())
        changed = sorted(
            k for k in set(old) | set(new)
            if old.get(k) != new.get(k) and not k.startswith(_RESUMABLE_PREFIXES)
        )
        if changed:
            shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
            raise ConfigError(
                f"run '{cfg.name}' already exists at {run.display()} with a different config ({shown}); "
                f"use another --name to start a new run"
            )
    return RunContext(cfg=cfg, storage=run)


def commit_run(ctx: RunContext) -> None:
    """Write the run's ``config.yaml`` (after every input has been checked)."""
    ctx.storage.write_text(RunLayout.CONFIG, ctx.cfg.to_yaml())


def open_run(cfg: Config, storage: Storage) -> RunContext:
    """Create the run folder, or check that an existing one was made by the same config
    (:func:`check_run` then :func:`commit_run`)."""
    ctx = check_run(cfg, storage)
    commit_run(ctx)
    return ctx
