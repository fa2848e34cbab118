"""One sweep of the simulation's message poller: Flower 1.41's against medae's (`medae.sim_poller`).

    python benchmarks/sim_poller.py [--nodes 10,100,1000] [--reps 3]

For each federation size n: a real in-memory LinkState with n virtual nodes and
one message for each (a round's start, as the ServerApp pushes it), then
- "first sweep": the sweep that delivers all n messages;
- "idle sweep": a sweep after they were delivered, while the sites train: the
  messages stay stored until their replies are pulled, and Flower's poller
  repeats this sweep every 0.1 s for the whole round.
Median milliseconds over --reps fresh states. Prints a Markdown table.
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

from medae.sim_poller import deliver_pending  # noqa: E402
from tests.flower_state import federation, flower_sweep, push  # noqa: E402


def timed(sweep, state, nodes) -> tuple[float, int]:
    t0 = time.perf_counter()
    delivered = sweep(state, nodes)
    return 1000 * (time.perf_counter() - t0), len(delivered)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default="10,100,1000")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    import flwr

    print(f"Command: `python benchmarks/sim_poller.py {' '.join(sys.argv[1:])}`\n")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
          f"flwr {flwr.__version__}; load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print("| nodes | poller | first sweep ms | idle sweep ms | share of a core while idle (sweep every 0.1 s) |")
    print("|---:|---|---:|---:|---:|")
    for n in [int(v) for v in args.nodes.split(",")]:
        for name, sweep in (("Flower 1.41", flower_sweep), ("medae", deliver_pending)):
            first, idle = [], []
            for _ in range(args.reps):
                state, nodes, grid = federation(n)
                push(grid, nodes)
                ms, count = timed(sweep, state, nodes)
                assert count == n, f"{name} delivered {count} of {n}"
                first.append(ms)
                ms, count = timed(sweep, state, nodes)
                assert count == 0
                idle.append(ms)
            f, i = statistics.median(first), statistics.median(idle)
            print(f"| {n:,} | {name} | {f:.1f} | {i:.2f} | {100 * i / (i + 100):.0f} % |", flush=True)


if __name__ == "__main__":
    main()
