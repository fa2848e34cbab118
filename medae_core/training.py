"""The training engine: non-private and differentially private (DP-SGD).

Used by ``medae train-local`` and, once per round from the global weights, by
the Flower ClientApp. Inputs are in-memory images ``[N, S, S]`` (or
``[N, C, S, S]``) float32 in [0, 1] with a ``patient_index [N]``.

Privacy unit
    ``privacy.unit = "patient"``: the dataset has one item per patient; item i
    is ONE slice of patient i, drawn at random afresh at every step. With
    Poisson sampling over patients each sampled patient contributes exactly one
    slice to a step, so the per-sample clipping bounds a whole patient's
    influence and the accountant's guarantee is per patient.
    ``"image"``: one item per slice (guarantee per image). The same unit
    dataset is used with DP off, so a "step" and an "image" mean the same thing
    in both modes.

Plan first, then train
    The caller reserves the privacy budget in its ledger from
    (noise_multiplier, `TrainingPlan.sample_rate`, `TrainingPlan.steps`) BEFORE
    calling `train`, which then takes exactly ``plan.steps`` optimizer steps.

DP step (``noise_multiplier`` given)
    Poisson sampling: each unit joins a step independently with probability
    ``plan.sample_rate`` (batches vary in size and may be empty; an empty batch
    still takes a step that adds pure noise). Per-sample gradients are clipped
    to ``privacy.max_grad_norm``, summed, Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` is added and the sum is divided by the
    expected batch size -- all by Opacus optimizers. The per-sample clipped
    sum is computed by one of (``privacy.grad_sample_mode``):

    - ``"bk"``: `medae_core.dp_clipping.BookKeepingClipper` (book-keeping with
      mixed ghost clipping; one backward pass, no discarded weight gradients);
    - ``"hooks"``, ``"functorch"``, ``"ew"``, ``"ghost"``: Opacus' own modes;
    - ``"auto"``: ``"bk"`` where the model is supported (all medae models),
      else ``"hooks"``. Measured fastest for every model kind here; see
      benchmarks/RESULTS-dp-throughput.md.

    The Poisson sampler and the noise are seeded from the operating system's
    entropy unless ``dp_seed`` is passed: a noise seed known to the server
    (e.g. the run config's seed) would let it subtract the noise. Model
    initialisation, VAE sampling and DAE corruption use ``train.seed``.

After `train` the ORIGINAL model object holds the trained weights (plain
``state_dict`` keys, no ``_module.`` prefix) and carries no Opacus hooks or
per-sample attributes, so it can be trained again next round and scored.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import secrets
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from medae_core.config import PrivacyConfig, RunConfig, TrainConfig
from medae_core.dp_clipping import BookKeepingClipper, UnsupportedModelError
from medae_core.errors import ConfigError, DataError, MedaeError
from medae_core.models import AnomalyModel, set_trainable

__all__ = [
    "GRAD_SAMPLE_MODES",
    "ImageDataset",
    "PatientSliceDataset",
    "TrainResult",
    "TrainingPlan",
    "evaluate_loss",
    "make_unit_dataset",
    "plan_training",
    "privatized_gradient",
    "reconstruct",
    "resolve_device",
    "resolve_grad_sample_mode",
    "train",
]

logger = logging.getLogger(__name__)

GRAD_SAMPLE_MODES = ("auto", "bk", "hooks", "functorch", "ew", "ghost")
Progress = Callable[[int, int], None]


# -- devices -------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` honoured."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MedaeError(
                f"train.device is {name!r} but CUDA is not available on this machine "
                "(no GPU, or a CPU-only PyTorch build); use device = \"auto\" or \"cpu\""
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MedaeError(
                f"train.device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type != "cpu":
        raise ConfigError(f"train.device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


# -- datasets ------------------------------------------------------------------
def _as_nchw(images: np.ndarray | Tensor) -> Tensor:
    t = torch.as_tensor(images, dtype=torch.float32)
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4 or t.shape[-1] != t.shape[-2]:
        raise DataError(f"images must be [N, S, S] or [N, C, S, S]; got shape {tuple(t.shape)}")
    return t


class ImageDataset(Dataset):
    """Privacy unit "image": item i is slice i."""

    k = 1  # rows per unit in a batch

    def __init__(self, images: np.ndarray | Tensor):
        self.images = _as_nchw(images)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]

    def batch(self, units: Tensor, step: int = 0) -> Tensor:
        """The images of the given units, [len(units), C, S, S]."""
        return self.images[units.to(self.images.device)]


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

    def __init__(self, images: np.ndarray | Tensor, patient_index: np.ndarray, seed: int = 0, k: int = 1):
        if int(k) < 1:
            raise ConfigError(f"train.slices_per_patient must be at least 1; got {k}")
        self.k = int(k)
        self.images = _as_nchw(images)
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
        gen = torch.Generator().manual_seed(_mix(self.seed, step))
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


def _mix(seed: int, step: int) -> int:
    """A 63-bit seed from (seed, step), stable across runs and platforms."""
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), int(step)]).generate_state(1, np.uint64)[0]) >> 1


def make_unit_dataset(
    images: np.ndarray | Tensor, patient_index: np.ndarray | None, privacy: PrivacyConfig, seed: int = 0,
    slices_per_patient: int = 1,
) -> ImageDataset | PatientSliceDataset:
    """The dataset whose items are privacy units (see module docstring)."""
    if privacy.unit == "patient":
        if patient_index is None:
            raise DataError("privacy.unit is 'patient' but no patient_index was given")
        return PatientSliceDataset(images, patient_index, seed=seed, k=slices_per_patient)
    if privacy.unit == "image":
        return ImageDataset(images)
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


# -- result --------------------------------------------------------------------
@dataclass
class TrainResult:
    mean_loss: float  # mean per-sample training loss over the last epoch
    losses: list[float]  # mean per-sample training loss per epoch
    steps_taken: int
    empty_steps: int  # DP steps whose Poisson batch was empty (noise-only updates)
    num_examples: int  # images processed (sum of batch sizes)
    n_units: int  # patients or images in the training set
    grad_sample_mode: str  # "none" without DP, else the mode actually used
    seconds: float
    images_per_second: float
    noise_multiplier: float | None = None
    sample_rate: float = 0.0
    # Opacus accountant history [(noise_multiplier, sample_rate, steps)]: a
    # cross-check for the ledger, see `opacus_epsilon`.
    accountant_history: list[tuple[float, float, int]] = field(default_factory=list)
    accountant: str = "rdp"
    trained_parameters: int = 0  # parameters DP-SGD trained (and noised); the rest stayed frozen
    state_dict: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def opacus_epsilon(self, delta: float, accountant: str | None = None) -> float:
        """Epsilon of this call alone per Opacus' accountant (0 without DP).

        NOTE: the training losses above are computed from private data and are
        NOT covered by the DP guarantee; do not publish them under DP.
        """
        if not self.accountant_history:
            return 0.0
        from opacus.accountants import create_accountant

        acc = create_accountant(mechanism=accountant or self.accountant)
        acc.history = list(self.accountant_history)
        return float(acc.get_epsilon(delta=delta))


def _opacus_mechanism(accountant: str) -> str:
    """The Opacus accountant that cross-checks a run ("pld" is not one of Opacus'; RDP is looser, never tighter)."""
    return accountant if accountant in ("rdp", "prv") else "rdp"


# -- grad sample modes ---------------------------------------------------------
def resolve_grad_sample_mode(mode: str, model: nn.Module) -> str:
    """The concrete mode for `mode` ("auto": "bk" if the model supports it, else "hooks")."""
    if mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"privacy.grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}; got {mode!r}"
        )
    if mode == "bk":
        BookKeepingClipper.check_supported(model)
    if mode != "auto":
        return mode
    try:
        BookKeepingClipper.check_supported(model)
    except UnsupportedModelError as exc:
        logger.info("book-keeping clipping unavailable (%s); using Opacus hooks", exc)
        return "hooks"
    return "bk"


