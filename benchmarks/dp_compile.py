"""Does `torch.compile` pay for the DP step on this CPU? (issue 12's lever "torch.compile where it pays")

Four steps on the same model, the same fixed batch of ``--batch-size`` random images, Adam:

- ``eager non-DP`` and ``eager bk``: the production `Stepper` (what `train()` runs;
  ``bk`` is what ``grad_sample_mode = "auto"`` runs), exactly as in `dp_throughput.py`;
- ``compiled non-DP``: ``torch.compile`` of ``torch.func.grad`` of the mean loss, then Adam;
- ``compiled DP``: ``torch.compile`` of the whole clipped sum in one graph -- per-sample
  gradients by ``vmap(grad(...))``, their norms, the clip factors and the weighted sum --
  then one Gaussian draw for the noise and Adam. Compilation is the only way to put the
  per-sample work in one graph: the book-keeping clipper's hooks are Python closures
  inside autograd, which Dynamo does not trace.

The compiled functions are compiled once per batch size (warm-up, timed separately); a
Poisson batch changes size every step, so a product path would need dynamic shapes or
a padded, masked batch on top. Steps are interleaved within each repetition; the table
gives medians over repetitions.

    python benchmarks/dp_compile.py [--kind ae] [--image-size 64] [--batch-size 16] \
        [--threads 1] [--reps 5] [--steps 4] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from dp_overlap import time_interleaved  # noqa: E402
from medae_core.config import ModelConfig  # noqa: E402
from medae_core.dp_clipping import clip_factors  # noqa: E402
from medae_core.dp_step import Stepper  # noqa: E402
from medae_core.models import build_model  # noqa: E402

NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0


def eager_step(args, x: torch.Tensor, mode: str):
    model = build_model(ModelConfig(kind=args.kind, image_size=args.image_size), seed=0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    dp = mode != "nondp"
    stepper = Stepper(model, opt, mode if dp else "none", noise_multiplier=NOISE_MULTIPLIER if dp else None,
                      max_grad_norm=MAX_GRAD_NORM, expected_batch_size=args.batch_size,
                      noise_generator=torch.Generator().manual_seed(1) if dp else None)
    gen = torch.Generator().manual_seed(2)

    def step():
        stepper.compute_gradient(model.corrupt(x, gen), x, gen, None)
        stepper.step()

    return step


def compiled_step(args, x: torch.Tensor, dp: bool):
    model = build_model(ModelConfig(kind=args.kind, image_size=args.image_size), seed=0)
    model.train()
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=1e-4)
    noise_gen = torch.Generator().manual_seed(1)

    gen = torch.Generator().manual_seed(2)

    def losses(p, x_in, xb):
        return model.per_sample_loss(xb, functional_call(model, p, (x_in,)))

    def mean_grad(p, x_in, xb):
        return grad(lambda q: losses(q, x_in, xb).mean())(p)

    def one(p, x_in, xi):
        return losses(p, x_in.unsqueeze(0), xi.unsqueeze(0)).sum()

    def clipped_sum(p, x_in, xb):
        g = vmap(grad(one), in_dims=(None, 0, 0))(p, x_in, xb)
        norms = sum(v.flatten(1).pow(2).sum(1) for v in g.values()).sqrt()
        c = clip_factors(norms, MAX_GRAD_NORM, "flat")
        return {k: torch.einsum("b,b...->...", c, v) for k, v in g.items()}

    fn = torch.compile(clipped_sum if dp else mean_grad)

    def step():
        detached = {k: v.detach() for k, v in params.items()}
        grads = fn(detached, model.corrupt(x, gen), x)  # a denoising AE's corruption, as in eager
        if dp:
            sizes = [v.numel() for v in grads.values()]
            noise = torch.empty(sum(sizes)).normal_(0.0, NOISE_MULTIPLIER * MAX_GRAD_NORM, generator=noise_gen)
            for (k, v), n in zip(grads.items(), noise.split(sizes)):
                params[k].grad = (v + n.view_as(v)) / args.batch_size
        else:
            for k, v in grads.items():
                params[k].grad = v
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="ae", choices=["ae", "dae", "sae"],
                   help="deterministic kinds only (a VAE's sampling inside vmap needs randomness='different')")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="steps per repetition")
    p.add_argument("--out", type=Path, help="write the markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    x = torch.rand(args.batch_size, 1, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    steps = {
        "eager non-DP": eager_step(args, x, "nondp"),
        "eager bk (the product)": eager_step(args, x, "bk"),
        "compiled non-DP": compiled_step(args, x, dp=False),
        "compiled DP": compiled_step(args, x, dp=True),
    }
    warmup = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        step()
        warmup[name] = time.perf_counter() - t0
        print(f"{name}: two warm-up steps (compilation included) {warmup[name]:.1f} s", flush=True)
    ms = time_interleaved(steps, args.reps, args.steps)
    base = ms["eager non-DP"]
    lines = [
        f"Command: `python benchmarks/dp_compile.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"- machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}, {args.threads} torch threads",
        f"- {args.kind}, {args.image_size} px, batch {args.batch_size}, {args.reps} repetitions x {args.steps} steps; "
        f"load average before / after: {load_before} / {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        "",
        "| step | ms per step (median) | min–max | eager non-DP / this (speed ratio) | warm-up s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in ms.items():
        ratio = statistics.median(b / t for b, t in zip(base, v))
        lines.append(f"| {name} | {statistics.median(v):.1f} | {min(v):.1f}–{max(v):.1f} | {ratio:.2f} | "
                     f"{warmup[name]:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
