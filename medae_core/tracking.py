"""Experiment tracking: a federated run's round metrics and figures in TensorBoard, when asked for.

Off by default (`config.TrackingConfig`). Everything is written to local files
under the run folder (``RUN/tensorboard/``; view with ``tensorboard --logdir
RUN/tensorboard``); nothing goes over the network. What is logged is what the
coordinator already holds (pooled metrics and the sites' ε), never a site's data.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from medae_core.config import RunConfig
from medae_core.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"


def check_tracking(cfg: RunConfig) -> None:
    """Fail before a run starts when tracking is asked for and its library is missing."""
    if cfg.tracking.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("tracking.tensorboard = true needs the tensorboard package in this environment "
                              "(`pip install tensorboard`), or set it to false") from None


class RunTracker:
    """Logs rounds and the final figures to TensorBoard; does nothing when tracking is off."""

    def __init__(self, run_dir: Path, cfg: RunConfig):
        self.writer = None
        if not cfg.tracking.tensorboard:
            return
        check_tracking(cfg)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def log_round(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(record["round"])
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
        for tag, value in values.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def log_figures(self, figures: list[tuple[str, bytes]], step: int) -> None:
        """PNG figures (e.g. `report.report_figures`), each under its caption."""
        if self.writer is None:
            return
        from PIL import Image

        for caption, png in figures:
            image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            self.writer.add_image(f"report/{caption}", image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
