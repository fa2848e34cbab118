"""The baselines every result sits next to: centralized (DP and not), each site alone, the intensity threshold."""

from __future__ import annotations

import pytest

from medae_core.baselines import run_baselines
from medae_core.data import site_folders
from medae_core.privacy import PrivacyLedger


@pytest.mark.slow
def test_every_baseline_is_scored_on_the_same_pooled_test_set(tiny_benchmark, tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({"federation.rounds": 1, "federation.data_root": str(tiny_benchmark)})
    sites = site_folders(tiny_benchmark)
    results = run_baselines(cfg, sites, tmp_path / "baselines")
    expected = {"centralized, DP", "centralized, no DP", "intensity threshold", *(f"{s.name} alone" for s in sites)}
    assert set(results) == expected
    counts = {name: (r["n_images"], r["n_anomalous"]) for name, r in results.items()}
    assert len(set(counts.values())) == 1  # one test set for every row
    for name, r in results.items():
        assert 0.0 <= r["image_auroc"] <= 1.0, name
    ledgers = sorted((tmp_path / "baselines" / "ledgers").glob("*.jsonl"))
    assert ledgers, "the DP baselines keep ledgers of their own"
    for path in ledgers:
        ledger = PrivacyLedger.open(path, readonly=True)
        assert 0 < ledger.epsilon() <= ledger.budget_epsilon
    no_dp = run_baselines(cfg.with_overrides({"privacy.enabled": False}), sites[:1], tmp_path / "nodp")
    assert "centralized, DP" not in no_dp and "centralized, no DP" in no_dp
