"""Experiment tracking is off unless asked for, and says what is missing when its library is."""

from __future__ import annotations

import sys

import pytest

from medae_core.config import RunConfig
from medae_core.errors import ConfigError
from medae_core.tracking import TENSORBOARD_DIR, RunTracker, check_tracking


def test_tracking_is_off_by_default_and_writes_nothing(tmp_path):
    tracker = RunTracker(tmp_path, RunConfig())
    tracker.log_round({"round": 1, "train_loss": 0.1, "sites": {"a": {"status": "ok", "epsilon": 1.0}}})
    tracker.log_figures([], 1)
    tracker.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_a_missing_tensorboard_is_a_clear_error_before_the_run(monkeypatch):
    cfg = RunConfig().with_overrides({"tracking.tensorboard": True})
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        check_tracking(cfg)
