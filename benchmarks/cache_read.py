"""A site's read with the decoded-image cache: uncached, cold (fills it) and warm (a later run or message).

    python benchmarks/cache_read.py DATA [DATA ...] [--repeats 3] [--out FILE.json]

DATA is a site folder (``train/`` and optionally ``test/``), e.g. one that
``benchmarks/scale_data.py`` or ``medae benchmark`` wrote. For each, ``--repeats``
times and interleaved: ``load_site_data`` with ``RunConfig()`` (no cache), then
with ``data.cache = true`` into a fresh, empty ``$MEDAE_CACHE_DIR`` (cold), then
again (warm). The in-process cache of ``load_site_data`` is cleared before every
load, so each is a real read, as in a deployed site's fresh process per message.
Reports the fastest of each, every repetition, and whether the three gave the
same images. To compare code versions, run the same command with
``PYTHONPATH`` pointing at another checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def timed_load(site: Path, cfg):
    from medae_core.site import _load_site_data_cached, load_site_data

    _load_site_data_cached.cache_clear()
    started = time.perf_counter()
    data = load_site_data(site, cfg)
    seconds = time.perf_counter() - started
    _load_site_data_cached.cache_clear()
    return seconds, data


def measure(site: Path, repeats: int) -> dict:
    import numpy as np

    import medae_core
    from medae_core.config import RunConfig
    from medae_core.data import cache as image_cache

    plain, cached = RunConfig(), RunConfig().with_overrides({"data.cache": True})
    runs = []
    for _ in range(repeats):
        root = Path(tempfile.mkdtemp(prefix="medae-cache-bench-"))
        os.environ[image_cache.CACHE_ENV] = str(root)
        try:
            uncached_s, a = timed_load(site, plain)
            cold_s, b = timed_load(site, cached)
            warm_s, c = timed_load(site, cached)
            entries, size = image_cache.usage(root)
        finally:
            os.environ.pop(image_cache.CACHE_ENV, None)
            shutil.rmtree(root, ignore_errors=True)
        same = all(np.array_equal(getattr(a, k), getattr(x, k))
                   for x in (b, c) for k in ("train_images", "val_images", "train_patients"))
        runs.append({"uncached_s": uncached_s, "cold_s": cold_s, "warm_s": warm_s, "entries": entries,
                     "bytes": size, "same_images": same})
    best = {k: min(r[k] for r in runs) for k in ("uncached_s", "cold_s", "warm_s")}
    return {"site": str(site), "files": sum(1 for p in site.rglob("*") if p.is_file()),
            "code": str(Path(medae_core.__file__).parent.parent), "runs": runs, "best": best,
            "warm_speedup_vs_uncached": best["uncached_s"] / best["warm_s"],
            "same_images": all(r["same_images"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version(), "load_before": os.getloadavg()},
               "sites": [measure(site, args.repeats) for site in args.data]}
    results["machine"]["load_after"] = os.getloadavg()
    print("| site | files | uncached s | cache cold s | cache warm s | warm / uncached speed | same images |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results["sites"]:
        b = r["best"]
        print(f"| {r['site']} | {r['files']:,} | {b['uncached_s']:.2f} | {b['cold_s']:.2f} | {b['warm_s']:.2f} | "
              f"{r['warm_speedup_vs_uncached']:.1f}× | {r['same_images']} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
