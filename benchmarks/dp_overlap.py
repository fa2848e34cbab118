"""Would the per-layer DP work hide behind the backward pass on a second core? (issue 12, tried, not kept)

At 64 px a non-DP step gains little from a second thread (its kernels are small), so the
second core is mostly idle. This prototype moves the book-keeping clipper's per-layer
work (the per-sample norms, `BookKeepingClipper._on_grad`) onto a worker thread as each
layer's output gradient arrives, while autograd carries on with the next layer on the
main thread; the main thread waits for the worker only before the norms are summed.
The clipped sums, the noise and Adam are unchanged. It patches the clipper's methods
for the ``bk_thread`` step only (nothing in medae_core is changed).

Three steps, interleaved, on the same model and fixed batch (the production `Stepper`):
``nondp``, ``bk`` (what ``grad_sample_mode = "auto"`` runs) and ``bk_thread``; then, for
``bk_thread``, where the time goes: autograd's backward on the main thread, the worker's
per-layer work, and how long the main thread waits for the worker afterwards.

    python benchmarks/dp_overlap.py [--threads 2] [--worker-threads 1] [--image-size 64] [--reps 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import medae_core.dp_clipping as dc  # noqa: E402
from medae_core.config import ModelConfig  # noqa: E402
from medae_core.dp_step import Stepper  # noqa: E402
from medae_core.models import build_model  # noqa: E402

ON_GRAD, BACKWARD = dc.BookKeepingClipper._on_grad, dc.BookKeepingClipper.backward


class Overlap:
    """The worker thread, the patched methods and their timings."""

    def __init__(self, worker_threads: int):
        self.pool = ThreadPoolExecutor(1, initializer=lambda: torch.set_num_threads(worker_threads))
        self.pending = []
        self.seconds = {"backward": 0.0, "worker": 0.0, "wait": 0.0}
        self.steps = 0

    def _work(self, clipper, record, g):
        t0 = time.perf_counter()
        ON_GRAD(clipper, record, g)
        self.seconds["worker"] += time.perf_counter() - t0

    def on_grad(self, clipper, record, g):
        self.pending.append(self.pool.submit(self._work, clipper, record, g.detach()))

    def backward(self, clipper, loss):
        plain = torch.Tensor.backward

        def backward_then_wait(t, *args, **kwargs):
            t0 = time.perf_counter()
            plain(t, *args, **kwargs)
            t1 = time.perf_counter()
            for f in self.pending:
                f.result()
            self.pending.clear()
            self.seconds["backward"] += t1 - t0
            self.seconds["wait"] += time.perf_counter() - t1
            self.steps += 1

        torch.Tensor.backward = backward_then_wait
        try:
            return BACKWARD(clipper, loss)
        finally:
            torch.Tensor.backward = plain

    def patched(self, fn):
        def run():
            dc.BookKeepingClipper._on_grad = lambda c, r, g: self.on_grad(c, r, g)
            dc.BookKeepingClipper.backward = lambda c, loss: self.backward(c, loss)
            try:
                fn()
            finally:
                dc.BookKeepingClipper._on_grad, dc.BookKeepingClipper.backward = ON_GRAD, BACKWARD
        return run


def make_step(args, mode: str):
    model = build_model(ModelConfig(kind=args.kind, image_size=args.image_size), seed=0)
    model.train()
    x = torch.rand(args.batch_size, 1, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    dp = mode != "nondp"
    stepper = Stepper(model, opt, "bk" if dp else "none", noise_multiplier=1.0 if dp else None, max_grad_norm=1.0,
                      expected_batch_size=args.batch_size,
                      noise_generator=torch.Generator().manual_seed(1) if dp else None)
    gen = torch.Generator().manual_seed(2)

    def step():
        stepper.compute_gradient(model.corrupt(x, gen), x, gen, None)
        stepper.step()

    return step


def time_interleaved(steps: dict, reps: int, n: int) -> dict[str, list[float]]:
    """Milliseconds a step of each of ``steps``: ``reps`` repetitions of ``n`` steps, the steps taking turns."""
    ms: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            ms[name].append((time.perf_counter() - t0) / n * 1000)
    return ms


def print_against_nondp(ms: dict[str, list[float]]) -> None:
    """Each step's median, and its speed against ``nondp`` repetition by repetition."""
    for name, v in ms.items():
        ratio = statistics.median(b / t for b, t in zip(ms["nondp"], v))
        print(f"  {name:10s} {statistics.median(v):6.1f} ms a step (min {min(v):.1f})   "
              f"speed against nondp {ratio:.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="ae")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main thread")
    p.add_argument("--worker-threads", type=int, default=1, help="torch threads of the worker thread")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="steps per repetition")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    overlap = Overlap(args.worker_threads)
    steps = {"nondp": make_step(args, "nondp"), "bk": make_step(args, "bk"),
             "bk_thread": overlap.patched(make_step(args, "bk"))}
    for step in steps.values():
        for _ in range(3):
            step()
    overlap.seconds = dict.fromkeys(overlap.seconds, 0.0)
    overlap.steps = 0
    ms = time_interleaved(steps, args.reps, args.steps)
    print(f"{args.kind}, {args.image_size} px, batch {args.batch_size}, main thread {args.threads} torch threads, "
          f"worker {args.worker_threads}; {args.reps} repetitions x {args.steps} steps; "
          f"load average after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print_against_nondp(ms)
    per = {k: v / overlap.steps * 1000 for k, v in overlap.seconds.items()}
    print(f"  bk_thread, per step: autograd backward {per['backward']:.1f} ms on the main thread, per-layer work "
          f"{per['worker']:.1f} ms on the worker, then the main thread waits {per['wait']:.1f} ms")


if __name__ == "__main__":
    main()
