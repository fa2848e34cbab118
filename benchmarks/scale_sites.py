"""Scale in sites: `medae simulate` with 10, 100, 1,000 small virtual sites on one machine.

    python benchmarks/scale_sites.py [--sites 10,100,1000] [--patients 10] [--rounds 2] [--cache] [--reference]
                                     [--out runs/scale-sites]
    python benchmarks/scale_sites.py --combine A.json,B.json --out DIR    # one table and plot of several runs

For each federation size N:
1. the benchmark writer makes N sites of ``--patients`` patients each (timed on
   its own, in this process);
2. ``medae simulate`` runs on it in a subprocess (default config otherwise: the
   AE at 64 px from the public start, DP at ε = 8, every round evaluated), while
   the whole process tree (the command, Ray's GCS, raylet and actors) is sampled
   every 0.5 s for its resident memory: RSS summed over processes (an upper
   bound: shared pages count once per process) and PSS (shared pages split);
3. its metrics.json gives each round's training and evaluation seconds and each
   site's status; start-up is the wall time outside the rounds.

The federation alone (``--no-reference``) unless ``--reference``: then the command as
a user runs it, with the non-private reference trained and scored after the
federation: that phase (the sites' images pooled, the reference trained, every row
scored, the report redrawn) timed from the federation's last log line, and its
peak memory sampled on its own.

Writes OUT/scale_sites.json, OUT/scale_sites.png (cost against sites) and
prints a Markdown table. Sizes run one at a time; nothing else should run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class TreeMemory(threading.Thread):
    """Peak resident memory of a process and all its descendants, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.phase_peak_rss = self.phase_peak_pss = 0  # since `mark`
        self._phase = False
        self._done = threading.Event()

    def mark(self) -> None:
        """Start a second peak, of what follows."""
        self._phase = True

    def run(self) -> None:
        import psutil

        while not self._done.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            rss = pss = 0
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            if self._phase:
                self.phase_peak_rss, self.phase_peak_pss = max(self.phase_peak_rss, rss), max(self.phase_peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(procs))
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


FEDERATION_DONE = re.compile(r"run \w+ complete: ")  # the ServerApp's last line; the reference follows


