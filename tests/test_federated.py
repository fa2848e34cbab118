"""Server-side pooling: metrics from histogram counts agree with exact metrics; run state resumes."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medae_core.config import RunConfig
from medae_core.errors import ConfigError
from medae_core.federated import (
    RunState,
    auprc_from_histograms,
    auroc_from_histograms,
    dice_best_from_histograms,
    pool_evaluations,
)
from medae_core.scoring import calibrate_threshold, score_histogram


def _scores(seed=0, n_pos=300, n_neg=700):
    rng = np.random.default_rng(seed)
    pos = rng.lognormal(mean=-2.0, sigma=0.5, size=n_pos)
    neg = rng.lognormal(mean=-2.6, sigma=0.5, size=n_neg)
    return pos, neg


def test_histogram_auroc_and_auprc_match_exact_metrics():
    pos, neg = _scores()
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    hp, hn = score_histogram(pos), score_histogram(neg)
    assert auroc_from_histograms(hp, hn) == pytest.approx(roc_auc_score(labels, scores), abs=0.01)
    assert auprc_from_histograms(hp, hn) == pytest.approx(average_precision_score(labels, scores), abs=0.02)


def test_histogram_metrics_extremes():
    hp = score_histogram(np.full(10, 1.0))
    hn = score_histogram(np.full(10, 0.01))
    assert auroc_from_histograms(hp, hn) == 1.0
    assert auroc_from_histograms(hn, hp) == 0.0
    assert auprc_from_histograms(hp, hn) == 1.0
    assert auroc_from_histograms(hp, np.zeros_like(hp)) is None


def test_dice_best_from_histograms_matches_brute_force():
    pos, neg = _scores(seed=1, n_pos=200, n_neg=2000)
    dice = dice_best_from_histograms(score_histogram(pos), score_histogram(neg))
    thresholds = np.quantile(np.concatenate([pos, neg]), np.linspace(0, 1, 400))
    brute = max(2 * (pos >= t).sum() / ((pos >= t).sum() + (neg >= t).sum() + len(pos)) for t in thresholds)
    assert dice == pytest.approx(brute, abs=0.02)


def test_pooled_dice_at_threshold_is_exact_at_a_bin_edge():
    from medae_core.federated import dice_at_threshold_from_histograms
    from medae_core.scoring import SCORE_BINS

    pos, neg = _scores(seed=3, n_pos=300, n_neg=3000)
    for threshold in SCORE_BINS[[500, 560, 620, 700]]:
        direct = 2 * (pos >= threshold).sum() / ((pos >= threshold).sum() + (neg >= threshold).sum() + len(pos))
        pooled = dice_at_threshold_from_histograms(score_histogram(pos), score_histogram(neg), threshold)
        assert pooled == pytest.approx(direct, rel=1e-12)
    evals = [{"healthy": score_histogram(neg), "image_pos": score_histogram(pos), "image_neg": score_histogram(neg),
              "pixel_pos": score_histogram(pos), "pixel_neg": score_histogram(neg)}]
    assert "dice_at_threshold" not in pool_evaluations(evals, 95.0)["test"]
    edge = SCORE_BINS[np.searchsorted(SCORE_BINS, np.median(pos))]  # a bin edge near the positives
    assert 0 < pool_evaluations(evals, 95.0, threshold=edge)["test"]["dice_at_threshold"] < 1


def test_pooled_threshold_matches_percentile_of_pooled_scores():
    rng = np.random.default_rng(2)
    sites = [rng.lognormal(-3 + 0.3 * k, 0.4, size=200 + 50 * k) for k in range(3)]
    pooled = pool_evaluations([{"healthy": score_histogram(s)} for s in sites], 95.0)
    exact = calibrate_threshold(np.concatenate(sites), 95.0)
    assert pooled["n_healthy"] == sum(len(s) for s in sites)
    assert pooled["threshold"] >= exact  # conservative: the bin's upper edge
    assert pooled["threshold"] == pytest.approx(exact, rel=0.05)


def test_pool_evaluations_ignores_sites_without_labels():
    pos, neg = _scores()
    evals = [
        {"healthy": score_histogram(neg), "image_pos": score_histogram(pos), "image_neg": score_histogram(neg)},
        {"healthy": score_histogram(neg)},
    ]
    pooled = pool_evaluations(evals, 95.0)
    assert pooled["test"]["n_images"] == len(pos) + len(neg)
    assert "pixel_auprc" not in pooled["test"]


def test_run_state_resumes_and_refuses_a_different_model(tmp_path):
    cfg = RunConfig()
    state = RunState.open(tmp_path, cfg)
    state.rounds_done = 2
    state.rounds = [{"round": 1}, {"round": 2}]
    state.save(tmp_path)
    again = RunState.open(tmp_path, cfg)
    assert again.run_id == state.run_id and again.rounds_done == 2
    with pytest.raises(ConfigError, match="different \\[model\\]"):
        RunState.open(tmp_path, cfg.with_overrides({"model.kind": "vae"}))
