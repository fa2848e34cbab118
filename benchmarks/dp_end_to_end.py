"""DP against non-DP end to end, and a federation against centralized training (issue 12, items 1 and 4).

    python benchmarks/dp_end_to_end.py site  [--patients 75] [--epochs 4] [--reps 2]
    python benchmarks/dp_end_to_end.py federation [--sites 3] [--rounds 4] [--patients 165]
    python benchmarks/dp_end_to_end.py simround [--data ROOT] [--rounds 3] [--reps 2]

``site``: one site's training round as `medae train-local` and a ClientApp run it
(`SiteTrainer.train_round`: plan, noise calibration and ledger reservation under
DP, `train`; the accountant's memo is emptied before each DP round, so each one
calibrates afresh), DP against non-DP, alternating, ``--reps`` times, in one process
(the first pair pays the imports; it is reported, and left out of the medians).
Two non-DP references:
- "same plan": the same privacy units (one slice per patient per step), batch
  and step count as DP, so both process the same number of images;
- "product": what `--no-dp` really does (an epoch is every image, about 14x the
  images per epoch).
Images per second count every image a round processed; "round" is the whole
`train_round` call, "train()" the training loop alone.

``federation``: `medae simulate` (the default configuration: DP at ε = 8, 2 Ray
actors of 1 CPU each; evaluation only in the last round) on the built-in
benchmark, then DP training of the same model on the sites' pooled patients
with the same total sample-steps (the sum over rounds and sites of each site's
planned steps at its expected batch), in this process, with 1 and with 2 torch
threads. Round 1 carries the one-time start-up (Ray, actors, imports), so the
comparison is over rounds 2..R and the start-up is reported on its own.

``simround``: a simulated round, DP against non-DP: `medae simulate` on the same sites
(the built-in benchmark's 3 sites of 165 patients unless ``--data``), the default
configuration against ``--no-dp`` with ``train.epochs = 1`` (an epoch without DP is every
image, so one epoch is about as many images as a DP round's ten epochs of one slice per
patient), alternating, ``--reps`` times, evaluation in the last round only. From each run's
metrics, rounds 2..R: each site's images per second in its training loop (`train()`, the
site's reported ``seconds``) and the round's images per second (the server's training
phase: every site's whole message -- plan, calibration, ledger, training -- with Flower
and Ray, 2 actors).

Prints Markdown; ``--json FILE`` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    import torch

    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; load average at start {load}")


# -- one site ----------------------------------------------------------------------
def site(args) -> dict:
    from medae_core.benchmark import make_benchmark
    from medae_core.config import RunConfig
    from medae_core.privacy import PrivacyLedger, accounting
    from medae_core.site import SiteTrainer, load_site_data

    work = Path(tempfile.mkdtemp(prefix="dp-e2e-"))
    make_benchmark(work / "data", sites=1, patients=args.patients, test_patients=max(2, args.patients // 5))
    cfg = RunConfig().with_overrides({"train.epochs": args.epochs})
    data = load_site_data(work / "data" / "site-1", cfg)
    trainers = {
        "DP": SiteTrainer(data, cfg, None),  # a fresh ledger (ε = 8 for this round) in each repetition
        # Non-DP on DP's units and plan: SiteTrainer switches a non-DP run to image units,
        # so this one is made non-private below, after construction.
        "non-DP, same plan": SiteTrainer(data, cfg, None),
        "non-DP, product (--no-dp)": SiteTrainer(data, cfg.with_overrides({"privacy.enabled": False}), None),
    }
    same_plan = trainers["non-DP, same plan"]
    same_plan.cfg = cfg.with_overrides({"privacy.enabled": False, "privacy.unit": "patient"})
    runs = {name: [] for name in trainers}
    for rep in range(args.reps + 1):
        trainers["DP"].ledger = PrivacyLedger.for_config(cfg.privacy, site="site-1", path=work / f"ledger-{rep}.jsonl")
        # Each DP round pays its own calibration, as a new round would. (getattr: the memos are
        # absent from code before 2026-12-03, which this script also measured, for BENCHMARKS' "before".)
        for memo in ("_pld_cached", "_rdp_cached"):
            getattr(getattr(accounting, memo, None), "cache_clear", lambda: None)()
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            r = trainer.train_round(None, run_id=f"bench-{rep}", server_round=1, rounds_left=1)
            wall = time.perf_counter() - t0
            runs[name].append(dict(wall=wall, train=r.seconds, steps=r.steps,
                                   images=round(r.images_per_second * r.seconds)))  # processed, not planned
            print(f"rep {rep} {name}: round {wall:.2f} s, train() {r.seconds:.2f} s, {r.steps} steps, "
                  f"{r.images_per_second:.0f} img/s in train()", flush=True)
    rows = []
    for name, rs in runs.items():
        warm = rs[1:]
        med = lambda k: statistics.median(x[k] for x in warm)  # noqa: E731
        images = med("images")
        rows.append(dict(name=name, steps=med("steps"), images=images, round_s=med("wall"), train_s=med("train"),
                         ips_round=images / med("wall"), ips_train=images / med("train"),
                         cold_round_s=rs[0]["wall"]))
    return dict(kind="site", patients=args.patients, epochs=args.epochs, reps=args.reps,
                train_patients=int(data.n_train_patients), train_images=int(len(data.train_images)),
                machine=machine(), rows=rows)


def site_markdown(res: dict) -> str:
    dp = res["rows"][0]
    lines = [f"One site: {res['train_patients']} training patients ({res['train_images']} slices), "
             f"{res['epochs']} epochs, default configuration; medians of {res['reps']} warm repetitions. "
             f"Machine: {res['machine']}.", "",
             "| run | steps | images | round s | of which train() s | img/s, round | img/s, train() | "
             "DP / this, round | DP / this, train() | first (cold) round s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['name']} | {r['steps']:.0f} | {r['images']:.0f} | {r['round_s']:.2f} | {r['train_s']:.2f} | "
                     f"{r['ips_round']:.0f} | {r['ips_train']:.0f} | {dp['ips_round'] / r['ips_round']:.2f} | "
                     f"{dp['ips_train'] / r['ips_train']:.2f} | {r['cold_round_s']:.2f} |")
    return "\n".join(lines) + "\n"


# -- federation against centralized -------------------------------------------------
def federation(args) -> dict:
    import numpy as np

    from medae_core.config import RunConfig
    from medae_core.models import build_model
    from medae_core.site import load_site_data
    from medae_core.starts import initial_weights
    from medae_core.training import train
    from medae_core.units import TrainingPlan

    out = Path(args.out)
    cfg_file = out.with_suffix(".toml")
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(f"[federation]\nbenchmark_patients = {args.patients}\nevaluate_every = {args.rounds}\n")
    cmd = [sys.executable, "-m", "medae", "simulate", "--config", str(cfg_file), "--sites", str(args.sites),
           "--rounds", str(args.rounds), "--out", str(out), "--no-reference"]  # the federation alone
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sim_wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    train_s = [r["train_seconds"] for r in rounds]
    site_s = [sum(s["seconds"] for s in r["sites"].values()) for r in rounds]
    batch = RunConfig().train.batch_size
    steps = [sum(round(s["num_examples"] / batch) for s in r["sites"].values()) for r in rounds]
    sigma = statistics.median(s["noise_multiplier"] for r in rounds for s in r["sites"].values())

    cfg = RunConfig()
    sites = sorted(p for p in (out / "data").iterdir() if p.is_dir() and (p / "train").is_dir())
    datas = [load_site_data(p, cfg) for p in sites]
    images = np.concatenate([d.train_images for d in datas])
    offsets = np.cumsum([0] + [d.n_train_patients for d in datas[:-1]])
    patients = np.concatenate([d.train_patients + o for d, o in zip(datas, offsets)])
    n_units = int(sum(d.n_train_patients for d in datas))
    total = sum(steps[1:])
    plan = TrainingPlan(n_units=n_units, batch_size=batch, sample_rate=batch / n_units, epochs=1,
                        steps_per_epoch=total, steps=total)
    central = {}
    for threads in (1, 2):
        model = build_model(cfg.model, seed=0)
        state, _ = initial_weights(cfg)
        if state is not None:
            model.load_state_dict(state)
        r = train(model, images, patients, plan, cfg.with_overrides({"train.num_threads": threads}),
                  noise_multiplier=sigma)
        central[threads] = r.seconds
        print(f"centralized, {threads} thread(s): {r.seconds:.2f} s for {total} steps", flush=True)
    later = train_s[1:]
    return dict(kind="federation", sites=args.sites, rounds=args.rounds, patients=args.patients,
                sim_wall=sim_wall, train_seconds=train_s, site_train_seconds=site_s, steps=steps,
                eval_seconds=[r.get("eval_seconds") for r in rounds], startup=train_s[0] - statistics.median(later),
                central=central, machine=machine(), command=" ".join(cmd[1:]))


def federation_markdown(res: dict) -> str:
    later = sum(res["train_seconds"][1:])
    n = res["rounds"] - 1
    lines = [f"`medae simulate`: {res['sites']} sites of {res['patients']} patients, {res['rounds']} rounds, default "
             f"configuration (DP, ε = 8), evaluation in the last round only. Machine: {res['machine']}.", "",
             "| what | seconds | federation / this |", "|---|---:|---:|",
             f"| federation: training of rounds 2-{res['rounds']} ({n} rounds, {sum(res['steps'][1:])} site steps) "
             f"| {later:.1f} | 1.00 |",
             f"| of which inside the sites' train() (summed over sites) | {sum(res['site_train_seconds'][1:]):.1f} | – |"]
    for threads, s in res["central"].items():
        lines.append(f"| centralized DP on the pooled patients, same sample-steps, {threads} torch thread(s) | "
                     f"{s:.1f} | {later / s:.2f} |")
    lines += [f"| one-time start-up (round 1's training minus a later round's) | {res['startup']:.1f} | – |",
              f"| the whole `medae simulate` command (benchmark writing, start-up, evaluation, report) | "
              f"{res['sim_wall']:.1f} | – |"]
    return "\n".join(lines) + "\n"


# -- a simulated round --------------------------------------------------------------
def simround(args) -> dict:
    from medae_core.benchmark import make_benchmark
    from medae_core.config import RunConfig

    at_start = machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    if not args.data and not (data / "benchmark.json").exists():  # the quick start's sites
        fed = RunConfig().federation
        make_benchmark(data, sites=fed.sites, patients=fed.benchmark_patients,
                       test_patients=fed.benchmark_test_patients, seed=fed.benchmark_seed)
    configs = {"DP": f"[federation]\nevaluate_every = {args.rounds}\n",
               "non-DP": f"[federation]\nevaluate_every = {args.rounds}\n[train]\nepochs = 1\n"}
    for name, text in configs.items():
        (out / f"{name}.toml").write_text(text)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    commands = {}
    for rep in range(args.reps):
        for name in configs:
            cfg_file = out / f"{name}.toml"
            run = out / f"{name}-{rep}"
            cmd = [sys.executable, "-m", "medae", "simulate", "--config", str(cfg_file), "--data", str(data),
                   "--rounds", str(args.rounds), "--out", str(run), "--no-reference"]
            if name == "non-DP":
                cmd.append("--no-dp")
            commands[name] = " ".join(cmd[3:])
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rounds = json.loads((run / "metrics.json").read_text())["rounds"][1:]
            sites = [s for r in rounds for s in r["sites"].values() if s.get("status") == "ok"]
            res = dict(site_img_s=statistics.median(s["num_examples"] / s["seconds"] for s in sites),
                       round_img_s=statistics.median(sum(s["num_examples"] for s in r["sites"].values())
                                                     / r["train_seconds"] for r in rounds),
                       images_per_site_round=statistics.median(s["num_examples"] for s in sites),
                       round_seconds=statistics.median(r["train_seconds"] for r in rounds))
            runs[name].append(res)
            print(f"{name} rep {rep}: {res}", flush=True)
    return dict(kind="simround", rounds=args.rounds, reps=args.reps, runs=runs, commands=commands,
                machine=at_start)


def simround_markdown(res: dict) -> str:
    med = {name: {k: statistics.median(r[k] for r in reps) for k in reps[0]} for name, reps in res["runs"].items()}
    dp = med["DP"]
    lines = [f"A simulated round, rounds 2-{res['rounds']}, medians over {res['reps']} alternating runs of each. "
             f"Machine: {res['machine']}.", "",
             "| run | images per site and round | round s | images/s in a site's train() | images/s, round "
             "| DP / this, train() | DP / this, round |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['images_per_site_round']:.0f} | {m['round_seconds']:.1f} | {m['site_img_s']:.0f} "
                     f"| {m['round_img_s']:.0f} | {dp['site_img_s'] / m['site_img_s']:.2f} "
                     f"| {dp['round_img_s'] / m['round_img_s']:.2f} |")
    lines += ["", *(f"- {name}: `medae {cmd}`" for name, cmd in res["commands"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("site")
    s.add_argument("--patients", type=int, default=75)
    s.add_argument("--epochs", type=int, default=4)
    s.add_argument("--reps", type=int, default=2)
    f = sub.add_parser("federation")
    f.add_argument("--sites", type=int, default=3)
    f.add_argument("--rounds", type=int, default=4)
    f.add_argument("--patients", type=int, default=165)
    f.add_argument("--out", default="runs/dp-e2e-federation")
    r = sub.add_parser("simround")
    r.add_argument("--data", help="federation root (default: the built-in benchmark, written under --out)")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--reps", type=int, default=2)
    r.add_argument("--out", default="runs/dp-e2e-simround")
    for q in (s, f, r):
        q.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    os.environ.setdefault("MEDAE_HOME", tempfile.mkdtemp(prefix="dp-e2e-home-"))  # ledgers stay out of the user's
    run, markdown = {"site": (site, site_markdown), "federation": (federation, federation_markdown),
                     "simround": (simround, simround_markdown)}[args.what]
    res = run(args)
    print(f"\nCommand: `python benchmarks/dp_end_to_end.py {' '.join(sys.argv[1:])}`\n")
    print(markdown(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
