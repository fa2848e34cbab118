"""What federation and privacy cost and buy: baselines on the same data and model.

All scorers are evaluated exactly (not from histograms) on the pooled test
sets of the given sites, so the rows of one table compare like with like:
- federated: the federated model bundle;
- centralized, with and without DP: one model on all sites' training data
  pooled (what federation tries to approach without moving data);
- each site alone, with DP: what a hospital gets without federating;
- intensity threshold: the plain baseline that beats many autoencoders on
  bright lesions.
Centralized and single-site models train for rounds × epochs epochs, the same
budget of passes as a federated site (without DP: for as many images as with DP). A simulation's ledgers are its own
(``OUT/ledgers``), never a real site's.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np

from medae_core import scoring
from medae_core.bundle import load_bundle
from medae_core.config import RunConfig
from medae_core.data import Scan
from medae_core.privacy import PrivacyLedger
from medae_core.site import SiteData, SiteTrainer, load_site_data, scored_metrics

log = logging.getLogger(__name__)


def pool_sites(data: list[SiteData], name: str = "pooled") -> SiteData:
    offsets = np.cumsum([0] + [d.n_train_patients for d in data[:-1]])
    return SiteData(
        name=name,
        root=Path("."),
        train_images=np.concatenate([d.train_images for d in data]),
        train_patients=np.concatenate([d.train_patients + o for d, o in zip(data, offsets, strict=True)]),
        val_images=np.concatenate([d.val_images for d in data]),
        test=None,
        skipped=sum(d.skipped for d in data),
    )


def pooled_test(data: list[SiteData]) -> dict[str, np.ndarray] | None:
    tests: list[Scan] = [d.test for d in data if d.test is not None and d.test.labels is not None]
    if not tests:
        return None
    images = np.concatenate([t.images for t in tests])
    labels = np.concatenate([t.labels for t in tests])
    masks = np.concatenate([t.masks if t.masks is not None else np.zeros(t.images.shape, bool) for t in tests])
    has_mask = np.concatenate([t.has_mask if t.has_mask is not None else np.zeros(len(t.images), bool)
                               for t in tests])
    known = labels >= 0
    return {"images": images[known], "labels": labels[known], "masks": masks[known], "has_mask": has_mask[known]}


def evaluate_model(model, cfg: RunConfig, test: dict, threshold: float | None, device) -> dict:
    maps, scores = scoring.anomaly_maps(model, test["images"], cfg.scoring, device)
    return scored_metrics(test["images"], maps, scores, test["labels"], test["masks"], test["has_mask"], threshold)[0]


def train_and_evaluate(data: SiteData, cfg: RunConfig, test: dict, ledger_dir: Path) -> dict:
    ledger = None
    if cfg.privacy.enabled:
        path = ledger_dir / f"{data.name}-{uuid.uuid4().hex[:6]}.jsonl"
        ledger = PrivacyLedger.for_config(cfg.privacy, site=data.name, path=path)
    from medae_core.jobs import train_and_calibrate

    trainer = SiteTrainer(data, cfg, ledger)
    result, _, threshold = train_and_calibrate(trainer, "baseline")
    out = evaluate_model(trainer.model(result.state_dict), cfg, test, threshold.value, trainer.device)
    out["epsilon"] = result.epsilon if cfg.privacy.enabled else None
    return out


def run_baselines(cfg: RunConfig, sites: list[Path], out_dir: Path, federated: Path | None = None) -> dict:
    from medae_core.training import resolve_device

    out_dir = Path(out_dir)
    data = [load_site_data(s, cfg) for s in sites]
    test = pooled_test(data)
    if test is None:
        log.warning("no site has test labels: baselines need labelled test data")
        return {}
    long = cfg.with_overrides({"train.epochs": cfg.train.epochs * cfg.federation.rounds})
    results: dict[str, dict] = {}
    device = resolve_device(cfg.train.device)
    if federated is not None:
        bundle = load_bundle(federated)
        threshold = bundle.threshold.value if bundle.threshold else None
        results["federated (exact)"] = evaluate_model(bundle.build_model().to(device), cfg, test, threshold, device)
    pooled = pool_sites(data)
    if cfg.privacy.enabled:
        log.info("baseline: centralized training with DP")
        results["centralized, DP"] = train_and_evaluate(pooled, long, test, out_dir / "ledgers")
    log.info("baseline: centralized training without DP")
    # Without DP an epoch is every image, not one slice per patient: train for as
    # many images as the DP runs see, so that the rows differ by privacy alone.
    nondp_epochs = max(1, round(long.train.epochs * pooled.n_train_patients / len(pooled.train_images)))
    results["centralized, no DP"] = train_and_evaluate(
        pooled, long.with_overrides({"privacy.enabled": False, "train.epochs": nondp_epochs}), test,
        out_dir / "ledgers")
    for site in data:
        log.info("baseline: %s alone", site.name)
        results[f"{site.name} alone"] = train_and_evaluate(site, long, test, out_dir / "ledgers")
    maps, scores = scoring.intensity_baseline(test["images"], cfg.scoring)
    results["intensity threshold"] = scored_metrics(test["images"], maps, scores, test["labels"], test["masks"],
                                                    test["has_mask"], None)[0]
    return results


def add_baselines(run_dir: Path, cfg: RunConfig) -> dict:
    """After a simulated federation: its baselines into RUN/metrics.json, and the report redrawn with them.

    ``cfg`` is the run's (``federation.data_root`` set). Returns the metrics.
    """
    import json

    from medae_core.data import site_folders
    from medae_core.report import reference_images, write_metrics, write_report

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    sites = site_folders(Path(cfg.federation.data_root))[: cfg.federation.sites]
    metrics["baselines"] = run_baselines(cfg, sites, run_dir / "baselines", federated=run_dir / "model")
    write_metrics(run_dir, metrics)
    # The ServerApp wrote the report; it is rewritten only to add the baselines.
    write_report(run_dir, metrics, load_bundle(run_dir / "model"), reference=reference_images(cfg))
    return metrics
