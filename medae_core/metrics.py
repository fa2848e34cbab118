"""Image- and pixel-level evaluation of anomaly scores and maps.

Conventions (shared with `medae_core.scoring`):

* label 1 = anomalous, 0 = healthy; ground-truth masks are binarised at 0.5
  (masks are resized bilinearly, so values in between occur at edges).
* A pixel is predicted anomalous when its map value is ``>= threshold``.
* Dice is the pooled ("dataset-level") Dice over all evaluated pixels of all
  images, 2 sum(TP) / (sum(GT) + sum(pred)), as in the anomaly-segmentation
  literature (Baur et al. 2021; Meissen et al. 2021), not a mean of per-image
  Dice values (undefined on healthy images).
* Pixels are evaluated inside the foreground mask when one is given, plus all
  ground-truth pixels (a lesion pixel is never dropped because the foreground
  mask missed it).
* A metric that is undefined (only one class present, nothing to evaluate) is
  ``None`` and the reason is logged; evaluation never raises for that.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from medae_core.scoring import as_stack, is_anomalous

log = logging.getLogger(__name__)

# Above this many distinct positive map values, the best-Dice sweep evaluates
# this many quantiles of them (exactly) instead of every value.
DICE_CANDIDATES = 4096
_CHUNK = 64


def _stack(a: Any, name: str) -> np.ndarray:
    return as_stack(a, name, dtype=None)


def _finite_maps(maps: Any) -> np.ndarray:
    """Float32 maps with NaN and infinities replaced (`np.nan_to_num`); copied only when one is there."""
    m = _stack(maps, "maps").astype(np.float32, copy=False)
    return m if np.isfinite(m).all() else np.nan_to_num(m)


def _binary(a: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = _stack(a, name)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    return arr > 0.5 if arr.dtype != bool else arr


# ---------------------------------------------------------------------------
# image level
# ---------------------------------------------------------------------------
def _undefined_reason(y: np.ndarray, what: str) -> str | None:
    if y.size == 0:
        return f"{what} undefined: nothing to evaluate"
    n_pos = int(y.sum())
    if n_pos == 0:
        return f"{what} undefined: all {y.size} are negative (healthy); need both classes"
    if n_pos == y.size:
        return f"{what} undefined: all {y.size} are positive (anomalous); need both classes"
    return None


def image_metrics(scores: Any, labels: Any) -> dict[str, float | None]:
    """``{"image_auroc", "image_auprc"}`` of image scores against 0/1 labels.

    Images with a non-finite score or a label other than 0/1 are left out
    (logged). With only one class present both values are ``None``.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    ok = np.isfinite(s) & ((y == 0) | (y == 1))
    if not ok.all():
        log.warning("image metrics: leaving out %d images with a non-finite score or no 0/1 label", int((~ok).sum()))
    s, y = s[ok], y[ok].astype(bool)
    reason = _undefined_reason(y, "image AUROC/AUPRC: images")
    if reason:
        log.info(reason)
        return {"image_auroc": None, "image_auprc": None}
    from sklearn.metrics import average_precision_score, roc_auc_score  # here: 1.5 s to import, and training never needs it

    return {
        "image_auroc": float(roc_auc_score(y, s)),
        "image_auprc": float(average_precision_score(y, s)),
    }


def image_rates(scores: Any, labels: Any, threshold: float) -> dict[str, float | None]:
    """Sensitivity (TPR) and false-positive rate of ``score >= threshold``; None where a class is absent."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    pred = is_anomalous(s, threshold)
    pos, neg = y == 1, y == 0
    return {
        "image_tpr": float(pred[pos].mean()) if pos.any() else None,
        "image_fpr": float(pred[neg].mean()) if neg.any() else None,
    }


# ---------------------------------------------------------------------------
# pixel level
# ---------------------------------------------------------------------------
def evaluated_images(labels: Any, gt_masks: Any, has_mask: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The pixel rule's images: ``(selected [N] bool, gt [N,S,S] bool)``.

    Pixel metrics use every image that has a mask plus every healthy image
    (label 0), whose mask is all-negative; masks of other images are ignored.
    The exact metrics here and a site's pooled pixel histograms
    (`medae_core.evaluation`) both take their pixels from this and `pixel_region`.
    """
    n = shape[0]
    y = np.asarray(labels).reshape(-1)
    hm = np.zeros(n, dtype=bool) if has_mask is None else np.asarray(has_mask, dtype=bool).reshape(-1)
    if gt_masks is None:
        hm = np.zeros(n, dtype=bool)
        gt = np.zeros(shape, dtype=bool)
    else:
        gt = _binary(gt_masks, "gt_masks", shape)  # read only: may be the caller's array
        if not hm.all():
            gt = gt & hm[:, None, None]
    return hm | (y == 0), gt


