"""The model's other jobs against real alternatives: denoising, compression, features, generation.

    python benchmarks/other_jobs.py --out runs/other-jobs

Needs scikit-image for non-local means and SSIM (`pip install -e .[bench]`; not a medae
runtime dependency). Models are trained with the real `medae train-local` job on site-1 of the
built-in benchmark (DP: the defaults, ε = 8 patient-level, public start; no DP: `--no-dp`),
then judged on site-1's test images (healthy and lesion slices):

- denoising: Gaussian and Rician noise at three levels; PSNR / SSIM against the clean image
  for the noisy input, non-local means (scikit-image), and a DAE with and without DP;
- compression: bytes per image against PSNR / SSIM, for an AE's codes (float16, and uint8
  with one range per latent dimension) and for JPEG and JPEG 2000 (Pillow, OpenJPEG) at
  several rates, with and without each format's fixed header;
- features: a logistic-regression probe (5-fold, stratified) on the AE's and the VAE's codes
  against one on raw pixels down-sampled to as many numbers (and to 16 × 16), lesion slice
  vs healthy slice (AUROC);
- generation: VAE samples' nearest training image (L2) and its SSIM, against held-out
  (validation) real images' nearest training image; and the memorisation check: no sample
  closer to a training image than the closest pair of training images from different
  patients (every pair).

Writes OUT/other_jobs.json and OUT/other_jobs.md (the tables in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medae_core.config import RunConfig  # noqa: E402

LEVELS = (0.05, 0.1, 0.2)


def train(site: Path, out: Path, cfg: RunConfig) -> Path:
    from medae_core.jobs import train_local

    if not (out / "model" / "bundle.json").exists():
        train_local(site, out, cfg, ledger_path=out.parent / f"{out.name}-ledger.jsonl")
    return out / "model"


def model_of(path: Path):
    from medae_core.bundle import load_bundle

    return load_bundle(path).build_model().eval()


@torch.no_grad()
def run(fn, x: np.ndarray) -> np.ndarray:
    return np.concatenate([fn(torch.as_tensor(x[i:i + 64, None])).float().numpy() for i in range(0, len(x), 64)])


def psnr_ssim(clean: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    mse = np.mean((clean - other) ** 2, axis=(1, 2))
    psnr = float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))
    ssim = float(np.mean([structural_similarity(c, o, data_range=1.0) for c, o in zip(clean, other)]))
    return round(psnr, 2), round(ssim, 3)


def noisy(clean: np.ndarray, kind: str, sigma: float, rng) -> np.ndarray:
    if kind == "gaussian":
        out = clean + rng.normal(0, sigma, clean.shape)
    else:  # Rician: the magnitude of a complex signal with Gaussian noise in both channels (MRI)
        out = np.sqrt((clean + rng.normal(0, sigma, clean.shape)) ** 2 + rng.normal(0, sigma, clean.shape) ** 2)
    return np.clip(out, 0, 1).astype(np.float32)


def nl_means(images: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    return np.stack([denoise_nl_means(i, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                                      fast_mode=True) for i in images]).astype(np.float32)


def denoising(clean: np.ndarray, daes: dict, rng) -> list[dict]:
    rows = []
    for kind in ("gaussian", "rician"):
        for sigma in LEVELS:
            x = noisy(clean, kind, sigma, rng)
            row = {"noise": kind, "sigma": sigma, "noisy input": psnr_ssim(clean, x),
                   "non-local means": psnr_ssim(clean, nl_means(x, sigma))}
            for name, model in daes.items():
                row[name] = psnr_ssim(clean, run(model.reconstruct, x)[:, 0])
            rows.append(row)
    return rows


def quantised(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Codes stored as uint8 with one min/max per latent dimension (shared by all images, like the decoder)."""
    low, high = codes.min(0), codes.max(0)
    step = np.where(high > low, (high - low) / 255.0, 1.0)
    return (np.rint((codes - low) / step) * step + low).astype(np.float32), codes.shape[1]


def lesion_psnr(clean: np.ndarray, other: np.ndarray, masks: np.ndarray) -> float:
    """PSNR over the lesion pixels only: what a compression keeps of what a reader looks for."""
    mse = float(np.mean((clean[masks] - other[masks]) ** 2))
    return round(10 * math.log10(1.0 / max(mse, 1e-12)), 2)


