"""What one site (hospital) does: load its data, train a round privately, evaluate.

Used by `medae train-local` (one round, one site) and by the Flower ClientApp
(one call per federated round). Nothing here knows about Flower: the caller
passes weights in and gets weights, scalars and histogram counts out.

Privacy flow of a round (see `SiteTrainer.train_round`):
1. plan the steps (sample rate q = batch / units, steps = epochs / q);
2. choose the noise multiplier: the configured one, or the smallest that keeps
   everything already in the ledger plus the remaining planned rounds inside
   the budget;
3. reserve (σ, q, steps) in the ledger — this refuses the round if it would
   overspend — and only then train.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medae_core import scoring
from medae_core.augment import synthetic_units
from medae_core.bundle import Threshold
from medae_core.config import DataConfig, RunConfig
from medae_core.data import Scan, load_site, split_patients
from medae_core.devices import resolve_device
from medae_core.errors import DataError
from medae_core.evaluation import LabelledSet, evaluate_site
from medae_core.fileio import atomic_write, ensure_outside
from medae_core.models import build_model, trainable_mask
from medae_core.privacy import PrivacyLedger
from medae_core.starts import initial_weights
from medae_core.training import evaluate_loss, train
from medae_core.units import plan_training

log = logging.getLogger(__name__)


@dataclass
class SiteData:
    """A site's images in memory, split by patient into train and validation."""

    name: str
    root: Path
    train_images: np.ndarray  # [N,S,S] float32
    train_patients: np.ndarray  # [N] patient position of each training image
    val_images: np.ndarray
    test: Scan | None
    skipped: int  # files the loader could not use (reasons stay on site); test/'s only when it was read
    inputs: dict = field(default_factory=dict)  # `Scan.input_kinds` of the training images
    # each image's contrast index (`Scan.contrast_index`), a CVAE's labels; None when all are read
    train_cond: np.ndarray | None = None
    val_cond: np.ndarray | None = None

    @property
    def n_train_patients(self) -> int:
        return int(len(np.unique(self.train_patients)))


def load_site_data(root: str | Path, cfg: RunConfig, name: str | None = None,
                   snapshots: str | Path | None = None, *, with_test: bool = True) -> SiteData:
    """Read and split a site folder. Cached per process: rounds reuse the scan.

    ``with_test=False``: test/ is not read (``SiteData.test`` is None), for a process
    that only trains -- a deployed site's train message, in a process of its own.

    ``snapshots``: a folder only this user can read (``medae simulate`` makes one per
    run, outside every data folder, and deletes it at the end). The first process
    to read a site keeps it there, split and at model size, and every other
    process of the run loads that instead of scanning again. A simulation's
    messages go to whichever Ray actor is free, so without it each actor decoded
    each site once, and with more sites than an actor keeps in memory, every
    message did. It holds a copy of the site's pixels while the run lasts, so a
    folder that other users can open, or one in or around the data, is not used.
    """
    root = Path(root).resolve()
    if snapshots is not None:
        snapshots = Path(snapshots).resolve()
        if not snapshots.is_dir():  # the run that made it is over (a manifest read again later)
            snapshots = None
        elif not _private_folder(snapshots) or not _apart(snapshots, root):
            log.warning("not keeping site %s's images in %s: only a folder of this user's alone, outside the "
                        "data, is used for that", name or root.name, snapshots)
            snapshots = None
    return _load_site_data_cached(root, cfg.data, cfg.model.image_size, cfg.train.seed, name or root.name, snapshots,
                                  with_test)


SNAPSHOT_FORMAT = 1


@functools.lru_cache(maxsize=8)
def _load_site_data_cached(root: Path, data: DataConfig, image_size: int, seed: int, name: str,
                           snapshots: Path | None = None, with_test: bool = True) -> SiteData:
    if snapshots is None:
        return _read_site_data(root, data, image_size, seed, name, with_test)
    identity = (SNAPSHOT_FORMAT, str(root), data, image_size, seed, name, with_test)
    key = hashlib.sha256(repr(identity).encode()).hexdigest()
    path = snapshots / f"{key}.pickle"
    site = _load_snapshot(path, root, name)
    if site is None:
        site = _read_site_data(root, data, image_size, seed, name, with_test)
        try:  # no fsync: the folder lives as long as the run
            atomic_write(path, lambda fh: pickle.dump(site, fh, protocol=pickle.HIGHEST_PROTOCOL), durable=False)
        except OSError as exc:  # a full disk costs the other processes a scan, nothing more
            log.warning("could not keep site %s's images for the other processes of this run: %s", name, exc)
    return site


