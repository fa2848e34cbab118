"""One optimizer step, private or not: per-sample clipping by the chosen grad-sample mode, then Opacus' noise.

`Stepper` puts a model and its optimizer behind Opacus' ``DPOptimizer`` (or
``DPOptimizerFastGradientClipping`` for book-keeping and ghost clipping, with one noise draw per
step instead of one per tensor: `_summed_gradient_optimizer`) and
computes the per-unit clipped gradient sum by ``privacy.grad_sample_mode``
(`medae_core.training` module docstring). `privatized_gradient` runs the same
path once, for tests and inspection.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from medae_core.dp_clipping import BookKeepingClipper, UnsupportedModelError
from medae_core.errors import ConfigError
from medae_core.models import AnomalyModel

logger = logging.getLogger(__name__)

GRAD_SAMPLE_MODES = ("auto", "bk", "hooks", "functorch", "ew", "ghost")


def opacus_mechanism(accountant: str) -> str:
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


@functools.cache
def _summed_gradient_optimizer() -> type:
    """Opacus' ``DPOptimizerFastGradientClipping``, less two costs of a short step.

    Book-keeping and ghost clipping hand the optimizer the clipped sum in ``p.grad``; it
    copies each one into ``p.summed_grad``, adds Gaussian noise of standard deviation
    σ·C to every coordinate, scales by the expected batch size and reports the step to
    the accountant. At 64 px (a ~50 ms step, 40 parameter tensors) two things in it cost
    about 4 ms: ``copy.deepcopy`` of every gradient, and one noise draw per tensor. This
    subclass copies with ``clone`` and draws the noise of all tensors in one call, then
    splits it. Every coordinate still gets its own independent N(0, (σ·C)²), from the same
    generator; the processed-flag checks, scaling and accounting are Opacus' own. With
    ``secure_mode``, or tensors on different devices or of different types, Opacus' own
    per-tensor noise runs.
    """
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class SummedGradientDPOptimizer(DPOptimizerFastGradientClipping):
        def accumulate(self):
            for p in self.params:
                if p.summed_grad is not None:
                    p.summed_grad.add_(p.grad.detach())
                else:
                    p.summed_grad = p.grad.detach().clone()

        def add_noise(self):
            params = self.params
            kinds = {(p.summed_grad.device, p.summed_grad.dtype) for p in params}
            if self.secure_mode or len(kinds) != 1:
                return super().add_noise()
            (device, dtype), = kinds
            std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
            for p in params:
                _check_processed_flag(p.summed_grad)
            sizes = [p.summed_grad.numel() for p in params]
            noise = torch.zeros(sum(sizes), device=device, dtype=dtype)
            if std != 0:
                noise.normal_(0.0, std, generator=self.generator)
            for p, n in zip(params, noise.split(sizes)):
                p.grad = (p.summed_grad + n.view_as(p.summed_grad)).view_as(p)
                _mark_as_processed(p.summed_grad)

    return SummedGradientDPOptimizer


class Stepper:
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
            self.optimizer = _summed_gradient_optimizer()(optimizer, **kwargs)
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

    def compute_gradient(self, x_in: Tensor, x_target: Tensor, gen: torch.Generator,
                         cond: Tensor | None = None) -> Tensor:
        """Forward + backward; leaves what the optimizer needs. Returns per-sample losses.

        ``cond``: a conditional model's label index per image (None for the others).
        """
        with warnings.catch_warnings():
            # Opacus' module hooks on the first layer warn that the input needs
            # no gradient; that is expected (images are not trained).
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return self._compute_gradient(x_in, x_target, gen, cond)

    def _compute_gradient(self, x_in: Tensor, x_target: Tensor, gen: torch.Generator,
                          cond: Tensor | None) -> Tensor:
        out = self._forward(x_in, generator=gen, cond=cond)
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


def privatized_gradient(
    model: AnomalyModel,
    x: Tensor,
    *,
    grad_sample_mode: str,
    max_grad_norm: float,
    noise_multiplier: float = 0.0,
    expected_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    cond: Tensor | None = None,
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
    stepper = Stepper(
        model, opt, mode,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size or x.shape[0],
        noise_generator=None,
    )
    try:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        stepper.compute_gradient(x, x, gen, cond)
        stepper.optimizer.pre_step()
        return [p.grad.detach().clone() for p in stepper.params]
    finally:
        stepper.close()
        model.train(was_training)
