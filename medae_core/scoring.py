"""Anomaly maps, image scores and threshold calibration.

About 500 lines: every step from a reconstruction to a decision (residuals, foreground,
post-processing, aggregation, thresholds, histogram bins) shares the conventions below.

Everything here works on numpy arrays ``[N, S, S]`` of images normalised to
about [0, 1] (as `medae_core.data` reads them). The only function
that touches a model is `run_model`; `anomaly_maps` composes it with the pure
numpy steps so that those can be tested and reused without torch:

    images, recons --residual_maps--> raw maps --postprocess--> maps
    maps --image_scores--> one score per image (mean of the top k % pixels)

Conventions
-----------
* A pixel / image is called anomalous when its value is **at or above** the
  threshold (``>=``), everywhere in medae (scoring, metrics, figures).
* Scores are non-negative and larger means more anomalous.

VAE scores (`ScoringConfig.vae_score`; ignored for models without a KL term)
--------------------------------------------------------------------------
``"recon"``  map = residual map; score = top-k % mean of the map.
``"elbo"``   map = residual map + KL(x) / (S*S) added to every scored pixel,
             i.e. the per-image KL term of the negative ELBO spread evenly over
             the image. The image score is the same top-k % aggregate of that
             map, so it equals top-k % residual + KL / (S*S); with
             ``top_percent = 100`` it is exactly the per-pixel negative ELBO
             (reconstruction term measured with the chosen residual, KL with
             weight 1, i.e. the true bound, not the training ``beta``).
             The constant per-image offset does not change the ranking of
             pixels inside one image, but it does move whole images against
             each other in pooled pixel metrics, which is the point.
``"kl"``     score = KL(q(z|x) || p(z)) in nats. KL has no spatial resolution,
             so the map is the plain residual map (as in ``"recon"``): pixel
             metrics and figures in this mode are those of the reconstruction.
             Image thresholds are then in nats and must not be used as pixel
             thresholds; use `calibrate_pixel_threshold` for pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from medae_core.config import ScoringConfig
from medae_core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ResidualKind = Literal["l1", "l2", "ssim"]

# SSIM window (Wang et al. 2004): Gaussian, sigma 1.5 px, truncated at 3.5 sigma
# -> radius 5, i.e. the classic 11 x 11 window. Constants for data range 1.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# Images per chunk for the numpy filters (bounds temporary memory).
_CHUNK = 64


def is_anomalous(values: Any, threshold: float) -> np.ndarray:
    """The decision, for images and pixels alike: ``value >= threshold`` (module docstring)."""
    return np.asarray(values) >= threshold


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def as_stack(a: Any, name: str, dtype: Any = np.float32) -> np.ndarray:
    """Return an ``[N, S, S]`` view/copy of ``a`` (accepts [S,S] and [N,1,S,S]); ``dtype=None`` keeps it."""
    arr = np.asarray(a)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape [N, S, S] (or [S, S], [N, 1, S, S]); got {arr.shape}")
    return arr if dtype is None else np.asarray(arr, dtype=dtype)


def _as_masks(m: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.asarray(m)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    return arr.astype(bool, copy=False)


# ---------------------------------------------------------------------------
# foreground
# ---------------------------------------------------------------------------
def foreground_mask(
    images: np.ndarray,
    threshold: float = 0.05,
    min_component_fraction: float = 0.1,
) -> np.ndarray:
    """Body / brain mask of each image, from the image itself: bool ``[N, S, S]``.

    Steps, per image:

    1. ``image > threshold`` on the normalised intensity. Every image goes
       through the same normalisation to about [0, 1] with air/background near
       0, so one fixed threshold works across sites and modalities. A per-image
       threshold (Otsu) was rejected: it is unstable on near-empty slices and
       moves with the lesion itself (a large bright lesion raises it).
    2. Morphological opening with a 3 x 3 cross (erosion treats the image
       border as foreground, so anatomy cut by the field of view keeps its
       edge pixels). Removes isolated noise and ghosting specks. If opening
       would erase everything (tiny structures), the thresholded mask is kept.
    3. Keep every connected component with at least ``min_component_fraction``
       of the largest component's area. Unlike "largest component only", this
       keeps genuinely separate parts (two lungs, two legs, hemispheres split
       in a slice) while dropping burned-in text, tubing and small artefacts.
    4. Fill holes, so dark structures enclosed by anatomy (ventricles, CSF,
       lungs on a soft-tissue window, necrotic lesion cores) are inside.

    An image with nothing above the threshold gets an all-False mask;
    `image_scores` then falls back to the whole image.
    """
    imgs = as_stack(images, "images")
    out = np.zeros(imgs.shape, dtype=bool)
    cross = ndimage.generate_binary_structure(2, 1)
    for i, img in enumerate(imgs):
        m = img > threshold  # NaN compares False
        if not m.any():
            continue
        eroded = ndimage.binary_erosion(m, structure=cross, border_value=1)
        opened = ndimage.binary_dilation(eroded, structure=cross) & m
        if opened.any():
            m = opened
        labels, n = ndimage.label(m)
        if n > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            keep = sizes >= min_component_fraction * sizes.max()
            keep[0] = False
            m = keep[labels]
        out[i] = ndimage.binary_fill_holes(m)
    return out


# ---------------------------------------------------------------------------
# residual maps
# ---------------------------------------------------------------------------
def _gauss(a: np.ndarray) -> np.ndarray:
    # sigma 0 on the batch axis: each image is filtered on its own.
    return ndimage.gaussian_filter(a, sigma=(0.0, SSIM_SIGMA, SSIM_SIGMA), truncate=SSIM_TRUNCATE, mode="reflect")


def local_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-pixel SSIM of two ``[N, S, S]`` stacks with an 11 x 11 Gaussian window (sigma 1.5).

    Standard SSIM (Wang et al. 2004) with C1 = (0.01 L)^2, C2 = (0.03 L)^2 and
    L = ``data_range`` (1 for normalised images); borders are reflected.
    Identical flat regions (e.g. background) give SSIM 1.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mux, muy = _gauss(x), _gauss(y)
    sxx = _gauss(x * x) - mux * mux
    syy = _gauss(y * y) - muy * muy
    sxy = _gauss(x * y) - mux * muy
    num = (2 * mux * muy + c1) * (2 * sxy + c2)
    den = (mux * mux + muy * muy + c1) * (sxx + syy + c2)
    return num / den


def residual_maps(
    images: np.ndarray,
    recons: np.ndarray,
    kind: ResidualKind = "l1",
    positive_only: bool = False,
) -> np.ndarray:
    """Per-pixel reconstruction error, float32 ``[N, S, S]``, >= 0.

    ``"l1"``: ``|x - r|``; ``"l2"``: ``(x - r)^2``; ``"ssim"``: ``1 - SSIM(x, r)``
    per pixel (see `local_ssim`: 11 x 11 Gaussian window, sigma 1.5), clipped to
    [0, 2]. ``positive_only`` keeps only pixels where the image is brighter than
    its reconstruction (``x - r > 0``; bright lesions such as FLAIR
    hyperintensities) and sets the others to 0; for SSIM the same sign gate is
    applied to the SSIM map.
    """
    x = as_stack(images, "images")
    r = as_stack(recons, "recons")
    if x.shape != r.shape:
        raise ValueError(f"images {x.shape} and reconstructions {r.shape} differ in shape")
    x = np.nan_to_num(x)
    r = np.nan_to_num(r)
    diff = x - r
    if kind == "l1":
        out = np.maximum(diff, 0.0) if positive_only else np.abs(diff)
    elif kind == "l2":
        out = np.square(np.maximum(diff, 0.0) if positive_only else diff)
    elif kind == "ssim":
        out = np.empty_like(x)
        for s in range(0, len(x), _CHUNK):
            out[s : s + _CHUNK] = np.clip(1.0 - local_ssim(x[s : s + _CHUNK], r[s : s + _CHUNK]), 0.0, 2.0)
        if positive_only:
            out[diff <= 0] = 0.0
    else:
        raise ConfigError(f"scoring.residual must be one of l1, l2, ssim; got {kind!r}")
    return out.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------
# post-processing and aggregation
# ---------------------------------------------------------------------------
def postprocess(
    maps: np.ndarray,
    fg_masks: np.ndarray | None,
    median_filter: int = 5,
    mask_foreground: bool = True,
) -> np.ndarray:
    """Median-filter each map in 2-D (``median_filter`` x ``median_filter``), then
    set pixels outside the foreground to 0 (if ``mask_foreground``).

    ``median_filter`` 0 or 1 disables filtering; it must otherwise be odd so the
    map is not shifted. Returns a new float32 array.
    """
    out = as_stack(maps, "maps").copy()
    k = int(median_filter)
    if k > 1:
        if k % 2 == 0:
            raise ConfigError(f"scoring.median_filter must be odd (or 0/1 to disable); got {k}")
        out = _median_filter(out, k)
    elif k < 0:
        raise ConfigError(f"scoring.median_filter must be >= 0; got {k}")
    if mask_foreground and fg_masks is not None:
        out[~_as_masks(fg_masks, out.shape, "fg_masks")] = 0.0
    return out


# Window values per chunk of `_median_filter` (k*k per pixel; 32 MB). A map whose windows
# alone exceed it (a wide kernel on a large map) is filtered by scipy, one map at a time.
_MEDIAN_WINDOW_VALUES = 1 << 23


def _median_filter(maps: np.ndarray, k: int) -> np.ndarray:
    """Each ``[S, S]`` map of ``maps`` median-filtered over k x k windows, borders mirrored.

    The same values as ``scipy.ndimage.median_filter(map, size=k, mode="reflect")`` on
    each map (numpy's "symmetric" padding is scipy's "reflect"), 2.4x faster at 64 px
    and k = 5 here: a view of every pixel's window, and one `np.partition` per chunk of
    maps instead of a Python call per map.
    """
    if len(maps) == 0:
        return maps.copy()
    per_map = maps[0].size * k * k
    if per_map > _MEDIAN_WINDOW_VALUES:
        return np.stack([ndimage.median_filter(m, size=k, mode="reflect") for m in maps])
    r, mid = k // 2, k * k // 2
    out = np.empty_like(maps)
    step = max(1, _MEDIAN_WINDOW_VALUES // per_map)
    for i in range(0, len(maps), step):
        padded = np.pad(maps[i:i + step], ((0, 0), (r, r), (r, r)), mode="symmetric")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2))
        windows = windows.reshape(*windows.shape[:3], k * k)
        out[i:i + step] = np.partition(windows, mid, axis=-1)[..., mid]
    return out


def image_scores(maps: np.ndarray, fg_masks: np.ndarray | None, top_percent: float = 1.0) -> np.ndarray:
    """Image score = mean of the top ``top_percent`` % of the map's foreground pixels.

    At least one pixel is always used (``ceil``). Images whose foreground mask
    is empty (or ``fg_masks=None``) are scored on the whole map, so every image
    gets a finite score. ``top_percent = 100`` gives the mean over the foreground.
    """
    if not 0.0 < float(top_percent) <= 100.0:
        raise ConfigError(f"scoring.top_percent must be in (0, 100]; got {top_percent}")
    m = np.nan_to_num(as_stack(maps, "maps"))
    fg = None if fg_masks is None else _as_masks(fg_masks, m.shape, "fg_masks")
    scores = np.empty(len(m), dtype=np.float64)
    for i in range(len(m)):
        vals = m[i][fg[i]] if fg is not None and fg[i].any() else m[i].ravel()
        k = max(1, math.ceil(vals.size * float(top_percent) / 100.0))
        scores[i] = float(np.partition(vals, vals.size - k)[vals.size - k :].mean(dtype=np.float64))
    return scores


def score_reconstructions(
    images: np.ndarray,
    recons: np.ndarray,
    cfg: ScoringConfig,
    kl: np.ndarray | None = None,
    fg_masks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Maps and scores from images and their reconstructions (no model needed).

    ``kl``: per-image KL term of a VAE (``[N]``, nats) or None. Its use follows
    ``cfg.vae_score`` (module docstring). ``fg_masks`` defaults to
    `foreground_mask` of the images.
    """
    x = as_stack(images, "images")
    fg = foreground_mask(x) if fg_masks is None else _as_masks(fg_masks, x.shape, "fg_masks")
    maps = residual_maps(x, recons, cfg.residual, cfg.positive_only)
    maps = postprocess(maps, fg, cfg.median_filter, cfg.mask_foreground)
    if kl is not None and cfg.vae_score in ("elbo", "kl"):
        kl = np.asarray(kl, dtype=np.float64).reshape(-1)
        if kl.shape[0] != len(x):
            raise ValueError(f"kl has {kl.shape[0]} values for {len(x)} images")
    if kl is not None and cfg.vae_score == "elbo":
        npix = x.shape[1] * x.shape[2]
        offset = (kl / npix).astype(np.float32)[:, None, None]
        where = fg if cfg.mask_foreground else np.ones_like(fg)
        maps = np.where(where, maps + offset, maps).astype(np.float32, copy=False)
    scores = image_scores(maps, fg, cfg.top_percent)
    if kl is not None and cfg.vae_score == "kl":
        scores = kl.copy()
    return maps, scores


