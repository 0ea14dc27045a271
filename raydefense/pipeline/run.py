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

import yaml

from raydefense.config import Config, from_dict
from raydefense.errors import ConfigError
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
        return self.storage.read_json(f"stages/{stage}.json")

    def mark_done(self, stage: str, *, duration_s: float, outputs: Optional[dict[str, Any]] = None) -> None:
        self.storage.write_json(
            f"stages/{stage}.json",
            {"stage": stage, "finished_at": time.time(), "duration_s": duration_s, "outputs": outputs or {}},
        )

    def clear(self, stage: str) -> None:
        self.storage.delete_file(f"stages/{stage}.json")

    # ------------------------------------------------------------- paths

    def data_path(self, *parts: str) -> str:
        return self.storage.path("data", *parts)

    def model_rel(self, name: str) -> str:
        return f"models/{name}.pt"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def open_run(cfg: Config, storage: Storage) -> RunContext:
    """Create the run folder, or check that an existing one was made by the same config."""
    storage.check_writable()
    run = storage.child(cfg.name)
    if run.exists("config.yaml"):
        saved = from_dict(yaml.safe_load(run.read_text("config.yaml")))
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
    run.write_text("config.yaml", cfg.to_yaml())
    return RunContext(cfg=cfg, storage=run)
