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
    assert "privacy and federation cost 0.030 against the non-private reference" in page
    no_dp = _summary_html(metrics(0.88, 0.78, reference=0.91), RunConfig().with_overrides({"privacy.enabled": False}))
    assert "; federation cost 0.030" in no_dp
    assert "at or above the non-private reference" in _summary_html(metrics(0.92, 0.78, reference=0.91), RunConfig())
    without = _summary_html(metrics(0.88, 0.78), RunConfig())
    assert "not computed" in without and "--no-reference" in without and "cost 0." not in without
    trained = {"rounds": [{"round": 1, "sites": {"a": {"status": "ok"}}}]}
    switched_off = metrics(0.88, 0.78) | trained | {"config": RunConfig().with_overrides(
        {"federation.reference": False}).to_dict()}
    assert "switched off" in _summary_html(switched_off, RunConfig())
    failed = switched_off | {"rounds": [{"round": 1, "sites": {"a": {"status": "refused", "reason": "no data"}}}]}
    assert "no site trained" in _summary_html(failed, RunConfig())
    recorded = failed | {"reference_not_computed": "not computed: too large"}
    assert "too large" in _summary_html(recorded, RunConfig())
    assert "trains it after the federation" in _summary_html(metrics(0.88, 0.78) | trained, RunConfig())
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
    # A simulated site leaves the warning to the ServerApp (`server.app.warn_noisy_sites`).
    caplog.clear()
    ledger = PrivacyLedger.for_config(cfg.privacy, site=data.name, path=tmp_path / "l2.jsonl")
    with caplog.at_level(logging.WARNING, logger="medae_core.site"):
        SiteTrainer(data, cfg, ledger, warn_noise=False).train_round(None, run_id="r", server_round=1)
    assert "DP noise is" not in caplog.text


def _run_metrics(model_auroc_bins: int, cfg) -> dict:
    """A two-round federated run's metrics.json as the ServerApp writes it (histograms over the shared bins)."""
    import numpy as np

    from medae_core.federated import pool_evaluations
    from medae_core.scoring import N_SCORE_BINS, score_bin_index

    def hist(scores):
        counts = np.zeros(N_SCORE_BINS, int)
        np.add.at(counts, score_bin_index(scores), 1)
        return counts.tolist()

    rng = np.random.default_rng(0)
    healthy, sick = rng.normal(0.02, 0.004, 40), rng.normal(0.02 + 0.001 * model_auroc_bins, 0.004, 20)
    pooled = pool_evaluations([{"healthy": hist(healthy), "image_pos": hist(sick), "image_neg": hist(healthy),
                                "baseline_image_pos": hist(sick * 0.9), "baseline_image_neg": hist(healthy)}],
                              95.0, threshold=0.025)
    sites = {"site-1": {"status": "ok", "epsilon": 4.0, "trained_parameters": 1000, "noise_to_signal": 0.5},
             "site-2": {"status": "refused", "reason": "site site-2: refused: budget spent"}}
    rounds = [{"round": r, "train_loss": 0.1 / r, "val_loss": 0.12 / r, "sites": sites, **pooled}
              for r in (1, 2)]
    return {"run_id": "abc", "rounds_done": 2, "rounds": rounds, "threshold": pooled["threshold"],
            "test": pooled["test"], "intensity_baseline": pooled["baseline"], "init": None,
            "sites": [{"site": "site-1", "epsilon": 4.0, "delta": 1e-5, "budget_epsilon": 8.0,
                       "privacy_unit": "patient", "num_examples": 100, "test": pooled["test"]}],
            "config": cfg.to_dict()}


def test_the_report_has_the_baseline_banners_delta_and_every_figure(tmp_path, tiny_cfg):
    from medae_core.bundle import Bundle, Threshold
    from medae_core.models import build_model
    from medae_core.report import LABELS, reference_images, write_report

    bundle = Bundle(tiny_cfg, build_model(tiny_cfg.model, seed=0).state_dict(),
                    Threshold(value=0.025, percentile=95.0, n_healthy=40, method="federated-histogram"))
    good = _run_metrics(12, tiny_cfg)
    page = write_report(tmp_path, good, bundle, reference=reference_images(tiny_cfg)).read_text()
    for alt in ("loss per round", "AUROC per round", "epsilon per site", "ROC and PR curves", "score histograms",
                "reconstructions and anomaly maps"):
        assert f'alt="{alt}"' in page, alt
    assert "intensity-threshold baseline" in page and "1e-05" in page and "0.000" not in page.split("δ")[1][:20]
    assert "The model learned" in page and "class=alert" not in page
    for key, label in LABELS.items():
        assert f">{key}<" not in page  # one name per metric: the label, never the raw key
    assert LABELS["sensitivity"] in page and "Refused rounds and rejected updates" in page
    assert "lesion" in page or "healthy" in page
    chance = _run_metrics(-1, tiny_cfg)  # anomalous images score a little lower: worse than a coin toss
    page = write_report(tmp_path, chance, bundle).read_text()
    assert "near chance" in page and "class=alert" in page


def test_a_thousand_site_report_shows_the_spread_and_keeps_every_site_folded(tmp_path, tiny_cfg):
    from medae_core.bundle import Bundle, Threshold
    from medae_core.models import build_model
    from medae_core.report import SITES_LISTED, round_summary, write_report

    bundle = Bundle(tiny_cfg, build_model(tiny_cfg.model, seed=0).state_dict(),
                    Threshold(value=0.025, percentile=95.0, n_healthy=40, method="federated-histogram"))
    m = _run_metrics(12, tiny_cfg)
    n = 1000
    sites = {f"site-{k}": {"status": "ok", "epsilon": 3.0 + k / n, "trained_parameters": 1000,
                           "noise_to_signal": 0.5} for k in range(1, n + 1)}
    sites["site-7"] = {"status": "refused", "reason": "site site-7: refused: budget spent"}
    for r in m["rounds"]:
        r["sites"] = sites
    m["sites"] = [{"site": name, "epsilon": s.get("epsilon", 8.0), "delta": 1e-5, "budget_epsilon": 8.0,
                   "privacy_unit": "patient", "num_examples": 100,
                   "test": {"image_auroc": 0.6 + 0.3 * (k % 2), "baseline_image_auroc": 0.7}}
                  for k, (name, s) in enumerate(sites.items())]
    page = write_report(tmp_path, m, bundle).read_text()
    visible, folded = page.split("<details><summary>every site (1000)</summary>")
    assert "site-500<" not in visible and "site-500<" in folded  # every site is there, folded away
    assert "1000 sites: each row" in visible and ">median<" in visible
    assert "500 of 1000 sites with test labels" in visible  # half the sites beat their own baseline
    assert 'alt="epsilon per site"' in page
    line = round_summary(m["rounds"][0])
    assert "999 sites trained, ε 3.00–4.00" in line and "refused: site-7" in line and "site-500" not in line
    assert len(line) < 200 and SITES_LISTED < 999