def one_size(n: int, patients: int, rounds: int, out: Path, timeout: float, cache: bool = False,
             reference: bool = False) -> dict:
    from medae_core.benchmark import make_benchmark

    data = out / f"data-{n}"
    if not (data / "benchmark.json").exists():
        started = time.perf_counter()
        make_benchmark(data, sites=n, patients=patients, test_patients=max(2, patients // 3))
        write_s = time.perf_counter() - started
        (out / f"data-{n}.seconds").write_text(f"{write_s}\n")
    write_s = float((out / f"data-{n}.seconds").read_text())
    tag = f"{n}" + ("-cache" if cache else "") + ("-reference" if reference else "")
    run = out / f"run-{tag}"
    if run.exists():  # a fresh run, not a resume of the last one
        shutil.rmtree(run)
    config = out / f"config-{tag}.toml"
    config.write_text(f"[federation]\nmin_sites = {min(n, 2)}\n" + ("[data]\ncache = true\n" if cache else ""))
    env = os.environ.copy()
    if cache:  # an empty cache of its own: round 1 fills it, later rounds read it
        shutil.rmtree(out / f"cache-{n}", ignore_errors=True)
        env["MEDAE_CACHE_DIR"] = str(out / f"cache-{n}")
    cmd = [sys.executable, "-m", "medae", "simulate", "--config", str(config), "--data", str(data),
           "--sites", str(n), "--rounds", str(rounds), "--out", str(run)] + ([] if reference else ["--no-reference"])
    log = (out / f"run-{tag}.log").open("w")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=env, text=True)
    memory = TreeMemory(proc.pid)
    memory.start()
    reference_at = []

    def tee() -> None:  # the log to its file, and when the reference starts
        for line in proc.stdout:
            log.write(line)
            if reference and not reference_at and FEDERATION_DONE.search(line):
                reference_at.append(time.perf_counter() - started)
                memory.mark()

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "timeout"
    wall = time.perf_counter() - started
    reader.join(timeout=10)
    memory.stop()
    log.close()
    result = {"sites": n, "image_cache": cache, "reference": reference, "patients_per_site": patients,
              "rounds": rounds, "exit_code": code, "benchmark_write_s": write_s, "wall_s": wall,
              "peak_rss_gib": memory.peak_rss / 2**30, "peak_pss_gib": memory.peak_pss / 2**30,
              "peak_processes": memory.peak_processes}
    if reference_at:
        result |= {"reference_s": wall - reference_at[0], "reference_peak_pss_gib": memory.phase_peak_pss / 2**30,
                   "reference_peak_rss_gib": memory.phase_peak_rss / 2**30}
    metrics_path = run / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        per_round = [{"round": r["round"], "train_s": r.get("train_seconds"), "eval_s": r.get("eval_seconds"),
                      "ok": sum(s.get("status") == "ok" for s in r.get("sites", {}).values()),
                      "not_ok": {k: s.get("status") for k, s in r.get("sites", {}).items()
                                 if s.get("status") != "ok"}} for r in metrics["rounds"]]
        in_rounds = sum((r["train_s"] or 0) + (r["eval_s"] or 0) for r in per_round)
        result |= {"per_round": per_round, "outside_rounds_s": wall - in_rounds - result.get("reference_s", 0),
                   "baselines_auroc": {k: v.get("image_auroc") for k, v in metrics.get("baselines", {}).items()},
                   "image_auroc": (metrics.get("test") or {}).get("image_auroc"),
                   "intensity_baseline_auroc": (metrics.get("intensity_baseline") or {}).get("image_auroc"),
                   "metrics_json_kib": metrics_path.stat().st_size / 1024,
                   "report_html_kib": (run / "report.html").stat().st_size / 1024
                   if (run / "report.html").exists() else None}
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.get("per_round")]
    sites = [r["sites"] for r in done]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.loglog(sites, [r["per_round"][-1]["train_s"] for r in done], "o-", label="training (last round)")
    a.loglog(sites, [r["per_round"][-1]["eval_s"] or 0 for r in done], "s-", label="evaluation (last round)")
    a.loglog(sites, [r["benchmark_write_s"] for r in done], "^-", label="benchmark writer")
    if len(done) > 1:  # linear growth from the smallest size, for comparison
        s0, t0 = sites[0], done[0]["per_round"][-1]["train_s"]
        a.loglog(sites, [t0 * s / s0 for s in sites], "k:", label="linear in sites")
    a.set_xlabel("virtual sites")
    a.set_ylabel("seconds")
    a.set_title("Time against sites")
    a.legend(fontsize=8)
    a.grid(True, which="both", alpha=0.3)
    b.semilogx(sites, [r["peak_pss_gib"] for r in done], "o-", label="peak PSS (process tree)")
    b.semilogx(sites, [r["peak_rss_gib"] for r in done], "s--", label="peak RSS sum (upper bound)")
    b.axhline(12, color="k", ls=":", label="12 GiB target")
    b.set_xlabel("virtual sites")
    b.set_ylabel("GiB")
    b.set_title("Peak memory against sites")
    b.legend(fontsize=8)
    b.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(results: list[dict]) -> str:
    rows = ["| sites | image cache | exit | writer s | wall s | outside rounds s | train s / round | eval s / round | "
            "peak PSS GiB | peak RSS sum GiB | sites trained per round | sites not ok | report kB | "
            "reference s (peak PSS GiB) |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    nan = float("nan")
    for r in results:
        last = (r.get("per_round") or [{}])[-1]
        not_ok = sum(len(p["not_ok"]) for p in r.get("per_round", []))
        trained = ", ".join(str(p["ok"]) for p in r.get("per_round", []))
        reference = f"{r['reference_s']:.0f} ({r['reference_peak_pss_gib']:.2f})" if "reference_s" in r else "–"
        rows.append(f"| {r['sites']} | {'on' if r.get('image_cache') else 'off'} | {r['exit_code']} | "
                    f"{r['benchmark_write_s']:.0f} | {r['wall_s']:.0f} | {r.get('outside_rounds_s', nan):.0f} | "
                    f"{last.get('train_s') or nan:.1f} | {last.get('eval_s') or nan:.1f} | {r['peak_pss_gib']:.2f} | "
                    f"{r['peak_rss_gib']:.2f} | {trained} | {not_ok} | {r.get('report_html_kib') or nan:.0f} | "
                    f"{reference} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="10,100,1000", help="federation sizes, comma-separated")
    parser.add_argument("--patients", type=int, default=10, help="patients per site (a third are test patients)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run (round 1 includes Ray's start-up)")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per federation size")
    parser.add_argument("--cache", action="store_true", help="with [data] cache = true (an empty cache per size)")
    parser.add_argument("--reference", action="store_true",
                        help="the command as a user runs it: with the non-private reference after the federation")
    parser.add_argument("--out", type=Path, default=Path("runs/scale-sites"))
    parser.add_argument("--combine", metavar="JSON,...",
                        help="run nothing: the table and plot (OUT/scale_sites.png) of earlier runs' scale_sites*.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        results = [r for f in args.combine.split(",") for r in json.loads(Path(f).read_text())["results"]]
        results.sort(key=lambda r: (r.get("image_cache", False), r["sites"]))
        plot([r for r in results if not r.get("image_cache")], args.out / "scale_sites.png")
        print(table(results))
        return
    results = []
    suffix = ("-cache" if args.cache else "") + ("-reference" if args.reference else "")
    for n in (int(s) for s in args.sites.split(",")):
        results.append(one_size(n, args.patients, args.rounds, args.out, args.timeout, args.cache, args.reference))
        print(json.dumps(results[-1]), flush=True)
        machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                   "load_average_after": os.getloadavg()}
        (args.out / f"scale_sites{suffix}.json").write_text(json.dumps({"machine": machine, "results": results},
                                                                       indent=2))
    plot(results, args.out / f"scale_sites{suffix}.png")
    print(table(results))


if __name__ == "__main__":
    main()
