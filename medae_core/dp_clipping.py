"""Per-sample gradient clipping without a second backward pass ("book-keeping").

DP-SGD needs, for every step, the sum over the batch of per-sample gradients,
each clipped to L2 norm ``max_grad_norm``::

    grad = sum_i  c_i * g_i,   c_i = min(1, C / (||g_i|| + 1e-6))

(``clipping="automatic"``: ``c_i = C / (||g_i|| + gamma)``, Bu et al. 2023,
"Automatic clipping"; every sample then has norm just under C, so C sets only
the scale, which Adam divides out, and no clipping threshold needs tuning.)

A *unit* of privacy may span several rows of the batch (``group_size = k``:
rows ``u*k .. u*k+k-1`` belong to unit u, e.g. k slices of one patient). Then
``g_u`` is the gradient of the unit's MEAN loss over its k rows, and it is
``g_u`` that is clipped, so each unit's contribution is bounded by C no matter
how many rows it has: the sensitivity is that of one row, the variance of the
unit's gradient is lower.

Opacus computes this either by materialising every per-sample gradient
(``hooks``: memory ~ batch x parameters, plus the ordinary weight gradient that
is then thrown away) or, in ``ghost`` mode, by computing the norms first and
running a *second* full backward pass on ``sum_i c_i L_i``.

`BookKeepingClipper` follows Bu et al. (2023, "Differentially private
optimization on large model at small cost", book-keeping + mixed ghost
clipping): one forward and one backward pass that computes only activation
gradients (the weights are detached, so autograd does no weight-gradient work);
hooks keep each layer's input ``a`` and output gradient ``g``. Per layer the
per-sample gradient norm is computed the cheaper of two ways:

- *ghost norm* (never forms the gradient): for a conv/linear layer the
  per-sample weight gradient is ``G_i = g_i^T a_i`` over output positions, so
  ``||G_i||^2 = <a_i a_i^T, g_i g_i^T>`` -- cost ~ positions^2 (for a stride-1 conv
  ``a_i a_i^T`` of the patches is read off one Gram matrix of the padded input's pixels,
  no im2col);
- *materialised*: the per-sample weight gradients of a conv layer in one
  grouped convolution-backward call (batch as groups), cost ~ positions;
  or, for a stride-1 conv with few output channels (the high-resolution
  layers next to the image, where grouped kernels run slowest: 3-6x their
  batched cost here), by *shifted windows*: one batched matmul per kernel
  offset, each reading the padded input at that offset as a view, no im2col
  (1.2-2.7x faster than grouped on those layers, on this CPU).

With all norms known, the clipped sum is formed per layer directly: for a
ghost layer as one ordinary weight-gradient computation on the rescaled output
gradient ``c_i * g_i`` (the same kernel non-DP training uses), for a
materialised layer as ``sum_i c_i G_i``. The result is written to ``p.grad``;
an Opacus ``DPOptimizerFastGradientClipping`` then adds the Gaussian noise,
scales by the expected batch size and reports the step to the accountant,
exactly as in Opacus' own ghost-clipping mode.

Supported trainable layers: ``nn.Conv2d`` (zero padding, groups=1),
``nn.Linear`` on [B, features] inputs, ``nn.GroupNorm`` (affine). Anything
else raises `UnsupportedModelError`; the training engine then falls back to an
Opacus mode. Each layer may run once per forward pass (no weight tying), and
the loss of sample i may depend only on sample i (no BatchNorm) -- which is
what DP-SGD requires anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from medae_core.errors import MedaeError

__all__ = ["CLIPPING_MODES", "BookKeepingClipper", "UnsupportedModelError", "clip_factors"]

CLIPPING_MODES = ("flat", "automatic")
AUTOMATIC_GAMMA = 0.01  # Bu et al. 2023's stability constant, relative to C

_SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm)
# How conv layers get their per-sample norms: "auto" picks per layer (see `_conv_method`);
# the others force one way where it applies (for tests and benchmarks).
STRATEGIES = ("auto", "ghost", "materialize", "shift")
SHIFT_MAX_OUT_CHANNELS = 16  # "auto": shifted windows for stride-1 convs with at most this many outputs


class UnsupportedModelError(MedaeError):
    """The model has a layer the book-keeping clipper cannot handle."""


def clip_factors(norms: Tensor, max_grad_norm: float, clipping: str = "flat") -> Tensor:
    """Per-unit factors c with ||c * g|| <= C.

    ``"flat"`` (Opacus' rule): min(1, C / (norm + 1e-6)).
    ``"automatic"``: C / (norm + gamma * C), gamma = `AUTOMATIC_GAMMA` (< C always).
    """
    if clipping == "automatic":
        return max_grad_norm / (norms + AUTOMATIC_GAMMA * max_grad_norm)
    if clipping != "flat":
        raise ValueError(f"clipping must be one of {', '.join(CLIPPING_MODES)}; got {clipping!r}")
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


@dataclass
class _Record:
    module: nn.Module
    a: Tensor | None  # layer input (detached)
    g: Tensor | None = None  # gradient w.r.t. the layer output
    ghost: bool = False  # conv/linear: clipped sum from (a, g) instead of per-sample grads
    per_sample: dict[str, Tensor] = field(default_factory=dict)  # param name -> [B, *shape]
    stats: tuple[Tensor, Tensor] | None = None  # GroupNorm: the forward pass's mean and 1/std, when kept
    norm2: Tensor | None = None  # [B] squared per-sample gradient norm of this layer


class BookKeepingClipper:
    """Computes ``sum_i clip(g_i)`` into ``p.grad`` with a single backward pass.

    Usage per step::

        out = clipper.forward(x)                  # instead of model(x)
        norms = clipper.backward(per_sample_loss)  # sets p.grad, returns ||g_i||
        dp_optimizer.step()                        # noise + scaling + accounting

    ``close()`` removes the hooks; the model is otherwise untouched.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, *, strategy: str = "auto",
                 group_size: int = 1, clipping: str = "flat"):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        if int(group_size) < 1:
            raise ValueError(f"group_size must be at least 1; got {group_size}")
        if clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {', '.join(CLIPPING_MODES)}; got {clipping!r}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.strategy = strategy
        self.k = int(group_size)
        self.clipping = clipping
        self.check_supported(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._records: list[_Record] = []
        self._recording = False
        self._handles = [
            m.register_forward_hook(self._forward_hook)
            for m in model.modules()
            if isinstance(m, _SUPPORTED) and any(p.requires_grad for p in m.parameters(recurse=False))
        ]

    # -- setup ---------------------------------------------------------------
    @staticmethod
    def check_supported(model: nn.Module) -> None:
        """Raise `UnsupportedModelError` unless every trainable layer has a rule."""
        for name, m in model.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if type(m) not in _SUPPORTED:
                raise UnsupportedModelError(
                    f"layer {name or type(m).__name__} ({type(m).__name__}) has trainable "
                    "parameters but no book-keeping rule; use an Opacus grad_sample_mode"
                )
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
                raise UnsupportedModelError(
                    f"conv layer {name}: only groups=1 and zero padding are supported"
                )
            if isinstance(m, nn.GroupNorm) and not m.affine:
                raise UnsupportedModelError(f"GroupNorm {name} without affine parameters")

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._records = []

    # -- forward / backward --------------------------------------------------
    def forward(self, *args, **kwargs):
        """Run the model with detached weights while recording layer inputs."""
        self._records = []
        detached = {name: p.detach() for name, p in self.model.named_parameters()}
        self._recording = True
        try:
            return functional_call(self.model, detached, args, kwargs)
        finally:
            self._recording = False

    def _forward_hook(self, module: nn.Module, inputs, output):
        if not self._recording:
            return None
        if any(r.module is module for r in self._records):
            raise UnsupportedModelError(
                f"{type(module).__name__} ran twice in one forward pass (weight tying); "
                "per-sample norms cannot be computed by book-keeping"
            )
        rec = _Record(module=module, a=inputs[0].detach())
        if isinstance(module, nn.GroupNorm):
            rec.stats = _forward_group_norm_stats(output)
        self._records.append(rec)
        replaced = None
        if not output.requires_grad:
            # Nothing upstream needs a gradient (the first layer): make the
            # output a leaf so that its gradient still reaches the hook.
            output = replaced = output.detach().requires_grad_(True)
        output.register_hook(lambda g, rec=rec: self._on_grad(rec, g))
        return replaced

    def backward(self, loss_per_sample: Tensor) -> Tensor:
        """Backpropagate, clip per unit and store the clipped sum in ``p.grad``.

        ``loss_per_sample`` has one entry per row ([units * group_size]); a unit's
        loss is the mean of its rows'. Returns the per-unit gradient norms
        (before clipping), shape [units].
        """
        if loss_per_sample.dim() != 1:
            raise ValueError("loss_per_sample must have shape [batch]")
        if loss_per_sample.shape[0] % self.k:
            raise ValueError(f"batch of {loss_per_sample.shape[0]} rows is not a whole number of units "
                             f"of {self.k} rows")
        n = loss_per_sample.shape[0] // self.k
        # d(sum_i L_i)/d(out) holds, for each row, the gradient of its own loss
        # (divided by k: a unit's loss is the mean over its rows).
        (loss_per_sample.sum() / self.k).backward()
        missing = [r for r in self._records if r.norm2 is None]
        if missing:
            raise UnsupportedModelError(
                f"{type(missing[0].module).__name__} output did not reach the loss; "
                "every trainable layer must contribute to the loss"
            )
        device = loss_per_sample.device
        norm2 = torch.zeros(n, device=device, dtype=loss_per_sample.dtype)
        for r in self._records:
            norm2 += r.norm2
        norms = norm2.clamp(min=0).sqrt()
        coef = clip_factors(norms, self.max_grad_norm, self.clipping)
        grads: dict[int, Tensor] = {}
        for r in self._records:
            for p, grad in self._clipped_sum(r, coef):
                grads[id(p)] = grad
        for p in self.params:
            grad = grads.get(id(p))
            p.grad = grad.view_as(p) if grad is not None else torch.zeros_like(p)
        self._records = []
        return norms.detach()

    # -- per-layer rules -----------------------------------------------------
    def _on_grad(self, r: _Record, g: Tensor) -> None:
        g = g.detach()
        m = r.module
        if isinstance(m, nn.Conv2d):
            self._conv_norms(r, m, g)
        elif isinstance(m, nn.Linear):
            a = r.a
            if a.dim() != 2:
                raise UnsupportedModelError("Linear layers must get [batch, features] inputs")
            if self.k == 1:
                g2 = _sq_norms(g)
                r.norm2 = g2 * _sq_norms(a)
                if m.bias is not None:
                    r.norm2 = r.norm2 + g2
            else:  # ||sum_j g_j a_j^T||^2 = sum_jl (a_j.a_l)(g_j.g_l) within a unit
                ga = self._grouped(g)
                gg = torch.bmm(ga, ga.transpose(1, 2))
                r.norm2 = _dot_per_sample(torch.bmm(self._grouped(a), self._grouped(a).transpose(1, 2)), gg)
                if m.bias is not None:
                    r.norm2 = r.norm2 + gg.sum((1, 2))
            r.g, r.ghost = g, True
        else:  # GroupNorm
            gw, gb = _group_norm_per_sample_grads(m, r.a, g, r.stats)
            r.per_sample = {"weight": self._unit_sum(gw), "bias": self._unit_sum(gb)}
            r.norm2 = _sq_norms(r.per_sample["weight"]) + _sq_norms(r.per_sample["bias"])
            r.a = r.stats = None

    def _grouped(self, t: Tensor) -> Tensor:
        """[units * k, f] -> [units, k, f]."""
        return t.reshape(t.shape[0] // self.k, self.k, -1)

    def _unit_sum(self, t: Tensor) -> Tensor:
        """Per-row tensors [units * k, ...] summed over each unit's rows: [units, ...]."""
        if self.k == 1:
            return t
        return t.reshape(t.shape[0] // self.k, self.k, *t.shape[1:]).sum(1)

    def _conv_method(self, m: nn.Conv2d, g: Tensor) -> str:
        """"ghost", "shift" or "grouped": how this layer's per-sample norms are computed."""
        shiftable = _shiftable(m)
        if self.strategy == "ghost":
            return "ghost"
        if self.strategy == "materialize":
            return "grouped"
        if self.strategy == "shift":
            return "shift" if shiftable else "grouped"
        q = g.shape[2] * g.shape[3] * self.k  # output positions of one unit
        p = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        o = m.out_channels
        # ghost: q^2 (p + o) multiply-adds; materialised: p o q, plus writing
        # B x p x o per-sample gradients. Ghost wins for few positions.
        if q * (p + o) < p * o:
            return "ghost"
        return "shift" if shiftable and o <= SHIFT_MAX_OUT_CHANNELS else "grouped"

    def _conv_norms(self, r: _Record, m: nn.Conv2d, g: Tensor) -> None:
        n = g.shape[0] // self.k  # units
        a = r.a
        gb = self._unit_sum(g.sum((2, 3))) if m.bias is not None else None
        method = self._conv_method(m, g)
        if method == "ghost":
            aa = _shifted_gram(m, a, self.k) if _shiftable(m) else _unfolded_gram(m, a, self.k)  # [n, kq, kq]
            gg = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(n, -1, g.shape[1])
            ggt = torch.bmm(gg, gg.transpose(1, 2))  # [n, kq, kq]
            r.norm2 = _dot_per_sample(aa, ggt)
            r.g, r.ghost = g, True
        else:
            per_sample = _shifted_per_sample_weight_grad if method == "shift" else _conv_per_sample_weight_grad
            gw = per_sample(m, a, g, self.k)
            r.per_sample["weight"] = gw
            r.norm2 = _sq_norms(gw)
            r.a = None
        if gb is not None:
            r.per_sample["bias"] = gb
            r.norm2 = r.norm2 + _sq_norms(gb)

    def _clipped_sum(self, r: _Record, coef: Tensor):
        m = r.module
        out = []
        if r.ghost:
            cshape = (-1,) + (1,) * (r.g.dim() - 1)
            rows = coef.repeat_interleave(self.k) if self.k > 1 else coef
            gc = r.g * rows.view(cshape).to(r.g.dtype)
            if isinstance(m, nn.Conv2d):
                _, gw, _ = torch.ops.aten.convolution_backward(
                    gc, r.a, m.weight, None, m.stride, _pad(m), m.dilation,
                    False, [0, 0], 1, [False, True, False],
                )
                out.append((m.weight, gw))
            else:  # Linear
                out.append((m.weight, gc.t() @ r.a))
                if m.bias is not None:
                    out.append((m.bias, gc.sum(0)))
        for pname, ps in r.per_sample.items():
            out.append((getattr(m, pname), (coef.to(ps.dtype) @ ps.reshape(ps.shape[0], -1))))
        return out


def _sq_norms(t: Tensor) -> Tensor:
    """Squared L2 norm of each sample (row) of `t`, shape [B]."""
    flat = t.reshape(t.shape[0], -1)
    return torch.linalg.vector_norm(flat, dim=1).square()


def _dot_per_sample(x: Tensor, y: Tensor) -> Tensor:
    """<x_i, y_i> for each sample i, shape [B]."""
    n = x.shape[0]
    return torch.bmm(x.reshape(n, 1, -1), y.reshape(n, -1, 1)).view(n)


def _forward_group_norm_stats(output: Tensor) -> tuple[Tensor, Tensor] | None:
    """The mean and 1/std per (sample, group) that a GroupNorm's forward pass computed and autograd
    keeps for its backward, or None where this torch keeps them otherwise (then they are recomputed)."""
    node = output.grad_fn
    if node is None or type(node).__name__ != "NativeGroupNormBackward0":
        return None
    mean, rstd = getattr(node, "_saved_result1", None), getattr(node, "_saved_result2", None)
    return (mean, rstd) if isinstance(mean, Tensor) and isinstance(rstd, Tensor) else None


def _group_norm_per_sample_grads(m: nn.GroupNorm, a: Tensor, g: Tensor,
                                 stats: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample gradients [B, C] of a GroupNorm's weight and bias.

    weight: sum_s xhat * g with xhat = (a - mean) * rstd per (sample, group);
    computed as (sum_s a*g - mean * sum_s g) * rstd to avoid re-normalising.
    ``stats``: the forward pass's (mean, rstd), [B, groups]; recomputed when None.
    """
    n, c = a.shape[:2]
    spatial = a[0, 0].numel()
    if stats is not None and all(tuple(t.shape) == (n, m.num_groups) for t in stats):
        mean, rstd = stats
    else:  # the same statistics the forward pass used
        _, mean, rstd = torch.native_group_norm(a, None, None, n, c, spatial, m.num_groups, m.eps)
    per_group = c // m.num_groups
    mean_c = mean.repeat_interleave(per_group, dim=1)
    rstd_c = rstd.repeat_interleave(per_group, dim=1)
    dims = tuple(range(2, a.dim()))
    gb = g.sum(dims)
    ag = (a * g).sum(dims)
    gw = (ag - mean_c * gb) * rstd_c
    return gw, gb


def _pad(m: nn.Conv2d) -> list[int]:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return [0, 0]
        raise UnsupportedModelError("padding='same' is not supported by the book-keeping clipper")
    return list(m.padding)


def _conv_per_sample_weight_grad(m: nn.Conv2d, a: Tensor, g: Tensor, k: int = 1) -> Tensor:
    """Per-unit weight gradients [B / k, out, in, kh, kw] of a conv layer (a unit: k consecutive rows).

    One grouped convolution backward with the units folded into the channel
    dimension and a unit's k rows as the batch: unit i is group i, so the "weight
    gradient" of the grouped convolution is the stack of per-unit weight gradients.
    """
    n = a.shape[0] // k
    w = m.weight
    w_rep = w.detach().expand(n, *w.shape).reshape(n * w.shape[0], *w.shape[1:])

    def by_unit(t: Tensor) -> Tensor:  # [n * k, C, H, W] -> [k, n * C, H, W]
        if k == 1:
            return t.reshape(1, n * t.shape[1], *t.shape[2:])
        return t.reshape(n, k, *t.shape[1:]).transpose(0, 1).reshape(k, n * t.shape[1], *t.shape[2:])

    _, gw, _ = torch.ops.aten.convolution_backward(
        by_unit(g), by_unit(a), w_rep, None, m.stride, _pad(m), m.dilation, False, [0, 0], n,
        [False, True, False],
    )
    return gw.view(n, *w.shape)


def _unfolded_gram(m: nn.Conv2d, a: Tensor, k: int) -> Tensor:
    """``<patch_s, patch_t>`` for every pair of a unit's output positions: [units, k*q, k*q], by im2col."""
    cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    # A unit's positions are those of all its rows: [units, k * q, features].
    cols = cols.transpose(1, 2).reshape(a.shape[0] // k, -1, cols.shape[1])
    return torch.bmm(cols, cols.transpose(1, 2))


def _shifted_gram(m: nn.Conv2d, a: Tensor, k: int) -> Tensor:
    """`_unfolded_gram` of a stride-1 conv without im2col.

    A patch is the padded input at kh x kw offsets from its position, so ``<patch_s, patch_t> =
    sum over offsets d of <x_{s+d}, x_{t+d}>``: one Gram matrix of the padded input's pixels
    (channels as features; kh*kw times fewer multiply-adds than of the patches), then the sum of
    its kh*kw shifted windows.
    """
    b, c, _, _ = a.shape
    n = b // k
    kh, kw = m.kernel_size
    ph, pw = _pad(m)
    padded = F.pad(a, (pw, pw, ph, ph))
    hp, wp = padded.shape[2], padded.shape[3]
    ho, wo = hp - kh + 1, wp - kw + 1
    pixels = padded.permute(0, 2, 3, 1).reshape(n, k * hp * wp, c)
    gram = torch.bmm(pixels, pixels.transpose(1, 2)).view(n, k, hp, wp, k, hp, wp)
    out = gram[:, :, :ho, :wo, :, :ho, :wo].clone()
    for dy in range(kh):
        for dx in range(kw):
            if dy or dx:
                out += gram[:, :, dy:dy + ho, dx:dx + wo, :, dy:dy + ho, dx:dx + wo]
    return out.view(n, k * ho * wo, k * ho * wo)


def _shiftable(m: nn.Conv2d) -> bool:
    """Stride 1, no dilation, numeric padding: the layers `_shifted_per_sample_weight_grad` handles."""
    return tuple(m.stride) == (1, 1) and tuple(m.dilation) == (1, 1) and not isinstance(m.padding, str)


def _shifted_per_sample_weight_grad(m: nn.Conv2d, a: Tensor, g: Tensor, k: int = 1) -> Tensor:
    """Per-unit weight gradients [B / k, out, in, kh, kw] of a stride-1 conv layer, by shifted windows.

    ``G_i[:, :, dy, dx] = g_i @ window_i(dy, dx)^T`` summed over output positions, where
    the window is the padded input at offset (dy, dx). With the input padded, made
    channels-last and flattened row by row (rows of padded width Wp, one spare row),
    the window of every offset is a contiguous slice of that buffer, provided the
    output gradient is laid out on the same rows (its kw - 1 extra columns zero, so
    the positions that wrap round a row add nothing). Each offset is then one
    batched matmul [B, out, Ho*Wp] @ [B, Ho*Wp, in], and nothing is copied per offset.
    A unit of k consecutive rows accumulates its rows' matmuls into one gradient.
    """
    b, c, _, _ = a.shape
    n = b // k
    o, ho, wo = g.shape[1], g.shape[2], g.shape[3]
    kh, kw = m.kernel_size
    ph, pw = _pad(m)
    padded = F.pad(a, (pw, pw, ph, ph + 1))  # the spare row keeps the last offset's window in bounds
    wp = padded.shape[3]
    flat = padded.permute(0, 2, 3, 1).reshape(n, k, -1, c)  # [units, k, (Hp + 1) * Wp, in]
    rows = F.pad(g, (0, wp - wo)).reshape(n, k, o, ho * wp)  # [units, k, out, Ho * Wp]
    out = torch.empty(kh, kw, n, o, c, dtype=g.dtype, device=g.device)
    for dy in range(kh):
        for dx in range(kw):
            start = dy * wp + dx
            torch.bmm(rows[:, 0], flat[:, 0, start:start + ho * wp], out=out[dy, dx])
            for j in range(1, k):
                out[dy, dx].baddbmm_(rows[:, j], flat[:, j, start:start + ho * wp])
    return out.permute(2, 3, 4, 0, 1).contiguous()
