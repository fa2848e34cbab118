"""Scale in data: one site of 150, 300 and 1,000 patients -- the writer, the scan and a training epoch.

About 500 lines, on purpose: three phases measured side by side in one child process per
size (each phase one function, in the order they run), then the JSON, the plot and the tables.

    python benchmarks/scale_data.py [--patients 150,300,1000] [--test-fraction 0.1] [--repeats 2] [--threads 0] [--out /tmp/scale-data]
    python benchmarks/scale_data.py --reuse --out DIR        # again from OUT/size-N.json: memory children, table, plot
    python benchmarks/scale_data.py --one 300 --out DIR      # one size only, in this process (what the sweep runs)
    python benchmarks/scale_data.py --combine A.json,B.json --out DIR   # table and plot of earlier runs

Each size N runs in a fresh child process (``--one N``), so that its peak RSS is
its own, and does, one after the other:

1. **Writer.** ``medae_core.benchmark.make_benchmark(OUT/data-N, sites=1,
   patients=N, test_patients=T, seed=0)`` with T = round(N * --test-fraction)
   (at least 2), its default worker processes (every usable CPU from 60
   patients on). Wall time, DICOM files written, files/s. An existing
   OUT/data-N with a benchmark.json is reused and its recorded time reported.
2. **Scan**, every timing on the same files, which the writer has just left in
   the OS page cache (so this is decoding, not disk):
   - ``medae_core.site.load_site_data(site, RunConfig())``, what training calls
     (train/ and test/, worker processes from 300 files on); its in-process
     ``lru_cache`` (``_load_site_data_cached.cache_clear()``) is cleared before
     every timing, so each is a real load;
   - a plain single-process loop of ``pydicom.dcmread(path).pixel_array`` over
     the same .dcm files (no normalisation, no resize, no split): the raw
     decoding cost the scan adds its work to;
   - with the image cache on (``data.cache = true``, ``$MEDAE_CACHE_DIR`` an
     empty folder OUT/cache-N): the first (cold: decodes and writes the cache)
     and second (warm: reads the cache) load.
   - once, the scan's per-file work (``medae_core.data.dataset._read_sized``:
     decode, checks, intensity scaling, resize to 64 px) in a plain loop in this
     process: the same work as the scan without its worker processes, next to
     the plain loop.
   The uncached scan and the plain loop run ``--repeats`` times, interleaved;
   the table gives the fastest of each, the JSON every repetition.
3. **Training**: one ``medae_core.training.train`` call of the default model
   (``build_model(cfg.model, seed=0)``, random weights: the work per step
   does not depend on them) on the scanned site, for **one epoch**:
   - DP: ``plan_training(n_train_patients, cfg.train, epochs=1)`` (privacy
     unit = patient, the default: a step samples patients with probability
     batch / patients, one slice each), ``noise_multiplier=1.0, dp_seed=0``;
   - non-DP on the same plan (``noise_multiplier=None``): same units, shuffled
     batches, same number of steps;
   - non-DP as a non-private site round plans it (``SiteTrainer`` switches the
     unit to "image" without DP): ``plan_training(len(train_images), ...)``,
     every training image once.
   Seconds (train()'s own timer), steps, images, images/s; DP / non-DP ratio.
   Two untimed 2-step calls (DP, non-DP) come first (the first DP call imports
   Opacus and builds its hooks: a one-off cost a long-lived site process pays
   once); the three timed calls then run ``--repeats`` times, interleaved, and
   the table gives the fastest of each (the JSON every repetition).

Memory: the child's peak RSS (``resource.getrusage``, ru_maxrss) after each
phase (an upper bound: the sweep holds several loads of the site at once), the
site's images in memory (train, validation, test arrays' nbytes), and, in a
second fresh child (``--memory N``), the peak RSS of what one site round does
with its data: one uncached ``load_site_data`` and one DP epoch, with the RSS
of the scan's worker processes sampled (psutil, every 0.1 s) during the load.
The writer's progress callbacks are kept as a timeline (seconds, patients
done); first_progress_s is when the first one reported any patient done.
Load averages (``os.getloadavg()``) are recorded before and after each size,
the writer and the training. ``--reuse`` keeps the OUT/size-N.json files
already there (and the machine and load of the sweep that made them) and runs
only the memory children and the aggregation.

Writes OUT/scale_data.json (all numbers and the machine), OUT/scale_data.png
(seconds against patients per site, log-log, and per patient) and prints
Markdown tables. Sizes run one at a time; nothing else should run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_site(n: int, test: int, out: Path) -> dict:
    """Write (or reuse) OUT/data-N and return the writer's numbers."""
    from medae_core.benchmark import make_benchmark

    data = out / f"data-{n}"
    record = out / f"data-{n}.writer.json"
    if not (data / "benchmark.json").exists() or not record.exists():
        shutil.rmtree(data, ignore_errors=True)
        load_before = _loadavg()
        timeline: list[tuple[float, int]] = []
        started = time.perf_counter()
        make_benchmark(data, sites=1, patients=n, test_patients=test, seed=0,
                       progress=lambda done, total: timeline.append((time.perf_counter() - started, done)))
        seconds = time.perf_counter() - started
        dcm = sum(1 for _ in data.rglob("*.dcm"))
        png = sum(1 for _ in data.rglob("*.png"))
        size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
        record.write_text(json.dumps({"seconds": seconds, "dicom_files": dcm, "png_masks": png,
                                      "bytes_on_disk": size, "load_before": load_before, "timeline": timeline,
                                      "load_after": _loadavg(), "reused": False}))
        writer = json.loads(record.read_text())
    else:
        writer = json.loads(record.read_text()) | {"reused": True}
    writer["files_per_s"] = writer["dicom_files"] / writer["seconds"]
    summary = json.loads((data / "benchmark.json").read_text())
    writer["site"] = summary["sites"][0]["name"]
    writer["train_patients"] = summary["sites"][0]["train"]["patients"]
    writer["test_patients"] = test
    return writer


