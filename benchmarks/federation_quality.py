"""Quality of the default federation against its baselines, written to BENCHMARKS.md.

    .venv/bin/python benchmarks/federation_quality.py [--out runs/bench-quality] [--config FILE]

Runs `medae simulate --baselines` (the README's main job) on the built-in
benchmark and appends a results table, with the exact command and machine, to
BENCHMARKS.md. This is a benchmark, not a test: it takes minutes and its
numbers depend on the machine only through time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("image_auroc", "image_auprc", "pixel_auroc", "pixel_auprc", "dice_best", "dice_at_threshold")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-quality")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--results", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out} is not empty; choose a new --out", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "medae", "simulate", "--out", str(args.out), "--baselines"]
    if args.config:
        command += ["--config", str(args.config)]
    start = time.time()
    subprocess.run(command, check=True, cwd=ROOT)
    minutes = (time.time() - start) / 60
    metrics = json.loads((args.out / "metrics.json").read_text())

    def row(name, values):
        values = values or {}
        cells = ["–" if values.get(k) is None else f"{values[k]:.3f}" for k in KEYS]
        eps = values.get("epsilon")
        return f"| {name} | {' | '.join(cells)} | {'–' if eps is None else f'{eps:.2f}'} |"

    cfg = metrics["config"]
    eps = {s["site"]: s["epsilon"] for s in metrics["sites"]}
    lines = [
        "",
        f"## Federation vs baselines — {time.strftime('%Y-%m-%d')}",
        "",
        f"Command: `{' '.join(['python', '-m', 'medae', *command[3:]]).replace(str(ROOT) + '/', '')}` "
        f"({minutes:.1f} min wall time on {os.cpu_count()} CPU cores, {platform.machine()}, no GPU).",
        f"Built-in benchmark: {cfg['federation']['sites']} sites × {cfg['federation']['benchmark_patients']} "
        f"patients, seed {cfg['federation']['benchmark_seed']}; model {cfg['model']['kind']} "
        f"{cfg['model']['image_size']}px; {cfg['federation']['rounds']} rounds × {cfg['train']['epochs']} epochs; "
        f"privacy unit {cfg['privacy']['unit']}, budget ε = {cfg['privacy']['budget_epsilon']} per site, "
        f"δ = {cfg['privacy']['delta']}. Final ε per site: "
        + ", ".join(f"{k} {v:.2f}" for k, v in eps.items()) + ".",
        "",
        "All rows are evaluated exactly on the pooled test sets of all sites, thresholds from healthy validation "
        "images (the federated threshold from pooled histograms). ε is each model's own spending.",
        "",
        "| scorer | " + " | ".join(k.replace("_", " ") for k in KEYS) + " | ε |",
        "|---" * (len(KEYS) + 2) + "|",
        row("federated, pooled-histogram metrics", metrics.get("test")),
    ]
    for name, values in (metrics.get("baselines") or {}).items():
        lines.append(row(name, values))
    with args.results.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
