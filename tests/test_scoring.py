"""Anomaly maps, image scores, intensity baseline and threshold calibration."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from medae_core.config import ScoringConfig
from medae_core.errors import ConfigError, DataError
from medae_core.metrics import image_metrics
from medae_core.scoring import (
    SCORE_BINS,
    anomaly_maps,
    calibrate_pixel_threshold,
    calibrate_threshold,
    foreground_mask,
    image_scores,
    intensity_baseline,
    postprocess,
    residual_maps,
    score_bin_index,
    score_histogram,
    score_reconstructions,
    threshold_from_histogram,
)

S = 32


def disc(s=S, radius=12.0, value=0.5, center=None):
    c = (s / 2 - 0.5, s / 2 - 0.5) if center is None else center
    yy, xx = np.mgrid[:s, :s]
    return (((yy - c[0]) ** 2 + (xx - c[1]) ** 2) <= radius**2).astype(np.float32) * value


def blob_mask(s=S, radius=3.0, center=(14, 18)):
    yy, xx = np.mgrid[:s, :s]
    return ((yy - center[0]) ** 2 + (xx - center[1]) ** 2) <= radius**2


def healthy(rng, s=S):
    img = disc(s)
    return np.where(img > 0, img + rng.normal(0, 0.03, img.shape).astype(np.float32), 0).astype(np.float32)


# --------------------------------------------------------------------- residuals
@pytest.mark.parametrize("kind", ["l1", "l2", "ssim"])
def test_residual_is_zero_for_perfect_reconstruction(kind):
    x = np.stack([healthy(np.random.default_rng(i)) for i in range(3)])
    m = residual_maps(x, x.copy(), kind)
    assert m.shape == x.shape and m.dtype == np.float32
    assert np.abs(m).max() < 1e-6


@pytest.mark.parametrize("kind", ["l1", "l2", "ssim"])
def test_residual_is_high_where_a_bright_blob_was_not_reconstructed(kind):
    rng = np.random.default_rng(0)
    recon = healthy(rng)
    img = recon.copy()
    b = blob_mask()
    img[b] = 1.0
    m = residual_maps(img[None], recon[None], kind)[0]
    far = disc(radius=12) > 0
    far &= ~blob_mask(radius=9)  # well outside the blob (and the SSIM window)
    assert m[b].mean() > 5 * max(m[far].mean(), 1e-3)
    assert (m >= 0).all()


@pytest.mark.parametrize("kind", ["l1", "l2", "ssim"])
def test_positive_only_ignores_dark_differences(kind):
    recon = disc()
    img = recon.copy()
    b = blob_mask()
    img[b] = 0.1  # dark lesion: image below its reconstruction
    both = residual_maps(img[None], recon[None], kind, positive_only=False)[0]
    pos = residual_maps(img[None], recon[None], kind, positive_only=True)[0]
    assert both[b].min() > 0.05
    assert pos.max() == 0.0
    img2 = recon.copy()
    img2[b] = 1.0  # bright lesion is kept
    assert residual_maps(img2[None], recon[None], kind, positive_only=True)[0][b].min() > 0.05


def test_residual_rejects_shape_mismatch_and_unknown_kind():
    with pytest.raises(ValueError, match="differ in shape"):
        residual_maps(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(ConfigError, match="l1, l2, ssim"):
        residual_maps(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), "l3")


# --------------------------------------------------------------------- postprocess
def test_median_filter_removes_salt_noise_but_keeps_a_lesion():
    rng = np.random.default_rng(1)
    m = np.zeros((2, S, S), np.float32)
    salt = rng.random((2, S, S)) < 0.03
    m[salt] = 1.0
    b = blob_mask(radius=3)
    m[1][b] = 1.0
    out = postprocess(m, None, median_filter=3, mask_foreground=False)
    assert out[0].max() == 0.0  # isolated pixels gone
    assert out[1][blob_mask(radius=2)].min() == 1.0  # the lesion core survives
    assert np.array_equal(postprocess(m, None, median_filter=1, mask_foreground=False), m)


@pytest.mark.parametrize("size", [1, 2, 5, 33, 64])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_median_filter_gives_scipys_values_on_every_map_and_chunk(size, k, monkeypatch):
    from scipy import ndimage

    from medae_core import scoring

    monkeypatch.setattr(scoring, "_MEDIAN_WINDOW_VALUES", 3 * size * size * k * k - 1)  # chunks of 2 maps, then 1
    rng = np.random.default_rng(size * 10 + k)
    m = rng.random((5, size, size), dtype=np.float32) ** 3
    m[1] = rng.integers(0, 3, (size, size))  # ties
    expected = np.stack([ndimage.median_filter(x, size=k, mode="reflect") for x in m])
    out = postprocess(m, None, median_filter=k, mask_foreground=False)
    assert out.dtype == np.float32 and np.array_equal(out, expected)


def test_a_kernel_too_wide_for_the_window_budget_is_filtered_one_map_at_a_time(monkeypatch):
    from scipy import ndimage

    from medae_core import scoring

    monkeypatch.setattr(scoring, "_MEDIAN_WINDOW_VALUES", 16 * 16 * 9 - 1)  # less than one map's windows
    monkeypatch.setattr(np.lib.stride_tricks, "sliding_window_view", None)  # the windowed path is not taken
    m = np.random.default_rng(0).random((3, 16, 16), dtype=np.float32)
    expected = np.stack([ndimage.median_filter(x, size=3, mode="reflect") for x in m])
    assert np.array_equal(postprocess(m, None, median_filter=3, mask_foreground=False), expected)
    assert postprocess(m[:0], None, median_filter=3, mask_foreground=False).shape == (0, 16, 16)


def test_postprocess_zeroes_outside_foreground_and_rejects_even_kernels():
    m = np.ones((1, S, S), np.float32)
    fg = (disc() > 0)[None]
    out = postprocess(m, fg, median_filter=0, mask_foreground=True)
    assert out[~fg].max() == 0.0 and out[fg].min() == 1.0
    assert postprocess(m, fg, 0, mask_foreground=False).min() == 1.0
    with pytest.raises(ConfigError, match="odd"):
        postprocess(m, fg, median_filter=4)


# --------------------------------------------------------------------- foreground
def test_foreground_mask_on_a_disc_fills_holes_and_drops_specks():
    img = disc(radius=12)
    img[disc(radius=4) > 0] = 0.0  # dark "ventricle" inside
    img[1, 1] = 0.9  # isolated noise speck
    img[28:30, 1:3] = 0.9  # small burned-in label (4 px)
    m = foreground_mask(img[None])[0]
    truth = disc(radius=12) > 0
    iou = (m & truth).sum() / (m | truth).sum()
    assert iou > 0.97
    assert m[disc(radius=4) > 0].all()  # hole filled
    assert not m[1, 1] and not m[28:30, 1:3].any()


def test_foreground_mask_keeps_two_similar_structures_and_handles_empty_images():
    two = disc(radius=6, center=(15.5, 8)) + disc(radius=6, center=(15.5, 24))
    m = foreground_mask(np.stack([two, np.zeros((S, S), np.float32)]))
    assert m[0, 15, 8] and m[0, 15, 24]
    assert not m[1].any()


# --------------------------------------------------------------------- image scores
def test_image_scores_rank_an_image_with_a_lesion_above_one_without():
    rng = np.random.default_rng(2)
    base = np.abs(rng.normal(0, 0.02, (2, S, S))).astype(np.float32)
    base[1][blob_mask()] += 0.5
    fg = np.stack([disc() > 0] * 2)
    s = image_scores(base, fg, top_percent=2.0)
    assert s[1] > s[0] + 0.3


def test_image_scores_mean_of_top_percent_and_empty_mask_fallback():
    m = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    assert image_scores(m, None, 10.0)[0] == pytest.approx(np.mean(np.arange(90, 100)))
    assert image_scores(m, None, 100.0)[0] == pytest.approx(49.5)
    assert image_scores(m, None, 0.01)[0] == 99.0  # at least one pixel
    assert image_scores(m, np.zeros((1, 10, 10), bool), 10.0)[0] == pytest.approx(94.5)  # whole map
    with pytest.raises(ConfigError, match="top_percent"):
        image_scores(m, None, 0.0)


# --------------------------------------------------------------------- baseline
def test_intensity_baseline_finds_bright_but_not_dark_blobs():
    rng = np.random.default_rng(3)
    n = 30
    healthy_imgs = np.stack([healthy(rng) for _ in range(n)])
    bright = np.stack([healthy(rng) for _ in range(n)])
    dark = np.stack([healthy(rng) for _ in range(n)])
    for i in range(n):
        c = (int(rng.integers(11, 21)), int(rng.integers(11, 21)))
        bright[i][blob_mask(center=c)] = 0.95
        dark[i][blob_mask(center=c)] = 0.1
    cfg = ScoringConfig(median_filter=3)
    maps, sh = intensity_baseline(healthy_imgs, cfg)
    _, sb = intensity_baseline(bright, cfg)
    _, sd = intensity_baseline(dark, cfg)
    assert maps.shape == healthy_imgs.shape
    y = np.r_[np.zeros(n), np.ones(n)]
    assert image_metrics(np.r_[sh, sb], y)["image_auroc"] > 0.99
    assert 0.25 < image_metrics(np.r_[sh, sd], y)["image_auroc"] < 0.75  # about chance
    assert intensity_baseline(healthy_imgs)[1].shape == (n,)  # default config works


# --------------------------------------------------------------------- thresholds
def test_calibrate_threshold_is_the_healthy_percentile():
    v = np.arange(1, 101, dtype=float)
    assert calibrate_threshold(v, 95) == pytest.approx(np.percentile(v, 95))
    assert calibrate_threshold(np.r_[v, np.nan], 50) == pytest.approx(50.5)
    with pytest.raises(DataError, match="no healthy"):
        calibrate_threshold([], 95)
    with pytest.raises(ConfigError):
        calibrate_threshold(v, 120)


def test_calibrate_pixel_threshold_uses_foreground_pixels():
    m = np.zeros((2, 10, 10), np.float32)
    m[:, :5] = 1.0
    fg = np.zeros_like(m, bool)
    fg[:, :5] = True
    assert calibrate_pixel_threshold(m, fg, 50) == 1.0
    assert calibrate_pixel_threshold(m, None, 40) == 0.0


def test_score_bins_are_fixed_log_spaced_and_cover_all_score_scales():
    assert SCORE_BINS[0] == -np.inf and SCORE_BINS[-1] == np.inf
    inner = SCORE_BINS[1:-1]
    assert inner[0] == pytest.approx(1e-6) and inner[-1] == pytest.approx(1e6)
    assert np.allclose(inner[1:] / inner[:-1], 10**0.01)
    idx = score_bin_index([0.0, 1e-7, 0.02, 1.5, 3000.0, 1e7, np.inf])
    assert idx[0] == idx[1] == 0 and idx[-1] == idx[-2] == len(SCORE_BINS) - 2
    assert 0 < idx[2] < idx[3] < idx[4] < len(SCORE_BINS) - 2


@pytest.mark.parametrize("percentile", [50.0, 90.0, 95.0, 99.0])
def test_pooled_site_histograms_give_the_pooled_percentile_within_one_bin(percentile):
    rng = np.random.default_rng(4)
    sites = [
        rng.lognormal(np.log(0.05), 0.4, 120),
        rng.lognormal(np.log(0.08), 0.3, 75),
        rng.gamma(2.0, 0.02, 310),
    ]
    pooled_counts = sum(score_histogram(s) for s in sites)
    assert pooled_counts.dtype == np.int64 and pooled_counts.sum() == 505
    pooled = np.concatenate(sites)
    thr = threshold_from_histogram(pooled_counts, percentile)
    exact = np.percentile(pooled, percentile)
    assert abs(int(score_bin_index([thr])[0]) - int(score_bin_index([exact])[0])) <= 1
    # conservative: never below the (inverted-CDF) percentile, at most one bin ratio above it
    lower = np.percentile(pooled, percentile, method="inverted_cdf")
    assert lower <= thr <= lower * 10**0.01 * (1 + 1e-9)
    assert (pooled >= thr).mean() <= 1 - percentile / 100 + 1e-9


def test_threshold_from_histogram_rejects_bad_histograms():
    with pytest.raises(DataError, match="no scores"):
        threshold_from_histogram(np.zeros(len(SCORE_BINS) - 1, np.int64), 95)
    with pytest.raises(ValueError, match="bins"):
        threshold_from_histogram(np.ones(10, np.int64), 95)
    assert threshold_from_histogram(score_histogram([0.0, 0.0]), 95) == pytest.approx(1e-6)


# --------------------------------------------------------------------- model glue
class ClipModel(nn.Module):
    """Stand-in 'healthy' autoencoder: cannot reproduce intensities above 0.6."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def reconstruct(self, x):
        assert x.ndim == 4 and x.shape[1] == 1
        return x.clamp(max=0.6) + 0 * self.w


