"""Public pretraining (zero ε) and the weights a training run starts from.

Why: under patient-level DP the noise on the averaged gradient is several
times the clipped signal at hospital sizes (see BENCHMARKS.md). Training from a
random start, DP-SGD then learns nothing; fine-tuning a model that already
reconstructs brains only has to move a little, and that survives the noise.
This is the public-pretraining / private-fine-tuning recipe (Tramèr & Boneh
2021; De et al. 2022).

`pretrain` trains WITHOUT differential privacy, so its data must be data the
user may publish: the built-in public set (``medae make-benchmark --public N``),
IXI, OASIS or another licensed public collection, never a site's patients. The
bundle it writes records what it was trained on (`PROVENANCE_KEY`), and every
run started from it reports that.

``train.init`` says where a run starts (`initial_weights`):

- ``"builtin"`` (default): the public model that ships with medae for the
  configured model (``medae_core/pretrained/<kind>-<size>/``, made by
  ``scripts/build_pretrained.sh``); for a model without a shipped one, it is
  built on first use -- the built-in public set, then `pretrain` -- and cached
  under ``$MEDAE_HOME/pretrained/``;
- a path: a bundle from ``medae pretrain`` (or any medae run) with the same
  architecture;
- ``""`` / ``"none"``: random initialisation from ``train.seed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from medae_core.bundle import Bundle, load_bundle, save_bundle
from medae_core.config import RunConfig
from medae_core.errors import BundleError, ConfigError
from medae_core.fileio import output_folder

log = logging.getLogger(__name__)

PROVENANCE_KEY = "pretrained"
BUILTIN = "builtin"
SHIPPED_DIR = Path(__file__).parent / "pretrained"
# The built-in public set a shipped (or first-use) model is trained on.
BUILTIN_PUBLIC_PATIENTS = 200
BUILTIN_PUBLIC_SEED = 0
BUILTIN_EPOCHS = 30
# Its training settings are pinned here, so that tuning the private fine-tuning
# defaults (train.*) never silently changes the public model.
BUILTIN_TRAIN = {"train.epochs": BUILTIN_EPOCHS, "train.lr": 2e-3, "train.batch_size": 16, "train.seed": 0,
                 "train.weight_decay": 0.0}
# Model and preprocessing settings that must match between a start and a run.
_ARCH_KEYS = ("kind", "image_size", "in_channels", "channels", "latent_dim", "groups")


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 (first 16 hex digits) of what fixes a model's weights: model, data and training settings."""
    key = {s: cfg.to_dict()[s] for s in ("model", "data", "train")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def describe_data(root: Path, n_patients: int) -> str:
    """A one-line description of public data: the built-in set's own, else the folder's name."""
    for candidate in (root / "benchmark.json", root.parent / "benchmark.json"):
        if candidate.is_file():
            try:
                public = json.loads(candidate.read_text()).get("public")
            except (OSError, json.JSONDecodeError):
                public = None
            if public and root.name == "public":
                return str(public["description"])
    return f"user-declared public data '{root.name}' ({n_patients} patients)"


def pretrain(data: Path, out: Path, cfg: RunConfig, *, description: str | None = None, progress=None) -> dict:
    """Train ``cfg.model`` without DP on public ``data``; write a bundle with its provenance to ``out``.

    The bundle is complete (threshold from the public validation split), so it
    can be scored directly, used as ``train.init``, or both. Returns a summary.
    """
    from medae_core.jobs import ensure_outside, train_and_calibrate
    from medae_core.site import SiteTrainer, load_site_data

    data, out = Path(data), Path(out)
    ensure_outside(out, data)
    cfg = cfg.with_overrides({"privacy.enabled": False, "privacy.unit": "image", "train.init": "none",
                              "train.trainable": "all"})
    site = load_site_data(data, cfg, name="public")
    result, evaluation, threshold = train_and_calibrate(SiteTrainer(site, cfg, ledger=None), "pretrain", progress)
    provenance = {
        "data": description or describe_data(data, site.n_train_patients),
        "patients": site.n_train_patients,
        "images": len(site.train_images),
        "epochs": cfg.train.epochs,
        "config_hash": config_hash(cfg),
        "privacy": "none (public data)",
    }
    save_bundle(out, Bundle(cfg, result.state_dict, threshold, info={PROVENANCE_KEY: provenance}))
    return {"out": str(out), "loss": result.loss, "val_loss": evaluation.val_loss, **provenance}


# -- where a run starts ------------------------------------------------------------
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
            f"({', '.join(f'{k}={have[k]}' for k in diff)}), but this run trains "
            f"{', '.join(f'{k}={want[k]}' for k in diff)}; pretrain that model with `medae pretrain`, "
            "or set train.init = \"none\""
        )
    if start.data != cfg.data:
        log.warning("train.init %s was trained with other [data] (preprocessing) settings than this run", init)


def builtin_model(cfg: RunConfig) -> Path:
    """The shipped public model for ``cfg.model``, or one built now and cached (minutes, once)."""
    from medae_core.privacy import medae_home

    name = f"{cfg.model.kind}-{cfg.model.image_size}"
    shipped = SHIPPED_DIR / name
    if (shipped / "bundle.json").is_file() and not _architecture_diff(
            json.loads((shipped / "bundle.json").read_text())["config"]["model"], cfg.to_dict()["model"]):
        return shipped
    key = hashlib.sha256(json.dumps(cfg.to_dict()["model"], sort_keys=True).encode()).hexdigest()[:12]
    cached = medae_home() / "pretrained" / f"{name}-{key}"
    if (cached / "bundle.json").is_file():
        return cached
    log.warning("no public model ships for %s; building one now from the built-in public set "
                "(%d patients, %d epochs, no privacy spent; once, cached in %s)",
                name, BUILTIN_PUBLIC_PATIENTS, BUILTIN_EPOCHS, cached)
    build_builtin(cfg, cached)
    return cached


def build_builtin(cfg: RunConfig, out: Path, work: Path | None = None) -> dict:
    """Write the built-in public set into a scratch folder, pretrain on it, keep only the bundle."""
    from medae_core.benchmark import make_benchmark

    out = Path(out)
    cfg = cfg.with_overrides(BUILTIN_TRAIN)
    scratch = Path(tempfile.mkdtemp(prefix="medae-public-", dir=work))
    try:
        with output_folder(out, marker="bundle.json") as stage:  # the bundle is complete or absent
            make_benchmark(scratch / "set", sites=0, public=BUILTIN_PUBLIC_PATIENTS, seed=BUILTIN_PUBLIC_SEED)
            summary = pretrain(scratch / "set" / "public", stage, cfg)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary | {"out": str(out)}


def _architecture_diff(have: dict, want: dict) -> list[str]:
    """The architecture keys in which two [model] tables differ."""
    return [k for k in _ARCH_KEYS if have[k] != want[k]]