class _Stepper:
    """One DP (or non-DP) optimizer step on a batch, for a given mode.

    ``step(x_in, x_target, gen)`` computes the gradient and applies the update;
    ``empty_step()`` takes a noise-only step for an empty Poisson batch.
    ``close()`` detaches everything Opacus attached to the model.
    """

    def __init__(
        self,
        model: AnomalyModel,
        optimizer: torch.optim.Optimizer,
        mode: str,
        *,
        noise_multiplier: float | None,
        max_grad_norm: float,
        expected_batch_size: int,
        noise_generator: torch.Generator | None,
        proximal_mu: float = 0.0,
        group_size: int = 1,
        clipping: str = "flat",
    ):
        self.model = model
        self.proximal_mu = float(proximal_mu)
        self._anchor = (
            [p.detach().clone() for p in model.parameters() if p.requires_grad] if proximal_mu > 0 else None
        )
        self.mode = mode
        self.dp = noise_multiplier is not None
        self._hooks = None
        self._clipper: BookKeepingClipper | None = None
        self._gsm = None
        self._forward = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.dp:
            self.optimizer = optimizer
            return
        from opacus.grad_sample import prepare_module
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        kwargs = dict(
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            expected_batch_size=int(expected_batch_size),
            loss_reduction="mean",
            generator=noise_generator,
        )
        if mode in ("bk", "ghost"):
            self.optimizer = DPOptimizerFastGradientClipping(optimizer, **kwargs)
        else:
            self.optimizer = DPOptimizer(optimizer, **kwargs)
        if mode != "bk" and (group_size > 1 or clipping != "flat"):
            raise ConfigError(
                f"grad_sample_mode {mode!r} clips one image per unit with flat clipping; "
                f"train.slices_per_patient = {group_size} and privacy.clipping = {clipping!r} need "
                "grad_sample_mode \"bk\" (set slices_per_patient = 1 and clipping = \"flat\" for Opacus' modes)"
            )
        if mode == "bk":
            self._clipper = BookKeepingClipper(model, max_grad_norm, group_size=group_size, clipping=clipping)
            self._forward = self._clipper.forward
        elif mode in ("hooks", "functorch"):
            self._hooks = prepare_module(model, mode, wrap_model=False, batch_first=True, loss_reduction="mean")
        elif mode == "ghost":
            self._hooks = prepare_module(
                model, "ghost", wrap_model=False, batch_first=True, loss_reduction="mean",
                max_grad_norm=float(max_grad_norm),
            )
        elif mode == "ew":
            self._gsm = prepare_module(model, "ew", wrap_model=True, batch_first=True, loss_reduction="mean")
            self._forward = self._gsm
        else:  # pragma: no cover - resolve_grad_sample_mode rejects others
            raise ConfigError(f"unknown grad_sample_mode {mode!r}")

    def attach_accountant_hook(self, fn: Callable) -> None:
        self.optimizer.attach_step_hook(fn)

    def compute_gradient(self, x_in: Tensor, x_target: Tensor, gen: torch.Generator) -> Tensor:
        """Forward + backward; leaves what the optimizer needs. Returns per-sample losses."""
        with warnings.catch_warnings():
            # Opacus' module hooks on the first layer warn that the input needs
            # no gradient; that is expected (images are not trained).
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return self._compute_gradient(x_in, x_target, gen)

    def _compute_gradient(self, x_in: Tensor, x_target: Tensor, gen: torch.Generator) -> Tensor:
        out = self._forward(x_in, generator=gen)
        loss = self.model.per_sample_loss(x_target, out)
        if not self.dp:
            loss.mean().backward()
        elif self.mode == "bk":
            self._clipper.backward(loss)
        elif self.mode == "ghost":
            from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

            DPTensorFastGradientClipping(self._hooks, self.optimizer, loss, "mean").backward()
        else:
            loss.mean().backward()
        return loss.detach()

    def fill_empty(self) -> None:
        """Make the optimizer see an empty batch: zero clipped sum."""
        for p in self.params:
            if self.mode in ("bk", "ghost"):
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

    def step(self) -> None:
        if not self.dp:
            self._add_proximal_grad()
            self.optimizer.step()
        elif self.optimizer.pre_step():  # clip (or check), noise, scale, accountant
            self._add_proximal_grad()  # data-independent: outside clipping and noise
            self.optimizer.original_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _add_proximal_grad(self) -> None:
        if self._anchor is None:
            return
        with torch.no_grad():
            for p, w0 in zip(self.params, self._anchor):
                prox = self.proximal_mu * (p - w0)
                p.grad = prox if p.grad is None else p.grad.add_(prox)

    def close(self) -> None:
        if self._clipper is not None:
            self._clipper.close()
        if self._hooks is not None:
            self._hooks.cleanup()
        if self._gsm is not None:
            self._gsm.cleanup()
        for p in self.model.parameters():
            p.grad = None
            for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)


