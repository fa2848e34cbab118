"""Issue 14: translation, multi-contrast anomaly detection and resolution, on the paired multi-contrast benchmark.

    python benchmarks/multicontrast.py translation --out runs/multicontrast
    python benchmarks/multicontrast.py resolution --out runs/resolution

``translation`` writes the built-in benchmark in T1, T2 and FLAIR (`medae make-benchmark
--contrasts t1,t2,flair`: every patient in the three contrasts, same anatomy and lesions) and
trains with the real `medae simulate` (Flower on Ray, three sites, five rounds, the product's
defaults otherwise): a conditional VAE on all three contrasts, and a flat VAE on FLAIR alone,
each with patient-level DP at ε = 8 (public start: `train.init = "builtin"`, built from the
built-in public set in the same contrasts) and without DP (`--no-dp`, 2 epochs a round).
It then judges, on every site's test patients:

- translation T1 → T2 and T1 → FLAIR: SSIM and PSNR against the same patient's real slice at
  the same position, for identity (the T1 slice itself), per-tissue histogram remapping
  (three tissue classes from T1 intensity, each class's T1 quantiles mapped to the target's,
  fitted on the training patients' pairs) and the CVAE (encode with t1, decode with the target);
- FLAIR lesion detection: image AUROC and best Dice of the CVAE (FLAIR slices, label flair)
  and of the flat FLAIR VAE, next to the intensity threshold on the same slices.

``resolution`` trains a flat VAE and a hierarchical VAE (`model.kind = "hvae"`) with
`medae train-local --no-dp` on site-1 of the built-in (T1) benchmark at 128 and 256 px and at
each KL weight ``--betas`` (`model.beta`), each in its own process, and reports reconstruction SSIM of healthy test slices, image AUROC and
best Dice, seconds per epoch, the process's peak RSS, and DP training throughput (one DP epoch,
book-keeping clipping) with its peak RSS.

Needs scikit-image for SSIM (not a medae runtime dependency). Writes OUT/<part>.json and
OUT/<part>.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from medae_core.config import RunConfig  # noqa: E402

LABELS = ("t1", "t2", "flair")
MEDAE = [sys.executable, "-m", "medae"]


def machine() -> str:
    import os

    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads")


def psnr_ssim(truth: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    mse = np.mean((truth - other) ** 2, axis=(1, 2))
    psnr = float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))
    ssim = float(np.mean([structural_similarity(t, o, data_range=1.0) for t, o in zip(truth, other)]))
    return round(psnr, 2), round(ssim, 3)


# -- translation ------------------------------------------------------------------------
def toml(path: Path, sections: dict) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def simulate(name: str, out: Path, data: Path, sections: dict, no_dp: bool) -> tuple[Path, float]:
    run = out / name
    if not (run / "model" / "bundle.json").exists():
        if no_dp:
            sections = sections | {"train": sections.get("train", {}) | {"epochs": 2}}
        cfg = toml(out / f"{name}.toml", sections)
        start = time.perf_counter()
        cmd = [*MEDAE, "simulate", "--config", str(cfg), "--data", str(data), "--out", str(run), "--no-reference"]
        subprocess.run(cmd + (["--no-dp"] if no_dp else []), check=True)
        (run / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return run / "model", float((run / "wall_seconds.txt").read_text())


def paired_slices(site: Path, part: str, data_cfg) -> dict[str, np.ndarray]:
    """Each contrast's slices of ``site/part``, row i of every array the same patient and position."""
    from medae_core.data import scan_folder

    labels_csv = site / part / "labels.csv"
    scan = scan_folder(site / part, data_cfg, 64, labels_csv=labels_csv if labels_csv.is_file() else None)
    keys = {}
    for i, e in enumerate(scan.entries):
        keys.setdefault((e.patient, e.position), {})[e.contrast] = i
    rows = [k for k in sorted(keys, key=str) if len(keys[k]) == len(LABELS)]
    out = {c: scan.images[[keys[k][c] for k in rows]] for c in LABELS}
    if scan.labels is not None:
        idx = [keys[k]["flair"] for k in rows]
        out["label"] = scan.labels[idx]
        out["mask"] = scan.masks[idx] if scan.masks is not None else None
        out["has_mask"] = scan.has_mask[idx] if scan.has_mask is not None else None
    return out


class TissueRemap:
    """Per-tissue histogram matching: 3 classes by T1 intensity (1-D k-means in the foreground), quantile maps."""

    def __init__(self, source: np.ndarray, target: np.ndarray):
        fg = source > 0.05
        values = source[fg]
        centers = np.quantile(values, [0.2, 0.5, 0.8])
        for _ in range(30):
            assign = np.argmin(np.abs(values[:, None] - centers[None]), axis=1)
            centers = np.array([values[assign == k].mean() for k in range(3)])
        self.centers = np.sort(centers)
        q = np.linspace(0, 1, 101)
        cls = self.classes(source)
        self.maps = [(np.quantile(source[cls == k], q), np.quantile(target[cls == k], q)) for k in range(4)]

    def classes(self, x: np.ndarray) -> np.ndarray:
        cls = np.argmin(np.abs(x[..., None] - self.centers), axis=-1) + 1
        return np.where(x > 0.05, cls, 0)  # 0 = background

    def __call__(self, x: np.ndarray) -> np.ndarray:
        cls = self.classes(x)
        out = np.zeros_like(x)
        for k, (qs, qt) in enumerate(self.maps):
            out[cls == k] = np.interp(x[cls == k], qs, qt)
        return out.astype(np.float32)


