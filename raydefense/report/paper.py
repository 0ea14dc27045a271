"""The published numbers the report sets beside ours, and the labels it prints.

Li & Wang, "Defense Against Adversarial Attacks in Deep Learning", Applied Sciences 9(1), 76,
2019, section 5 (LFW + FaceNet unless noted), as fractions, keyed like ``metrics.json``
(defense keys ``none``, ``dae``, ``pixel_guided``, ``uddn``, ``uddn_kt``, ``jpeg``, ``dcn``,
``distillation``; test-set keys ``clean``, ``white_box``, ``black_box``).
"""
from __future__ import annotations

DEFENSE_LABELS = {
    "none": "no defense", "dae": "DAE", "pixel_guided": "pixel-guided", "uddn": "UDDN",
    "uddn_kt": "UDDN + KT", "jpeg": "JPEG", "dcn": "DCN", "distillation": "distillation",
    "pgd_at": "PGD-AT", "uddn_kt_adv": "UDDN + KT (adv. trained)",
}
SET_LABELS = {"clean": "clean", "white_box": "white-box", "black_box": "black-box",
              "adaptive_pgd": "whole-model PGD", "autoattack": "APGD check"}

# Table 1: mean L1 distance between the denoiser's output and the clean image.
PAPER_TABLE1 = {
    "none": {"clean": 0.0, "white_box": 0.0373, "black_box": 0.0157},
    "dae": {"clean": 0.0153, "white_box": 0.0359, "black_box": 0.0161},
    "pixel_guided": {"clean": 0.0138, "white_box": 0.0178, "black_box": 0.0145},
    "uddn": {"clean": 0.0125, "white_box": 0.0167, "black_box": 0.0134},
}
# Table 2: accuracy behind each denoiser (classifier: the target).
PAPER_TABLE2 = {
    "none": {"clean": 0.845, "white_box": 0.223, "black_box": 0.690},
    "dae": {"clean": 0.661, "white_box": 0.288, "black_box": 0.627},
    "pixel_guided": {"clean": 0.819, "white_box": 0.582, "black_box": 0.722},
    "uddn": {"clean": 0.831, "white_box": 0.602, "black_box": 0.753},
}
# Table 3: the whole strategy against other defenses. The paper's "PGD [27]" row is the
# pixel-guided denoiser (its Table 2 numbers differ); its DCN row repeats Table 2's PGD row.
PAPER_TABLE3 = {
    "none": {"clean": 0.845, "white_box": 0.223, "black_box": 0.690},
    "jpeg": {"clean": 0.822, "white_box": 0.534, "black_box": 0.558},
    "pixel_guided": {"clean": 0.833, "white_box": 0.514, "black_box": 0.700},
    "dcn": {"clean": 0.819, "white_box": 0.582, "black_box": 0.722},
    "distillation": {"clean": 0.836, "white_box": 0.563, "black_box": 0.708},
    "uddn_kt": {"clean": 0.839, "white_box": 0.612, "black_box": 0.765},
}
TABLE2_ROWS = ("none", "dae", "pixel_guided", "uddn")
TABLE3_ROWS = ("none", "jpeg", "pixel_guided", "dcn", "distillation", "uddn", "uddn_kt")

# Table 4: the strategy (UDDN + KT, FaceNet) on three datasets; one "NA" row (no defense, LFW).
PAPER_TABLE4 = {
    "lfw": {"clean": 0.839, "white_box": 0.612, "black_box": 0.765},
    "ytf": {"clean": 0.812, "white_box": 0.603, "black_box": 0.744},
    "sfc": {"clean": 0.827, "white_box": 0.609, "black_box": 0.756},
}
PAPER_TABLE4_NA = {"clean": 0.839, "white_box": 0.223, "black_box": 0.690}
# Table 5: the strategy with other target models (LFW): defended / no defense ("NA").
PAPER_TABLE5 = {
    "mobilenet_v2": {"clean": 0.819, "white_box": 0.605, "white_box_na": 0.211, "black_box": 0.757, "black_box_na": 0.670},
    "facenet": {"clean": 0.839, "white_box": 0.612, "white_box_na": 0.223, "black_box": 0.765, "black_box_na": 0.690},
    "googlenet": {"clean": 0.817, "white_box": 0.600, "white_box_na": 0.210, "black_box": 0.739, "black_box_na": 0.663},
    "vgg16": {"clean": 0.828, "white_box": 0.610, "white_box_na": 0.218, "black_box": 0.763, "black_box_na": 0.670},
}
# Athalye & Carlini, "On the Robustness of the CVPR 2018 White-Box Adversarial Example
# Defenses" (2018): HGD (Liao et al. 2018) under PGD through the denoiser, L-inf 4/255.
HGD_ADAPTIVE = {"eps": 4 / 255, "accuracy": 0.0}


def paper_dataset_key(source: str) -> str | None:
    """``'lfw'``, ``'ytf'`` or ``'sfc'`` if a data source's name mentions one of the paper's datasets."""
    name = source.lower().rstrip("/").rsplit("/", 1)[-1]
    for key, words in (("lfw", ("lfw", "labeled_faces", "labeled-faces")), ("ytf", ("ytf", "youtube")),
                       ("sfc", ("sfc", "social"))):
        if any(w in name for w in words):
            return key
    return None
