"""Site-side evaluation: what a server pools from histograms equals what the site measures exactly."""

import pytest

from medae_core.federated import auprc_from_histograms, auroc_from_histograms, dice_best_from_histograms
from medae_core.models import build_model
from medae_core.evaluation import LabelledSet, evaluate_site
from medae_core.site import load_site_data


def test_pooled_histogram_metrics_match_the_exact_site_metrics(tiny_benchmark, tiny_cfg):
    data = load_site_data(tiny_benchmark / "site-1", tiny_cfg)
    model = build_model(tiny_cfg.model, seed=0).eval()
    exact, hist = evaluate_site(model, LabelledSet.of(data.test), tiny_cfg, "cpu", None)
    assert exact["pixel_auroc"] is not None
    assert auroc_from_histograms(hist["image_pos"], hist["image_neg"]) == pytest.approx(exact["image_auroc"], abs=0.02)
    assert auroc_from_histograms(hist["pixel_pos"], hist["pixel_neg"]) == pytest.approx(exact["pixel_auroc"], abs=0.01)
    assert auprc_from_histograms(hist["pixel_pos"], hist["pixel_neg"]) == pytest.approx(exact["pixel_auprc"], abs=0.01)
    assert dice_best_from_histograms(hist["pixel_pos"], hist["pixel_neg"]) == pytest.approx(exact["dice_best"], abs=0.01)
