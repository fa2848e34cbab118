"""The model bundle: everything `medae score` needs, in one folder.

A bundle is ``weights.pt`` (a plain state dict, loaded with ``weights_only``)
and ``bundle.json`` (format version, the full RunConfig — model and
preprocessing included — the calibrated threshold, and provenance). Both are
written to temporary names and renamed, so a reader never sees half a bundle,
even when a server saves one after every round.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medae_core.config import RunConfig
from medae_core.errors import BundleError, ConfigError
from medae_core.fileio import atomic_write, write_json

BUNDLE_FORMAT = 1
WEIGHTS = "weights.pt"
META = "bundle.json"


@dataclass(frozen=True)
class Threshold:
    """Image-score threshold above which an image is called anomalous."""

    value: float
    percentile: float
    n_healthy: int  # healthy validation images it was calibrated on
    method: str  # "validation-percentile" or "federated-histogram"


@dataclass
class Bundle:
    config: RunConfig
    state_dict: dict[str, torch.Tensor]
    threshold: Threshold | None
    info: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> torch.nn.Module:
        from medae_core.models import build_model

        model = build_model(self.config.model)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:  # missing keys or wrong shapes: weights and config disagree
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[1:3]) or first[0][:300]
            raise BundleError(
                f"the bundle's weights do not fit its own [model] settings ({detail}); "
                "the bundle is damaged or was edited: use the folder a medae run wrote"
            ) from None
        return model.eval()


def resolve_bundle_dir(path: str | Path) -> Path:
    """Accept a bundle folder or a run folder that contains ``model/``."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / META).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
    raise BundleError(
        f"no model bundle at {path}: expected {META} and {WEIGHTS} there or in {path / 'model'}. "
        "Point --model at the output folder of `medae train-local` or `medae simulate`."
    )


def save_bundle(directory: str | Path, bundle: Bundle) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": BUNDLE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": bundle.config.to_dict(),
        "threshold": None if bundle.threshold is None else vars(bundle.threshold),
        "info": bundle.info,
    }
    state = {k: v.detach().cpu() for k, v in bundle.state_dict.items()}
    atomic_write(directory / WEIGHTS, lambda fh: torch.save(state, fh))
    write_json(directory / META, meta)
    return directory


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle; anything damaged or edited is a `BundleError` that says which file and what."""
    directory = resolve_bundle_dir(path)
    try:
        meta = json.loads((directory / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{directory / META} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise BundleError(f"{directory} has bundle format {found!r}; this medae reads format {BUNDLE_FORMAT}")
    if not isinstance(meta.get("config"), dict):
        raise BundleError(f"{directory / META} has no [config]; the bundle is incomplete or was edited")
    try:
        config = RunConfig.from_dict(meta["config"])
        threshold = Threshold(**meta["threshold"]) if meta.get("threshold") else None
    except (TypeError, ConfigError) as exc:
        raise BundleError(f"{directory / META} is not a valid bundle description: {exc}") from None
    try:
        state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file; torch's message would suggest weights_only=False
        kind = type(exc).__name__
        raise BundleError(
            f"{directory / WEIGHTS} cannot be read as model weights ({kind}): the file is truncated, damaged or "
            "not a medae bundle. Copy the bundle again from where it was written"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"{directory / WEIGHTS} does not hold a state dict of tensors")
    return Bundle(config, state, threshold, meta.get("info", {}))

