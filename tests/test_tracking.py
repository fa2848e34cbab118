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


def test_a_missing_mlflow_is_a_clear_error_before_the_run(monkeypatch):
    cfg = RunConfig().with_overrides({"tracking.mlflow": True})
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match="pip install mlflow-skinny"):
        check_tracking(cfg)


def test_mlflow_keeps_one_run_per_medae_run_across_a_resume(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from medae_core.tracking import MLFLOW_DIR, MLFLOW_RUN_TAG

    cfg = RunConfig().with_overrides({"tracking.mlflow": True})

    def round_record(n, eps):
        return {"round": n, "train_loss": 1.0 / n, "threshold": 0.1,
                "sites": {"a": {"status": "ok", "epsilon": eps}, "b": {"status": "refused", "epsilon": 9.0}}}

    tracker = RunTracker(tmp_path, cfg, "run-1")
    tracker.log_round(round_record(1, 1.5))
    tracker.close(failed=True)  # e.g. interrupted; the run is resumed below
    tracker = RunTracker(tmp_path, cfg, "run-1")
    tracker.log_round(round_record(2, 2.5))
    tracker.log_figures([("ε per round / site", _png())], 2)
    tracker.close()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / MLFLOW_DIR / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medae").experiment_id])
    assert run.data.tags[MLFLOW_RUN_TAG] == "run-1" and run.info.status == "FINISHED"
    assert run.data.params["privacy.budget_epsilon"] == str(cfg.privacy.budget_epsilon)
    eps = client.get_metric_history(run.info.run_id, "epsilon/a")
    assert [(m.step, m.value) for m in sorted(eps, key=lambda m: m.step)] == [(1, 1.5), (2, 2.5)]
    assert "epsilon/b" not in run.data.metrics  # a refused site spent nothing in this run
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "report")]
    assert artifacts == ["report/per_round___site.png"]
    assert not (tmp_path / TENSORBOARD_DIR).exists()  # only what was asked for


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()
