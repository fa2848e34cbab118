"""The model's other jobs against real alternatives: denoising, compression, features, generation.

    python benchmarks/other_jobs.py --bench runs/privacy-utility/data-165 --out runs/other-jobs

Needs scikit-image for non-local means and SSIM (`pip install scikit-image`; not a medae
dependency). Models are trained with the real `medae train-local` job on site-1 of the
built-in benchmark (DP: the defaults, ε = 8 patient-level, public start; no DP: `--no-dp`),
then judged on site-1's test images (healthy and lesion slices):

- denoising: Gaussian and Rician noise at three levels; PSNR / SSIM against the clean image
  for the noisy input, non-local means (scikit-image), and a DAE with and without DP;
- compression: bytes per image against PSNR / SSIM, for the AE's codes (float16) and for
  JPEG and JPEG 2000 (Pillow) at their smallest / at the codes' size;
- features: a logistic-regression probe (5-fold, stratified) on the VAE's codes against
  one on raw pixels down-sampled to as many numbers, lesion slice vs healthy slice (AUROC);
- generation: VAE samples' nearest training image (L2) and its SSIM, against held-out real
  images' nearest training image; and the memorisation check: no sample closer to a
  training image than the closest pair of training images from different patients.

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


def compression(clean: np.ndarray, ae) -> list[dict]:
    from PIL import Image

    codes = run(ae.encode, clean).astype(np.float16)
    recon = run(ae.decode, codes.astype(np.float32))[:, 0]
    code_bytes = codes.shape[1] * 2
    rows = [{"method": f"AE codes ({codes.shape[1]} × float16)", "bytes": code_bytes,
             "psnr_ssim": psnr_ssim(clean, recon)}]
    eight = (np.clip(clean, 0, 1) * 255 + 0.5).astype(np.uint8)

    def encode(fmt: str, **kw) -> tuple[float, np.ndarray]:
        sizes, outs = [], []
        for img in eight:
            buf = io.BytesIO()
            Image.fromarray(img, mode="L").save(buf, format=fmt, **kw)
            sizes.append(buf.tell())
            buf.seek(0)
            outs.append(np.asarray(Image.open(buf), dtype=np.float32) / 255.0)
        return float(np.mean(sizes)), np.stack(outs)

    for quality in (1, 10):
        size, out = encode("JPEG", quality=quality)
        rows.append({"method": f"JPEG quality {quality}", "bytes": round(size), "psnr_ssim": psnr_ssim(clean, out)})
    ratio = eight[0].size / code_bytes
    size, out = encode("JPEG2000", quality_mode="rates", quality_layers=[ratio], irreversible=True)
    rows.append({"method": f"JPEG 2000 at {ratio:.0f}:1", "bytes": round(size), "psnr_ssim": psnr_ssim(clean, out)})
    size, out = encode("PNG")
    rows.append({"method": "PNG (lossless, 8-bit)", "bytes": round(size), "psnr_ssim": psnr_ssim(clean, out)})
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


def features(images: np.ndarray, labels: np.ndarray, vaes: dict) -> dict:
    from PIL import Image

    dim = next(iter(vaes.values())).cfg.latent_dim
    side = int(math.sqrt(dim))
    raw = np.stack([np.asarray(Image.fromarray(i).resize((side, side), Image.BILINEAR)).ravel() for i in images])
    out = {f"raw pixels ({side}×{side})": probe(raw, labels)}
    for name, model in vaes.items():
        out[f"{name} codes ({dim})"] = probe(run(model.encode, images), labels)
    return out


def generation(vae, train: np.ndarray, train_patients: np.ndarray, held_out: np.ndarray, n: int) -> dict:
    from skimage.metrics import structural_similarity

    samples = vae.sample(n, torch.Generator().manual_seed(0)).float().numpy()[:, 0]
    flat = train.reshape(len(train), -1).astype(np.float64)
    sq = (flat ** 2).sum(1)

    def nearest(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = x.reshape(len(x), -1).astype(np.float64)
        d2 = (f ** 2).sum(1)[:, None] + sq[None] - 2 * f @ flat.T
        j = d2.argmin(1)
        return np.sqrt(np.maximum(d2[np.arange(len(x)), j], 0)), j

    d_s, j_s = nearest(samples)
    d_h, j_h = nearest(held_out)
    ssim = lambda a, idx: float(np.mean([structural_similarity(x, train[k], data_range=1.0)  # noqa: E731
                                         for x, k in zip(a, idx)]))
    # Closest pair of training images from different patients (a subsample keeps it fast).
    rng = np.random.default_rng(0)
    pick = rng.choice(len(train), size=min(len(train), 600), replace=False)
    f = flat[pick]
    d2 = sq[pick][:, None] + sq[pick][None] - 2 * f @ f.T
    same = train_patients[pick][:, None] == train_patients[pick][None]
    d2[same] = np.inf
    closest_pair = float(np.sqrt(max(d2.min(), 0)))
    return {"samples": n, "nn_l2_samples": round(float(np.median(d_s)), 3),
            "nn_l2_held_out": round(float(np.median(d_h)), 3),
            "nn_ssim_samples": round(ssim(samples, j_s), 3), "nn_ssim_held_out": round(ssim(held_out, j_h), 3),
            "min_sample_to_train": round(float(d_s.min()), 3), "closest_train_pair": round(closest_pair, 3),
            "memorised": bool(d_s.min() < closest_pair)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, required=True, help="a built-in benchmark (medae make-benchmark)")
    ap.add_argument("--out", type=Path, default=Path("runs/other-jobs"))
    ap.add_argument("--samples", type=int, default=200)
    a = ap.parse_args()
    from medae_core.site import load_site_data

    t0 = time.time()
    site = a.bench / "site-1"
    base = RunConfig().with_overrides({"train.num_threads": 2})
    a.out.mkdir(parents=True, exist_ok=True)
    models = {}
    for kind in ("dae", "vae"):
        for dp in (False, True):
            cfg = base.with_overrides({"model.kind": kind} | ({} if dp else {"privacy.enabled": False}))
            name = f"{kind.upper()}, {'DP ε = 8' if dp else 'no DP'}"
            print(f"training {name}", flush=True)
            models[name] = model_of(train(site, a.out / f"{kind}-{'dp' if dp else 'nodp'}", cfg))
    data = load_site_data(site, base)
    known = data.test.labels >= 0
    clean, labels = data.test.images[known], data.test.labels[known]
    rng = np.random.default_rng(0)
    result = {
        "site": "site-1", "test_images": int(len(clean)),
        "denoising": denoising(clean, {k: v for k, v in models.items() if k.startswith("DAE")}, rng),
        "compression": compression(clean, models["DAE, no DP"]),
        "features": features(clean, labels, {k: v for k, v in models.items() if k.startswith("VAE")}),
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
    lines += ["", "**Compression** (64 × 64 px, 8-bit source = 4096 bytes)", "", "| method | bytes per image | PSNR / SSIM |",
              "|---|---|---|"]
    lines += [f"| {c['method']} | {c['bytes']} | {c['psnr_ssim'][0]} / {c['psnr_ssim'][1]} |" for c in r["compression"]]
    lines += ["", "**Features**: linear probe, lesion vs healthy slice, 5-fold AUROC", "", "| features | AUROC |",
              "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["features"].items()]
    lines += ["", "**Generation** (median nearest-training-image L2; SSIM to it)", "",
              "| model | samples: NN L2 / SSIM | held-out real: NN L2 / SSIM | closest sample to training | "
              "closest training pair (other patients) | memorised |", "|---|---|---|---|---|---|"]
    for k, g in r["generation"].items():
        lines.append(f"| {k} | {g['nn_l2_samples']} / {g['nn_ssim_samples']} | {g['nn_l2_held_out']} / "
                     f"{g['nn_ssim_held_out']} | {g['min_sample_to_train']} | {g['closest_train_pair']} | "
                     f"{'yes' if g['memorised'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
