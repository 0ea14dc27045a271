"""Stage 1, prepare: read and split the data, write it as Parquet shards.

The driver only handles the list of images (identity, index or file path); rendering the
synthetic faces or decoding/aligning the files runs in Ray Data ``map_batches`` workers,
and the shards go straight to ``<run>/data/clean/``. Columns: ``image`` (uint8 H x W x 3),
``label`` (int64), ``split`` (gnr | denoise | val | test), ``index`` (int64, stable id).
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np

from raydefense.config import Config
from raydefense.errors import ConfigError, DataError
from raydefense.storage import Storage
from raydefense.pipeline.run import RunContext
from raydefense.pipeline.runtime import map_instances


class RenderSynthetic:
    """map_batches callable: (identity, within) rows -> rendered faces."""

    def __init__(self, *, image_size: int, seed: int, difficulty: float):
        self.kw = {"image_size": image_size, "seed": seed, "difficulty": difficulty}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydefense.data import render_identity_images

        images = np.stack([
            render_identity_images(int(i), [int(k)], **self.kw)[0]
            for i, k in zip(batch["label"], batch["within"])
        ])
        return {"image": images, "label": batch["label"].astype(np.int64), "split": batch["split"],
                "index": batch["index"].astype(np.int64)}


class LoadFolderImages:
    """map_batches actor: image paths -> decoded (optionally MTCNN-aligned) faces."""

    def __init__(self, *, source: str, image_size: int, align: bool, endpoint_url, region):
        self.storage = Storage.open(source, endpoint_url=endpoint_url, region=region)
        self.image_size = image_size
        self.align = align
        self.aligner = None
        if align:
            from raydefense.data import FaceAligner

            self.aligner = FaceAligner(image_size=image_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydefense.data import load_images

        fs = self.storage.fs if self.storage.is_s3 else None
        images, found, _ = load_images(list(batch["path"]), image_size=self.image_size, align=self.align,
                                       aligner=self.aligner, filesystem=fs)
        return {"image": images, "label": batch["label"].astype(np.int64), "split": batch["split"],
                "index": batch["index"].astype(np.int64), "face_found": np.asarray(found, dtype=bool)}


def list_source(cfg: Config):
    """List an image-folder source (cheap: names only); DataError naming the culprit if unusable."""
    from raydefense.data import list_image_folder

    src = Storage.open(cfg.data.source, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)
    return list_image_folder(src.path() if src.is_s3 else src.root,
                             min_images_per_identity=cfg.data.min_images_per_identity,
                             filesystem=src.fs if src.is_s3 else None)


def _plan(labels: np.ndarray, cfg: Config) -> Any:
    """The split plan of ``labels``; DataError naming the split when one the config asks for
    would be empty (splits may be short for small identities, with a printed note, never empty)."""
    from raydefense.data import SPLITS, plan_splits
    from raydefense.data.splits import empty_split_problem

    want = asdict(cfg.data.splits)
    plan = plan_splits(labels, per_identity=want, seed=cfg.seed)
    largest = int(np.bincount(labels).max()) if len(labels) else 0
    problem = empty_split_problem(plan, want, largest=largest)
    if problem:
        raise DataError(f"data '{cfg.data.source}': {problem}")
    return plan, SPLITS


def _folder_records(cfg: Config):
    """``(records, classes, listing)`` of an image-folder source after ``data.max_identities``."""
    listing = list_source(cfg)
    records = listing.records
    classes = list(listing.classes)
    if cfg.data.max_identities:
        counts: dict[int, int] = {}
        for r in records:
            counts[r.label] = counts.get(r.label, 0) + 1
        top = sorted(counts, key=lambda k: (-counts[k], k))[: cfg.data.max_identities]
        remap = {old: new for new, old in enumerate(sorted(top))}
        classes = [classes[old] for old in sorted(top)]
        records = [type(r)(path=r.path, identity=r.identity, label=remap[r.label]) for r in records if r.label in remap]
    if len(classes) < 2:
        raise DataError(f"data '{cfg.data.source}': need at least 2 identities with >= "
                        f"{cfg.data.min_images_per_identity} images, found {len(classes)}")
    return records, classes, listing


def required_splits(cfg: Config) -> dict[str, str]:
    """Splits a pipeline run reads downstream, each with what it feeds (a split asked for 0 images
    would reach those stages empty)."""
    need = {"val": "the validation set of every training and the UDDN's white-box validation set"}
    if cfg.gnr.enabled:
        need["gnr"] = "the real adversarial noise the GNR trains on"
        need["denoise"] = "the clean images the GNR's noise turns into the denoiser's training set"
    return need


def check_source(cfg: Config) -> None:
    """Check the data before anything starts (no Ray): every split a run reads downstream is
    asked for (ConfigError naming ``data.splits.<split>``); an image folder is listed (names
    only) and split on paper (DataError naming the folder, or the split that would be empty).
    Synthetic identities are checked against the splits when the config loads."""
    for split, feeds in required_splits(cfg).items():
        if getattr(cfg.data.splits, split) < 1:
            raise ConfigError(f"config key 'data.splits.{split}': must be >= 1 for a pipeline run ({feeds} "
                              f"come from it)")
    if cfg.data.source == "synthetic":
        return
    records, _, _ = _folder_records(cfg)
    _plan(np.array([r.label for r in records], dtype=np.int64), cfg)


def _by_split(items: list[dict[str, Any]], splits) -> list[dict[str, Any]]:
    """``items`` ordered by split (in the order of ``splits``), then by ``index``: the clean
    Parquet rows of a split are then contiguous, so a stage that reads several splits in order
    (the attack stage) gets batches of one split, and a read of one split touches few shards."""
    order = {s: k for k, s in enumerate(splits)}
    return sorted(items, key=lambda item: (order[item["split"]], item["index"]))


def run_prepare(ctx: RunContext, *, gpu: bool = False) -> dict[str, Any]:
    import ray

    cfg = ctx.cfg
    layout = ctx.layout
    meta: dict[str, Any] = {"source": cfg.data.source, "image_size": cfg.data.image_size}

    if cfg.data.source == "synthetic":
        n_id, per_id = cfg.data.num_identities, cfg.data.images_per_identity
        labels = np.repeat(np.arange(n_id), per_id)
        within = np.tile(np.arange(per_id), n_id)
        plan, splits = _plan(labels, cfg)
        keep = np.flatnonzero(plan.assignment >= 0)
        items = [{"label": int(labels[i]), "within": int(within[i]), "split": splits[plan.assignment[i]], "index": int(i)}
                 for i in keep]
        ds = ray.data.from_items(_by_split(items, splits),
                                 override_num_blocks=max(1, math.ceil(len(items) / cfg.data.shard_size)))
        ds = map_instances(ds, RenderSynthetic, {
            "image_size": cfg.data.image_size, "seed": cfg.seed, "difficulty": cfg.data.difficulty},
            cfg=cfg, gpu=False, batch_size=cfg.data.shard_size, size=1)
        meta.update(classes=[f"synthetic_{i:04d}" for i in range(n_id)], skipped_identities=[])
    else:
        records, classes, listing = _folder_records(cfg)
        labels = np.array([r.label for r in records], dtype=np.int64)
        plan, splits = _plan(labels, cfg)
        keep = np.flatnonzero(plan.assignment >= 0)
        items = [{"path": records[i].path, "label": int(labels[i]), "split": splits[plan.assignment[i]], "index": int(i)}
                 for i in keep]
        ds = ray.data.from_items(_by_split(items, splits),
                                 override_num_blocks=max(1, math.ceil(len(items) / cfg.data.shard_size)))
        ds = map_instances(ds, LoadFolderImages, {
            "source": cfg.data.source, "image_size": cfg.data.image_size, "align": cfg.data.align,
            "endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region},
            cfg=cfg, gpu=False, batch_size=min(cfg.data.shard_size, 64), size=cfg.scale.attack_actors)
        meta.update(classes=classes, skipped_identities=list(listing.skipped_identities))

    layout.write_dataset(layout.CLEAN, ds, min_rows_per_file=cfg.data.shard_size)

    counts = {s: int((plan.assignment == k).sum()) for k, s in enumerate(splits)}
    meta.update(num_classes=len(meta["classes"]), split_counts=counts, shortfalls=list(plan.shortfalls))
    if cfg.data.source != "synthetic" and cfg.data.align:
        table = layout.table(layout.CLEAN, columns=["face_found"])
        meta["no_face_found"] = int(len(table) - int(np.asarray(table["face_found"]).sum()))
    ctx.storage.write_json(layout.META, meta)
    ctx.echo(f"  prepared {sum(counts.values())} images of {meta['num_classes']} identities: "
             + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for line in meta["shortfalls"]:
        ctx.echo(f"  note: {line}")
    if meta.get("no_face_found"):
        ctx.echo(f"  note: MTCNN found no face in {meta['no_face_found']} images; they were centre-cropped")
    return {"meta": layout.META, "clean": layout.CLEAN}