class ClipVAE(ClipModel):
    def kl_per_sample(self, x):
        return x.flatten(1).sum(1) * 10.0  # a known per-image number


def _test_images():
    rng = np.random.default_rng(5)
    imgs = np.stack([healthy(rng) for _ in range(5)])
    imgs[3][blob_mask()] = 1.0
    return imgs


def test_anomaly_maps_with_a_stand_in_model():
    torch.set_num_threads(1)
    imgs = _test_images()
    model = ClipModel().train()
    calls = []
    maps, scores = anomaly_maps(model, imgs, ScoringConfig(), "cpu", batch_size=2,
                                progress=lambda d, t: calls.append((d, t)))
    assert maps.shape == imgs.shape and maps.dtype == np.float32 and scores.shape == (5,)
    assert int(np.argmax(scores)) == 3
    assert maps[3][blob_mask(radius=2)].min() > 0.3
    assert model.training  # mode restored
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_vae_score_modes():
    imgs = _test_images()
    cfg = ScoringConfig(median_filter=0)
    rec_maps, rec_scores = anomaly_maps(ClipVAE(), imgs, cfg, "cpu")
    kl = imgs.reshape(5, -1).sum(1) * 10.0
    # elbo: map + KL / (S*S) on the foreground; score shifts by the same amount
    el_maps, el_scores = anomaly_maps(ClipVAE(), imgs, dataclasses.replace(cfg, vae_score="elbo"), "cpu")
    fg = foreground_mask(imgs)
    off = (kl / (S * S))[:, None, None]
    assert np.allclose(el_maps[fg], (rec_maps + off)[fg], atol=1e-5)
    assert np.all(el_maps[~fg] == 0)
    assert np.allclose(el_scores, rec_scores + kl / (S * S), rtol=1e-5)
    # kl: score is the KL itself, map is the reconstruction map
    kl_maps, kl_scores = anomaly_maps(ClipVAE(), imgs, dataclasses.replace(cfg, vae_score="kl"), "cpu")
    assert np.allclose(kl_scores, kl, rtol=1e-5)
    assert np.array_equal(kl_maps, rec_maps)
    # models without a KL term ignore vae_score
    _, ae_scores = anomaly_maps(ClipModel(), imgs, dataclasses.replace(cfg, vae_score="kl"), "cpu")
    assert np.allclose(ae_scores, rec_scores)


