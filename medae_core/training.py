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

Where the parts live: privacy units, the plan and the batches in `medae_core.units`; one
(DP) optimizer step in `medae_core.dp_step`; device, threads and allocator in
`medae_core.devices`; the loop, the weight average and the result here.

After `train` the ORIGINAL model object holds the trained weights (plain
``state_dict`` keys, no ``_module.`` prefix) and carries no Opacus hooks or
per-sample attributes, so it can be trained again next round and scored.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from medae_core.config import RunConfig
from medae_core.devices import resolve_device, reuse_freed_memory, torch_threads
from medae_core.dp_step import Stepper, opacus_mechanism, resolve_grad_sample_mode
from medae_core.errors import ConfigError, DataError, MedaeError
from medae_core.models import AnomalyModel, set_trainable
from medae_core.units import (TrainingPlan, as_cond, as_nchw, augment_views, make_unit_dataset, mix_seed,
                              unit_batches)

__all__ = ["TrainResult", "evaluate_loss", "train"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


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
    cond: np.ndarray | Tensor | None = None,
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
    only; default: fresh OS entropy). ``cond``: a conditional model's label index
    per image (required for one, refused for the others).
    """
    if (cond is not None) != model.conditional:
        raise DataError(f"a {model.kind} model {'needs' if model.conditional else 'takes no'} image labels (cond)")
    device = resolve_device(cfg.train.device) if device is None else torch.device(device)
    dataset = make_unit_dataset(
        images, patient_index, cfg.privacy, seed=cfg.train.seed if seed is None else int(seed),
        slices_per_patient=cfg.train.slices_per_patient, cond=cond,
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
    # The whole training set moves to the device once per call (batches are then indexed
    # there, no per-step copies); from page-locked memory that copy is a single DMA.
    images = dataset.images.pin_memory() if device.type == "cuda" else dataset.images
    dataset.images = images.to(device, non_blocking=device.type == "cuda")
    mode = "none"
    if dp:
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ConfigError(f"the model cannot be trained with DP: {errors}")
        mode = resolve_grad_sample_mode(cfg.privacy.grad_sample_mode, model)

    seed = cfg.train.seed if seed is None else int(seed)
    # Model-side randomness (VAE eps, DAE noise): reproducible from train.seed.
    model_gen = torch.Generator().manual_seed(mix_seed(seed, 1))
    aug_gen = torch.Generator().manual_seed(mix_seed(seed, 4))
    multiplicity = int(cfg.train.augment_multiplicity) if dp else 1
    if multiplicity < 1:
        raise ConfigError(f"train.augment_multiplicity must be at least 1; got {multiplicity}")
    if dp:
        secret = secrets.randbits(62) if dp_seed is None else int(dp_seed)
        sample_gen = torch.Generator().manual_seed(mix_seed(secret, 2))
        noise_gen = torch.Generator(device=device).manual_seed(mix_seed(secret, 3))
    else:
        sample_gen = torch.Generator().manual_seed(mix_seed(seed, 2))
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
    with torch_threads(cfg.train.num_threads), reuse_freed_memory():
        stepper = Stepper(
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
            accountant = create_accountant(mechanism=opacus_mechanism(cfg.privacy.accountant))
            stepper.attach_accountant_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
        steps_taken = 0
        try:
            for step, units in enumerate(unit_batches(plan, dp, sample_gen)):
                epoch = step // plan.steps_per_epoch
                if len(units) == 0:
                    stepper.fill_empty()
                    empty_steps += 1
                else:
                    x, c = dataset.rows(units, step)  # [len(units) * k, C, S, S], labels [len(units) * k]
                    x = augment_views(x, multiplicity, aug_gen)  # [len(units) * k * m, C, S, S]
                    if c is not None:
                        c = c.repeat_interleave(multiplicity).to(device)
                    x_in = model.corrupt(x, model_gen)
                    losses = stepper.compute_gradient(x_in, x, model_gen, c)
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
        accountant=opacus_mechanism(cfg.privacy.accountant),
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


def _batched(images: np.ndarray | Tensor, batch_size: int, cond=None) -> Iterator[tuple[Tensor, Tensor | None]]:
    t = as_nchw(images)
    c = as_cond(cond, t.shape[0])
    for i in range(0, t.shape[0], batch_size):
        yield t[i : i + batch_size], None if c is None else c[i : i + batch_size]


@torch.no_grad()
def evaluate_loss(
    model: AnomalyModel, images: np.ndarray | Tensor, device: torch.device | str, batch_size: int = 64,
    cond: np.ndarray | Tensor | None = None,
) -> float:
    """Mean per-sample loss (eval mode: no corruption, VAE uses the mean); ``cond`` as in `train`."""
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    total, count = 0.0, 0
    try:
        for x, c in _batched(images, batch_size, cond):
            x = x.to(device)
            c = None if c is None else c.to(device)
            total += float(model.per_sample_loss(x, model(x, cond=c)).sum())
            count += x.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("evaluate_loss got no images")
    return total / count
