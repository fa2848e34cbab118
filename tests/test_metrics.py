"""Image and pixel metrics against hand-computed values."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from medae_core.metrics import dice_at, evaluate, image_metrics, image_rates, pixel_metrics


# --------------------------------------------------------------------- image level
def test_image_metrics_perfect_reversed_and_hand_computed():
    y = [0, 0, 1, 1]
    assert image_metrics([0.1, 0.2, 0.8, 0.9], y) == {"image_auroc": 1.0, "image_auprc": 1.0}
    assert image_metrics([0.9, 0.8, 0.2, 0.1], y)["image_auroc"] == 0.0
    # pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4
    # ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 1/2 * (1/1 + 2/3) = 5/6
    m = image_metrics([0.1, 0.4, 0.35, 0.8], y)
    assert m["image_auroc"] == pytest.approx(0.75)
    assert m["image_auprc"] == pytest.approx(5 / 6)


def test_image_metrics_single_class_returns_none_with_a_logged_reason(caplog):
    with caplog.at_level(logging.INFO, logger="medae_core.metrics"):
        out = image_metrics([0.1, 0.5, 0.3], [0, 0, 0])
    assert out == {"image_auroc": None, "image_auprc": None}
    assert "all 3 are negative" in caplog.text
    assert image_metrics([], [])["image_auroc"] is None
    assert image_metrics([0.2, 0.4], [1, 1])["image_auprc"] is None


def test_image_metrics_drops_nan_scores_and_unlabelled_images():
    m = image_metrics([0.1, np.nan, 0.9, 0.5], [0, 1, 1, -1])
    assert m["image_auroc"] == 1.0


def test_image_rates_at_threshold():
    r = image_rates([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1], 0.5)
    assert r == {"image_tpr": 1.0, "image_fpr": 0.5}  # >= threshold counts as anomalous
    assert image_rates([0.1], [0], 0.5)["image_tpr"] is None


# --------------------------------------------------------------------- pixel level
def _gt():
    gt = np.zeros((2, 6, 6), bool)
    gt[0, 1:3, 1:3] = True  # 4 lesion pixels in image 0; image 1 healthy
    return gt


def test_pixel_metrics_perfect_and_reversed_maps():
    gt = _gt()
    perfect = pixel_metrics(gt.astype(np.float32) * 0.7, gt)
    assert perfect["pixel_auroc"] == 1.0 and perfect["pixel_auprc"] == 1.0
    assert perfect["dice_best"] == 1.0 and perfect["dice_best_threshold"] == pytest.approx(0.7)
    assert perfect["n_pixels"] == 72 and perfect["n_positive_pixels"] == 4
    rev = pixel_metrics(1.0 - gt.astype(np.float32), gt)
    assert rev["pixel_auroc"] == 0.0
    # every threshold at a lesion value (0.0) flags all 72 pixels: Dice = 2*4/(4+72)
    assert rev["dice_best"] == pytest.approx(8 / 76)


def test_dice_at_known_overlaps():
    gt = _gt()
    m = np.zeros((2, 6, 6), np.float32)
    m[0, 1:3, 2:4] = 1.0  # 4 predicted, 2 overlap -> 2*2/(4+4)
    assert dice_at(m, gt, 0.5) == pytest.approx(0.5)
    m[1, 0, 0] = 1.0  # a false positive on the healthy image -> 4/9
    assert dice_at(m, gt, 0.5) == pytest.approx(4 / 9)
    assert dice_at(m, gt, 2.0) == 0.0
    assert dice_at(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), 0.5) is None  # 0/0


def test_best_dice_matches_a_brute_force_sweep():
    rng = np.random.default_rng(0)
    gt = rng.random((3, 12, 12)) < 0.1
    m = (rng.random((3, 12, 12)) + 0.8 * gt).astype(np.float32)
    got = pixel_metrics(m, gt)
    brute = max(dice_at(m, gt, t) for t in np.unique(m))
    assert got["dice_best"] == pytest.approx(brute)
    assert dice_at(m, gt, got["dice_best_threshold"]) == pytest.approx(got["dice_best"])


def test_best_dice_with_more_lesion_values_than_candidates_is_near_exact(monkeypatch):
    import medae_core.metrics as metrics

    rng = np.random.default_rng(1)
    gt = rng.random((4, 32, 32)) < 0.2
    m = (rng.random((4, 32, 32)) + 0.6 * gt).astype(np.float32)
    exact = pixel_metrics(m, gt)["dice_best"]
    monkeypatch.setattr(metrics, "DICE_CANDIDATES", 64)
    approx = pixel_metrics(m, gt)
    assert approx["dice_best"] <= exact + 1e-12
    assert approx["dice_best"] > exact - 0.01
    assert dice_at(m, gt, approx["dice_best_threshold"]) == pytest.approx(approx["dice_best"])


def test_pixel_metrics_single_class_returns_none():
    out = pixel_metrics(np.random.default_rng(0).random((2, 5, 5)), np.zeros((2, 5, 5), bool))
    assert out["pixel_auroc"] is None and out["dice_best"] is None


def test_pixel_metrics_foreground_restricts_pixels_but_keeps_all_lesion_pixels():
    gt = _gt()
    m = gt.astype(np.float32)
    m[:, 5, :] = 5.0  # very bright background row outside the foreground
    fg = np.zeros_like(gt)
    fg[:, :5, :] = True
    fg[0, 1, 1] = False  # foreground misses one lesion pixel: it still counts
    assert pixel_metrics(m, gt)["pixel_auroc"] < 1.0
    out = pixel_metrics(m, gt, fg_masks=fg)
    assert out["pixel_auroc"] == 1.0 and out["n_positive_pixels"] == 4
    assert out["n_pixels"] == 60


def test_pixel_subsampling_keeps_positives_is_deterministic_and_unbiased():
    rng = np.random.default_rng(2)
    gt = rng.random((8, 40, 40)) < 0.02
    m = (rng.normal(0, 1, gt.shape) + 1.5 * gt).astype(np.float32)
    full = pixel_metrics(m, gt)
    a = pixel_metrics(m, gt, max_pixels=3000, seed=1)
    b = pixel_metrics(m, gt, max_pixels=3000, seed=1)
    assert a == b
    assert a["n_positive_pixels"] == full["n_positive_pixels"]
    assert a["pixel_auroc"] == pytest.approx(full["pixel_auroc"], abs=0.03)
    # negatives are re-weighted: AUPRC stays near the full value instead of inflating
    assert a["pixel_auprc"] == pytest.approx(full["pixel_auprc"], abs=0.06)
    assert a["dice_best"] == full["dice_best"]  # Dice always uses every pixel


@pytest.mark.parametrize("max_pixels", [500, 3000, 10_000])
def test_the_subsample_is_the_draw_from_an_index_of_every_negative_without_building_one(max_pixels):
    """Same seed, same pixels as drawing from the positions of all negatives (as medae always has),
    though the positions of a pooled test set's ~10^8 negatives are no longer held at once."""
    from medae_core.metrics import _subsample

    rng = np.random.default_rng(4)
    gt = rng.random((150, 16, 16)) < 0.01
    region = (rng.random(gt.shape) < 0.6) | gt
    m = rng.random(gt.shape).astype(np.float32)
    pos_idx, neg_idx = np.flatnonzero(region & gt), np.flatnonzero(region & ~gt)
    draw = np.random.default_rng(7)
    k_pos = pos_idx.size if pos_idx.size <= max_pixels // 2 else max(
        1, round(max_pixels * pos_idx.size / (pos_idx.size + neg_idx.size)))
    if k_pos < pos_idx.size:
        pos_idx = np.sort(draw.choice(pos_idx, k_pos, replace=False))
    k_neg = min(neg_idx.size, max_pixels - k_pos)
    neg_drawn = np.sort(draw.choice(neg_idx, k_neg, replace=False))
    idx = np.concatenate([pos_idx, neg_drawn])
    values, labels, weights = _subsample(m, gt, region, max_pixels, seed=7)
    assert np.array_equal(values, m.reshape(-1)[idx]) and np.array_equal(labels, gt.reshape(-1)[idx])
    assert weights[-1] == pytest.approx(neg_idx.size / k_neg)