def compression(clean: np.ndarray, masks: np.ndarray, aes: dict) -> list[dict]:
    """Bytes per image against quality. ``payload`` leaves out each format's fixed header, measured on a blank image."""
    from PIL import Image

    rows = []
    for name, ae in aes.items():
        codes = run(ae.encode, clean)
        dim = codes.shape[1]
        for label, stored, size in ((f"{dim} × float16", codes.astype(np.float16).astype(np.float32), 2 * dim),
                                    (f"{dim} × uint8", *quantised(codes))):
            recon = run(ae.decode, stored)[:, 0]
            rows.append({"method": f"{name} codes ({label})", "bytes": size, "payload": size,
                         "psnr_ssim": psnr_ssim(clean, recon), "lesion_psnr": lesion_psnr(clean, recon, masks)})
    eight = (np.clip(clean, 0, 1) * 255 + 0.5).astype(np.uint8)

    def encode(img: np.ndarray, fmt: str, kw: dict) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format=fmt, **kw)
        return buf.getvalue()

    def codec(label: str, fmt: str, **kw) -> None:
        header = len(encode(np.zeros_like(eight[0]), fmt, kw))
        blobs = [encode(img, fmt, kw) for img in eight]
        out = np.stack([np.asarray(Image.open(io.BytesIO(b)), dtype=np.float32) / 255.0 for b in blobs])
        size = float(np.mean([len(b) for b in blobs]))
        rows.append({"method": label, "bytes": round(size), "payload": max(0, round(size - header)),
                     "psnr_ssim": psnr_ssim(clean, out), "lesion_psnr": lesion_psnr(clean, out, masks)})

    for quality in (1, 5, 10, 25, 50):
        codec(f"JPEG quality {quality} (optimised Huffman)", "JPEG", quality=quality, optimize=True)
    for ratio in (64, 32, 16, 8):
        codec(f"JPEG 2000 {ratio}:1 (codestream)", "JPEG2000", quality_mode="rates", quality_layers=[ratio],
              irreversible=True, no_jp2=True)
    codec("PNG (lossless, 8-bit)", "PNG", optimize=True)
    return rows


