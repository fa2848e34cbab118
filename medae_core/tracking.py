"""Experiment tracking: a federated run's round metrics and figures in TensorBoard or MLflow, when asked for.

Off by default (`config.TrackingConfig`). Everything is written to local files
under the run folder; nothing goes over the network:

- TensorBoard: event files in ``RUN/tensorboard/`` (``tensorboard --logdir RUN/tensorboard``);
- MLflow: a SQLite store ``RUN/mlflow/mlflow.db`` with artifacts in ``RUN/mlflow/artifacts/``
  (``mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db``, which needs the full
  ``mlflow`` package; ``mlflow-skinny`` is enough to write). MLflow's telemetry is switched
  off before it is imported. One MLflow run per medae run: a resumed run continues it.

What is logged is what the coordinator already holds (pooled metrics, the
threshold and the sites' ε, the run's configuration), never a site's data.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from medae_core.config import RunConfig
from medae_core.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlflow"
MLFLOW_EXPERIMENT = "medae"
MLFLOW_RUN_TAG = "medae.run_id"
# Set before mlflow is imported: no usage reports leave the machine.
_NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def check_tracking(cfg: RunConfig) -> None:
    """Fail before a run starts when tracking is asked for and its library is missing."""
    if cfg.tracking.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("tracking.tensorboard = true needs the tensorboard package in this environment "
                              "(`pip install tensorboard`), or set it to false") from None
    if cfg.tracking.mlflow:
        os.environ.update(_NO_TELEMETRY)
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("tracking.mlflow = true needs MLflow in this environment "
                              "(`pip install mlflow-skinny`, or `mlflow` for its UI), or set it to false") from None


def round_values(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one round record (`server.app` writes them to metrics.json) under their tracking names."""
    values = {
        "loss/train": record.get("train_loss"),
        "loss/validation": record.get("val_loss"),
        "threshold": record.get("threshold"),
        "image_auroc/model": (record.get("test") or {}).get("image_auroc"),
        "image_auroc/intensity_baseline": (record.get("baseline") or {}).get("image_auroc"),
    }
    for site, s in (record.get("sites") or {}).items():
        if s.get("status") == "ok":
            values[f"epsilon/{site}"] = s.get("epsilon")
    return {tag: float(v) for tag, v in values.items() if isinstance(v, int | float) and math.isfinite(v)}


def config_params(cfg: RunConfig) -> dict[str, str]:
    """The run's configuration as flat ``section.key`` parameters."""
    return {f"{section}.{key}": str(value) for section, keys in cfg.to_dict().items() for key, value in keys.items()}


class _MLflowRun:
    """One MLflow run in the run folder's own SQLite store; reopened by its medae run id on resume.

    Made by `RunTracker` after `check_tracking`, which switches telemetry off before mlflow is imported.
    """

    def __init__(self, run_dir: Path, cfg: RunConfig, run_id: str):
        for name in ("mlflow", "alembic"):  # their schema set-up lines are not the run's progress
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        root = (Path(run_dir) / MLFLOW_DIR).absolute()
        root.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            MLFLOW_EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
        earlier = self.client.search_runs([experiment_id], f"tags.`{MLFLOW_RUN_TAG}` = '{run_id}'", max_results=1)
        if earlier:
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_id or None, tags={MLFLOW_RUN_TAG: run_id})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in config_params(cfg).items()])

    def log_values(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_image(self, name: str, image: np.ndarray) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"report/{name}.png")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _file_name(caption: str) -> str:
    return "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in caption).strip("_")[:80] or "figure"


class RunTracker:
    """Logs rounds and the final figures to TensorBoard and/or MLflow; does nothing when tracking is off."""

    def __init__(self, run_dir: Path, cfg: RunConfig, run_id: str = ""):
        self.writer = None
        self.mlflow = None
        if not (cfg.tracking.tensorboard or cfg.tracking.mlflow):
            return
        check_tracking(cfg)
        if cfg.tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        if cfg.tracking.mlflow:
            self.mlflow = _MLflowRun(run_dir, cfg, run_id)

    def log_round(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        values = round_values(record)
        if self.mlflow is not None:
            self.mlflow.log_values(values, step)
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_figures(self, figures: list[tuple[str, bytes]], step: int) -> None:
        """PNG figures (e.g. `report.report_figures`), each under its caption."""
        if self.writer is None and self.mlflow is None:
            return
        from PIL import Image

        for caption, png in figures:
            image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            if self.writer is not None:
                self.writer.add_image(f"report/{caption}", image, step, dataformats="HWC")
            if self.mlflow is not None:
                self.mlflow.log_image(_file_name(caption), image)
        if self.writer is not None:
            self.writer.flush()

    def close(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.mlflow is not None:
            self.mlflow.close(failed)
            self.mlflow = None