# --------------------------------------------------------------------- evaluate
def test_evaluate_combines_image_and_pixel_metrics():
    n, s = 4, 6
    labels = np.array([0, 0, 1, 1])
    maps = np.zeros((n, s, s), np.float32)
    gt = np.zeros((n, s, s), np.float32)
    gt[2, 1:3, 1:3] = 1.0
    maps[2, 1:3, 1:3] = 0.9
    maps[3, 0, 0] = 0.9  # anomalous image without a mask: out of pixel metrics
    gt[3] = 1.0  # ignored because has_mask is False
    gt[1] = 1.0  # healthy image without a mask: treated as all-negative
    has_mask = np.array([False, False, True, False])
    scores = np.array([0.1, 0.2, 0.9, 0.8])
    res = evaluate(maps, scores, labels, gt, has_mask, threshold=0.5)
    assert res["n_images"] == 4 and res["n_anomalous"] == 2 and res["n_healthy"] == 2
    assert res["image_auroc"] == 1.0 and res["image_tpr"] == 1.0 and res["image_fpr"] == 0.0
    assert res["n_pixel_images"] == 3 and res["n_pixel_images_with_lesion"] == 1
    assert res["n_pixels"] == 3 * s * s and res["n_positive_pixels"] == 4
    assert res["pixel_auroc"] == 1.0 and res["dice_best"] == 1.0
    assert res["dice_at_threshold"] == 1.0
    assert evaluate(maps, scores, labels, gt, has_mask, 0.5, pixel_threshold=2.0)["dice_at_threshold"] == 0.0
    assert res["notes"] == []
    # Sensitivity and specificity, as the pooled rows name them, so an exact row fills the same table columns.
    for threshold, sensitivity, specificity in ((0.85, 0.5, 1.0), (0.15, 1.0, 0.5), (None, None, None)):
        r = evaluate(maps, scores, labels, gt, has_mask, threshold=threshold)
        assert (r["sensitivity"], r["specificity"]) == (sensitivity, specificity), threshold


