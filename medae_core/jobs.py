"""Single-site jobs behind `medae train-local` and `medae score`.

The command line parses options into a `RunConfig` and calls these; they do
the work and return JSON-ready summaries that the command line presents.
"""

from __future__ import annotations

import csv
import logging
import uuid
from pathlib import Path

import numpy as np

from medae_core import scoring
from medae_core.bundle import Bundle, load_bundle, save_bundle
from medae_core.config import RunConfig
from medae_core.data import input_warnings, scan_folder
from medae_core.errors import NoUsableImagesError
from medae_core.evaluation import LabelledSet, evaluate_site, intensity_metrics, judge
from medae_core.fileio import ensure_outside, output_folder, printable_path, safe_file_name
from medae_core.pretrain import ensure_start
from medae_core.privacy import PrivacyLedger, check_ledger_location, default_ledger_path
from medae_core.report import write_json
from medae_core.scoring import is_anomalous
from medae_core.site import SiteTrainer, load_site_data, train_and_calibrate

log = logging.getLogger(__name__)


def train_local(site: Path, run_dir: Path, cfg: RunConfig, ledger_path: Path | None = None, progress=None) -> dict:
    """Train on one site, calibrate the threshold, evaluate, write the bundle."""
    site, run_dir = Path(site), Path(run_dir)
    ensure_outside(run_dir, site)
    ensure_start(cfg)
    data = load_site_data(site, cfg)
    ledger = None
    if cfg.privacy.enabled:
        ledger_path = Path(ledger_path) if ledger_path else default_ledger_path(data.name)
        check_ledger_location(ledger_path, site)
        ledger = PrivacyLedger.for_config(cfg.privacy, site=data.name, path=ledger_path)
    trainer = SiteTrainer(data, cfg, ledger)
    result, evaluation, threshold = train_and_calibrate(trainer, uuid.uuid4().hex[:12], progress)
    summary = {
        "site": data.name,
        "train_images": len(data.train_images),
        "train_patients": data.n_train_patients,
        "val_images": evaluation.num_val,
        "skipped_files": data.skipped,
        "loss": result.loss,
        "val_loss": evaluation.val_loss,
        "steps": result.steps,
        "seconds": result.seconds,
        "images_per_second": result.images_per_second,
        "privacy": {
            "enabled": cfg.privacy.enabled,
            "unit": cfg.privacy.unit,
            "epsilon": result.epsilon if cfg.privacy.enabled else None,
            "delta": cfg.privacy.delta,
            "budget_epsilon": cfg.privacy.budget_epsilon,
            "noise_multiplier": result.noise_multiplier,
            "sample_rate": result.sample_rate,
            "ledger": str(ledger.path) if ledger is not None else None,
            "noise_to_signal": result.noise_to_signal,
            "reproducible_noise": cfg.privacy.reproducible_noise,
        },
        "trained_parameters": result.trained_parameters,
        "init": result.init,
        "threshold": vars(threshold),
    }
    test = LabelledSet.of(data.test)
    if test is not None:
        summary["test"], _ = evaluate_site(trainer.model(result.state_dict), test, cfg, trainer.device,
                                           threshold.value)
        summary["baseline_intensity"] = intensity_metrics(test, cfg)
    save_bundle(run_dir / "model", Bundle(cfg, result.state_dict, threshold, info={
        "site": data.name, "init": result.init, "inputs": data.inputs}))
    write_json(run_dir / "metrics.json", summary)
    return summary


