"""The report's first screen: did the model learn, is it better than the baseline, what did it cost."""

import logging

from medae_core.config import RunConfig
from medae_core.report import _summary_html, verdict
from medae_core.site import NOISE_TO_SIGNAL_WARNING, noise_to_signal


def metrics(model, baseline, reference=None):
    m = {"test": {"image_auroc": model}, "intensity_baseline": {"image_auroc": baseline},
         "sites": [{"site": "a", "epsilon": 7.9}, {"site": "b", "epsilon": 7.95}], "init": None}
    if reference is not None:
        m["baselines"] = {"centralized, no DP": {"image_auroc": reference}}
    return m


def test_a_model_near_chance_gets_a_banner_and_so_does_one_below_the_baseline():
    near = verdict(metrics(0.52, 0.78))
    assert any("near chance" in w for w in near["warnings"])
    assert any("does not beat the plain intensity threshold" in w for w in near["warnings"])
    below = verdict(metrics(0.75, 0.78))
    assert [w for w in below["warnings"] if "intensity" in w] and not [w for w in below["warnings"] if "chance" in w]
    assert verdict(metrics(0.88, 0.78))["warnings"] == []


def test_the_summary_shows_the_baseline_reference_and_cost_next_to_the_model():
    page = _summary_html(metrics(0.88, 0.78, reference=0.91), RunConfig())
    assert "0.880" in page and "0.780" in page and "0.910" in page
    assert "ε = 7.95 of 8" in page and "1e-05" in page
    assert "random initialisation" in page
    without = _summary_html(metrics(0.88, 0.78), RunConfig())
    assert "run with --baselines" in without
    started = metrics(0.88, 0.78) | {"init": {"data": "medae built-in public set", "config_hash": "abc"}}
    assert "built-in public set" in _summary_html(started, RunConfig())


def test_noise_to_signal_falls_with_patients_and_with_fewer_trained_parameters():
    from medae_core.privacy import calibrate_noise

    def ratio(patients, params, batch=16, epochs=50):
        q = batch / patients
        steps = epochs * -(-patients // batch)
        return noise_to_signal(calibrate_noise(8.0, 1e-5, q, steps, "pld"), params, batch, steps)

    small, large = ratio(27, 226_000), ratio(450, 226_000)
    assert small > 5 * NOISE_TO_SIGNAL_WARNING  # the regime where DP from scratch fails
    assert large < small / 5
    assert ratio(150, 1_500) < ratio(150, 226_000) / 10


def test_a_site_in_the_noise_dominated_regime_is_warned(tiny_benchmark, tiny_cfg, tmp_path, caplog):
    from medae_core.privacy import PrivacyLedger
    from medae_core.site import SiteTrainer, load_site_data

    cfg = tiny_cfg.with_overrides({"privacy.budget_epsilon": 1.0, "train.epochs": 1})
    data = load_site_data(tiny_benchmark / "site-1", cfg)
    ledger = PrivacyLedger.for_config(cfg.privacy, site=data.name, path=tmp_path / "l.jsonl")
    with caplog.at_level(logging.WARNING, logger="medae_core.site"):
        result = SiteTrainer(data, cfg, ledger).train_round(None, run_id="r", server_round=1)
    assert result.noise_to_signal > NOISE_TO_SIGNAL_WARNING
    assert "DP noise is" in caplog.text and "from a random start" in caplog.text
