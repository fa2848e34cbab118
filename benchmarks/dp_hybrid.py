"""Materialised per-sample norms, batched clipped sums (issue 12, an experiment).

In `BookKeepingClipper` a conv layer whose norms are *materialised* (grouped or shifted
windows) keeps its per-sample weight gradients [B, out, in, kh, kw] until every layer's norm
is known, then forms the clipped sum as ``coef @ per_sample``. At 64 px those tensors are
the largest thing the DP step writes (2.4 MB for the 64 -> 64 layer at batch 16), and they
stay alive across the rest of the backward pass. This variant ("bk_free") computes such a
layer's norms and drops its per-sample gradients at once; the clipped sum is then one ordinary
weight gradient of the rescaled output gradient, as for ghost layers. It keeps the layer's
input and output gradient instead (small at low resolution, larger next to the image).
"bk_free_hi" does so only where the per-sample gradients are the larger of the two.

Steps interleaved on the same model and batch (the production `Stepper`); the variants'
clipped gradients are checked against ``bk``'s first.

    python benchmarks/dp_hybrid.py [--kind ae] [--threads 1] [--image-size 64] [--reps 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import medae_core.dp_clipping as dc  # noqa: E402
from dp_overlap import make_step, print_against_nondp, time_interleaved  # noqa: E402
from medae_core.config import ModelConfig  # noqa: E402
from medae_core.dp_step import Stepper  # noqa: E402
from medae_core.models import build_model  # noqa: E402

CONV_NORMS = dc.BookKeepingClipper._conv_norms


def _shift_norms(m, a, g):
    """Per-sample squared norms of a stride-1 conv's weight gradient by shifted windows, no final copy."""
    n, c, _, _ = a.shape
    o, ho, wo = g.shape[1], g.shape[2], g.shape[3]
    kh, kw = m.kernel_size
    ph, pw = dc._pad(m)
    padded = F.pad(a, (pw, pw, ph, ph + 1))
    wp = padded.shape[3]
    flat = padded.permute(0, 2, 3, 1).reshape(n, -1, c)
    rows = F.pad(g, (0, wp - wo)).reshape(n, o, ho * wp)
    out = torch.empty(kh, kw, n, o, c, dtype=g.dtype, device=g.device)
    for dy in range(kh):
        for dx in range(kw):
            start = dy * wp + dx
            torch.bmm(rows, flat[:, start:start + ho * wp], out=out[dy, dx])
    return out.square().sum((0, 1, 3, 4))


def conv_norms_free(self, r, m, g, only_where_smaller=False):
    if self.k != 1:
        return CONV_NORMS(self, r, m, g)
    method = self._conv_method(m, g)
    if method == "ghost":
        return CONV_NORMS(self, r, m, g)
    a = r.a
    if only_where_smaller and a.numel() + g.numel() > a.shape[0] * m.weight.numel():
        return CONV_NORMS(self, r, m, g)
    if method == "shift":
        norm2 = _shift_norms(m, a, g)
    else:
        norm2 = dc._sq_norms(dc._conv_per_sample_weight_grad(m, a, g))
    r.norm2 = norm2
    r.g, r.ghost = g, True
    if m.bias is not None:
        gb = g.sum((2, 3))
        r.per_sample["bias"] = gb
        r.norm2 = r.norm2 + dc._sq_norms(gb)


def patched(fn, mode: str):
    """``fn`` run with the ``mode`` variant's `_conv_norms` in place of the clipper's own (``bk``: unchanged)."""
    if mode in ("nondp", "bk"):
        return fn
    hi = mode == "bk_free_hi"

    def run():
        dc.BookKeepingClipper._conv_norms = lambda c, r, m, g: conv_norms_free(c, r, m, g, hi)
        try:
            return fn()
        finally:
            dc.BookKeepingClipper._conv_norms = CONV_NORMS
    return run


def clipped_gradient(args, mode: str) -> list:
    """The clipped, summed gradient of one DP batch under ``mode`` (before noise), to check the variants."""
    model = build_model(ModelConfig(kind=args.kind, image_size=args.image_size), seed=0)
    model.train()
    x = torch.rand(args.batch_size, 1, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    stepper = Stepper(model, torch.optim.Adam(model.parameters(), lr=1e-4), "bk", noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=args.batch_size,
                      noise_generator=torch.Generator().manual_seed(1))

    def grad():
        gen = torch.Generator().manual_seed(2)
        stepper.compute_gradient(model.corrupt(x, gen), x, torch.Generator().manual_seed(2), None)
        return [p.grad.clone() for p in model.parameters()]

    return patched(grad, mode)()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="ae")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--steps", type=int, default=4, help="steps per repetition")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    ref = clipped_gradient(args, "bk")
    for m in ("bk_free", "bk_free_hi"):
        got = clipped_gradient(args, m)
        err = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(got, ref))
        print(f"  {m}: largest relative difference of a clipped gradient from bk's: {err:.1e}")
        assert err < 1e-4, err
    steps = {m: patched(make_step(args, "nondp" if m == "nondp" else "bk"), m)
             for m in ("nondp", "bk", "bk_free", "bk_free_hi")}
    for step in steps.values():
        for _ in range(3):
            step()
    ms = time_interleaved(steps, args.reps, args.steps)
    print(f"{args.kind}, {args.image_size} px, batch {args.batch_size}, {args.threads} torch threads; "
          f"{args.reps} repetitions x {args.steps} steps; load average after "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print_against_nondp(ms)


if __name__ == "__main__":
    main()
