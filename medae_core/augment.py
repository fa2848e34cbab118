"""Training augmented with VAE samples (``train.augment_with_samples``), and what it means for privacy.

A site may add ``augment_with_samples × units`` synthetic images to its own
training data, drawn from the VAE bundle ``train.augment_model``. Each sample
is its own privacy unit (a "synthetic patient"): Poisson sampling then
includes a real patient with probability batch / (real + synthetic units),
and the accountant uses exactly that rate, so the guarantee for the real
patients holds as before.

Drawing samples from a model is post-processing: it spends no ε. That holds
only when the VAE itself is private or public, so a VAE is accepted only if it
was trained under DP (its ε was spent where it was trained, and composes with
this run's for patients it saw) or is a `medae pretrain` model of public data.
A VAE trained without DP on patients is refused: its samples could reproduce
them, and nothing here would account for it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from medae_core.bundle import load_bundle
from medae_core.config import RunConfig
from medae_core.errors import BundleError, ConfigError
from medae_core.starts import PROVENANCE_KEY


def synthetic_units(cfg: RunConfig, n_units: int) -> np.ndarray | None:
    """The synthetic training images for a site with ``n_units`` real units, [n, S, S]; None when off."""
    fraction = cfg.train.augment_with_samples
    if fraction <= 0:
        return None
    n = max(1, round(fraction * n_units))
    return _samples(cfg.train.augment_model, n, cfg.train.seed, cfg.model.image_size).copy()


@functools.lru_cache(maxsize=4)
def _samples(path: str, n: int, seed: int, image_size: int) -> np.ndarray:
    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        raise ConfigError(f"train.augment_model = {path!r}: {exc}") from None
    kind, size = bundle.config.model.kind, bundle.config.model.image_size
    if kind != "vae":
        raise ConfigError(f"train.augment_model must be a VAE bundle; {path} is a {kind!r}")
    if size != image_size:
        raise ConfigError(f"train.augment_model makes {size} px images; this run trains at {image_size} px")
    if not bundle.config.privacy.enabled and PROVENANCE_KEY not in bundle.info:
        raise ConfigError(f"train.augment_model {path} was trained without DP on data not declared public: its "
                          "samples could reproduce its patients. Use a VAE trained under DP or one from "
                          "`medae pretrain` (public data)")
    model = bundle.build_model()
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        return model.sample(n, generator).float().numpy()[:, 0]
