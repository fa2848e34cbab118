"""Server-side bookkeeping of a federated run, without Flower.

Sites send only scalars and histogram counts (fixed, shared bins from
`medae_core.scoring`). From those the server derives:
- the global anomaly threshold: the percentile of the pooled healthy-score
  histogram;
- pooled test metrics: image AUROC/AUPRC from label-split image-score
  histograms, pixel AUPRC, best Dice and Dice at the global threshold from
  label-split pixel histograms.
Histogram metrics are exact up to the bin width: every score in a bin is
treated as tied.

`RunState` is the run's memory on the coordinator's disk (``RUN/state.json``):
which round is done, the per-round metrics and each site's last report. The
server saves it after every round so that a restarted run resumes.

Before averaging, the server checks every site's reply (`check_update`,
`RunState.check_epsilon`): one buggy or hostile site must not poison the
global model for everyone, and a site whose ledger lost entries (its ε went
down) must not train on as if it had spent less.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medae_core.config import RunConfig
from medae_core.errors import ConfigError
from medae_core.fileio import write_json
from medae_core.scoring import score_bin_index, threshold_from_histogram

STATE = "state.json"
# Deployment: the coordinator's record of which authenticated node is which site
# (``RUN/sites.json``), named to the ServerApp by the run config (`contract.RUN_SITE_REGISTRY`).
SITE_REGISTRY = "sites.json"
# Adam's per-coordinate step is at most lr * (1 - beta1) / sqrt(1 - beta2) = 3.16 lr with
# beta = (0.9, 0.999) (Kingma & Ba 2015, section 2.1); the margin covers float rounding,
# weight decay and the moving average of the weights.
ADAM_STEP_BOUND = 3.2
UPDATE_MARGIN = 2.0


PROGRESS_DIR = "progress"  # simulation only: RUN/progress/<site>.json, a site's steps within a round


def write_site_progress(run_dir: Path, site: str, server_round: int, done: int, total: int) -> None:
    """Where a simulated site is within its round (for the live display of `medae simulate`)."""
    folder = Path(run_dir) / PROGRESS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{site}.json", {"round": server_round, "done": done, "total": total, "time": time.time()})


def read_progress(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every simulated site's last progress record; a file being replaced is skipped this time."""
    out = {}
    for path in sorted((Path(run_dir) / PROGRESS_DIR).glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def write_site_registry(path: Path, site_of_node: dict[int, str]) -> None:
    write_json(path, {"nodes": {str(node): site for node, site in sorted(site_of_node.items())}})


def read_site_registry(path: Path) -> dict[int, str]:
    nodes = json.loads(Path(path).read_text())["nodes"]
    return {int(node): str(site) for node, site in nodes.items()}


# -- checks on a site's reply -------------------------------------------------
def check_update(
    global_state: dict[str, np.ndarray], update: dict[str, np.ndarray], *, steps: int, lr: float
) -> str | None:
    """Why ``update`` cannot be local training from ``global_state``; None when it can be.

    Checks: the same keys and shapes as the global model; every value finite;
    no coordinate moved further than ``steps`` Adam steps of size ``lr`` can move
    it. This stops NaN, wrong-shape and crude scaling attacks; an update inside
    the bound can still be biased, which robust strategies (``fedmedian``,
    ``fedtrimmedavg``) are for.
    """
    missing, extra = sorted(set(global_state) - set(update)), sorted(set(update) - set(global_state))
    if missing or extra:
        return f"its arrays are not the model's (missing {missing[:3]}, unexpected {extra[:3]})"
    bound = UPDATE_MARGIN * ADAM_STEP_BOUND * lr * max(int(steps), 0)
    largest = 0.0
    for key, ref in global_state.items():
        new = np.asarray(update[key])
        if new.shape != np.shape(ref):
            return f"array {key} has shape {list(new.shape)}, the model's is {list(np.shape(ref))}"
        if not np.issubdtype(new.dtype, np.number) and new.dtype != np.bool_:
            return f"array {key} is not numeric ({new.dtype})"
        bad = int(np.size(new) - np.count_nonzero(np.isfinite(new)))
        if bad:
            return f"array {key} holds {bad} NaN or infinite values"
        if new.size:
            largest = max(largest, float(np.max(np.abs(new.astype(np.float64) - np.asarray(ref, np.float64)))))
    if largest > bound:
        return (f"it moves a weight by {largest:.3g}, more than {int(steps)} training steps at lr {lr:g} can "
                f"(at most {bound:.3g})")
    return None


# -- metrics from pooled histograms -----------------------------------------
def _descending_cumsums(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives when thresholding at each bin's lower edge (high to low)."""
    tp = np.cumsum(pos[::-1].astype(np.float64))
    fp = np.cumsum(neg[::-1].astype(np.float64))
    return tp, fp


def auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """Area under the ROC curve, ties within a bin counted as one half."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if pos.sum() == 0 or neg.sum() == 0:
        return None
    neg_below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    wins = (pos * (neg_below + 0.5 * neg)).sum()
    return float(wins / (pos.sum() * neg.sum()))


def auprc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """Average precision: precision at each bin threshold weighted by recall gained."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if pos.sum() == 0:
        return None
    tp, fp = _descending_cumsums(pos, neg)
    gained = pos[::-1] / pos.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
    return float((precision * gained).sum())


def dice_best_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """Best global Dice over bin thresholds: 2TP / (2TP + FP + FN)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if pos.sum() == 0:
        return None
    tp, fp = _descending_cumsums(pos, neg)
    fn = pos.sum() - tp
    return float(np.max(2 * tp / (2 * tp + fp + fn)))


def _confusion_at(pos: np.ndarray, neg: np.ndarray, threshold: float) -> tuple[float, float, float, float]:
    """(TP, FP, FN, TN) of ``score >= threshold``; exact when ``threshold`` is a bin edge (as pooled thresholds are)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    k = int(score_bin_index([threshold])[0])
    return pos[k:].sum(), neg[k:].sum(), pos[:k].sum(), neg[:k].sum()


def dice_at_threshold_from_histograms(pos: np.ndarray, neg: np.ndarray, threshold: float) -> float | None:
    """Global Dice of ``score >= threshold``."""
    tp, fp, fn, _ = _confusion_at(pos, neg, threshold)
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom > 0 else None


def rates_at_threshold(pos: np.ndarray, neg: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Sensitivity and specificity of ``score >= threshold``."""
    tp, fp, fn, tn = _confusion_at(pos, neg, threshold)
    return {"sensitivity": float(tp / (tp + fn)) if tp + fn else None,
            "specificity": float(tn / (tn + fp)) if tn + fp else None}


def pool_evaluations(
    site_evals: list[dict[str, Any]], percentile: float, threshold: float | None = None
) -> dict[str, Any]:
    """Combine per-site evaluation replies into a threshold and pooled metrics.

    Each element holds ``healthy`` and optionally ``image_pos``,
    ``image_neg``, ``pixel_pos``, ``pixel_neg`` (histogram counts).
    ``threshold``: the threshold the sites evaluated at (pixel Dice at it).
    """

    def total(key: str) -> np.ndarray | None:
        arrays = [np.asarray(e[key]) for e in site_evals if e.get(key) is not None]
        return np.sum(arrays, axis=0) if arrays else None

    pooled: dict[str, Any] = {}
    healthy = total("healthy")
    if healthy is not None and healthy.sum() > 0:
        pooled["threshold"] = float(threshold_from_histogram(healthy, percentile))
        pooled["n_healthy"] = int(healthy.sum())
    image_pos, image_neg = total("image_pos"), total("image_neg")
    if image_pos is not None and image_neg is not None:
        pooled["test"] = {
            "image_auroc": auroc_from_histograms(image_pos, image_neg),
            "image_auprc": auprc_from_histograms(image_pos, image_neg),
            "n_images": int(image_pos.sum() + image_neg.sum()),
            "n_anomalous": int(image_pos.sum()),
        }
        if threshold is not None:
            pooled["test"].update(rates_at_threshold(image_pos, image_neg, threshold))
        pixel_pos, pixel_neg = total("pixel_pos"), total("pixel_neg")
        if pixel_pos is not None and pixel_neg is not None:
            pooled["test"].update(
                pixel_auroc=auroc_from_histograms(pixel_pos, pixel_neg),
                pixel_auprc=auprc_from_histograms(pixel_pos, pixel_neg),
                dice_best=dice_best_from_histograms(pixel_pos, pixel_neg),
            )
            if threshold is not None:
                pooled["test"]["dice_at_threshold"] = dice_at_threshold_from_histograms(
                    pixel_pos, pixel_neg, threshold
                )
        pooled["curves"] = {"image_pos": image_pos.tolist(), "image_neg": image_neg.tolist()}
    base_pos, base_neg = total("baseline_image_pos"), total("baseline_image_neg")
    if base_pos is not None and base_neg is not None:
        pooled["baseline"] = {
            "image_auroc": auroc_from_histograms(base_pos, base_neg),
            "image_auprc": auprc_from_histograms(base_pos, base_neg),
        }
        pooled["curves"].update(baseline_pos=base_pos.tolist(), baseline_neg=base_neg.tolist())
    return pooled


def run_failure(metrics: dict[str, Any]) -> str | None:
    """Why a finished federated run produced no trained model; None when some site trained.

    A run in which every round was refused or rejected exits non-zero with this
    reason (`medae simulate`, `medae server`), instead of reporting the untrained
    starting model as if it were a result.
    """
    rounds = metrics.get("rounds") or []
    if not rounds:
        return "no round was completed"
    sites = [s for r in rounds for s in (r.get("sites") or {}).values()]
    if any(s.get("status") == "ok" for s in sites):
        return None
    if not sites:
        return "no site replied in any round"
    reasons = list(dict.fromkeys(str(s.get("reason") or s.get("status")) for s in sites))
    return "no site trained in any round: " + "; ".join(reasons[:5])


# -- run state --------------------------------------------------------------
@dataclass
class RunState:
    run_id: str
    config: dict[str, Any]
    rounds_done: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    init: dict[str, Any] | None = None  # provenance of round 0's global model (None: random start)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @classmethod
    def open(cls, run_dir: Path, cfg: RunConfig) -> RunState:
        """Resume the run in ``run_dir`` or start a new one.

        A run may only resume with the same model and data settings: changing
        them mid-run would average incompatible weights.
        """
        path = Path(run_dir) / STATE
        if not path.exists():
            return cls(run_id=uuid.uuid4().hex[:12], config=cfg.to_dict())
        state = cls(**json.loads(path.read_text()))
        for section in ("model", "data"):
            if state.config.get(section) != cfg.to_dict()[section]:
                raise ConfigError(
                    f"{run_dir} holds a run with different [{section}] settings; "
                    "use a new --out folder or the original config to resume it"
                )
        return state

    def check_epsilon(self, site: str, epsilon: float, budget: float) -> str | None:
        """Why a site's reported ε cannot be accepted; None when it can.

        ε only grows: a site reporting less than it reported earlier in this run
        has a ledger that lost entries (cut off, restored from an old backup, or
        deleted and started afresh), and would go on spending privacy it already
        spent. Its update is refused until its administrator restores the ledger.
        """
        if not math.isfinite(epsilon) or epsilon < 0:
            return f"it reports an invalid ε ({epsilon})"
        if budget > 0 and epsilon > budget * (1 + 1e-9):
            return f"it reports ε = {epsilon:.4g}, over its budget of {budget:g}"
        last = self.sites.get(site, {}).get("epsilon")
        if last is not None and epsilon < last - 1e-9:
            return (f"its ε went down, from {last:.4f} to {epsilon:.4f}: its privacy ledger lost entries "
                    "(truncated, restored from an older backup, or replaced). The site's administrator must "
                    "restore the ledger before the site trains again")
        return None

    def save(self, run_dir: Path) -> None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(run_dir) / STATE, asdict(self))
