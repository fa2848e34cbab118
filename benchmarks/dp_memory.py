"""Peak memory of a DP training step against a non-DP one, per model kind and image size (CPU).

    python benchmarks/dp_memory.py [--kinds ae,vae,dae,sae,cvae,hvae] [--sizes 64,128,256] \
        [--batch-size 16] [--steps 3] [--threads 1] [--repeats 3] [--out FILE.md]

Each (kind, size, mode) runs in a fresh child process, ``--repeats`` times
(modes alternating), one after another, so that each peak is its own; the table
gives the median and the range. The heap's layout makes a single child's peak
vary by tens of MiB at 256 px. The child builds the step exactly as
`benchmarks/dp_throughput.py` does (the production `Stepper`: the same model,
batch of ``--batch-size`` random images, Adam; "bk" is what
``grad_sample_mode = "auto"`` runs), inside `reuse_freed_memory` as ``train()``
runs it. It then resets the kernel's high-water mark of its resident memory
(``/proc/self/clear_refs`` = 5, Linux), notes its resident memory, takes
``--steps`` steps (the first one allocates Adam's state and Opacus' buffers) and
reads the high-water mark (``VmHWM``). "Step MiB" is that peak less the resident
memory before the first step: everything training adds to the model and the
batch (activations, gradients, optimizer state, per-sample norms and gradients,
the noise). Linux only; on a GPU, `dp_throughput.py`'s "peak GPU MiB" column is
the counterpart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("ae", "vae", "dae", "sae", "cvae", "hvae")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(kind: str, mode: str, size: int, batch: int, steps: int, threads: int) -> dict:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import torch
    from dp_throughput import make_step

    from medae_core.config import ModelConfig
    from medae_core.devices import reuse_freed_memory

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    args = argparse.Namespace(image_size=size, channels=list(ModelConfig().channels),
                              latent_dim=ModelConfig().latent_dim, batch_size=batch, device="cpu")
    with reuse_freed_memory():
        step, n_params, close = make_step(kind, mode, args)
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
        before = _status_kib("VmRSS")
        started = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - started
        peak = _status_kib("VmHWM")
        close()
    return {"kind": kind, "mode": mode, "size": size, "params": n_params, "rss_before_mib": before / 1024,
            "peak_mib": peak / 1024, "step_mib": (peak - before) / 1024, "seconds_per_step": seconds / steps}


def run_child(kind: str, mode: str, size: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{kind},{mode},{size}", "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {mode} {size} px failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| kind | px | params | non-DP step MiB (range) | DP step MiB (range) | DP / non-DP | "
             "non-DP peak RSS MiB | DP peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, size in dict.fromkeys((r["kind"], r["size"]) for r in rows):
        runs = {m: [r for r in rows if (r["kind"], r["size"], r["mode"]) == (kind, size, m)] for m in ("nondp", "bk")}
        step = {m: statistics.median(r["step_mib"] for r in v) for m, v in runs.items()}
        peak = {m: statistics.median(r["peak_mib"] for r in v) for m, v in runs.items()}
        spread = {m: f"{min(r['step_mib'] for r in v):.0f}–{max(r['step_mib'] for r in v):.0f}"
                  for m, v in runs.items()}
        lines.append(f"| {kind} | {size} | {runs['bk'][0]['params']:,} | {step['nondp']:.0f} ({spread['nondp']}) | "
                     f"{step['bk']:.0f} ({spread['bk']}) | {step['bk'] / step['nondp']:.2f} | "
                     f"{peak['nondp']:.0f} | {peak['bk']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--sizes", default="64,128,256")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="children per kind, size and mode")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per child")
    p.add_argument("--out", type=Path, help="write the Markdown table and the command here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, mode, size = args.child.split(",")
        print(json.dumps(child(kind, mode, int(size), args.batch_size, args.steps, args.threads)))
        return
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("dp_memory.py reads the kernel's peak-memory counters: Linux only")
    load_before = os.getloadavg()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for kind in args.kinds.split(","):
            for _ in range(args.repeats):
                for mode in ("nondp", "bk"):
                    rows.append(run_child(kind, mode, size, args))
                    r = rows[-1]
                    print(f"{kind:5s} {size:4d} px {mode:6s} step {r['step_mib']:7.1f} MiB  "
                          f"peak {r['peak_mib']:7.1f} MiB", flush=True)
    text = (f"Command: `python benchmarks/dp_memory.py {' '.join(sys.argv[1:])}`\n\n"
            f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; "
            f"batch {args.batch_size}, {args.steps} steps, {args.threads} torch thread(s), "
            f"{args.repeats} children per cell; load average "
            f"{' '.join(f'{v:.2f}' for v in load_before)} before, "
            f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} after\n\n" + table(rows))
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