def test_evaluate_leaves_its_inputs_alone_and_gives_the_same_with_boolean_or_float_masks():
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 1, 0, 1, 1])
    gt = (rng.random((6, 12, 12)) < 0.1) & (labels[:, None, None] == 1)
    has_mask = np.array([False, True, False, False, True, True])
    maps = rng.random(gt.shape).astype(np.float32)
    maps[1, 0, 0] = np.nan
    fg = rng.random(gt.shape) < 0.7
    kept = maps.copy(), gt.copy(), fg.copy()
    a = evaluate(maps, maps.mean(axis=(1, 2)), labels, gt, has_mask, 0.5, fg_masks=fg)
    assert np.array_equal(maps, kept[0], equal_nan=True) and np.array_equal(gt, kept[1]) and np.array_equal(fg, kept[2])
    b = evaluate(maps, maps.mean(axis=(1, 2)), labels, gt.astype(np.float32), has_mask, 0.5, fg_masks=fg)
    assert a == b and a["n_pixel_images"] == 5 and a["pixel_auroc"] is not None
    keys = ("pixel_auroc", "pixel_auprc", "dice_best", "n_pixels", "n_positive_pixels")
    sel = has_mask | (labels == 0)  # images 2 (anomalous, no mask) left out of the pixel metrics
    direct = pixel_metrics(np.nan_to_num(maps[sel]), gt[sel], fg[sel])
    assert {k: a[k] for k in keys} == {k: direct[k] for k in keys}
    assert a["dice_at_threshold"] == dice_at(np.nan_to_num(maps[sel]), gt[sel], 0.5, fg[sel])
    every = evaluate(maps, maps.mean(axis=(1, 2)), labels, gt, labels == 1, 0.5, fg_masks=fg)  # all selected
    direct = pixel_metrics(np.nan_to_num(maps), gt, fg)
    assert every["n_pixel_images"] == 6 and {k: every[k] for k in keys} == {k: direct[k] for k in keys}


def test_evaluate_without_masks_or_anomalies_never_raises():
    maps = np.random.default_rng(0).random((3, 5, 5)).astype(np.float32)
    res = evaluate(maps, [0.1, 0.2, 0.3], [0, 0, 0], None, None, threshold=None)
    assert res["image_auroc"] is None and res["pixel_auroc"] is None and res["dice_at_threshold"] is None
    assert res["threshold"] is None and res["image_fpr"] is None
    assert len(res["notes"]) == 2 and "masks" in res["notes"][1]
    with pytest.raises(ValueError, match="must match"):
        evaluate(maps, [0.1], [0, 0, 0], None, None, None)