def pixel_region(gt: np.ndarray, fg_masks: Any) -> np.ndarray:
    """Pixels that count in an image: its foreground plus every lesion pixel (all pixels without a foreground)."""
    if fg_masks is None:
        return np.ones(gt.shape, dtype=bool)
    return _binary(fg_masks, "fg_masks", gt.shape) | gt


def _subsample(
    m: np.ndarray, gt: np.ndarray, region: np.ndarray, max_pixels: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Values, labels and sample weights of the evaluated pixels, at most ``max_pixels``.

    All positives stay when they fit in half the budget; negatives are drawn
    without replacement and weighted by (negatives / drawn) so that AUPRC (which
    depends on the class ratio) stays unbiased. Deterministic for a seed.
    """
    pos_idx = np.flatnonzero(region & gt)
    n_pos = pos_idx.size
    n_neg = int(region.sum()) - n_pos
    if n_pos + n_neg <= max_pixels:
        idx = np.concatenate([pos_idx, np.flatnonzero(region & ~gt)])
        return m.reshape(-1)[idx], gt.reshape(-1)[idx], None
    rng = np.random.default_rng(seed)
    if n_pos <= max_pixels // 2:
        k_pos = n_pos
    else:  # more positives than half the budget: keep classes proportional
        k_pos = max(1, round(max_pixels * n_pos / (n_pos + n_neg)))
    k_neg = min(n_neg, max(1, max_pixels - k_pos)) if n_neg else 0
    if k_pos < n_pos:
        pos_idx = np.sort(rng.choice(pos_idx, k_pos, replace=False))
    # The negatives' ranks, drawn as `rng.choice(negative positions, ...)` would draw them, then
    # turned into positions image chunk by image chunk: no index of every negative pixel.
    ranks = np.sort(rng.choice(n_neg, k_neg, replace=False)) if k_neg < n_neg else np.arange(n_neg)
    neg_idx = _positions_of_ranks(region, gt, ranks)
    idx = np.concatenate([pos_idx, neg_idx])
    w = np.concatenate(
        [np.full(pos_idx.size, n_pos / max(pos_idx.size, 1)), np.full(neg_idx.size, n_neg / max(neg_idx.size, 1))]
    )
    log.debug("pixel metrics: subsampled %d of %d pixels (all %d positives kept: %s)",
              idx.size, n_pos + n_neg, n_pos, k_pos == n_pos)
    return m.reshape(-1)[idx], gt.reshape(-1)[idx], w


def _positions_of_ranks(region: np.ndarray, gt: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Flat positions of the ``ranks``-th (sorted) negative pixels (``region & ~gt``), in order."""
    out = np.empty(ranks.size, dtype=np.int64)
    per_image = int(np.prod(region.shape[1:], dtype=np.int64))
    seen = done = 0
    for s in range(0, len(region), _CHUNK):
        neg = region[s : s + _CHUNK] & ~gt[s : s + _CHUNK]
        count = int(neg.sum())
        hi = int(np.searchsorted(ranks, seen + count, side="left"))
        if hi > done:
            out[done:hi] = np.flatnonzero(neg)[ranks[done:hi] - seen] + s * per_image
            done = hi
        seen += count
    return out


def _best_dice(m: np.ndarray, gt: np.ndarray, region: np.ndarray) -> tuple[float | None, float | None]:
    """Best pooled Dice over thresholds, swept exactly at candidate thresholds.

    The optimal ``>=`` threshold can always be taken at a positive pixel's value
    (raising it up to the next positive value only removes false positives),
    so candidates are the distinct positive values, or `DICE_CANDIDATES`
    quantiles of them when there are more. For each candidate the TP/FP counts
    over *all* evaluated pixels come from one searchsorted + bincount pass and
    reversed cumulative sums, O(pixels * log(candidates)) in total.
    """
    pos_vals = m[region & gt]
    n_gt = pos_vals.size
    if n_gt == 0:
        return None, None
    cands = np.unique(pos_vals)
    if cands.size > DICE_CANDIDATES:
        cands = np.unique(np.quantile(pos_vals, np.linspace(0.0, 1.0, DICE_CANDIDATES)))
    pos_hist = np.zeros(cands.size, dtype=np.int64)
    neg_hist = np.zeros(cands.size, dtype=np.int64)
    for s in range(0, len(m), _CHUNK):
        r = region[s : s + _CHUNK]
        v = m[s : s + _CHUNK][r]
        g = gt[s : s + _CHUNK][r]
        idx = np.searchsorted(cands, v, side="right") - 1  # bin j: cands[j] <= v < cands[j+1]
        keep = idx >= 0
        pos_hist += np.bincount(idx[keep & g], minlength=cands.size)
        neg_hist += np.bincount(idx[keep & ~g], minlength=cands.size)
    tp = np.cumsum(pos_hist[::-1])[::-1]  # pixels >= cands[j]
    fp = np.cumsum(neg_hist[::-1])[::-1]
    dice = 2.0 * tp / (n_gt + tp + fp)
    j = int(np.argmax(dice))
    return float(dice[j]), float(cands[j])


def pixel_metrics(
    maps: Any,
    gt_masks: Any,
    fg_masks: Any = None,
    max_pixels: int = 2_000_000,
    seed: int = 0,
) -> dict[str, float | None]:
    """Pixel AUROC / AUPRC and best Dice of anomaly maps against ground-truth masks.

    Returns ``{"pixel_auroc", "pixel_auprc", "dice_best", "dice_best_threshold",
    "n_pixels", "n_positive_pixels"}``. AUROC/AUPRC use at most ``max_pixels``
    pixels (stratified, weighted subsample; see `_subsample`); the best-Dice
    sweep always uses every evaluated pixel. Values are ``None`` when
    undefined (no lesion pixel, or no healthy pixel for AUROC/AUPRC).
    """
    m = _finite_maps(maps)
    gt = _binary(gt_masks, "gt_masks", m.shape)
    region = pixel_region(gt, fg_masks)
    n_pix = int(region.sum())
    n_posp = int((region & gt).sum())
    out: dict[str, float | None] = {
        "pixel_auroc": None,
        "pixel_auprc": None,
        "dice_best": None,
        "dice_best_threshold": None,
        "n_pixels": n_pix,
        "n_positive_pixels": n_posp,
    }
    reason = _undefined_reason((region & gt)[region], "pixel AUROC/AUPRC: evaluated pixels")
    if reason:
        log.info(reason)
    else:
        from sklearn.metrics import average_precision_score, roc_auc_score

        v, y, w = _subsample(m, gt, region, int(max_pixels), seed)
        out["pixel_auroc"] = float(roc_auc_score(y, v, sample_weight=w))
        out["pixel_auprc"] = float(average_precision_score(y, v, sample_weight=w))
    if n_posp == 0:
        log.info("best Dice undefined: no ground-truth lesion pixel")
    else:
        out["dice_best"], out["dice_best_threshold"] = _best_dice(m, gt, region)
    return out


def dice_at(maps: Any, gt_masks: Any, threshold: float, fg_masks: Any = None) -> float | None:
    """Pooled Dice of ``map >= threshold`` against the masks (evaluated pixels only).

    ``None`` when there is neither a lesion pixel nor a predicted pixel
    (Dice is 0/0 there); 0.0 when only one of them is empty.
    """
    m = _finite_maps(maps)
    gt = _binary(gt_masks, "gt_masks", m.shape)
    region = pixel_region(gt, fg_masks)
    pred = is_anomalous(m, threshold) & region
    denom = int(gt[region].sum()) + int(pred.sum())
    if denom == 0:
        log.info("Dice undefined: no lesion pixel and no pixel at or above the threshold")
        return None
    return float(2.0 * int((pred & gt).sum()) / denom)


# ---------------------------------------------------------------------------
# everything
# ---------------------------------------------------------------------------
def evaluate(
    maps: Any,
    scores: Any,
    labels: Any,
    gt_masks: Any,
    has_mask: Any,
    threshold: float | None,
    fg_masks: Any = None,
    pixel_threshold: float | None = None,
    max_pixels: int = 2_000_000,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of one scored test set.

    ``maps [N,S,S]``, ``scores [N]``, ``labels [N]`` (1 anomalous / 0 healthy),
    ``gt_masks [N,S,S]`` or None (values of images without a mask are
    ignored), ``has_mask [N]`` bool or None. ``threshold`` is the calibrated
    image threshold; ``pixel_threshold`` (default: ``threshold``, valid when
    image scores are in map units) is used for Dice at the calibrated threshold.

    Pixel metrics use the images that have a mask plus every healthy image
    (label 0), whose mask is taken as all-negative.

    Returns image_auroc, image_auprc, image_tpr, image_fpr (and the same as sensitivity and
    specificity), pixel_auroc,
    pixel_auprc, dice_best, dice_best_threshold, dice_at_threshold, threshold,
    pixel_threshold, n_images, n_anomalous, n_healthy, n_pixel_images,
    n_pixel_images_with_lesion, n_pixels, n_positive_pixels, and ``notes``: a
    list of human-readable reasons why a metric is missing.
    """
    m = _stack(maps, "maps")
    n = len(m)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.size != n or y.size != n:
        raise ValueError(f"{n} maps, {s.size} scores and {y.size} labels must match")
    notes: list[str] = []
    res: dict[str, Any] = {
        "n_images": n,
        "n_anomalous": int((y == 1).sum()),
        "n_healthy": int((y == 0).sum()),
    }
    im = image_metrics(s, y)
    res.update(im)
    if im["image_auroc"] is None:
        notes.append(
            f"image AUROC/AUPRC need healthy and anomalous images; have {res['n_healthy']} healthy, "
            f"{res['n_anomalous']} anomalous"
        )
    res["threshold"] = None if threshold is None else float(threshold)
    rates = image_rates(s, y, threshold) if threshold is not None else {"image_tpr": None, "image_fpr": None}
    res.update(rates)
    # Under the names pooled results use (`federated.rates_at_threshold`): exact and pooled rows fill one table.
    res["sensitivity"] = rates["image_tpr"]
    res["specificity"] = None if rates["image_fpr"] is None else 1.0 - rates["image_fpr"]

    sel, gt = evaluated_images(y, gt_masks, has_mask, m.shape)
    res["n_pixel_images"] = int(sel.sum())
    res["n_pixel_images_with_lesion"] = int(gt.any(axis=(1, 2)).sum())
    pix_thr = threshold if pixel_threshold is None else pixel_threshold
    res["pixel_threshold"] = None if pix_thr is None else float(pix_thr)
    pm: dict[str, Any] = {
        "pixel_auroc": None, "pixel_auprc": None, "dice_best": None, "dice_best_threshold": None,
        "n_pixels": 0, "n_positive_pixels": 0,
    }
    dice_thr = None
    if res["n_pixel_images_with_lesion"] == 0:
        notes.append("pixel metrics need ground-truth masks with lesions (labels.csv mask column); none given")
    else:
        fg = None if fg_masks is None else _binary(fg_masks, "fg_masks", m.shape)
        if not sel.all():  # otherwise no copies: a pooled test set's maps are large
            m, gt, fg = m[sel], gt[sel], None if fg is None else fg[sel]
        pm = pixel_metrics(m, gt, fg, max_pixels=max_pixels, seed=seed)
        if pm["pixel_auroc"] is None:
            notes.append("pixel AUROC/AUPRC undefined: evaluated pixels are all lesion")
        if pix_thr is not None:
            dice_thr = dice_at(m, gt, pix_thr, fg)
    res.update(pm)
    res["dice_at_threshold"] = dice_thr
    res["notes"] = notes
    return res
