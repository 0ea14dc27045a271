"""A run that reads part of its files from other runs, without copying them.

Every stage reaches a run's files through its :class:`~raydefense.storage.Storage` (``path``,
``exists``, ``read_*``, ``listdir``; Ray Data and Ray Train take ``storage.path(rel)`` and
``storage.fs``). :class:`SharedStorage` is that storage with a table of run-relative paths
(a file, or a folder and everything under it) that resolve into another run's folder on the
same filesystem: the variant run finds the base run's ``data/clean``, ``models/target.pt``,
``stages/attack.json``... as if they were its own, so the pipeline's stage functions run
unchanged and a finished shared stage is skipped by its marker. Nothing is copied, on a local
folder or on S3 alike.

Shared paths are read-only here: writing or deleting one raises StorageError, so a bug that
would run a shared stage again cannot touch the run it is shared from.
"""
from __future__ import annotations

import posixpath
from typing import Any, Mapping, Optional

from raydefense.errors import StorageError
from raydefense.pipeline.run import RunLayout
from raydefense.storage import Storage


class SharedStorage(Storage):
    """``own`` (the run's folder), with each path of ``shared`` read from the run it maps to.

    Args:
        own: the run's own storage (``<ablation>/s<seed>-<run>``).
        shared: run-relative path (``data/clean``, ``models/target.pt``) -> the Storage of the
            run that holds it; a folder covers everything under it. Same filesystem as ``own``.
    """

    def __init__(self, own: Storage, shared: Mapping[str, Storage]) -> None:
        super().__init__(uri=own.uri, fs=own.fs, root=own.root, endpoint_url=own.endpoint_url, region=own.region)
        for rel, src in shared.items():
            if not rel or rel.startswith("/") or rel != posixpath.normpath(rel):
                raise ValueError(f"SharedStorage: '{rel}' is not a run-relative path")
            if type(src.fs) is not type(own.fs) or src.endpoint_url != own.endpoint_url:
                raise ValueError(f"SharedStorage: '{rel}' comes from {src.display()}, another filesystem than "
                                 f"{own.display()}")
        self.shared = dict(shared)

    # Pickled into Ray tasks, actors and training workers with the table.
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "shared": self.shared}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.shared = state["shared"]

    def source(self, rel: str) -> Optional[Storage]:
        """The run ``rel`` is read from, or None when it is the run's own."""
        for prefix, src in self.shared.items():
            if rel == prefix or rel.startswith(prefix + "/"):
                return src
        return None

    def _redirect(self, parts: tuple[str, ...]) -> tuple[Optional[Storage], str]:
        """(the run ``parts`` is read from or None, its run-relative path)."""
        rel = posixpath.join(*parts) if parts else ""
        return (self.source(rel) if parts else None), rel

    def path(self, *parts: str) -> str:
        src, rel = self._redirect(parts)
        return src.path(rel) if src is not None else super().path(*parts)

    def display(self, *parts: str) -> str:
        src, rel = self._redirect(parts)
        return src.display(rel) if src is not None else super().display(*parts)

    def listdir(self, rel: str = "") -> list[str]:
        """The run's own names under ``rel`` and the shared paths directly under it."""
        names = set(super().listdir(rel))
        if self.source(rel) is None:
            for prefix, src in self.shared.items():
                if posixpath.dirname(prefix) == rel.rstrip("/") and src.exists(prefix):
                    names.add(posixpath.basename(prefix))
        return sorted(names)

    def _refuse(self, rel: str, what: str) -> None:
        src = self.source(rel)
        if src is not None:
            raise StorageError(f"storage '{super().display(rel)}': cannot {what}: it is read from {src.display(rel)}, "
                               f"shared read-only with this run")

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._refuse(rel, "write")
        super().write_bytes(rel, data)

    def delete_dir(self, rel: str) -> None:
        self._refuse(rel, "delete")
        super().delete_dir(rel)

    def delete_file(self, rel: str) -> None:
        self._refuse(rel, "delete")
        super().delete_file(rel)


def stage_outputs(base: Storage, stages: tuple[str, ...] | list[str]) -> list[str]:
    """The run-relative paths that ``stages`` of run ``base`` wrote (those that exist), with their
    markers: what a run that shares those stages reads from ``base``.

    ``prepare``: ``data/clean``, ``data/meta.json``; ``models``: every ``models/*.pt`` but the
    GNR's (target, surrogate, pretrained inits); ``attack``: ``data/adv``; ``gnr``:
    ``data/gnr_aug``, ``models/gnr_generator.pt`` (the base run stops after ``gnr``, so its
    ``models/`` holds nothing else).
    """
    layout = RunLayout(base)
    gnr_model = RunLayout.model_rel("gnr_generator")
    outputs = {
        "prepare": [RunLayout.CLEAN, RunLayout.META],
        "models": [RunLayout.model_rel(n) for n in layout.model_names() if RunLayout.model_rel(n) != gnr_model],
        "attack": [RunLayout.ADV],
        "gnr": [RunLayout.GNR_AUG, gnr_model],
    }
    out = []
    for stage in stages:
        marker = RunLayout.marker_rel(stage)
        if not base.exists(marker):
            raise StorageError(f"storage '{base.display(marker)}': not found; stage '{stage}' of that run has not "
                               f"finished, so it cannot be shared")
        out += [rel for rel in outputs[stage] if base.exists(rel)] + [marker]
    return out