def probe(features: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    p = cross_val_predict(clf, features, labels, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                          method="predict_proba")[:, 1]
    return round(float(roc_auc_score(labels, p)), 3)


def features(images: np.ndarray, labels: np.ndarray, models: dict) -> dict:
    from PIL import Image

    out = {}
    for side in (8, 16):
        raw = np.stack([np.asarray(Image.fromarray(i).resize((side, side), Image.BILINEAR)).ravel() for i in images])
        out[f"raw pixels, {side}×{side} = {side * side} numbers"] = probe(raw, labels)
    for name, model in models.items():
        codes = run(model.encode, images)
        out[f"{name} codes, {codes.shape[1]} numbers"] = probe(codes, labels)
    return out


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` and ``b`` (flattened images), in float64."""
    fa, fb = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    d2 = (fa ** 2).sum(1)[:, None] + (fb ** 2).sum(1)[None] - 2 * fa @ fb.T
    return np.sqrt(np.maximum(d2, 0))


def generation(vae, train: np.ndarray, train_patients: np.ndarray, held_out: np.ndarray, n: int) -> dict:
    """Realism (nearest training image of a sample vs of a held-out real image) and the memorisation check.

    The check's bar is the closest pair of training images from different
    patients, over every pair: a sample closer than that to a training image is
    nearer to one patient's image than any other patient's image ever is.
    """
    from skimage.metrics import structural_similarity

    samples = vae.sample(n, torch.Generator().manual_seed(0)).float().numpy()[:, 0]
    d_s, d_h = _distances(samples, train), _distances(held_out, train)
    j_s, j_h = d_s.argmin(1), d_h.argmin(1)
    nn_s, nn_h = d_s.min(1), d_h.min(1)
    bar = np.inf
    for i in range(0, len(train), 512):  # every pair, in blocks
        d = _distances(train[i:i + 512], train)
        d[train_patients[i:i + 512, None] == train_patients[None]] = np.inf
        bar = min(bar, float(d.min()))

    def ssim(a, idx):
        return float(np.mean([structural_similarity(x, train[k], data_range=1.0) for x, k in zip(a, idx)]))

    return {"samples": n, "train_images": int(len(train)),
            "nn_l2_samples": round(float(np.median(nn_s)), 3), "nn_l2_held_out": round(float(np.median(nn_h)), 3),
            "nn_ssim_samples": round(ssim(samples, j_s), 3), "nn_ssim_held_out": round(ssim(held_out, j_h), 3),
            "min_sample_to_train": round(float(nn_s.min()), 3), "closest_train_pair": round(bar, 3),
            "samples_below_bar": int((nn_s < bar).sum()), "memorised": bool(nn_s.min() < bar)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, help="a built-in benchmark (medae make-benchmark); "
                    "default: the default benchmark, written once under OUT/data")
    ap.add_argument("--out", type=Path, default=Path("runs/other-jobs"))
    ap.add_argument("--samples", type=int, default=200)
    a = ap.parse_args()
    from medae_core.site import load_site_data

    t0 = time.time()
    base = RunConfig().with_overrides({"train.num_threads": 2})
    a.out.mkdir(parents=True, exist_ok=True)
    bench = a.bench or a.out / "data"
    if a.bench is None and not (bench / "benchmark.json").exists():
        from medae_core.benchmark import make_benchmark

        fed = base.federation
        make_benchmark(bench, sites=fed.sites, patients=fed.benchmark_patients, seed=fed.benchmark_seed,
                       test_patients=fed.benchmark_test_patients or None)
    site = bench / "site-1"
    models, anomaly = {}, {}
    for kind in ("ae", "dae", "vae"):
        for dp in (False, True):
            cfg = base.with_overrides({"model.kind": kind} | ({} if dp else {"privacy.enabled": False}))
            name = f"{kind.upper()}, {'DP ε = 8' if dp else 'no DP'}"
            print(f"training {name}", flush=True)
            run_dir = a.out / f"{kind}-{'dp' if dp else 'nodp'}"
            models[name] = model_of(train(site, run_dir, cfg))
            test = json.loads((run_dir / "metrics.json").read_text())["test"]
            anomaly[name] = round(test["image_auroc"], 3)
            baseline = round(test["baseline_image_auroc"], 3)  # the same test slices for every model
    data = load_site_data(site, base)
    known = data.test.labels >= 0
    clean, labels = data.test.images[known], data.test.labels[known]
    rng = np.random.default_rng(0)
    result = {
        "site": "site-1", "test_images": int(len(clean)),
        "denoising": denoising(clean, {k: v for k, v in models.items() if k.startswith("DAE")}, rng),
        "compression": compression(clean, data.test.masks[known], {k: v for k, v in models.items()
                                                                     if k.startswith("AE")}),
        "anomaly_reference": anomaly | {"intensity threshold (baseline)": baseline},
        "features": features(clean, labels, {k: v for k, v in models.items() if not k.startswith("DAE")}),
        "generation": {k: generation(v, data.train_images, data.train_patients, data.val_images, a.samples)
                       for k, v in models.items() if k.startswith("VAE")},
        "seconds": round(time.time() - t0),
    }
    (a.out / "other_jobs.json").write_text(json.dumps(result, indent=2))
    (a.out / "other_jobs.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [f"Site-1 test images ({r['test_images']}, healthy and lesion slices); PSNR dB / SSIM.", "",
             "**Denoising**", ""]
    methods = [k for k in r["denoising"][0] if k not in ("noise", "sigma")]
    lines += ["| noise | σ | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for row in r["denoising"]:
        lines.append(f"| {row['noise']} | {row['sigma']} | " + " | ".join(f"{row[m][0]} / {row[m][1]}" for m in methods)
                     + " |")
    lines += ["", "**Compression** (64 × 64 px, 8-bit source = 4096 bytes; payload = bytes less the format's fixed "
              "header, measured on a blank image; lesion PSNR: over the lesion pixels only)", "",
              "| method | bytes per image | payload | PSNR / SSIM | lesion PSNR |", "|---|---|---|---|---|"]
    lines += [f"| {c['method']} | {c['bytes']} | {c['payload']} | {c['psnr_ssim'][0]} / {c['psnr_ssim'][1]} | "
              f"{c['lesion_psnr']} |" for c in r["compression"]]
    lines += ["", "**Features**: linear probe, lesion vs healthy slice, 5-fold AUROC", "", "| features | AUROC |",
              "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["features"].items()]
    lines += ["", "For reference, the same slices scored without a probe (image AUROC of the anomaly score; "
              "the intensity threshold is the plain baseline):", "", "| scorer | image AUROC |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["anomaly_reference"].items()]
    lines += ["", "**Generation** (median nearest-training-image L2; SSIM to it)", "",
              "| model | samples: NN L2 / SSIM | held-out real: NN L2 / SSIM | closest sample to training | "
              "closest training pair (other patients) | samples below it | memorised |",
              "|---|---|---|---|---|---|---|"]
    for k, g in r["generation"].items():
        lines.append(f"| {k} | {g['nn_l2_samples']} / {g['nn_ssim_samples']} | {g['nn_l2_held_out']} / "
                     f"{g['nn_ssim_held_out']} | {g['min_sample_to_train']} | {g['closest_train_pair']} | "
                     f"{g['samples_below_bar']} of {g['samples']} | {'yes' if g['memorised'] else 'no'} |")
    lines += ["", f"{r['seconds']} s for this call (models already trained in OUT are reused, not retrained)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
