"""Privacy units and the training plan: what one DP step samples, and how many steps a call takes.

``privacy.unit = "patient"``: the dataset has one item per patient; item i is
ONE slice (or ``train.slices_per_patient`` slices) of patient i, drawn afresh
at every step, so the per-sample clipping bounds a whole patient's influence.
``"image"``: one item per slice. The plan (`plan_training`) fixes the sample
rate and the exact step count before training, so the ledger can reserve the
budget first; `unit_batches` then yields exactly that many batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from medae_core.config import PrivacyConfig, TrainConfig
from medae_core.errors import ConfigError, DataError


# -- datasets ------------------------------------------------------------------
def as_nchw(images: np.ndarray | Tensor) -> Tensor:
    t = torch.as_tensor(images, dtype=torch.float32)
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4 or t.shape[-1] != t.shape[-2]:
        raise DataError(f"images must be [N, S, S] or [N, C, S, S]; got shape {tuple(t.shape)}")
    return t


def as_cond(cond: np.ndarray | Tensor | None, n: int) -> Tensor | None:
    """A conditional model's label index per image, as a long tensor [n] (None stays None)."""
    if cond is None:
        return None
    t = torch.as_tensor(np.asarray(cond), dtype=torch.long).reshape(-1)
    if t.shape != (n,):
        raise DataError(f"cond must have one label per image ({n}); got shape {tuple(t.shape)}")
    return t


class ImageDataset(Dataset):
    """Privacy unit "image": item i is slice i."""

    k = 1  # rows per unit in a batch

    def __init__(self, images: np.ndarray | Tensor, cond: np.ndarray | Tensor | None = None):
        self.images = as_nchw(images)
        self.cond = as_cond(cond, self.images.shape[0])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]

    def batch(self, units: Tensor, step: int = 0) -> Tensor:
        """The images of the given units, [len(units), C, S, S]."""
        return self.images[units.to(self.images.device)]

    def rows(self, units: Tensor, step: int = 0) -> tuple[Tensor, Tensor | None]:
        """`batch` and each row's label index (None without labels)."""
        return self.batch(units, step), None if self.cond is None else self.cond[units.to(torch.long).cpu()]


class PatientSliceDataset(Dataset):
    """Privacy unit "patient": item i is ``k`` random slices of patient i (default one).

    The slices are a deterministic function of (seed, step, patient): they
    change from step to step (``set_step``), and each patient contributes
    exactly ``k`` rows whenever it is sampled (`batch` returns them
    patient-major, the layout `BookKeepingClipper(group_size=k)` expects). The
    k slices are stratified over the patient's slices -- one uniform offset u,
    slice ``floor((u + j) / k * count)`` for j < k -- so they are distinct
    when the patient has at least k slices and repeat evenly otherwise.
    """

    def __init__(self, images: np.ndarray | Tensor, patient_index: np.ndarray, seed: int = 0, k: int = 1,
                 cond: np.ndarray | Tensor | None = None):
        if int(k) < 1:
            raise ConfigError(f"train.slices_per_patient must be at least 1; got {k}")
        self.k = int(k)
        self.images = as_nchw(images)
        self.cond = as_cond(cond, self.images.shape[0])
        patient_index = np.asarray(patient_index)
        if patient_index.shape != (self.images.shape[0],):
            raise DataError(
                f"patient_index must have one entry per image ({self.images.shape[0]}); "
                f"got shape {patient_index.shape}"
            )
        _, inverse, counts = np.unique(patient_index, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        self._slices = torch.as_tensor(order, dtype=torch.long)  # slice ids grouped by patient
        self._start = torch.as_tensor(np.concatenate([[0], np.cumsum(counts)[:-1]]), dtype=torch.long)
        self._count = torch.as_tensor(counts, dtype=torch.long)
        self.seed = int(seed)
        self.step = 0

    @property
    def n_patients(self) -> int:
        return int(self._count.shape[0])

    def slices_per_patient(self) -> np.ndarray:
        return self._count.numpy().copy()

    def __len__(self) -> int:
        return self.n_patients

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def slice_ids(self, units: Tensor, step: int) -> Tensor:
        """Global slice indices drawn for the patients in `units` at `step`: [len(units) * k], patient-major."""
        units = units.to(torch.long).cpu()
        gen = torch.Generator().manual_seed(mix_seed(self.seed, step))
        # One uniform draw per patient (for all patients, so a patient's draw
        # does not depend on who else was sampled), stratified into k offsets.
        u = torch.rand(self.n_patients, generator=gen, dtype=torch.float64)
        strata = (u[units, None] + torch.arange(self.k, dtype=torch.float64)) / self.k  # [P, k] in [0, 1)
        count = self._count[units, None]
        offset = (strata * count).long().clamp(max=count - 1)
        return self._slices[(self._start[units, None] + offset).reshape(-1)]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[self.slice_ids(torch.tensor([i]), self.step)[0]]

    def batch(self, units: Tensor, step: int) -> Tensor:
        return self.images[self.slice_ids(units, step).to(self.images.device)]

    def rows(self, units: Tensor, step: int) -> tuple[Tensor, Tensor | None]:
        """`batch` and each row's label index (None without labels), from one slice draw."""
        ids = self.slice_ids(units, step)
        return self.images[ids.to(self.images.device)], None if self.cond is None else self.cond[ids]


def mix_seed(seed: int, step: int) -> int:
    """A 63-bit seed from (seed, step), stable across runs and platforms."""
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), int(step)]).generate_state(1, np.uint64)[0]) >> 1


