"""The report's judgement of the black-box column (report.writer.black_box_check / _sentence)."""
from __future__ import annotations

import pytest

from raydefense.config import load_config
from raydefense.errors import ConfigError
from raydefense.report.writer import black_box_check, black_box_sentence, render_markdown


def _metrics(clean: float, black: float, surrogate_acc=0.3):
    return {"accuracy": {"none": {"clean": clean, "white_box": 0.2, "black_box": black}},
            "models": {"surrogate": {"metrics": {"val_acc": surrogate_acc}}, "target": {"metrics": {"val_acc": 0.95}}},
            "config": {"name": "r", "models": {"surrogate": "inception_v3", "target": "facenet"}}}


def test_a_surrogate_whose_attacks_do_not_transfer_is_called_uninformative():
    check = black_box_check(_metrics(0.958, 0.933), min_drop=0.10)
    assert check["no_defense_drop"] == pytest.approx(0.025) and not check["informative"]
    assert check["surrogate_val_acc"] == 0.3 and check["target_val_acc"] == 0.95
    text = black_box_sentence(check, "inception_v3")
    assert "uninformative" in text and "2.5 points" in text and "30.0%" in text and "`inception_v3`" in text


def test_a_transferring_surrogate_makes_the_column_informative():
    check = black_box_check(_metrics(0.845, 0.690), min_drop=0.10)
    assert check["informative"] and check["no_defense_drop"] == pytest.approx(0.155)
    assert "uninformative" not in black_box_sentence(check, "inception_v3")
    assert "architecture" not in black_box_sentence(check, "inception_v3", target="facenet")
    assert "the target's architecture, its own weights" in black_box_sentence(check, "facenet", target="facenet")
    shared = black_box_sentence(check, "facenet", target="facenet", surrogate_init="target")
    assert "from the target's starting weights on its own batches" in shared and "its own weights" not in shared
    # At the threshold exactly: informative; a pretrained surrogate used as it is has no val_acc.
    edge = black_box_check(_metrics(0.9, 0.8, surrogate_acc=None), min_drop=0.1)
    assert edge["surrogate_val_acc"] is None and "validation accuracy" not in black_box_sentence(edge, "x")


def test_the_report_says_where_the_surrogate_started():
    m = _metrics(0.95, 0.70)
    m["config"]["models"] = {"surrogate": "facenet", "target": "facenet", "surrogate_init": "target"}
    m["black_box_check"] = black_box_check(m, min_drop=0.1)
    text = render_markdown(m, [])
    assert "`facenet` from the target's starting weights" in text  # What was run
    assert "trained from the target's starting weights on its own batches" in text  # the black-box sentence


def test_no_black_box_result_means_no_check_and_the_threshold_is_validated():
    assert black_box_check({"accuracy": {"uddn": {"clean": 1.0}}}, min_drop=0.1) is None
    assert load_config(overrides=["eval.black_box_min_drop=0.2"]).eval.black_box_min_drop == 0.2
    with pytest.raises(ConfigError, match="eval.black_box_min_drop"):
        load_config(overrides=["eval.black_box_min_drop=10"])


def test_the_report_carries_the_sentence():
    m = _metrics(0.958, 0.933)
    m["black_box_check"] = black_box_check(m, min_drop=0.10)
    m.update({"accuracy_detail": {}, "l1": {}, "by_epsilon": {}, "n_images": {}, "data": {}})
    text = render_markdown(m, [])
    assert "Black-box column uninformative" in text
