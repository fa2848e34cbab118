"""How long a DP round's noise calibration takes (`calibrate_noise`, the PLD accountant, as a site runs it).

    python benchmarks/calibration.py [--reps 5]

Each row calibrates σ for one more run of ``steps`` steps at sample rate ``q`` against
the budget, after ``prior`` earlier rounds of the same size at σ = 3. The ε memos are
emptied before each repetition, so every calibration starts cold, as a new round
of a real site (which has a history of its own) does. Prints the median and the
range in milliseconds, and the σ found, as a Markdown table; then a later round of
an unchanged plan, searched and with the last round's σ as the hint.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medae_core.privacy import accounting  # noqa: E402

# (sample rate, steps, budget ε, prior rounds): the default site (51 patients, batch 16, 4 epochs), a
# five-round plan, a large site, a site in its fifth round, and an absurd budget (σ tiny, the slowest).
CASES = [(0.314, 16, 8.0, 0), (0.314, 80, 8.0, 0), (0.126, 400, 8.0, 0), (0.126, 80, 8.0, 4), (0.314, 16, 1000.0, 0)]


def clear() -> None:
    for memo in ("_pld_cached", "_rdp_cached"):
        getattr(getattr(accounting, memo, None), "cache_clear", lambda: None)()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    accounting.calibrate_noise(8.0, 1e-5, 0.3, 10, "pld")  # imports (Opacus, dp-accounting) outside the timing
    print(f"Command: `python benchmarks/calibration.py {' '.join(sys.argv[1:])}`; {platform.machine()}, "
          f"{os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.2f}\n")
    print("| q | steps | budget ε | prior rounds | σ | median ms | min-max ms |\n|---:|---:|---:|---:|---:|---:|---:|")
    for q, steps, budget, prior in CASES:
        times = []
        for _ in range(args.reps):
            clear()
            t0 = time.perf_counter()
            sigma = accounting.calibrate_noise(budget, 1e-5, q, steps, "pld", [(3.0, q, steps)] * prior)
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"| {q} | {steps} | {budget:g} | {prior} | {sigma:.4f} | {statistics.median(times):,.0f} | "
              f"{min(times):,.0f}-{max(times):,.0f} |", flush=True)

    # A later round of an unchanged plan (`PrivacyLedger.calibrate` hands the last round's σ as the hint):
    # round 2 of a 5-round plan of the default site, with and without the hint, memos emptied each time.
    q, steps, rounds = 0.314, 16, 5
    first = accounting.calibrate_noise(8.0, 1e-5, q, steps * rounds, "pld")
    print("\n| round 2 of 5, default site | σ | median ms | min-max ms |\n|---|---:|---:|---:|")
    for label, hint in (("searched (no hint)", None), ("the last round's σ as the hint", first)):
        times = []
        for _ in range(args.reps):
            clear()
            t0 = time.perf_counter()
            sigma = accounting.calibrate_noise(8.0, 1e-5, q, steps * (rounds - 1), "pld", [(first, q, steps)],
                                               hint=hint)
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"| {label} | {sigma:.4f} | {statistics.median(times):,.0f} | {min(times):,.0f}-{max(times):,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
