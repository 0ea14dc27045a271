"""Shared command-line handling for the thin scripts in ``jobs/``.

Flags common to every job: ``--config PATH``, ``--set key.sub=value`` (repeatable),
``--data PATH_OR_S3_URI``, ``--storage PATH_OR_S3_URI``, ``--name RUN``. Errors a user can
fix end with one line on stderr naming the culprit and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

from raydefense.config import DEFAULT_CONFIG, Config, load_config, run_name_problem
from raydefense.errors import ConfigError, RayDefenseError

__all__ = ["DEFAULT_CONFIG", "common_parser", "check_flags", "config_from_args", "quiet_logs", "run_main"]


def common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help=f"YAML config (default: the preset {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distill.T=2 (repeatable)")
    p.add_argument("--data", help="image folder in the LFW layout (local path or s3:// URI); default: synthetic")
    p.add_argument("--storage", help="where runs live: a folder (default ./runs) or s3://bucket/prefix")
    p.add_argument("--name", help="run name; the same name resumes the run")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output too: workers' stdout/stderr, Ray's INFO lines, Ray Data's per-operator "
                        "progress (the same as --set scale.worker_logs=true)")
    return p


def check_flags(args: argparse.Namespace) -> dict[str, str]:
    """``--name``, ``--data`` and ``--storage`` as the config values they set, verbatim (never
    parsed as YAML: ``--name 'exp #2'`` is that name, ``--name 2024`` the name '2024'); a flag
    given with a value that cannot work is a ConfigError naming the flag."""
    values: dict[str, str] = {}
    if args.name is not None:
        problem = run_name_problem(args.name)
        if problem:
            raise ConfigError(f"--name {args.name!r}: a run name {problem}")
        values["name"] = args.name
    for flag, key in (("data", "data.source"), ("storage", "storage.path")):
        value = getattr(args, flag, None)
        if value is None:
            continue
        if not value.strip():
            raise ConfigError(f"--{flag}: must not be empty (leave the flag out for the default)")
        if any(ord(c) < 32 for c in value):
            raise ConfigError(f"--{flag} {value!r}: contains control characters")
        if value != value.strip():
            raise ConfigError(f"--{flag} {value!r}: starts or ends with whitespace")
        values[key] = value
    return values


def config_from_args(args: argparse.Namespace) -> Config:
    """The config of ``--config`` (default: configs/default.yaml), then ``--set``, then the
    verbatim ``--data``, ``--storage`` and ``--name``."""
    values = check_flags(args)
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = str(DEFAULT_CONFIG)
    overrides = list(args.overrides) + (["scale.worker_logs=true"] if getattr(args, "verbose", False) else [])
    return load_config(path, overrides, values=values)


def quiet_logs() -> None:
    """Keep the console to stage progress and Ray Data's progress bars."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    logging.getLogger("ray").setLevel(logging.WARNING)


def run_main(fn: Callable[[Sequence[str]], int], argv: Optional[Sequence[str]] = None) -> None:
    """Call ``fn``; turn user errors into one line on stderr and exit code 2."""
    try:
        code = fn(sys.argv[1:] if argv is None else argv)
    except RayDefenseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted; run again with the same --name to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)