def make_unit_dataset(
    images: np.ndarray | Tensor, patient_index: np.ndarray | None, privacy: PrivacyConfig, seed: int = 0,
    slices_per_patient: int = 1, cond: np.ndarray | Tensor | None = None,
) -> ImageDataset | PatientSliceDataset:
    """The dataset whose items are privacy units (see module docstring); ``cond``: label index per image."""
    if privacy.unit == "patient":
        if patient_index is None:
            raise DataError("privacy.unit is 'patient' but no patient_index was given")
        return PatientSliceDataset(images, patient_index, seed=seed, k=slices_per_patient, cond=cond)
    if privacy.unit == "image":
        return ImageDataset(images, cond=cond)
    raise ConfigError(f"privacy.unit must be 'patient' or 'image'; got {privacy.unit!r}")


# -- plan ------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingPlan:
    """What a training call will do; the ledger reserves budget from it first."""

    n_units: int
    batch_size: int  # expected batch size (Poisson) / batch size (non-DP)
    sample_rate: float  # batch_size / n_units, capped at 1
    epochs: int
    steps_per_epoch: int  # ceil(n_units / batch_size)
    steps: int  # optimizer steps = epochs * steps_per_epoch

    @property
    def expected_batch_size(self) -> int:
        return min(self.batch_size, self.n_units)


def plan_training(n_units: int, train: TrainConfig, epochs: int | None = None) -> TrainingPlan:
    """sample_rate = batch_size / n_units (<= 1); steps = epochs * ceil(n_units / batch_size)."""
    epochs = train.epochs if epochs is None else epochs
    if n_units < 1:
        raise DataError("no training data: at least one patient/image is needed")
    if train.batch_size < 1:
        raise ConfigError(f"train.batch_size must be at least 1; got {train.batch_size}")
    if epochs < 1:
        raise ConfigError(f"train.epochs must be at least 1; got {epochs}")
    steps_per_epoch = -(-n_units // train.batch_size)  # exact integer ceil(1 / sample_rate)
    return TrainingPlan(
        n_units=int(n_units),
        batch_size=int(train.batch_size),
        sample_rate=min(1.0, train.batch_size / n_units),
        epochs=int(epochs),
        steps_per_epoch=steps_per_epoch,
        steps=epochs * steps_per_epoch,
    )


MAX_SHIFT_PX = 3  # augmentation: largest translation, in pixels


def augment_views(x: Tensor, multiplicity: int, gen: torch.Generator) -> Tensor:
    """Augmentation multiplicity (De et al. 2022): each row followed by ``m - 1`` augmented copies of it.

    Copies are left-right mirrored (brains are nearly symmetric) and shifted
    by up to `MAX_SHIFT_PX` pixels (``torch.flip`` / ``torch.roll``; the
    background they wrap is black). The copies of a row belong to the same
    unit, so the clipper (``group_size = k * m``) averages their gradients
    before clipping: the same sensitivity, a lower-variance gradient.
    """
    if multiplicity == 1:
        return x
    n = x.shape[0]
    views = [x]
    for _ in range(multiplicity - 1):
        shifts = torch.randint(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1, (n, 2), generator=gen).tolist()
        copy = torch.flip(x, dims=(-1,))
        views.append(torch.stack([torch.roll(copy[i], (dy, dx), dims=(-2, -1)) for i, (dy, dx) in
                                  enumerate(shifts)]))
    # [n, ...] x m -> row-major [n * m, ...]: the m views of row i are adjacent, so a
    # unit's k rows stay contiguous as k * m rows.
    return torch.stack(views, dim=1).reshape(n * multiplicity, *x.shape[1:])


def unit_batches(plan: TrainingPlan, dp: bool, gen: torch.Generator) -> Iterator[Tensor]:
    """Exactly ``plan.steps`` index batches: Poisson (DP) or shuffled (non-DP)."""
    n = plan.n_units
    if dp:
        for _ in range(plan.steps):
            mask = torch.rand(n, generator=gen) < plan.sample_rate
            yield mask.nonzero().view(-1)
        return
    for _ in range(plan.epochs):
        perm = torch.randperm(n, generator=gen)
        for k in range(plan.steps_per_epoch):
            yield perm[k * plan.batch_size : (k + 1) * plan.batch_size]
