"""A run: its storage, its config, its stages, and the markers that make reruns resume.

Layout under ``<storage>/<name>/``::

    config.yaml            the resolved config (written first; a rerun must match it)
    stages/<stage>.json    written LAST by a stage, after all its outputs: the only proof
                           that the stage finished. A rerun skips stages that have one.
    data/...               Parquet shards (clean split, adversarial sets, augmented set, ...)
    models/<name>.pt       final weights with the config that made them
    train/<task>/          Ray Train checkpoints (an interrupted training resumes from here)
    report/                report.md, metrics.json, figures

A stage that did not finish leaves no marker; the next run deletes its partial data
outputs before redoing it (training checkpoints are kept so training resumes).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from raydefense.config import Config, from_dict
from raydefense.errors import ConfigError, CorruptFileError
from raydefense.storage import Storage

log = logging.getLogger("raydefense")

# Keys that may change between a run and its resumption without invalidating finished stages.
_RESUMABLE_PREFIXES = ("scale.", "storage.", "name", "eval.", "tune.")


@dataclass
class RunContext:
    cfg: Config
    storage: Storage  # the run root: <storage>/<name>
    timings: dict[str, float] = field(default_factory=dict)
    echo: Callable[[str], None] = print

    # ------------------------------------------------------------- markers

    def is_done(self, stage: str) -> bool:
        return self.storage.exists("stages", f"{stage}.json")

    def marker(self, stage: str) -> dict[str, Any]:
        """The stage's marker; CorruptFileError naming the file (and what to do) when it is
        empty, truncated or not a marker."""
        rel = f"stages/{stage}.json"
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
            f"stages/{stage}.json",
            {"stage": stage, "finished_at": time.time(), "duration_s": duration_s, "outputs": outputs or {}},
        )

    # ------------------------------------------------------------- paths

    def data_path(self, *parts: str) -> str:
        return self.storage.path("data", *parts)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def config_hint(run: Storage) -> str:
    return f"delete the run folder {run.display()} to start it again, or use another --name"


def read_saved_config(run: Storage) -> dict[str, Any]:
    """The raw mapping of a run's ``config.yaml``; CorruptFileError naming the file when it is
    not UTF-8, not YAML or not a mapping (the one reader of saved configs)."""
    return run.read_yaml("config.yaml", hint=config_hint(run))


def saved_config(run: Storage, data: Optional[dict[str, Any]] = None) -> Config:
    """A run's saved config as a validated Config; ConfigError naming the file when a value in it
    is no longer valid (hand-edited, or written by another version)."""
    data = read_saved_config(run) if data is None else data
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{run.display('config.yaml')}: {exc}; {config_hint(run)}") from exc


def check_run(cfg: Config, storage: Storage) -> RunContext:
    """Check that the run can start or resume, writing nothing of the run: the storage is
    writable (a probe at its root) and an existing run was made by a compatible config.
    :func:`commit_run` then writes ``config.yaml``."""
    storage.check_writable()
    run = storage.child(cfg.name)
    if run.exists("config.yaml"):
        saved = saved_config(run)
        old, new = _flatten(saved.to_dict()), _flatten(cfg.to_dict())
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
    ctx.storage.write_text("config.yaml", ctx.cfg.to_yaml())


def open_run(cfg: Config, storage: Storage) -> RunContext:
    """Create the run folder, or check that an existing one was made by the same config
    (:func:`check_run` then :func:`commit_run`)."""
    ctx = check_run(cfg, storage)
    commit_run(ctx)
    return ctx
