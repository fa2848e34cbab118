"""Cost against pixels: the DP and non-DP step throughput tables of several image sizes, as one plot.

    python benchmarks/dp_throughput_plot.py benchmarks/dp_throughput-2026-12-03.md [--out FILE.png]

Reads the Markdown tables `benchmarks/dp_throughput.py --out` writes (one per image
size and thread count, concatenated under "## N px, T torch thread(s)" headings, as in
benchmarks/dp_throughput-2026-12-03.md) and draws, per thread count, milliseconds per
image against image size for each model kind (non-DP dashed, DP solid), and the DP /
non-DP throughput ratio against image size with the 0.9 target.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path


def read_tables(text: str) -> dict:
    """{(threads, kind): {size: {"nondp": img/s, "bk": img/s, "ratio": DP/non-DP}}}."""
    rows: dict = defaultdict(lambda: defaultdict(dict))
    size = threads = None
    for line in text.splitlines():
        heading = re.match(r"## (\d+) px, (\d+) torch thread", line)
        if heading:
            size, threads = int(heading.group(1)), int(heading.group(2))
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if size is None or len(cells) < 6 or cells[1] not in ("nondp", "bk"):
            continue
        kind, mode, ips, ratio = cells[0], cells[1], float(cells[3]), float(cells[5])
        rows[(threads, kind)][size][mode] = ips
        if mode == "bk":
            rows[(threads, kind)][size]["ratio"] = ratio
    return rows


def plot(rows: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({t for t, _ in rows})
    fig, axes = plt.subplots(2, len(threads), figsize=(5.5 * len(threads), 8), squeeze=False)
    for col, t in enumerate(threads):
        cost, ratio = axes[0][col], axes[1][col]
        for (tt, kind), by_size in sorted(rows.items()):
            if tt != t:
                continue
            sizes = sorted(by_size)
            line, = cost.plot(sizes, [1000 / by_size[s]["bk"] for s in sizes], "o-", label=f"{kind} DP")
            cost.plot(sizes, [1000 / by_size[s]["nondp"] for s in sizes], "o--", color=line.get_color(), alpha=0.6,
                      label=f"{kind} non-DP")
            ratio.plot(sizes, [by_size[s]["ratio"] for s in sizes], "o-", color=line.get_color(), label=kind)
        for ax in (cost, ratio):
            ax.set_xscale("log", base=2)
            ax.set_xticks([64, 128, 256], ["64", "128", "256"])
            ax.set_xlabel("image size (px)")
        cost.set_yscale("log")
        cost.set_ylabel("ms per image (one training step)")
        cost.set_title(f"{t} torch thread{'s' if t > 1 else ''}: cost against pixels")
        ratio.axhline(0.9, color="grey", linestyle=":", label="target 0.9")
        ratio.set_ylim(0.5, 1.05)
        ratio.set_ylabel("DP / non-DP images per second")
        ratio.set_title(f"{t} torch thread{'s' if t > 1 else ''}: DP against non-DP")
    axes[0][-1].legend(fontsize=7, ncol=2)
    axes[1][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tables", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = read_tables(args.tables.read_text())
    if not rows:
        raise SystemExit(f"{args.tables}: no dp_throughput tables under '## N px, T torch thread(s)' headings")
    out = args.out or args.tables.with_suffix(".png")
    plot(rows, out)
    print(out)


if __name__ == "__main__":
    main()
