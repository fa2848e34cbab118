"""What federation and privacy cost and buy: baselines on the same data and model.

All scorers are evaluated exactly (not from histograms) on the pooled test
sets of the given sites, so the rows of one table compare like with like:
- federated: the federated model bundle;
- centralized, with and without DP: one model on all sites' training data
  pooled (what federation tries to approach without moving data);
- each site alone, with DP: what a hospital gets without federating;
- intensity threshold: the plain baseline that beats many autoencoders on
  bright lesions.
``medae simulate`` computes the federated, non-private reference and intensity rows by
default (``federation.reference``), and every row with ``--baselines``.
Centralized and single-site models train for rounds × epochs epochs, the same
budget of passes as a federated site (without DP: for as many images as with DP). A simulation's ledgers are its own
(``OUT/ledgers``), never a real site's.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np

from medae_core.bundle import load_bundle
from medae_core.config import RunConfig
from medae_core.pretrain import ensure_start
from medae_core.privacy import PrivacyLedger
from medae_core.evaluation import LabelledSet, evaluate_model, intensity_metrics
from medae_core.site import SiteData, SiteTrainer, load_site_data, train_and_calibrate

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
        train_cond=None if any(d.train_cond is None for d in data) else np.concatenate([d.train_cond for d in data]),
        val_cond=None if any(d.val_cond is None for d in data) else np.concatenate([d.val_cond for d in data]),
    )


def train_and_evaluate(data: SiteData, cfg: RunConfig, test: LabelledSet, ledger_dir: Path) -> dict:
    ledger = None
    if cfg.privacy.enabled:
        path = ledger_dir / f"{data.name}-{uuid.uuid4().hex[:6]}.jsonl"
        ledger = PrivacyLedger.for_config(cfg.privacy, site=data.name, path=path)
    trainer = SiteTrainer(data, cfg, ledger)
    result, _, threshold = train_and_calibrate(trainer, "baseline")
    out = evaluate_model(trainer.model(result.state_dict), test, cfg, trainer.device, threshold.value)
    out["epsilon"] = result.epsilon if cfg.privacy.enabled else None
    return out


def run_baselines(cfg: RunConfig, sites: list[Path], out_dir: Path, federated: Path | None = None, *,
                  full: bool = True, snapshots: Path | None = None) -> dict:
    """Every row (``full``), or only the reference rows: the federated model scored exactly, the
    centralized model without DP (the non-private reference) and the intensity threshold.

    ``snapshots``: the simulation's folder of site reads, while it lasts (`load_site_data`).
    """
    from medae_core.devices import resolve_device

    out_dir = Path(out_dir)
    ensure_start(cfg)
    data = [load_site_data(s, cfg, snapshots=snapshots) for s in sites]
    test = LabelledSet.pooled([d.test for d in data])
    if test is None:
        log.warning("no site has test labels: baselines need labelled test data")
        return {}
    pooled = pool_sites(data)
    # Only the per-site rows need the sites' own arrays; otherwise the pooled copies hold every image
    # (a large simulation has no room for both).
    alone = data if full else []
    del data
    long = cfg.with_overrides({"train.epochs": cfg.train.epochs * cfg.federation.rounds})
    results: dict[str, dict] = {}
    device = resolve_device(cfg.train.device)
    if federated is not None:
        bundle = load_bundle(federated)
        threshold = bundle.threshold.value if bundle.threshold else None
        results["federated (exact)"] = evaluate_model(bundle.build_model().to(device), test, cfg, device, threshold)
    if full and cfg.privacy.enabled:
        log.info("baseline: centralized training with DP")
        results["centralized, DP"] = train_and_evaluate(pooled, long, test, out_dir / "ledgers")
    # Without DP an epoch is every image, not one slice per patient: train for as
    # many images as the DP runs see, so that the rows differ by privacy alone.
    nondp_epochs = max(1, round(long.train.epochs * pooled.n_train_patients / len(pooled.train_images)))
    log.info("non-private reference: centralized training without DP, %d sites pooled, %d images, %d epoch%s",
             len(sites), len(pooled.train_images), nondp_epochs, "" if nondp_epochs == 1 else "s")
    results["centralized, no DP"] = train_and_evaluate(
        pooled, long.with_overrides({"privacy.enabled": False, "train.epochs": nondp_epochs}), test,
        out_dir / "ledgers")
    for site in alone:
        log.info("baseline: %s alone", site.name)
        results[f"{site.name} alone"] = train_and_evaluate(site, long, test, out_dir / "ledgers")
    results["intensity threshold"] = intensity_metrics(test, cfg)
    return results


# Peak memory of the baseline rows over the bytes of the sites' snapshots: 6.0 GiB over 2.2 GiB at
# 1,000 sites of 10 patients (BENCHMARKS.md, "The non-private reference in every simulation"), rounded up.
MEMORY_PER_SNAPSHOT_BYTE = 3.0


def memory_shortfall(snapshots: Path | None) -> str | None:
    """Why pooling the sites' images would not fit in the memory available now, or None (fits, or unknown)."""
    import psutil

    if snapshots is None or not Path(snapshots).is_dir():
        return None
    size = sum(p.stat().st_size for p in Path(snapshots).glob("*.pickle"))
    need, available = size * MEMORY_PER_SNAPSHOT_BYTE, psutil.virtual_memory().available
    if need <= available:
        return None
    return (f"not computed: pooling the sites' images ({size / 2**30:.1f} GiB) needs about {need / 2**30:.1f} GiB "
            f"of memory and {available / 2**30:.1f} GiB is available; the federated run is complete. To see what "
            "privacy costs, simulate fewer sites (--sites), or pass --no-reference")


def add_baselines(run_dir: Path, cfg: RunConfig, *, full: bool = True, snapshots: Path | None = None) -> dict:
    """After a simulated federation: its baselines into RUN/metrics.json, and the report redrawn with them.

    ``cfg`` is the run's (``federation.data_root`` set); ``full`` and ``snapshots`` as in
    `run_baselines`. The reference alone is skipped for a failed run (its metrics and report left
    as they are). When the pooled images would not fit in memory (`memory_shortfall`), the
    metrics say why instead (``reference_not_computed``) and nothing is trained. Returns the metrics.
    """
    import json

    from medae_core.data import site_folders
    from medae_core.federated import run_failure
    from medae_core.report import reference_images, write_metrics, write_report

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    failed = None if full else run_failure(metrics)
    if failed is not None:
        log.warning("no non-private reference: %s", failed)
        return metrics
    why = memory_shortfall(snapshots)
    if why is not None:
        log.warning("no non-private reference: %s", why)
        metrics["reference_not_computed"] = why
    else:
        sites = site_folders(Path(cfg.federation.data_root))[: cfg.federation.sites]
        metrics["baselines"] = run_baselines(cfg, sites, run_dir / "baselines", federated=run_dir / "model",
                                             full=full, snapshots=snapshots)
    write_metrics(run_dir, metrics)
    # The ServerApp wrote the report; it is rewritten only to add the baselines.
    write_report(run_dir, metrics, load_bundle(run_dir / "model"), reference=reference_images(cfg))
    return metrics