# ---------------------------------------------------------------------------
# model glue (the only place that calls the model)
# ---------------------------------------------------------------------------
def run_model(
    model: Any,
    images: np.ndarray,
    device: Any = "cpu",
    batch_size: int = 64,
    with_kl: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cond: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reconstruct ``images [N, S, S]`` in batches: ``(recons [N, S, S], kl [N] or None)``.

    Uses ``model.reconstruct(x[B,1,S,S], cond)`` and, when ``with_kl`` and the model
    has it, ``model.kl_per_sample(x, cond) -> [B]``. ``cond``: each image's label
    index, for a conditional model (the others ignore it). The model is put in eval
    mode for the call and its previous mode restored.
    """
    import torch

    x_all = as_stack(images, "images")
    n = len(x_all)
    kl_fn = getattr(model, "kl_per_sample", None) if with_kl else None
    recons = np.empty_like(x_all)
    kl = np.empty(n, dtype=np.float64) if kl_fn is not None else None
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            for s in range(0, n, max(1, int(batch_size))):
                xb = torch.from_numpy(np.ascontiguousarray(x_all[s : s + batch_size]))[:, None].to(device)
                cb = None if cond is None else torch.as_tensor(np.asarray(cond)[s : s + batch_size]).to(device)
                rb = model.reconstruct(xb) if cb is None else model.reconstruct(xb, cb)
                recons[s : s + len(xb)] = rb.detach().float().cpu().numpy().reshape(len(xb), *x_all.shape[1:])
                if kl_fn is not None:
                    kl_b = kl_fn(xb) if cb is None else kl_fn(xb, cb)
                    kl[s : s + len(xb)] = kl_b.detach().double().cpu().numpy().reshape(-1)
                if progress is not None:
                    progress(min(s + len(xb), n), n)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return recons, kl


def anomaly_maps(
    model: Any,
    images: np.ndarray,
    cfg: ScoringConfig,
    device: Any = "cpu",
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    fg_masks: np.ndarray | None = None,
    cond: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps ``[N, S, S]`` (float32) and image scores ``[N]`` for a trained model.

    Reconstruct (`run_model`), residual, post-process, aggregate
    (`score_reconstructions`). The KL term is computed only when
    ``cfg.vae_score`` needs it and the model has ``kl_per_sample``; for other
    models ``vae_score`` is ignored. ``fg_masks`` defaults to `foreground_mask`.
    """
    x = as_stack(images, "images")
    fg = None if fg_masks is None else _as_masks(fg_masks, x.shape, "fg_masks")

    def score(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        tick = None if progress is None else (lambda done, _total: progress(lo + done, len(x)))
        _, maps, scores = reconstruct_and_score(
            model, x[lo:hi], cfg, device, batch_size, tick, None if fg is None else fg[lo:hi],
            None if cond is None else np.asarray(cond)[lo:hi])
        return maps, scores

    return _in_chunks(x, score, multiple=max(1, int(batch_size)))


# Images per chunk of `anomaly_maps` and `intensity_baseline`: their reconstructions, residuals and
# post-processing copies are a few times the chunk's pixels, so a large test set (a simulation's
# pooled one) costs its maps and scores plus this much, not several copies of itself.
_SCORE_CHUNK_BYTES = 64 << 20


def _in_chunks(x: np.ndarray, score: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
               multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``score(lo, hi)`` (maps and scores of images lo..hi) over chunks of about `_SCORE_CHUNK_BYTES`."""
    n = len(x)
    step = max(1, _SCORE_CHUNK_BYTES // max(1, x[:1].nbytes)) if n else 1
    step = max(multiple, step // multiple * multiple)  # whole model batches, as one call would run them
    if n <= step:
        return score(0, n)
    maps = scores = None
    for lo in range(0, n, step):
        m, sc = score(lo, min(lo + step, n))
        if maps is None:
            maps, scores = np.empty((n, *m.shape[1:]), m.dtype), np.empty(n, sc.dtype)
        maps[lo : lo + len(m)], scores[lo : lo + len(sc)] = m, sc
    return maps, scores


def reconstruct_and_score(
    model: Any,
    images: np.ndarray,
    cfg: ScoringConfig,
    device: Any = "cpu",
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    fg_masks: np.ndarray | None = None,
    cond: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`anomaly_maps` with the reconstructions it scored: ``(recons, maps, scores)``, one model pass."""
    need_kl = cfg.vae_score in ("elbo", "kl")
    if need_kl and not hasattr(model, "kl_per_sample"):
        log.info("scoring.vae_score=%s applies to VAEs only; this model is scored on reconstruction", cfg.vae_score)
    recons, kl = run_model(model, images, device, batch_size, with_kl=need_kl, progress=progress, cond=cond)
    return (recons, *score_reconstructions(images, recons, cfg, kl=kl, fg_masks=fg_masks))


# ---------------------------------------------------------------------------
# intensity baseline
# ---------------------------------------------------------------------------
def intensity_baseline(
    images: np.ndarray,
    cfg: ScoringConfig | None = None,
    fg_masks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Plain intensity-threshold baseline: the normalised image *is* the anomaly map.

    Bright lesions (e.g. FLAIR hyperintensities) are found by thresholding
    intensity alone; Meissen et al. 2021 ("Challenging current semi-supervised
    anomaly segmentation methods for brain MRI") show that this beats many
    autoencoder methods on such data, so every results table carries it. The map
    goes through the same `postprocess` (median filter, foreground masking) and
    `image_scores` aggregation as model maps. It cannot find dark lesions.
    """
    cfg = cfg or ScoringConfig()
    images = as_stack(images, "images")
    fg_all = None if fg_masks is None else _as_masks(fg_masks, images.shape, "fg_masks")

    def score(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.nan_to_num(images[lo:hi])
        fg = foreground_mask(x) if fg_all is None else fg_all[lo:hi]
        maps = postprocess(np.clip(x, 0.0, None), fg, cfg.median_filter, cfg.mask_foreground)
        return maps, image_scores(maps, fg, cfg.top_percent)

    return _in_chunks(images, score)


# ---------------------------------------------------------------------------
# thresholds
# ---------------------------------------------------------------------------
def _finite(values: Any, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(v)
    if bad.any():
        log.warning("ignoring %d non-finite %s", int(bad.sum()), what)
        v = v[~bad]
    return v


def _check_percentile(percentile: float) -> float:
    p = float(percentile)
    if not 0.0 <= p <= 100.0:
        raise ConfigError(f"threshold percentile must be in [0, 100]; got {percentile}")
    return p


def calibrate_threshold(healthy_scores: Sequence[float] | np.ndarray, percentile: float = 95.0) -> float:
    """Image threshold = the ``percentile`` of healthy validation scores (linear interpolation).

    Images scoring at or above it are flagged: about ``100 - percentile`` % of
    healthy images are false positives by construction.
    """
    p = _check_percentile(percentile)
    v = _finite(healthy_scores, "healthy scores")
    if v.size == 0:
        raise DataError("cannot calibrate a threshold: no healthy validation scores (need at least one image)")
    return float(np.percentile(v, p))


def calibrate_pixel_threshold(
    healthy_maps: np.ndarray,
    fg_masks: np.ndarray | None,
    percentile: float = 99.0,
    max_pixels: int = 2_000_000,
    seed: int = 0,
) -> float:
    """Pixel threshold = ``percentile`` of the foreground pixels of healthy maps.

    Needed when image scores are not in map units (``vae_score = "kl"``).
    Beyond ``max_pixels`` pixels a deterministic random subsample is used.
    """
    p = _check_percentile(percentile)
    m = as_stack(healthy_maps, "healthy_maps")
    vals = m[_as_masks(fg_masks, m.shape, "fg_masks")] if fg_masks is not None else m.ravel()
    vals = _finite(vals, "map values")
    if vals.size == 0:
        raise DataError("cannot calibrate a pixel threshold: no foreground pixel in the healthy maps")
    if vals.size > max_pixels:
        vals = vals[np.random.default_rng(seed).choice(vals.size, max_pixels, replace=False)]
    return float(np.percentile(vals, p))


# Federated calibration: each site sends only counts over these shared bins.
#
# Score scales: residual-based scores lie in [0, 2] (L1/L2 in [0, 1], 1-SSIM in
# [0, 2]), ELBO scores add KL/(S*S) (small), and KL scores are in nats (tens to
# thousands). One log-spaced grid covers them all: 100 bins per decade from
# 1e-6 to 1e6 (1200 bins), plus an underflow bin [-inf, 1e-6) (zeros, and any
# negative value) and an overflow bin [1e6, inf]. Adjacent edges differ by a
# factor 10**0.01, so a threshold read from the histogram is at most ~2.33 %
# (relative) above the exact pooled percentile, never below it (see
# `threshold_from_histogram`). Counts are integers; a site's 1202 counts are
# the only thing it shares.
SCORE_BINS_PER_DECADE = 100
SCORE_BINS: np.ndarray = np.concatenate(
    [[-np.inf], np.logspace(-6.0, 6.0, 12 * SCORE_BINS_PER_DECADE + 1), [np.inf]]
)
SCORE_BINS.setflags(write=False)
N_SCORE_BINS = len(SCORE_BINS) - 1


def score_bin_index(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Index of the `SCORE_BINS` bin of each score (bins are ``[lo, hi)``; +inf -> last bin)."""
    v = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.clip(np.searchsorted(SCORE_BINS, v, side="right") - 1, 0, N_SCORE_BINS - 1)


def score_histogram(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Counts (int64, length ``len(SCORE_BINS) - 1``) of the scores in `SCORE_BINS`. NaNs are dropped."""
    v = np.asarray(scores, dtype=np.float64).reshape(-1)
    nan = np.isnan(v)
    if nan.any():
        log.warning("score_histogram: dropping %d NaN scores", int(nan.sum()))
        v = v[~nan]
    return np.bincount(score_bin_index(v), minlength=N_SCORE_BINS).astype(np.int64)


def threshold_from_histogram(counts: Sequence[int] | np.ndarray, percentile: float = 95.0) -> float:
    """Threshold from (pooled) `score_histogram` counts: the upper edge of the bin
    in which the cumulative count first reaches ``percentile`` % of all scores.

    The exact percentile (lower, "inverted CDF" definition) lies inside that
    bin, so the result is never below it and at most one bin width above it
    (relative error < 10**(1/SCORE_BINS_PER_DECADE) - 1, about 2.33 %):
    conservative, i.e. at most the intended share of healthy images is
    flagged. Scores in the underflow bin give 1e-6; if the percentile falls in
    the overflow bin, its finite lower edge 1e6 is returned with a warning.
    """
    p = _check_percentile(percentile)
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    if c.shape[0] != N_SCORE_BINS:
        raise ValueError(f"histogram has {c.shape[0]} bins; SCORE_BINS defines {N_SCORE_BINS}")
    if (c < 0).any():
        raise ValueError("histogram counts must be non-negative")
    total = int(c.sum())
    if total == 0:
        raise DataError("cannot calibrate a threshold: the pooled histogram holds no scores")
    target = max(1, math.ceil(p / 100.0 * total - 1e-9))
    b = int(np.searchsorted(np.cumsum(c), target, side="left"))
    upper = float(SCORE_BINS[b + 1])
    if not np.isfinite(upper):
        log.warning("threshold percentile falls in the overflow bin (scores >= 1e6); using 1e6")
        return float(SCORE_BINS[b])
    return upper