def score_folder(model_path: Path, input_dir: Path, out: Path, *, device=None, heatmaps: bool = True,
                 progress=None) -> dict:
    """Score every usable image under ``input_dir``; write scores.csv, heatmaps and summary.json.

    Written into a staging folder that replaces ``out`` only when everything is
    written (`fileio.output_folder`): the outputs are complete or absent. Each
    image has its own row and, with ``heatmaps``, its own file, named in the
    row's ``heatmap`` column (`fileio.safe_file_name`: any input name, any length).
    """
    from medae_core import figures
    from medae_core.devices import resolve_device

    input_dir, out = Path(input_dir).absolute(), Path(out).absolute()
    ensure_outside(out, input_dir)
    bundle = load_bundle(model_path)
    cfg = bundle.config
    device = resolve_device(device or cfg.train.device)
    with output_folder(out) as stage:  # refuses an unsuitable --out before the work
        labels_csv = input_dir / "labels.csv"
        scan = scan_folder(input_dir, cfg.data, cfg.model.image_size,
                           labels_csv=labels_csv if labels_csv.is_file() else None)
        if len(scan.images) == 0:
            raise NoUsableImagesError(f"no usable image under {input_dir} ({len(scan.skipped)} files skipped)")
        model = bundle.build_model().to(device)
        maps, scores = scoring.anomaly_maps(model, scan.images, cfg.scoring, device, cond=scan.contrast_index)
        threshold = bundle.threshold.value if bundle.threshold else None
        names = [safe_file_name(e.path, e.frame, i + 1) + ".png" for i, e in enumerate(scan.entries)]
        _write_scores(stage / "scores.csv", scan, scores, threshold, names if heatmaps else None)
        if heatmaps:
            for i, name in enumerate(names):
                gt = scan.masks[i] if scan.has_mask is not None and scan.has_mask[i] else None
                figures.save_overlay(stage / "heatmaps" / name, scan.images[i], maps[i], threshold=threshold,
                                     title=f"score {scores[i]:.4g}", gt_mask=gt)
                if progress:
                    progress(i + 1, len(names))
        summary = _score_summary(scan, maps, scores, threshold, cfg)
        summary["warnings"] = input_mismatch(bundle, scan, scores, threshold)
        write_json(stage / "summary.json", summary)
    return summary


# Half the input scoring at this multiple of the threshold or more: data unlike the training data.
FAR_SCORE_FACTOR = 2.0


def input_mismatch(bundle: Bundle, scan, scores: np.ndarray, threshold: float | None) -> list[str]:
    """Why this input looks unlike what the bundle was trained on.

    - Its DICOM modality or photometric interpretation, against the kinds the
      bundle recorded (train-local and pretrain bundles; a federated bundle
      records none, since the sites' data never reach the coordinator).
    - Its scores: when the median image scores at `FAR_SCORE_FACTOR` times the
      threshold or more, the images are far from anything the model learned
      (another modality, contrast or intensity range), lesions or not.
    """
    trained = bundle.info.get("inputs") or (bundle.info.get("pretrained") or {}).get("inputs")
    warnings = input_warnings(trained, scan.input_kinds())
    if threshold is not None and threshold > 0 and len(scores):
        median = float(np.median(scores))
        if median >= FAR_SCORE_FACTOR * threshold:
            warnings.append(f"the median image scores {median / threshold:.1f}× the threshold ({median:.4g} "
                            f"against {threshold:.4g}): these images are far from what the model was trained on "
                            "(modality, contrast or intensity range?); check the input before reading the scores")
    return warnings


def _write_scores(path: Path, scan, scores: np.ndarray, threshold: float | None, heatmaps: list[str] | None) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "frame", "score", "anomalous", "heatmap"])
        for i, (entry, score) in enumerate(zip(scan.entries, scores, strict=True)):
            flag = "" if threshold is None else int(is_anomalous(score, threshold))
            writer.writerow([printable_path(entry.path), "" if entry.frame is None else entry.frame,
                             f"{score:.6g}", flag, f"heatmaps/{heatmaps[i]}" if heatmaps else ""])


def _score_summary(scan, maps: np.ndarray, scores: np.ndarray, threshold: float | None, cfg: RunConfig) -> dict:
    summary = {
        "images": len(scan.entries),
        "skipped": [{"path": printable_path(s.path), "reason": s.reason} for s in scan.skipped],
        "threshold": threshold,
        "anomalous": None if threshold is None else int(is_anomalous(scores, threshold).sum()),
    }
    test = LabelledSet.of(scan)
    if test is not None:
        summary["metrics"] = judge(test, maps[test.index], scores[test.index], threshold)
        summary["baseline_intensity"] = intensity_metrics(test, cfg)  # the same images, as train-local reports it
    return summary
