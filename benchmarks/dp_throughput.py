"""DP-SGD vs non-private training throughput, per model kind and grad_sample_mode.

Every mode runs the same step code as `medae_core.training.train` (the
internal `Stepper`: forward, per-sample loss, backward/clipping, noise,
Adam), on the same model, with the same fixed batch of ``--batch-size``
images per step, so "an image" and "a step" mean the same thing in every
column. (`train` itself draws Poisson batches under DP, whose size varies;
a fixed batch keeps the comparison paired.) Modes are interleaved within
each repetition so that background load hits them alike; the table reports
the median over repetitions of images per second and of the per-repetition
ratio to the non-DP run of the same repetition.

    python benchmarks/dp_throughput.py                       # all kinds, all modes
    python benchmarks/dp_throughput.py --kinds vae --modes nondp,bk,hooks --reps 5
    python benchmarks/dp_throughput.py --out benchmarks/RESULTS-dp-throughput.md
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

from medae_core.config import ModelConfig  # noqa: E402
from medae_core.models import build_model, count_parameters  # noqa: E402
from medae_core.devices import reuse_freed_memory  # noqa: E402
from medae_core.dp_step import Stepper  # noqa: E402

ALL_MODES = ["nondp", "bk", "hooks", "ghost", "ew", "functorch"]


def make_step(kind: str, mode: str, args) -> tuple[callable, int, callable]:
    labels = ("t1", "t2", "flair") if kind == "cvae" else ()  # a conditional VAE needs its labels
    cfg = ModelConfig(kind=kind, image_size=args.image_size, channels=tuple(args.channels), latent_dim=args.latent_dim,
                      labels=labels)
    device = torch.device(args.device)
    model = build_model(cfg, seed=0).to(device)
    model.train()
    x = torch.rand(args.batch_size, 1, args.image_size, args.image_size,
                   generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    stepper = Stepper(
        model, opt, "none" if mode == "nondp" else mode,
        noise_multiplier=None if mode == "nondp" else 1.0,
        max_grad_norm=1.0,
        expected_batch_size=args.batch_size // args.group_size,
        group_size=args.group_size,
        noise_generator=torch.Generator(device=device).manual_seed(1) if mode != "nondp" else None,
    )
    gen = torch.Generator(device=device).manual_seed(2)
    cond = (torch.arange(args.batch_size, device=device) % len(labels)) if labels else None

    def step():
        x_in = model.corrupt(x, gen)
        stepper.compute_gradient(x_in, x, gen, cond)
        stepper.step()
        if device.type == "cuda":  # time the work, not its queueing
            torch.cuda.synchronize(device)

    return step, count_parameters(model), stepper.close


def measure(args) -> list[dict]:
    rows = []
    for kind in args.kinds:
        steps = {}
        peak_mb = {}
        cuda = args.device.startswith("cuda")
        for mode in args.modes:
            if cuda:  # what this mode's model and steps add to what is already held
                held = torch.cuda.memory_allocated(args.device)
                torch.cuda.reset_peak_memory_stats(args.device)
            step, n_params, close = make_step(kind, mode, args)
            for _ in range(args.warmup):
                step()
            if cuda:
                peak_mb[mode] = (torch.cuda.max_memory_allocated(args.device) - held) / 2**20
            steps[mode] = (step, close)
        wall = {m: [] for m in steps}
        cpu = {m: [] for m in steps}
        for _ in range(args.reps):
            for mode, (step, _) in steps.items():
                n = args.slow_steps if mode in ("functorch", "ew") else args.steps
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(n):
                    step()
                wall[mode].append(args.batch_size * n / (time.perf_counter() - w0))
                cpu[mode].append(args.batch_size * n / (time.process_time() - c0))
        for _, close in steps.values():
            close()
        base = wall.get("nondp")
        for mode in steps:
            ratios = [a / b for a, b in zip(wall[mode], base)] if base else []
            cpu_ratios = [a / b for a, b in zip(cpu[mode], cpu["nondp"])] if base else []
            rows.append(
                dict(
                    kind=kind, mode=mode, params=n_params,
                    ips=statistics.median(wall[mode]),
                    ratio=statistics.median(ratios) if ratios else float("nan"),
                    cpu_ratio=statistics.median(cpu_ratios) if cpu_ratios else float("nan"),
                    spread=(min(wall[mode]), max(wall[mode])),
                    peak_mb=peak_mb.get(mode),
                )
            )
            r = rows[-1]
            print(
                f"{kind:4s} {mode:9s} {r['ips']:8.1f} img/s  x{r['ratio']:.3f} (cpu-time x{r['cpu_ratio']:.3f})",
                flush=True,
            )
    return rows


def markdown(rows: list[dict], args, load_before, load_after, seconds) -> str:
    lines = [
        f"Command: `python benchmarks/dp_throughput.py {' '.join(sys.argv[1:])}`",
        "",
        f"- machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, device {args.device}"
        + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else ""),
        f"- load average before / after: {load_before} / {load_after}; took {seconds:.0f} s",
        f"- model: image_size {args.image_size}, channels {list(args.channels)}, latent_dim {args.latent_dim}, "
        f"batch {args.batch_size}, " + (f"{args.group_size} images per privacy unit, " if args.group_size > 1 else "") +
        f"{args.reps} repetitions x {args.steps} steps ({args.slow_steps} for ew/functorch), "
        f"{args.warmup} warm-up steps",
        "",
        "| kind | mode | params | img/s (median) | min-max img/s | DP / non-DP | same, CPU time | peak GPU MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "–" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(
            f"| {r['kind']} | {r['mode']} | {r['params']:,} | {r['ips']:.1f} | "
            f"{r['spread'][0]:.0f}-{r['spread'][1]:.0f} | {r['ratio']:.2f} | {r['cpu_ratio']:.2f} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="ae,vae,dae,sae")
    p.add_argument("--modes", default=",".join(ALL_MODES))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", default=",".join(map(str, ModelConfig().channels)), help="default: ModelConfig's")
    p.add_argument("--latent-dim", type=int, default=ModelConfig().latent_dim)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--group-size", type=int, default=1,
                   help="images per privacy unit (train.slices_per_patient); the batch is --batch-size images")
    p.add_argument("--threads", type=int, default=int(os.environ.get("MEDAE_BENCH_THREADS", "2")))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per repetition")
    p.add_argument("--slow-steps", type=int, default=1, help="steps per repetition for ew/functorch")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, help="write the markdown table here")
    args = p.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.modes = [m for m in args.modes.split(",") if m]
    if "nondp" not in args.modes:
        args.modes.insert(0, "nondp")
    args.channels = [int(c) for c in args.channels.split(",")]
    if args.group_size < 1 or args.batch_size % args.group_size:
        p.error(f"--batch-size {args.batch_size} is not a whole number of units of --group-size {args.group_size}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    t0 = time.perf_counter()
    with reuse_freed_memory():  # as train() does, for every mode alike
        rows = measure(args)
    load_after = " ".join(f"{v:.2f}" for v in os.getloadavg())
    text = markdown(rows, args, load_before, load_after, time.perf_counter() - t0)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
