"""Datasets: the embedded synthetic identities, LFW-layout image folders, and the splits.

Pure PyTorch / NumPy; nothing here imports Ray (the Ray Data stages live in
``raydefense.pipeline`` and call these functions per shard).
"""
from raydefense.data.folder import (
    IMAGE_EXTENSIONS,
    FaceAligner,
    FolderListing,
    ImageRecord,
    list_image_folder,
    load_image,
    load_images,
)
from raydefense.data.splits import PAPER_PER_IDENTITY, SPLITS, SplitPlan, plan_splits
from raydefense.data.synthetic import make_synthetic_faces, render_identity_images

__all__ = [
    "IMAGE_EXTENSIONS",
    "FaceAligner",
    "FolderListing",
    "ImageRecord",
    "list_image_folder",
    "load_image",
    "load_images",
    "PAPER_PER_IDENTITY",
    "SPLITS",
    "SplitPlan",
    "plan_splits",
    "make_synthetic_faces",
    "render_identity_images",
]
