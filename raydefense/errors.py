"""Errors that a user can act on.

Every failure caused by bad input (a config value, a data folder, a storage URI, missing
credentials) is raised as a subclass of :class:`RayDefenseError` with a one-line message
that names the culprit. Entry points in ``jobs/`` catch these, print the message and exit
with a non-zero code; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class RayDefenseError(Exception):
    """Base class for errors caused by user input or environment; one line, names the culprit."""

    exit_code = 2


class ConfigError(RayDefenseError, ValueError):
    """A config key is unknown, has the wrong type or is out of range."""


class DataError(RayDefenseError, ValueError):
    """A dataset path, image file or identity folder cannot be used."""


class StorageError(RayDefenseError, OSError):
    """Storage (a local folder or an s3:// URI) is unreachable, unwritable or lacks credentials."""


class CorruptFileError(StorageError):
    """A file the project wrote earlier (a run's config.yaml, a stage marker, metrics.json,
    weights) cannot be read back: truncated, edited by hand, or not what it should be.
    The message names the file and what to do about it."""


class ClusterError(RayDefenseError):
    """Ray cannot be started or reached (``ray.init`` failed or timed out), or the cluster can
    never hold what the run asks for."""


class ModelError(RayDefenseError, ValueError):
    """An unknown model name, or weights that do not fit the model."""


class TrainingError(RayDefenseError, RuntimeError):
    """A training's worker group kept failing after its automatic restarts (scale.max_failures).

    Its checkpoints stay: a rerun with the same --name resumes from the latest one.
    """

    exit_code = 1