# -- allocator ---------------------------------------------------------------
@contextlib.contextmanager
def _reuse_freed_memory() -> Iterator[None]:
    """Keep freed large blocks in the process heap while training (glibc only).

    By default glibc returns every large (> 32 MiB at most) allocation to the
    OS on free, so each training step page-faults its activations and
    gradients back in; measured here, that was ~30% of a DP step on CPU (per-
    sample gradients are large). Restored afterwards and the heap trimmed.
    Applied to DP and non-DP training alike.
    """
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            libc = None
    if libc is None:
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_max, 65536)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    if n <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# -- training ------------------------------------------------------------------
def train(
    model: AnomalyModel,
    images: np.ndarray | Tensor,
    patient_index: np.ndarray | None,
    plan: TrainingPlan,
    cfg: RunConfig,
    *,
    noise_multiplier: float | None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    proximal_mu: float = 0.0,
    seed: int | None = None,
    dp_seed: int | None = None,
) -> TrainResult:
    """Train `model` in place for exactly ``plan.steps`` optimizer steps.

    ``noise_multiplier=None`` trains without DP (shuffled batches of
    ``plan.batch_size`` units, ``plan.steps_per_epoch`` per epoch). Otherwise
    DP-SGD with Poisson sampling at ``plan.sample_rate`` (see module docstring);
    ``noise_multiplier=0.0`` clips without noise (no privacy; for tests).
    ``proximal_mu > 0`` adds the FedProx term ``mu/2 ||w - w_start||^2``; its
    gradient depends on no data, so under DP it is added after clipping and
    noise. ``seed`` (default ``train.seed``; the ClientApp passes one per round)
    drives the slice choice per patient, the non-DP shuffling, VAE sampling and
    DAE corruption. ``dp_seed`` fixes the Poisson sampler and the noise (tests
    only; default: fresh OS entropy).
    """
    device = resolve_device(cfg.train.device) if device is None else torch.device(device)
    dataset = make_unit_dataset(
        images, patient_index, cfg.privacy, seed=cfg.train.seed if seed is None else int(seed),
        slices_per_patient=cfg.train.slices_per_patient,
    )
    n_units = len(dataset)
    if n_units != plan.n_units:
        raise DataError(
            f"the training plan was made for {plan.n_units} {cfg.privacy.unit}s but the data has "
            f"{n_units}; plan again from the same data"
        )
    if dataset.images.shape[1:] != torch.Size(model.image_shape):
        raise DataError(
            f"images are {tuple(dataset.images.shape[1:])} but the model expects {model.image_shape} "
            "(channels, size, size)"
        )
    if noise_multiplier is not None and (not math.isfinite(noise_multiplier) or noise_multiplier < 0):
        raise ConfigError(f"noise_multiplier must be a finite number >= 0; got {noise_multiplier}")
    dp = noise_multiplier is not None
    if proximal_mu < 0 or not math.isfinite(proximal_mu):
        raise ConfigError(f"proximal_mu must be a finite number >= 0; got {proximal_mu}")
    if dp and cfg.privacy.max_grad_norm <= 0:
        raise ConfigError(f"privacy.max_grad_norm must be > 0; got {cfg.privacy.max_grad_norm}")

    model.to(device)
    model.train()
    dataset.images = dataset.images.to(device)
    mode = "none"
    if dp:
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ConfigError(f"the model cannot be trained with DP: {errors}")
        mode = resolve_grad_sample_mode(cfg.privacy.grad_sample_mode, model)

    seed = cfg.train.seed if seed is None else int(seed)
    # Model-side randomness (VAE eps, DAE noise): reproducible from train.seed.
    model_gen = torch.Generator().manual_seed(_mix(seed, 1))
    aug_gen = torch.Generator().manual_seed(_mix(seed, 4))
    multiplicity = int(cfg.train.augment_multiplicity) if dp else 1
    if multiplicity < 1:
        raise ConfigError(f"train.augment_multiplicity must be at least 1; got {multiplicity}")
    if dp:
        secret = secrets.randbits(62) if dp_seed is None else int(dp_seed)
        sample_gen = torch.Generator().manual_seed(_mix(secret, 2))
        noise_gen = torch.Generator(device=device).manual_seed(_mix(secret, 3))
    else:
        sample_gen = torch.Generator().manual_seed(_mix(seed, 2))
        noise_gen = None

    # Only the selected parameters are trained (and, under DP, clipped and noised);
    # the rest keep the weights the model came with (e.g. the public model's).
    trained = set_trainable(model, cfg.train.trainable)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                 weight_decay=cfg.train.weight_decay)
    ema = _Ema(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    epoch_loss_sums = [0.0] * plan.epochs
    epoch_counts = [0] * plan.epochs
    num_examples = 0
    empty_steps = 0
    start = time.perf_counter()
    with _torch_threads(cfg.train.num_threads), _reuse_freed_memory():
        stepper = _Stepper(
            model, optimizer, mode,
            noise_multiplier=noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm,
            expected_batch_size=plan.expected_batch_size,
            noise_generator=noise_gen,
            proximal_mu=proximal_mu,
            group_size=dataset.k * multiplicity,
            clipping=cfg.privacy.clipping,
        )
        accountant = None
        if dp:
            from opacus.accountants import create_accountant

            # Opacus' own accountant sees every step: a cross-check for the ledger
            # (which replays the steps with its own accountant, PLD included).
            accountant = create_accountant(mechanism=_opacus_mechanism(cfg.privacy.accountant))
            stepper.attach_accountant_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
        steps_taken = 0
        try:
            for step, units in enumerate(_batches(plan, dp, sample_gen)):
                epoch = step // plan.steps_per_epoch
                if len(units) == 0:
                    stepper.fill_empty()
                    empty_steps += 1
                else:
                    x = dataset.batch(units, step)  # [len(units) * k, C, S, S]
                    x = augment_views(x, multiplicity, aug_gen)  # [len(units) * k * m, C, S, S]
                    x_in = model.corrupt(x, model_gen)
                    losses = stepper.compute_gradient(x_in, x, model_gen)
                    epoch_loss_sums[epoch] += float(losses.sum())
                    epoch_counts[epoch] += len(x)
                    num_examples += len(x)
                stepper.step()
                if ema is not None:
                    ema.update()
                steps_taken += 1
                if progress is not None:
                    progress(steps_taken, plan.steps)
            if ema is not None:
                ema.copy_to_model()
        finally:
            stepper.close()
            set_trainable(model, "all")
    seconds = time.perf_counter() - start
    if steps_taken != plan.steps:  # pragma: no cover - guarded by _batches
        raise MedaeError(f"took {steps_taken} steps, planned {plan.steps}")
    history = [(float(s), float(q), int(k)) for s, q, k in accountant.history] if accountant else []
    if dp and sum(k for _, _, k in history) != plan.steps:  # pragma: no cover
        raise MedaeError("the Opacus accountant did not see every step; privacy accounting is unsafe")
    losses = [s / c if c else float("nan") for s, c in zip(epoch_loss_sums, epoch_counts)]
    done = [v for v in losses if not math.isnan(v)]
    return TrainResult(
        mean_loss=done[-1] if done else float("nan"),
        losses=losses,
        steps_taken=steps_taken,
        empty_steps=empty_steps,
        num_examples=num_examples,
        n_units=n_units,
        grad_sample_mode=mode,
        seconds=seconds,
        images_per_second=num_examples / seconds if seconds > 0 else 0.0,
        noise_multiplier=noise_multiplier,
        sample_rate=plan.sample_rate if dp else 0.0,
        accountant_history=history,
        accountant=_opacus_mechanism(cfg.privacy.accountant),
        trained_parameters=trained,
        state_dict={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
    )


class _Ema:
    """Exponential moving average of the trained weights (Polyak averaging; De et al. 2022).

    Averaging the iterates cancels part of the DP noise each step adds. It is
    post-processing of the private iterates, so it costs no privacy. The call
    returns the average, started from the weights the call began with.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1); got {decay}")
        self.decay = float(decay)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


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


def _batches(plan: TrainingPlan, dp: bool, gen: torch.Generator) -> Iterator[Tensor]:
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


# -- inspection / evaluation ---------------------------------------------------
def privatized_gradient(
    model: AnomalyModel,
    x: Tensor,
    *,
    grad_sample_mode: str,
    max_grad_norm: float,
    noise_multiplier: float = 0.0,
    expected_batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """The gradient one DP training step would apply, through the same code path.

    ``(sum_i clip(g_i) + N(0, (noise_multiplier * max_grad_norm)^2)) / expected_batch_size``
    for the batch `x` (target = `x`, no corruption), one tensor per trainable
    parameter. With ``noise_multiplier=0`` this is the clipped mean gradient, to
    compare against a per-sample reference. The model is left unchanged.
    """
    mode = resolve_grad_sample_mode(grad_sample_mode, model)
    was_training = model.training
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stepper = _Stepper(
        model, opt, mode,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size or x.shape[0],
        noise_generator=None,
    )
    try:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        stepper.compute_gradient(x, x, gen)
        stepper.optimizer.pre_step()
        return [p.grad.detach().clone() for p in stepper.params]
    finally:
        stepper.close()
        model.train(was_training)


def _batched(images: np.ndarray | Tensor, batch_size: int) -> Iterator[Tensor]:
    t = _as_nchw(images)
    for i in range(0, t.shape[0], batch_size):
        yield t[i : i + batch_size]


@torch.no_grad()
def evaluate_loss(
    model: AnomalyModel, images: np.ndarray | Tensor, device: torch.device | str, batch_size: int = 64
) -> float:
    """Mean per-sample loss (eval mode: no corruption, VAE uses the mean)."""
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    total, count = 0.0, 0
    try:
        for x in _batched(images, batch_size):
            x = x.to(device)
            total += float(model.per_sample_loss(x, model(x)).sum())
            count += x.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("evaluate_loss got no images")
    return total / count


@torch.no_grad()
def reconstruct(
    model: AnomalyModel, images: np.ndarray | Tensor, device: torch.device | str, batch_size: int = 64
) -> np.ndarray:
    """Deterministic reconstructions, same shape as `images` ([N, S, S] or [N, C, S, S])."""
    device = torch.device(device)
    squeeze = np.ndim(images) == 3
    was_training = model.training
    model.to(device).eval()
    outs = []
    try:
        for x in _batched(images, batch_size):
            outs.append(model.reconstruct(x.to(device)).float().cpu())
    finally:
        model.train(was_training)
    if not outs:
        shape = tuple(np.shape(images))
        return np.zeros(shape, dtype=np.float32)
    out = torch.cat(outs).numpy()
    return out[:, 0] if squeeze else out
