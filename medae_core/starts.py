"""Where a run starts (``train.init``): the weights, their provenance, and the public models medae ships.

``train.init`` says where a run starts (`initial_weights`):

- ``"builtin"`` (default): the public model for the configured model kind and
  size: shipped with medae (``medae_core/pretrained/<kind>-<size>/``, made by
  ``scripts/build_pretrained.py``), or built once from the built-in public set
  and cached under ``$MEDAE_HOME/pretrained/`` (`medae_core.pretrain.ensure_start`,
  which every command that trains calls first);
- a path: a bundle from ``medae pretrain`` (or any medae run) with the same
  architecture;
- ``""`` / ``"none"``: random initialisation from ``train.seed``.

Only finding and loading happen here, so the site, the apps and the jobs can
all ask for a start; building one is pretraining (`medae_core.pretrain`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from medae_core.bundle import load_bundle
from medae_core.config import RunConfig
from medae_core.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

PROVENANCE_KEY = "pretrained"
BUILTIN = "builtin"
SHIPPED_DIR = Path(__file__).parent / "pretrained"
# Model and preprocessing settings that must match between a start and a run.
_ARCH_KEYS = ("kind", "image_size", "in_channels", "channels", "latent_dim", "groups", "labels",
              "local_latent_channels")


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 (first 16 hex digits) of what fixes a model's weights: model, data and training settings."""
    key = {s: cfg.to_dict()[s] for s in ("model", "data", "train")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def initial_weights(cfg: RunConfig) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """(state dict, provenance) for ``train.init``; (None, None) for a random start."""
    init = (cfg.train.init or "").strip()
    if init.lower() in ("", "none", "scratch"):
        return None, None
    path = builtin_model(cfg) if init == BUILTIN else Path(init).expanduser()
    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        raise ConfigError(f"train.init = {init!r}: {exc}") from None
    check_compatible(bundle.config, cfg, init)
    provenance = dict(bundle.info.get(PROVENANCE_KEY) or {
        "data": f"the model bundle at {path} (not made by `medae pretrain`: what it was trained on is unknown)",
        "config_hash": config_hash(bundle.config),
    })
    provenance["init"] = BUILTIN if init == BUILTIN else str(path)
    return bundle.state_dict, provenance


def check_compatible(start: RunConfig, cfg: RunConfig, init: str) -> None:
    """A start must have the run's architecture; different preprocessing is allowed but warned about."""
    have, want = start.to_dict()["model"], cfg.to_dict()["model"]
    diff = _architecture_diff(have, want)
    if diff:
        raise ConfigError(
            f"train.init = {init!r} is a {have['kind']} model at {have['image_size']} px "
            f"({', '.join(f'{k}={have.get(k)}' for k in diff)}), but this run trains "
            f"{', '.join(f'{k}={want[k]}' for k in diff)}; pretrain that model with `medae pretrain`, "
            "or set train.init = \"none\""
        )
    if start.data.preprocessing() != cfg.data.preprocessing():
        log.warning("train.init %s was trained with other [data] (preprocessing) settings than this run", init)


def builtin_model(cfg: RunConfig) -> Path:
    """The public model for ``cfg.model``: the shipped one, else the one built and cached for it.

    Raises ConfigError when neither exists yet (`medae_core.pretrain.ensure_start` builds it).
    """
    path = builtin_location(cfg)
    if not (path / "bundle.json").is_file():
        raise ConfigError(f"train.init = \"builtin\": no public model for a {cfg.model.kind} at "
                          f"{cfg.model.image_size} px is built yet (expected in {path}); `medae train-local`, "
                          "`simulate` and `server` build it before they train")
    return path


def builtin_location(cfg: RunConfig) -> Path:
    """Where the public model for ``cfg.model`` is, or will be once built: shipped if one fits, else the cache."""
    from medae_core.privacy import medae_home

    name = f"{cfg.model.kind}-{cfg.model.image_size}"
    shipped = SHIPPED_DIR / name
    if (shipped / "bundle.json").is_file() and not cfg.data.contrasts and not _architecture_diff(
            json.loads((shipped / "bundle.json").read_text())["config"]["model"], cfg.to_dict()["model"]):
        return shipped  # the shipped models saw T1 images of every kind
    # The contrasts a run reads are the public images its start must see (a FLAIR-only VAE: FLAIR).
    what = cfg.to_dict()["model"] | ({"contrasts": list(cfg.data.contrasts)} if cfg.data.contrasts else {})
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return medae_home() / "pretrained" / f"{name}-{key}"


def _architecture_diff(have: dict, want: dict) -> list[str]:
    """The architecture keys in which two [model] tables differ (a key a bundle predates has its default)."""
    defaults = RunConfig().to_dict()["model"]
    return [k for k in _ARCH_KEYS if have.get(k, defaults[k]) != want.get(k, defaults[k])]