def translate_with(model, t1: np.ndarray, to: str) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for s in range(0, len(t1), 64):
            x = torch.as_tensor(t1[s:s + 64, None])
            src = torch.full((len(x),), LABELS.index("t1"))
            outs.append(model.translate(x, src, torch.full_like(src, LABELS.index(to))).numpy()[:, 0])
    return np.concatenate(outs)


def flair_detection(model, test: dict, cond_index: int | None, cfg) -> dict:
    from medae_core import metrics, scoring

    images = test["flair"]
    cond = None if cond_index is None else np.full(len(images), cond_index)
    maps, scores = scoring.anomaly_maps(model, images, cfg.scoring, "cpu", cond=cond)
    got = metrics.evaluate(maps, scores, test["label"], test["mask"], test["has_mask"], None)
    return {"image_auroc": round(got["image_auroc"], 3), "best_dice": round(got.get("dice_best") or float("nan"), 3)}


def translation(out: Path) -> dict:
    from medae_core.benchmark import make_benchmark
    from medae_core.bundle import load_bundle
    from medae_core.config import DataConfig
    from medae_core.data import site_folders

    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "benchmark.json").exists():
        start = time.perf_counter()
        make_benchmark(data, sites=3, patients=165, test_patients=15, seed=0, contrasts=LABELS)
        print(f"benchmark written in {time.perf_counter() - start:.0f} s", flush=True)
    cvae = {"model": {"kind": "cvae", "labels": list(LABELS)}}
    flat = {"model": {"kind": "vae"}, "data": {"contrasts": ["flair"]}}
    runs = {}
    for name, sections, no_dp in (("cvae-dp", cvae, False), ("cvae-nodp", cvae, True),
                                  ("vae-flair-dp", flat, False), ("vae-flair-nodp", flat, True)):
        runs[name] = simulate(name, out, data, sections, no_dp)
        print(f"{name}: {runs[name][1]:.0f} s", flush=True)

    read = DataConfig(contrasts=LABELS)
    sites = site_folders(data)
    train = [paired_slices(s, "train", read) for s in sites]
    test = [paired_slices(s, "test", read) for s in sites]
    test_all = {k: (np.concatenate([t[k] for t in test]) if test[0][k] is not None else None) for k in test[0]}
    result = {"machine": machine(), "command": "python benchmarks/multicontrast.py translation --out " + str(out),
              "test_slices": int(len(test_all["t1"])), "sites": len(sites), "translation": [], "flair_detection": []}
    models = {name: load_bundle(path) for name, (path, _) in runs.items()}
    for to in ("t2", "flair"):
        truth = test_all[to]
        remap = TissueRemap(np.concatenate([t["t1"] for t in train]), np.concatenate([t[to] for t in train]))
        rows = {"identity (the T1 slice)": test_all["t1"], "per-tissue histogram remapping": remap(test_all["t1"])}
        for name in ("cvae-nodp", "cvae-dp"):
            rows[f"CVAE, {'federated DP ε = 8' if name.endswith('-dp') else 'federated, no DP'}"] = translate_with(
                models[name].build_model(), test_all["t1"], to)
        for method, pred in rows.items():
            psnr, ssim = psnr_ssim(truth, pred)
            result["translation"].append({"to": to, "method": method, "psnr": psnr, "ssim": ssim})
    from medae_core import metrics, scoring

    cfg = RunConfig()
    maps, scores = scoring.intensity_baseline(test_all["flair"], cfg.scoring)
    base = metrics.evaluate(maps, scores, test_all["label"], test_all["mask"], test_all["has_mask"], None)
    result["flair_detection"].append({"model": "intensity threshold (FLAIR slice)",
                                      "image_auroc": round(base["image_auroc"], 3),
                                      "best_dice": round(base.get("dice_best") or float("nan"), 3)})
    for name, title in (("cvae-nodp", "CVAE on T1+T2+FLAIR, no DP"), ("cvae-dp", "CVAE on T1+T2+FLAIR, DP ε = 8"),
                        ("vae-flair-nodp", "flat VAE on FLAIR, no DP"), ("vae-flair-dp", "flat VAE on FLAIR, DP ε = 8")):
        bundle = models[name]
        cond = LABELS.index("flair") if name.startswith("cvae") else None
        row = flair_detection(bundle.build_model(), test_all, cond, bundle.config)
        result["flair_detection"].append({"model": title, **row, "simulate_seconds": round(runs[name][1])})
    (out / "translation.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["| translation | method | SSIM | PSNR (dB) |", "|---|---|---:|---:|"]
    md += [f"| T1 → {r['to'].upper()} | {r['method']} | {r['ssim']:.3f} | {r['psnr']:.2f} |"
           for r in result["translation"]]
    md += ["", "| FLAIR lesion detection | image AUROC | best Dice | simulate wall s |", "|---|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['image_auroc']:.3f} | {r['best_dice']:.3f} | {r.get('simulate_seconds', '–')} |"
           for r in result["flair_detection"]]
    (out / "translation.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


# -- resolution ---------------------------------------------------------------------------
def one_resolution(kind: str, size: int, data: Path, out: Path, epochs: int, beta: float) -> dict:
    """Train (no DP) and judge one model in this process; then one DP epoch for its throughput."""
    from medae_core.bundle import load_bundle
    from medae_core.config import RunConfig
    from medae_core.data import load_site
    from medae_core.evaluation import LabelledSet, evaluate_model
    from medae_core.jobs import train_local
    from medae_core.scoring import run_model

    cfg = RunConfig().with_overrides({"model.kind": kind, "model.image_size": size, "train.epochs": epochs,
                                      "train.init": "none", "privacy.enabled": False, "train.lr": 1e-3,
                                      "model.beta": beta})
    run = out / f"{kind}-{size}-b{beta:g}"
    start = time.perf_counter()
    summary = train_local(data, run, cfg)
    wall = time.perf_counter() - start
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bundle = load_bundle(run / "model")
    model = bundle.build_model()
    site = load_site(data, cfg.data, size)
    test = LabelledSet.of(site.test)
    healthy = test.images[test.labels == 0]
    recons, _ = run_model(model, healthy, "cpu")
    _, ssim = psnr_ssim(healthy, recons)
    got = evaluate_model(model, test, cfg, "cpu", None)
    dp_cfg = cfg.with_overrides({"privacy.enabled": True, "train.epochs": 1})
    dp = train_local(data, Path(f"{run}-dp"), dp_cfg, ledger_path=Path(f"{run}-dp.ledger"))
    return {"kind": kind, "size": size, "epochs": epochs, "beta": beta, "recon_ssim_healthy": ssim,
            "image_auroc": round(got["image_auroc"], 3), "best_dice": round(got.get("dice_best") or float("nan"), 3),
            "seconds_per_epoch": round(summary["seconds"] / epochs, 1), "wall_seconds": round(wall, 1),
            "nondp_images_per_second": round(summary["images_per_second"], 1),
            "dp_images_per_second": round(dp["images_per_second"], 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_rss_train_mib": round(rss_train), "parameters": summary.get("trained_parameters")}


def resolution(out: Path, patients: int, epochs: int, betas: list[float]) -> dict:
    from medae_core.benchmark import make_benchmark

    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "benchmark.json").exists():
        make_benchmark(data, sites=1, patients=patients, test_patients=10, seed=0)
    rows = []
    for beta in betas:
        for size in (128, 256):
            for kind in ("vae", "hvae"):
                part = out / f"{kind}-{size}-b{beta:g}.json"
                if not part.exists():
                    subprocess.run([sys.executable, __file__, "one", "--kind", kind, "--size", str(size), "--epochs",
                                    str(epochs), "--beta", str(beta), "--data", str(data / "site-1"),
                                    "--out", str(out)], check=True)
                rows.append(json.loads(part.read_text()))
                print(rows[-1], flush=True)
    result = {"machine": machine(), "patients": patients, "command":
              f"python benchmarks/multicontrast.py resolution --out {out} --patients {patients} --epochs {epochs} "
              f"--betas {','.join(f'{b:g}' for b in betas)}", "rows": rows}
    (out / "resolution.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["| β | px | model | recon SSIM (healthy) | image AUROC | best Dice | s / epoch | DP img/s | non-DP img/s "
          "| peak RSS MiB |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['beta']:g} | {r['size']} | {'hierarchical VAE' if r['kind'] == 'hvae' else 'flat VAE'} "
           f"| {r['recon_ssim_healthy']:.3f} "
           f"| {r['image_auroc']:.3f} | {r['best_dice']:.3f} | {r['seconds_per_epoch']} | {r['dp_images_per_second']} "
           f"| {r['nondp_images_per_second']} | {r['peak_rss_mib']} |" for r in rows]
    (out / "resolution.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("translation")
    p.add_argument("--out", type=Path, default=Path("runs/multicontrast"))
    p = sub.add_parser("resolution")
    p.add_argument("--out", type=Path, default=Path("runs/resolution"))
    p.add_argument("--patients", type=int, default=60)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--betas", default="1,0.05", help="model.beta values (the KL weight) to compare at")
    p = sub.add_parser("one")  # one resolution row, in its own process (for its peak memory)
    p.add_argument("--kind")
    p.add_argument("--beta", type=float)
    p.add_argument("--size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--data", type=Path)
    p.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.part == "translation":
        translation(args.out)
    elif args.part == "resolution":
        resolution(args.out, args.patients, args.epochs, [float(b) for b in args.betas.split(",")])
    else:
        row = one_resolution(args.kind, args.size, args.data, args.out, args.epochs, args.beta)
        (args.out / f"{args.kind}-{args.size}-b{args.beta:g}.json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
