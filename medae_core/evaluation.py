"""How a model is judged on labelled images: the one home of the rules every evaluation shares.

A site's federated evaluation (`medae_core.site`), `train-local` and `score`
(`medae_core.jobs`), the baselines (`medae_core.baselines`) and the benchmarks
all call this module, so they agree on:

- **the labelled set** (`LabelledSet`): the images whose label is 0 (healthy)
  or 1 (anomalous); -1 (unknown) is left out. Masks come with it;
- **the foreground**: `scoring.foreground_mask`, computed once per set and
  used by the scoring and by the pixel metrics alike;
- **the pixels that count** (`metrics.evaluated_images`, `metrics.pixel_region`):
  the foreground plus every lesion pixel, of each image with a mask and of
  each healthy image;
- **the decision**: `scoring.is_anomalous`, ``score >= threshold``;
- **the histograms** a site sends instead of scores (`site_histograms`), so that
  the server's pooled metrics use the same images and pixels as the exact ones.

The intensity-threshold baseline is judged by the same rules on the same set
(`intensity_metrics`), so a result can always sit next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from medae_core import metrics, scoring
from medae_core.config import RunConfig
from medae_core.data import Scan


@dataclass(frozen=True)
class LabelledSet:
    """Test images with a known label, their masks, and (once) their foreground."""

    images: np.ndarray  # [N,S,S] float32
    labels: np.ndarray  # [N] 1 anomalous / 0 healthy
    masks: np.ndarray | None  # [N,S,S] bool, or None when no image has a mask
    has_mask: np.ndarray  # [N] bool
    index: np.ndarray | None = None  # positions in the scan it came from (None when pooled)
    cond: np.ndarray | None = None  # each image's contrast index (`Scan.contrast_index`), a CVAE's label

    @classmethod
    def of(cls, scan: Scan | None) -> LabelledSet | None:
        """The labelled images of ``scan``; None when it has none (no labels.csv, or every label unknown)."""
        if scan is None or scan.labels is None or not (scan.labels >= 0).any():
            return None
        index = np.flatnonzero(scan.labels >= 0)
        return cls(
            images=scan.images[index],
            labels=scan.labels[index],
            masks=scan.masks[index] if scan.masks is not None else None,
            has_mask=scan.has_mask[index] if scan.has_mask is not None else np.zeros(len(index), bool),
            index=index,
            cond=scan.contrast_index[index] if scan.contrast_index is not None else None,
        )

    @classmethod
    def pooled(cls, scans: list[Scan | None]) -> LabelledSet | None:
        """The labelled images of several sites' test sets, in order; None when none has any."""
        sets = [s for s in (cls.of(scan) for scan in scans) if s is not None]
        if not sets:
            return None
        return cls(
            images=np.concatenate([s.images for s in sets]),
            labels=np.concatenate([s.labels for s in sets]),
            masks=None if all(s.masks is None for s in sets) else np.concatenate(
                [s.masks if s.masks is not None else np.zeros(s.images.shape, bool) for s in sets]),
            has_mask=np.concatenate([s.has_mask for s in sets]),
            cond=None if any(s.cond is None for s in sets) else np.concatenate([s.cond for s in sets]),
        )

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def foreground(self) -> np.ndarray:
        return scoring.foreground_mask(self.images)


def score_model(model: Any, test: LabelledSet, cfg: RunConfig, device: Any) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps and image scores of ``model`` on the set (its foreground computed once)."""
    return scoring.anomaly_maps(model, test.images, cfg.scoring, device, fg_masks=test.foreground, cond=test.cond)


def judge(test: LabelledSet, maps: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict:
    """Every exact metric of these maps and scores (`metrics.evaluate`) on the pixels that count."""
    return metrics.evaluate(maps, scores, test.labels, test.masks, test.has_mask, threshold, fg_masks=test.foreground)


def evaluate_model(model: Any, test: LabelledSet, cfg: RunConfig, device: Any, threshold: float | None) -> dict:
    maps, scores = score_model(model, test, cfg, device)
    return judge(test, maps, scores, threshold)


def intensity_metrics(test: LabelledSet, cfg: RunConfig) -> dict:
    """The plain intensity-threshold scorer (no model: the image is its own map), by the same rules."""
    maps, scores = scoring.intensity_baseline(test.images, cfg.scoring, fg_masks=test.foreground)
    return judge(test, maps, scores, None)


def evaluate_site(model: Any, test: LabelledSet, cfg: RunConfig, device: Any,
                  threshold: float | None) -> tuple[dict, dict[str, np.ndarray]]:
    """A site's exact metrics, with the intensity baseline's AUROC, and the histograms a server can pool."""
    maps, scores = score_model(model, test, cfg, device)
    result = judge(test, maps, scores, threshold)
    _, baseline = scoring.intensity_baseline(test.images, cfg.scoring, fg_masks=test.foreground)
    result["baseline_image_auroc"] = metrics.image_metrics(baseline, test.labels)["image_auroc"]
    return result, site_histograms(test, maps, scores, baseline)


def site_histograms(test: LabelledSet, maps: np.ndarray, scores: np.ndarray,
                    baseline_scores: np.ndarray) -> dict[str, np.ndarray]:
    """Label-split `scoring.score_histogram` counts: images, the baseline's images, and the pixels that count.

    Named as in `contract.HISTOGRAMS` (the healthy validation histogram is the ClientApp's).
    """
    pos, neg = test.labels == 1, test.labels == 0
    hist = scoring.score_histogram
    out = {
        "image_pos": hist(scores[pos]),
        "image_neg": hist(scores[neg]),
        "baseline_image_pos": hist(baseline_scores[pos]),
        "baseline_image_neg": hist(baseline_scores[neg]),
    }
    if test.masks is not None and test.has_mask.any():
        selected, gt = metrics.evaluated_images(test.labels, test.masks, test.has_mask, maps.shape)
        region = metrics.pixel_region(gt[selected], test.foreground[selected])
        values, truth = maps[selected][region], gt[selected][region]
        out["pixel_pos"] = hist(values[truth])
        out["pixel_neg"] = hist(values[~truth])
    return out