@pytest.mark.parametrize("vae_score", ["recon", "elbo", "kl"])
def test_a_large_set_is_scored_in_chunks_with_the_values_of_one_pass(vae_score, monkeypatch):
    """A simulation's pooled test set is scored a chunk of images at a time (memory); nothing else changes."""
    import medae_core.scoring as scoring

    rng = np.random.default_rng(9)
    imgs = np.stack([disc(radius=7.0 + i % 6) + rng.normal(0, 0.03, (S, S)).astype(np.float32) for i in range(23)])
    imgs[[4, 17]] = np.maximum(imgs[[4, 17]], blob_mask())  # each image its own foreground and score
    cfg = ScoringConfig(vae_score=vae_score)
    fg = foreground_mask(imgs)
    whole = anomaly_maps(ClipVAE(), imgs, cfg, "cpu", batch_size=2)
    base = intensity_baseline(imgs, cfg)
    base_fg = intensity_baseline(imgs, cfg, fg_masks=fg)
    monkeypatch.setattr(scoring, "_SCORE_CHUNK_BYTES", imgs[0].nbytes * 5)  # chunks of 4 images (whole batches)
    calls, seen = [], []
    model = ClipVAE()
    reconstruct = model.reconstruct
    model.reconstruct = lambda x: seen.append(len(x)) or reconstruct(x)
    for f in (None, fg):
        calls.clear()
        maps, scores = anomaly_maps(model, imgs, cfg, "cpu", batch_size=2, fg_masks=f,
                                    progress=lambda d, t: calls.append((d, t)))
        assert np.array_equal(maps, whole[0]) and np.array_equal(scores, whole[1])
        assert calls == [(d, 23) for d in (*range(2, 23, 2), 23)]
    assert seen == 2 * ([2] * 11 + [1])  # the model's batches are those of one pass
    for f, expected in ((None, base), (fg, base_fg)):
        maps, scores = intensity_baseline(imgs, cfg, fg_masks=f)
        assert np.array_equal(maps, expected[0]) and np.array_equal(scores, expected[1])


def test_score_reconstructions_checks_kl_length():
    imgs = _test_images()
    with pytest.raises(ValueError, match="kl has 2 values"):
        score_reconstructions(imgs, imgs, ScoringConfig(vae_score="elbo"), kl=np.ones(2))
