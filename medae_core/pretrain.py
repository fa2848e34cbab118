"""Public pretraining (zero ε), and building the public models that runs start from.

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

Where a run starts (``train.init``) is `medae_core.starts`. A model kind
without a shipped public model gets one built here on first use
(`ensure_start`: the built-in public set, then `pretrain`), cached under
``$MEDAE_HOME/pretrained/``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from medae_core.bundle import Bundle, save_bundle
from medae_core.config import RunConfig
from medae_core.errors import ConfigError
from medae_core.fileio import ensure_outside, output_folder
from medae_core.site import SiteTrainer, load_site_data, train_and_calibrate
from medae_core.starts import BUILTIN, PROVENANCE_KEY, builtin_location, config_hash

log = logging.getLogger(__name__)

# The built-in public set a shipped (or first-use) model is trained on.
BUILTIN_PUBLIC_PATIENTS = 200
BUILTIN_PUBLIC_SEED = 0
BUILTIN_EPOCHS = 30
# Its training settings are pinned here, so that tuning the private fine-tuning
# defaults (train.*) never silently changes the public model.
BUILTIN_TRAIN = {"train.epochs": BUILTIN_EPOCHS, "train.lr": 2e-3, "train.batch_size": 16, "train.seed": 0,
                 "train.weight_decay": 0.0}


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
        "inputs": site.inputs,
    }
    save_bundle(out, Bundle(cfg, result.state_dict, threshold, info={PROVENANCE_KEY: provenance}))
    return {"out": str(out), "loss": result.loss, "val_loss": evaluation.val_loss, **provenance}


def ensure_start(cfg: RunConfig) -> None:
    """Build the public model ``train.init = "builtin"`` needs, when none ships for this model (minutes, once)."""
    if (cfg.train.init or "").strip() != BUILTIN:
        return
    path = builtin_location(cfg)
    if (path / "bundle.json").is_file():
        return
    log.warning("no public model ships for a %s at %d px; building one now from the built-in public set "
                "(%d patients, %d epochs, no privacy spent; once, cached in %s)",
                cfg.model.kind, cfg.model.image_size, BUILTIN_PUBLIC_PATIENTS, BUILTIN_EPOCHS, path)
    build_builtin(cfg, path)


def build_builtin(cfg: RunConfig, out: Path, work: Path | None = None) -> dict:
    """Write the built-in public set into a scratch folder, pretrain on it, keep only the bundle."""
    from medae_core.benchmark import CONTRASTS, make_benchmark

    out = Path(out)
    cfg = cfg.with_overrides(BUILTIN_TRAIN)
    contrasts = cfg.data.contrasts or ("t1",)  # the public start sees the contrasts the run reads (a CVAE: its labels)
    if set(contrasts) - set(CONTRASTS):
        raise ConfigError(f"train.init = \"builtin\": the built-in public set has the contrasts "
                          f"{', '.join(CONTRASTS)}, not {', '.join(sorted(set(contrasts) - set(CONTRASTS)))}; "
                          "pretrain on public data of your own (`medae pretrain`) or set train.init = \"none\"")
    scratch = Path(tempfile.mkdtemp(prefix="medae-public-", dir=work))
    try:
        with output_folder(out, marker="bundle.json") as stage:  # the bundle is complete or absent
            make_benchmark(scratch / "set", sites=0, public=BUILTIN_PUBLIC_PATIENTS, seed=BUILTIN_PUBLIC_SEED,
                           contrasts=contrasts)
            summary = pretrain(scratch / "set" / "public", stage, cfg)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary | {"out": str(out)}