def _apart(a: Path, b: Path) -> bool:
    """Neither folder is inside the other (`ensure_outside` both ways)."""
    try:
        ensure_outside(a, b)
        ensure_outside(b, a)
    except DataError:
        return False
    return True


def _private_folder(path: Path) -> bool:
    """A folder owned by this user that no one else can read or write (what `tempfile.mkdtemp` makes)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if not hasattr(os, "getuid"):  # Windows: no owner or mode bits; mkdtemp's folder is in the user's own %TEMP%
        return True
    return st.st_uid == os.getuid() and not st.st_mode & 0o077


def _load_snapshot(path: Path, root: Path, name: str) -> SiteData | None:
    """The site another process of this run kept at ``path``, or None (absent, unreadable, another site's)."""
    try:
        with path.open("rb") as fh:
            site = pickle.load(fh)  # written by this user's own run, in a folder no one else can write to
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a damaged snapshot costs a scan, never the round
        log.warning("ignoring the kept copy of site %s (%s); reading the folder again", name, exc)
        return None
    if not isinstance(site, SiteData) or site.root != root or site.name != name:
        log.warning("ignoring the kept copy of site %s: it is another site's; reading the folder again", name)
        return None
    return site


def _read_site_data(root: Path, data: DataConfig, image_size: int, seed: int, name: str,
                    with_test: bool = True) -> SiteData:
    site = load_site(root, data, image_size, with_test=with_test)
    scan = site.train
    train_idx, val_idx = split_patients(scan, data.val_fraction, seed)
    if len(val_idx) == 0:
        # One patient only: validate on its images rather than not at all.
        log.warning("site %s has a single patient; validation reuses training images", name)
        val_idx = train_idx
    skipped = len(scan.skipped) + (len(site.test.skipped) if site.test is not None else 0)
    _, patients = np.unique(scan.patient_index[train_idx], return_inverse=True)
    return SiteData(
        name=name,
        root=root,
        train_images=scan.images[train_idx],
        train_patients=patients.astype(np.int64),
        val_images=scan.images[val_idx],
        test=site.test,
        skipped=skipped,
        inputs=scan.input_kinds(),
        train_cond=None if scan.contrast_index is None else scan.contrast_index[train_idx],
        val_cond=None if scan.contrast_index is None else scan.contrast_index[val_idx],
    )


@dataclass
class RoundResult:
    state_dict: dict[str, torch.Tensor]
    loss: float
    num_examples: int  # images seen in this round (weights FedAvg)
    steps: int
    noise_multiplier: float | None  # None: trained without DP
    sample_rate: float
    epsilon: float  # total spent by this site so far, this round included
    delta: float
    seconds: float
    images_per_second: float
    trained_parameters: int = 0  # parameters DP-SGD trained and noised (the rest stayed frozen)
    noise_to_signal: float | None = None  # see `noise_to_signal`; None without DP
    init: dict | None = None  # provenance of the starting weights (train-local only)


# Above this the noise left on the averaged update outweighs the clipped signal.
NOISE_TO_SIGNAL_WARNING = 1.0


def noise_to_signal(sigma: float, trained_parameters: int, expected_batch: int, total_steps: int) -> float:
    """Norm of the DP noise on the run's step-averaged gradient, in units of the clipping norm C.

    Each step adds N(0, (σC)² I) over the trained parameters to a sum divided
    by the expected batch B; averaged over the T steps of the whole run its norm
    is about ``σ √d / (B √T)`` C, while the clipped signal is at most C. Above 1,
    DP-SGD can only move a model by little (e.g. fine-tune a public start); from
    a random start it learns nothing. It shrinks with more patients per site
    and fewer trained parameters (``train.trainable``).
    """
    return float(sigma * trained_parameters**0.5 / (max(expected_batch, 1) * max(total_steps, 1) ** 0.5))


def noise_advice(cfg: RunConfig) -> str:
    """What a noise-to-signal ratio above `NOISE_TO_SIGNAL_WARNING` means for this run, and what lowers it."""
    random_start = cfg.train.init.strip().lower() in ("", "none", "scratch")
    consequence = ("DP-SGD will learn little from a random start: start from a public model (train.init)"
                   if random_start else "private fine-tuning can move the public start only a little")
    return (f"{consequence}. More {cfg.privacy.unit}s per site, fewer trained parameters (train.trainable) "
            "or a larger budget lower it.")


@dataclass
class EvalResult:
    val_loss: float
    num_val: int
    healthy_scores: np.ndarray  # image scores of healthy validation images
    test: dict = field(default_factory=dict)  # metrics when the site has labels
    test_histograms: dict[str, np.ndarray] = field(default_factory=dict)


def reproducible_noise_seed(cfg: RunConfig, site: str, server_round: int) -> int:
    """The DP noise seed of a research run (`PrivacyConfig.reproducible_noise`): train.seed, site, round."""
    digest = hashlib.sha256(f"{cfg.train.seed}:{site}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


class SiteTrainer:
    """Trains and evaluates the shared model on one site's data."""

    def __init__(self, data: SiteData, cfg: RunConfig, ledger: PrivacyLedger | None, warn_noise: bool = True):
        """``warn_noise``: log the noise-dominated-regime warning (`NOISE_TO_SIGNAL_WARNING`) itself.

        A simulated site leaves it to the ServerApp, which sums it up over all sites in one line.
        """
        if not cfg.privacy.enabled:
            # Without DP there is no privacy unit to protect: an epoch is every image.
            cfg = cfg.with_overrides({"privacy.unit": "image"})
        self.data = data
        self.cfg = cfg
        self.ledger = ledger
        self.warn_noise = warn_noise
        self.device = resolve_device(cfg.train.device)

    # -- training ------------------------------------------------------------
    def units(self) -> tuple[np.ndarray, int]:
        """Per-image unit index and unit count for the configured privacy unit."""
        if self.cfg.privacy.unit == "patient":
            return self.data.train_patients, self.data.n_train_patients
        n = len(self.data.train_images)
        return np.arange(n), n

    def training_set(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(images, unit index, unit count): the site's own, plus any synthetic units (`medae_core.augment`)."""
        unit_index, n_units = self.units()
        synthetic = synthetic_units(self.cfg, n_units)
        if synthetic is None:
            return self.data.train_images, unit_index, n_units
        extra = n_units + np.arange(len(synthetic))  # each sample is a unit of its own
        return (np.concatenate([self.data.train_images, synthetic]), np.concatenate([unit_index, extra]),
                n_units + len(synthetic))

    def noise_for_round(self, sample_rate: float, steps: int, rounds_left: int) -> float:
        """The configured σ, or the smallest σ that fits the remaining plan in the budget."""
        if self.cfg.privacy.noise_multiplier is not None:
            return self.cfg.privacy.noise_multiplier
        return self.ledger.calibrate(sample_rate, steps * max(rounds_left, 1))

    def train_round(
        self,
        state_dict: dict[str, torch.Tensor] | None,
        *,
        run_id: str,
        server_round: int,
        rounds_left: int = 1,
        proximal_mu: float = 0.0,
        progress=None,
    ) -> RoundResult:
        cfg = self.cfg
        images, unit_index, n_units = self.training_set()
        plan = plan_training(n_units, cfg.train, cfg.train.epochs)
        model = build_model(cfg.model, seed=cfg.train.seed)
        init = None
        if state_dict is None:  # a run of its own (train-local, baselines): start where train.init says
            state_dict, init = initial_weights(cfg)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        mask = trainable_mask(model, cfg.train.trainable)
        trained = sum(p.numel() for name, p in model.named_parameters() if mask[name])
        sigma, epsilon, ratio = None, 0.0, None
        if cfg.privacy.enabled:
            if self.ledger is None:
                raise ValueError("differentially private training needs a privacy ledger")
            sigma = self.noise_for_round(plan.sample_rate, plan.steps, rounds_left)
            entry = self.ledger.reserve(
                sigma, plan.sample_rate, plan.steps, run_id=run_id, round=server_round, unit=cfg.privacy.unit
            )
            epsilon = entry["epsilon_after"]  # ε with this round, computed under the ledger's lock
            run_rounds = server_round + max(rounds_left, 1) - 1  # the whole run, not what is left of it
            ratio = noise_to_signal(sigma, trained, plan.expected_batch_size, plan.steps * run_rounds)
            if self.warn_noise and ratio > NOISE_TO_SIGNAL_WARNING and server_round == 1:  # once per run
                log.warning("site %s: DP noise is %.1f× the clipped signal (%d %ss, %d trained parameters, "
                            "σ=%.2f); %s", self.data.name, ratio, n_units, cfg.privacy.unit, trained, sigma,
                            noise_advice(cfg))
        result = train(
            model,
            images,
            unit_index,
            plan,
            cfg,
            noise_multiplier=sigma,
            device=self.device,
            progress=progress,
            proximal_mu=proximal_mu,
            seed=cfg.train.seed + 1000 * server_round,
            dp_seed=reproducible_noise_seed(cfg, self.data.name, server_round) if cfg.privacy.reproducible_noise
            else None,
            cond=self.data.train_cond if model.conditional else None,
        )
        return RoundResult(
            state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
            loss=float(result.mean_loss),
            # Under DP the realised count depends on Poisson sampling of private data;
            # report the planned expectation instead (it depends only on the site's size).
            num_examples=int(plan.steps * plan.expected_batch_size if sigma is not None else result.num_examples),
            steps=int(result.steps_taken),
            noise_multiplier=sigma,
            sample_rate=float(plan.sample_rate),
            epsilon=float(epsilon),
            delta=float(cfg.privacy.delta),
            seconds=float(result.seconds),
            images_per_second=float(result.images_per_second),
            trained_parameters=int(result.trained_parameters),
            noise_to_signal=ratio if sigma is not None else None,
            init=init,
        )

    # -- evaluation ----------------------------------------------------------
    def model(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The configured model with these weights, on this site's device, in eval mode."""
        model = build_model(self.cfg.model, seed=self.cfg.train.seed)
        model.load_state_dict(state_dict)
        return model.to(self.device).eval()

    def evaluate(
        self, state_dict: dict[str, torch.Tensor], threshold: float | None = None, with_test: bool = True,
        with_val: bool = True,
    ) -> EvalResult:
        """The validation loss and healthy scores (``with_val``), and the test metrics at ``threshold`` (``with_test``)."""
        model = self.model(state_dict)
        result = EvalResult(val_loss=float("nan"), num_val=len(self.data.val_images), healthy_scores=np.zeros(0))
        if with_val:
            cond = self.data.val_cond if model.conditional else None
            result.val_loss = float(evaluate_loss(model, self.data.val_images, self.device,
                                                  self.cfg.train.batch_size, cond=cond))
            _, result.healthy_scores = scoring.anomaly_maps(model, self.data.val_images, self.cfg.scoring,
                                                            self.device, cond=cond)
        test = LabelledSet.of(self.data.test) if with_test else None
        if test is not None:
            result.test, result.test_histograms = evaluate_site(model, test, self.cfg, self.device, threshold)
        return result


def train_and_calibrate(trainer: SiteTrainer, run_id: str, progress=None):
    """One training run from ``train.init``, then the threshold from the healthy validation scores."""
    result = trainer.train_round(None, run_id=run_id, server_round=1, progress=progress)
    evaluation = trainer.evaluate(result.state_dict, with_test=False)
    percentile = trainer.cfg.scoring.threshold_percentile
    threshold = Threshold(
        value=float(scoring.calibrate_threshold(evaluation.healthy_scores, percentile)),
        percentile=percentile,
        n_healthy=len(evaluation.healthy_scores),
        method="validation-percentile",
    )
    return result, evaluation, threshold