def plain_loop(files: list[Path]) -> dict:
    """Single process: pydicom.dcmread(path).pixel_array for every file."""
    import pydicom

    started = time.perf_counter()
    pixels = 0
    for path in files:
        pixels += pydicom.dcmread(path).pixel_array.size
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "files": len(files), "files_per_s": len(files) / seconds, "pixels": pixels}


def scan_work_one_process(site: Path) -> dict:
    """What each scan worker does per file (decode, checks, intensity, resize: `_read_sized`), in this process."""
    from medae_core.config import RunConfig
    from medae_core.data.dataset import _read_sized

    data = RunConfig().data
    files = [(path, part) for part in (site / "train", site / "test") for path in sorted(part.rglob("*.dcm"))]
    started = time.perf_counter()
    for path, part in files:
        _read_sized(path, str(path.relative_to(part)), data, 64)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "files": len(files), "files_per_s": len(files) / seconds,
            "ms_per_file": seconds / len(files) * 1000}


class _RssSampler(threading.Thread):
    """Largest RSS of this process, of one of its children (the scan's workers) and of all children, every 0.1 s."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.me, self.psutil = psutil.Process(), psutil
        self.main = self.child = self.children = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.main = max(self.main, self.me.memory_info().rss)
            rss = []
            for kid in self.me.children(recursive=True):
                try:
                    rss.append(kid.memory_info().rss)
                except self.psutil.Error:
                    pass
            self.child, self.children = max([self.child, *rss]), max(self.children, sum(rss))
            self._done.wait(0.1)

    def stop(self) -> dict:
        self._done.set()
        self.join(timeout=5)
        return {"main_mib": self.main / 2**20, "largest_child_mib": self.child / 2**20,
                "children_sum_mib": self.children / 2**20}


def memory_only(n: int, out: Path) -> dict:
    """Peak RSS of a fresh process that does what one site round does with its data: load it once, one DP epoch."""
    from medae_core.config import RunConfig
    from medae_core.site import load_site_data
    from medae_core.units import plan_training

    summary = json.loads((out / f"data-{n}" / "benchmark.json").read_text())
    cfg = RunConfig()
    base = _maxrss_mib()
    sampler = _RssSampler()
    sampler.start()
    started = time.perf_counter()
    data = load_site_data(out / f"data-{n}" / summary["sites"][0]["name"], cfg)
    load_s = time.perf_counter() - started
    during_load = sampler.stop()
    after_load = _maxrss_mib()
    plan = plan_training(data.n_train_patients, cfg.train, epochs=1)
    train_once(data, cfg, plan, 1.0, data.train_patients)
    # RUSAGE_CHILDREN's ru_maxrss is not given: it reported the parent's size at each worker's start, not the
    # worker's own memory (the sampled worker RSS above is).
    return {"rss_after_imports_mib": base, "peak_rss_after_load_mib": after_load, "peak_rss_mib": _maxrss_mib(),
            "load_s_while_sampled": load_s, "sampled_during_load": during_load}


def scan(site: Path, cfg) -> tuple[dict, object]:
    """load_site_data as training calls it, its per-process cache cleared first."""
    from medae_core.site import _load_site_data_cached, load_site_data

    _load_site_data_cached.cache_clear()
    started = time.perf_counter()
    data = load_site_data(site, cfg)
    seconds = time.perf_counter() - started
    _load_site_data_cached.cache_clear()
    test_images = 0 if data.test is None else len(data.test.images)
    n_images = len(data.train_images) + len(data.val_images) + test_images
    return {"seconds": seconds, "images": n_images}, data


def train_once(data, cfg, plan, noise_multiplier: float | None, patient_index) -> dict:
    import torch

    from medae_core.models import build_model
    from medae_core.training import train

    model = build_model(cfg.model, seed=0)
    result = train(model, data.train_images, patient_index, plan, cfg, noise_multiplier=noise_multiplier,
                   dp_seed=0 if noise_multiplier is not None else None, device="cpu")
    return {"seconds": result.seconds, "steps": result.steps_taken, "images": result.num_examples,
            "images_per_s": result.images_per_second, "units": plan.n_units, "sample_rate": plan.sample_rate,
            "grad_sample_mode": result.grad_sample_mode, "torch_threads": torch.get_num_threads(),
            "loss": result.mean_loss}


def one_size(n: int, test: int, out: Path, repeats: int, threads: int = 0) -> dict:
    """Everything for one size, in this process; returns (and writes OUT/size-N.json) the numbers."""
    import numpy as np

    from medae_core.config import RunConfig
    from medae_core.data import cache as image_cache
    from medae_core.units import plan_training

    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"patients": n, "test_patients": test, "load_before": _loadavg()}
    writer = write_site(n, test, out)
    result["writer"] = writer
    result["rss_after_writer_mib"] = _maxrss_mib()
    site = out / f"data-{n}" / writer["site"]
    files = sorted(site.rglob("*.dcm"))

    cfg = RunConfig().with_overrides({"train.num_threads": threads})  # 0: torch's default, as configured
    scans, loops = [], []
    data = None
    for _ in range(repeats):  # interleaved, so background load hits both alike
        timing, data = scan(site, cfg)
        scans.append(timing)
        loops.append(plain_loop(files))
    for s in scans:
        s["files_per_s"] = len(files) / s["seconds"]
    result["scan"] = {"files": len(files), "runs": scans, "best_s": min(s["seconds"] for s in scans),
                      "images": scans[0]["images"]}
    result["scan"]["files_per_s"] = len(files) / result["scan"]["best_s"]
    result["plain_dcmread"] = {"runs": loops, "best_s": min(x["seconds"] for x in loops)}
    result["plain_dcmread"]["files_per_s"] = len(files) / result["plain_dcmread"]["best_s"]
    result["scan_work_one_process"] = scan_work_one_process(site)
    result["scan_over_plain_speed"] = result["scan"]["files_per_s"] / result["plain_dcmread"]["files_per_s"]

    cache_root = out / f"cache-{n}"
    shutil.rmtree(cache_root, ignore_errors=True)
    cache_root.mkdir(parents=True)
    os.environ[image_cache.CACHE_ENV] = str(cache_root)
    cached_cfg = cfg.with_overrides({"data.cache": True})
    cold, cold_data = scan(site, cached_cfg)
    entries, size = image_cache.usage(cache_root)
    warm, warm_data = scan(site, cached_cfg)
    same = bool(np.array_equal(cold_data.train_images, warm_data.train_images)
                and np.array_equal(cold_data.train_images, data.train_images))
    del cold_data, warm_data
    result["cache"] = {"cold_s": cold["seconds"], "warm_s": warm["seconds"],
                       "cold_files_per_s": len(files) / cold["seconds"],
                       "warm_files_per_s": len(files) / warm["seconds"],
                       "warm_speedup_vs_uncached": result["scan"]["best_s"] / warm["seconds"],
                       "cold_cost_vs_uncached": cold["seconds"] / result["scan"]["best_s"],
                       "entries": entries, "bytes": size, "same_images_as_uncached": same}
    shutil.rmtree(cache_root, ignore_errors=True)
    os.environ.pop(image_cache.CACHE_ENV, None)

    test_bytes = 0 if data.test is None else int(data.test.images.nbytes)
    result["memory"] = {"train_images_bytes": int(data.train_images.nbytes),
                        "val_images_bytes": int(data.val_images.nbytes), "test_images_bytes": test_bytes,
                        "train_images": len(data.train_images), "val_images": len(data.val_images),
                        "train_patients": data.n_train_patients, "skipped_files": data.skipped,
                        "image_shape": list(data.train_images.shape[1:]),
                        "rss_after_scans_mib": _maxrss_mib()}

    plan = plan_training(data.n_train_patients, cfg.train, epochs=1)
    image_cfg = cfg.with_overrides({"privacy.enabled": False, "privacy.unit": "image"})
    image_plan = plan_training(len(data.train_images), image_cfg.train, epochs=1)
    # Warm-up (untimed in the table): the first DP call imports Opacus and sets up its hooks.
    warm_plan = dataclasses.replace(plan, steps=2, steps_per_epoch=2)
    started = time.perf_counter()
    train_once(data, cfg, warm_plan, 1.0, data.train_patients)
    train_once(data, cfg, warm_plan, None, data.train_patients)
    warmup_s = time.perf_counter() - started
    load_before_training = _loadavg()
    runs: dict[str, list[dict]] = {"dp": [], "nondp_same_plan": [], "nondp_unit_image": []}
    for _ in range(repeats):  # interleaved, so background load hits all three alike
        runs["dp"].append(train_once(data, cfg, plan, 1.0, data.train_patients))
        result["memory"]["rss_after_dp_mib"] = _maxrss_mib()
        runs["nondp_same_plan"].append(train_once(data, cfg, plan, None, data.train_patients))
        runs["nondp_unit_image"].append(train_once(data, image_cfg, image_plan, None,
                                                   np.arange(len(data.train_images))))
    best = {k: min(v, key=lambda x: x["seconds"]) | {"all_seconds": [x["seconds"] for x in v]}
            for k, v in runs.items()}
    result["training"] = {"epochs": 1, "batch_size": cfg.train.batch_size, "warmup_s": warmup_s,
                          "load_before": load_before_training, **best,
                          "dp_over_nondp_images_per_s": best["dp"]["images_per_s"]
                          / best["nondp_same_plan"]["images_per_s"]}
    result["memory"]["peak_rss_mib"] = _maxrss_mib()
    result["load_after"] = _loadavg()
    (out / f"size-{n}.json").write_text(json.dumps(result, indent=2))
    return result


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        import opacus
        import pydicom

        info |= {"opacus": opacus.__version__, "pydicom": pydicom.__version__}
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        with open("/proc/meminfo") as fh:
            info["memory_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def series(results: list[dict]) -> dict[str, list[float]]:
    return {
        "benchmark writer": [r["writer"]["seconds"] for r in results],
        "scan (load_site_data, no cache)": [r["scan"]["best_s"] for r in results],
        "plain dcmread loop (1 process)": [r["plain_dcmread"]["best_s"] for r in results],
        "scan's per-file work (1 process)": [r["scan_work_one_process"]["seconds"] for r in results],
        "scan, cache cold": [r["cache"]["cold_s"] for r in results],
        "scan, cache warm": [r["cache"]["warm_s"] for r in results],
        "DP epoch (unit = patient)": [r["training"]["dp"]["seconds"] for r in results],
        "non-DP, same plan": [r["training"]["nondp_same_plan"]["seconds"] for r in results],
        "non-DP epoch (unit = image)": [r["training"]["nondp_unit_image"]["seconds"] for r in results],
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["patients"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 5.5))
    markers = "o^sDvx*Ph"
    for (label, values), m in zip(series(results).items(), markers):
        a.loglog(n, values, m + "-", label=label)
    if len(n) > 1:  # linear growth from the smallest size, for comparison
        s0 = results[0]["writer"]["seconds"]
        a.loglog(n, [s0 * x / n[0] for x in n], "k:", label="linear in patients (from the writer)")
    a.set_xlabel("patients per site")
    a.set_ylabel("seconds")
    a.set_title("Cost against patients per site (1 site)")
    a.grid(True, which="both", alpha=0.3)
    per_patient = {k: [v / x * 1000 for v, x in zip(vals, n)] for k, vals in series(results).items()}
    for (label, values), m in zip(per_patient.items(), markers):
        b.semilogx(n, values, m + "-")
    b.set_xlabel("patients per site")
    b.set_ylabel("milliseconds per patient")
    b.set_yscale("log")
    b.set_title("Cost per patient (flat = linear)")
    b.grid(True, which="both", alpha=0.3)
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(path, dpi=100)


def table(results: list[dict]) -> str:
    rows = ["| patients (test) | DICOM files | writer s (files/s) | scan s (files/s) | plain dcmread s (files/s) | "
            "scan / plain speed | scan work, 1 process s (ms/file) | cache cold s | cache warm s | "
            "train images (MiB) | DP epoch s: steps, img, img/s | non-DP same plan s: img/s | DP / non-DP img/s | "
            "non-DP unit=image s: steps, img/s | peak RSS MiB: sweep / one round |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        w, s, p, c, m, t = r["writer"], r["scan"], r["plain_dcmread"], r["cache"], r["memory"], r["training"]
        dp, nd, ni = t["dp"], t["nondp_same_plan"], t["nondp_unit_image"]
        one = (r.get("one_round_memory") or {}).get("peak_rss_mib")
        work = r.get("scan_work_one_process") or {"seconds": float("nan"), "ms_per_file": float("nan")}
        rows.append(
            f"| {r['patients']} ({r['test_patients']}) | {w['dicom_files']:,} | {w['seconds']:.1f} ({w['files_per_s']:.0f}) | "
            f"{s['best_s']:.1f} ({s['files_per_s']:.0f}) | {p['best_s']:.1f} ({p['files_per_s']:.0f}) | "
            f"{r['scan_over_plain_speed']:.2f} | {work['seconds']:.1f} ({work['ms_per_file']:.1f}) | "
            f"{c['cold_s']:.1f} | {c['warm_s']:.1f} | "
            f"{m['train_images']:,} ({m['train_images_bytes'] / 2**20:.0f}) | "
            f"{dp['seconds']:.1f}: {dp['steps']}, {dp['images']}, {dp['images_per_s']:.0f} | "
            f"{nd['seconds']:.1f}: {nd['images_per_s']:.0f} | {t['dp_over_nondp_images_per_s']:.2f} | "
            f"{ni['seconds']:.1f}: {ni['steps']}, {ni['images_per_s']:.0f} | "
            f"{m['peak_rss_mib']:.0f} / {'-' if one is None else f'{one:.0f}'} |")
    rows += ["", "| patients | train + val + test images MiB | one round: RSS after imports MiB | peak after load MiB | "
             "peak after DP epoch MiB | largest scan worker MiB (sampled) |", "|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m, one = r["memory"], r.get("one_round_memory") or {}
        images = (m["train_images_bytes"] + m["val_images_bytes"] + m["test_images_bytes"]) / 2**20
        worker = (one.get("sampled_during_load") or {}).get("largest_child_mib", float("nan"))
        rows.append(f"| {r['patients']} | {images:.0f} | {one.get('rss_after_imports_mib', float('nan')):.0f} | "
                    f"{one.get('peak_rss_after_load_mib', float('nan')):.0f} | {one.get('peak_rss_mib', float('nan')):.0f} | "
                    f"{worker:.0f} |")
    return "\n".join(rows)


def per_patient_table(results: list[dict]) -> str:
    names = list(series(results))
    rows = ["| patients | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    values = series(results)
    for i, r in enumerate(results):
        rows.append(f"| {r['patients']} | " + " | ".join(f"{values[k][i] / r['patients'] * 1000:.1f}" for k in names)
                    + " |")
    return "ms per patient:\n\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", default="150,300,1000", help="patients per site, comma-separated")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of test patients (at least 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timings of the uncached scan and the plain loop")
    parser.add_argument("--threads", type=int, default=0, help="train.num_threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per size")
    parser.add_argument("--out", type=Path, default=Path("/tmp/scale-data"))
    parser.add_argument("--one", type=int, metavar="N", help="one size, in this process (the sweep's child)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep each OUT/size-N.json already there (run only the one-round memory child)")
    parser.add_argument("--memory", type=int, metavar="N", help="only the one-round memory of size N (a child)")
    parser.add_argument("--combine", metavar="JSON,...", help="run nothing: table and plot of earlier runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        test = max(2, round(args.one * args.test_fraction))
        print(json.dumps(one_size(args.one, test, args.out, args.repeats, args.threads)), flush=True)
        return
    if args.memory is not None:
        print(json.dumps(memory_only(args.memory, args.out)), flush=True)
        return
    if args.combine:
        runs = [json.loads(Path(f).read_text()) for f in args.combine.split(",")]
        results = sorted((r for run in runs for r in run["results"]), key=lambda r: r["patients"])
        plot(results, args.out / "scale_data.png")
        print(table(results) + "\n\n" + per_patient_table(results))
        return
    info = machine() | {"load_average_start": _loadavg()}
    previous = args.out / "scale_data.json"
    if args.reuse and previous.exists():  # the timings are the earlier sweep's: keep its machine and load
        info = json.loads(previous.read_text())["machine"] | {"reuse_run": info}
    results, failed = [], []
    for n in (int(x) for x in args.patients.split(",")):
        started = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(n), "--out", str(args.out),
               "--test-fraction", str(args.test_fraction), "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
        size_json = args.out / f"size-{n}.json"
        if args.reuse and size_json.exists():
            code, wall = 0, json.loads(size_json.read_text()).get("size_wall_s")
        else:
            try:
                code = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            wall = time.perf_counter() - started
            if code == 0 and size_json.exists():
                size_json.write_text(json.dumps(json.loads(size_json.read_text()) | {"size_wall_s": wall}, indent=2))
        if code == 0 and size_json.exists():
            memory = subprocess.run(cmd[:2] + ["--memory", str(n), "--out", str(args.out)], cwd=ROOT,
                                    capture_output=True, text=True, timeout=args.timeout)
            one_round = json.loads(memory.stdout.strip().splitlines()[-1]) if memory.returncode == 0 else None
            result = json.loads(size_json.read_text()) | {"size_wall_s": wall, "one_round_memory": one_round}
            # progress callbacks: seconds into the write of the first one that reports patients done
            first = [t for t, done in result["writer"].get("timeline") or [] if done > 0]
            result["writer"]["first_progress_s"] = first[0] if first else None
            results.append(result)
        else:
            failed.append({"patients": n, "exit": code, "wall_s": wall})
        (info["reuse_run"] if "reuse_run" in info else info)["load_average_end"] = _loadavg()
        (args.out / "scale_data.json").write_text(json.dumps({"machine": info, "results": results,
                                                              "failed": failed}, indent=2))
    if results:
        plot(results, args.out / "scale_data.png")
        print(table(results) + "\n\n" + per_patient_table(results))
    for f in failed:
        print(f"size {f['patients']} did not finish: exit {f['exit']} after {f['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
