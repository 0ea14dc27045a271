"""What reaches the driver's console from Ray (raydefense.pipeline.runtime.ray_data_console and
the --verbose flag): set with Ray's own switches and logging levels."""
from __future__ import annotations

import logging

import pytest

from raydefense.cli import common_parser, config_from_args
from raydefense.pipeline.runtime import (_RAY_DATA_PROGRESS_LOGGER, _RAY_DATA_PROGRESS_NOTICE_LOGGER,
                                        _RAY_TOKEN_NOTICE_LOGGER, ray_data_console, ray_notices)
from tests.conftest import REPO


@pytest.fixture
def restore_ray_data_logging():
    import ray

    data = logging.getLogger("ray.data")
    progress = logging.getLogger(_RAY_DATA_PROGRESS_LOGGER)
    levels = [(h, h.level) for h in data.handlers]
    handlers = list(progress.handlers)
    notice = logging.getLogger(_RAY_DATA_PROGRESS_NOTICE_LOGGER)
    logger_levels = [(lg, lg.level) for lg in (progress, notice)]
    ctx = ray.data.DataContext.get_current()
    op_bars = ctx.enable_operator_progress_bars
    yield
    for h, level in levels:
        h.setLevel(level)
    progress.handlers[:] = handlers
    for lg, level in logger_levels:
        lg.setLevel(level)
    ctx.enable_operator_progress_bars = op_bars


def _console_handlers():
    return [h for h in logging.getLogger("ray.data").handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def test_quiet_console_keeps_the_file_and_the_dataset_progress(restore_ray_data_logging):
    import ray

    ray_data_console(verbose=False, tty=False)
    data = logging.getLogger("ray.data")
    assert _console_handlers() and all(h.level == logging.WARNING for h in _console_handlers())
    # ray-data.log (Ray's session file handler) still takes every record.
    assert any(h.level <= logging.INFO for h in data.handlers if h not in _console_handlers())
    assert not ray.data.DataContext.get_current().enable_operator_progress_bars
    progress = logging.getLogger(_RAY_DATA_PROGRESS_LOGGER)
    ours = [h for h in progress.handlers if getattr(h, "_raydefense_progress", False)]
    assert len(ours) == 1 and ours[0].level == logging.INFO and progress.propagate
    # Ray Data's notice that the operator bars are off (a WARNING) stays off the console; its
    # progress lines (INFO, a child logger) still flow.
    notice = logging.getLogger(_RAY_DATA_PROGRESS_NOTICE_LOGGER)
    assert not notice.isEnabledFor(logging.WARNING) and progress.isEnabledFor(logging.INFO)
    ray_data_console(verbose=False, tty=False)  # a second init_ray in the same process adds nothing
    assert len([h for h in progress.handlers if getattr(h, "_raydefense_progress", False)]) == 1


def test_a_terminal_keeps_operator_bars_and_verbose_shows_everything(restore_ray_data_logging):
    import ray

    ray_data_console(verbose=False, tty=True)
    assert ray.data.DataContext.get_current().enable_operator_progress_bars
    ray_data_console(verbose=True, tty=False)
    assert ray.data.DataContext.get_current().enable_operator_progress_bars
    assert logging.getLogger(_RAY_DATA_PROGRESS_NOTICE_LOGGER).isEnabledFor(logging.INFO)
    assert all(h.level == logging.INFO for h in _console_handlers())


def test_verbose_flag_is_scale_worker_logs():
    p = common_parser("x")
    smoke = f"{REPO}/configs/smoke.yaml"
    assert config_from_args(p.parse_args(["--config", smoke, "--verbose"])).scale.worker_logs is True
    assert config_from_args(p.parse_args(["--config", smoke])).scale.worker_logs is False


def test_the_token_notice_is_shown_only_when_verbose():
    notice = logging.getLogger(_RAY_TOKEN_NOTICE_LOGGER)
    level = notice.level
    try:
        ray_notices(verbose=False)
        assert not notice.isEnabledFor(logging.WARNING) and notice.isEnabledFor(logging.ERROR)
        ray_notices(verbose=True)
        assert notice.level == logging.NOTSET
    finally:
        notice.setLevel(level)
