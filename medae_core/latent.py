"""The model's other jobs on any bundle: latent codes out (`encode_folder`), images from codes
(`decode_codes`), and new images from a VAE (`sample_images`).

Every bundle that `train-local`, `simulate` or `server` writes serves them, so a
federation trained under DP does too: these are post-processing of the trained
weights and spend no ε. They read the input folder and never write into it; each
output folder is staged and appears complete or not at all (`fileio.output_folder`).

Formats a researcher opens without medae:
- codes: ``CODES/codes.npz`` (``codes [N, latent_dim]`` float32, ``path [N]``,
  ``frame [N]`` with -1 for single images, ``model_sha256``, ``kind``,
  ``image_size``) and the same rows in ``CODES/manifest.csv``;
- images: 8-bit grayscale PNG of the model's [0, 1] output, or, for `sample`,
  synthetic DICOM (Secondary Capture, 16-bit) marked as synthetic and carrying
  no identifier of any site.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import torch

from medae_core.bundle import WEIGHTS, load_bundle, resolve_bundle_dir
from medae_core.data import scan_folder
from medae_core.errors import ConfigError, DataError, NoUsableImagesError
from medae_core.fileio import ensure_outside, output_folder, printable_path, safe_file_name, write_json

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
OUTPUT_FORMATS = ("png", "dicom")
_BATCH = 64


def model_sha256(model_path: Path) -> str:
    """SHA-256 of the bundle's weights file: which model made (and can decode) a set of codes."""
    digest = hashlib.sha256()
    with (resolve_bundle_dir(model_path) / WEIGHTS).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(model_path: Path, device=None):
    """(bundle, its model in eval mode on the device, the device): what every job over a bundle starts with."""
    from medae_core.devices import resolve_device

    bundle = load_bundle(model_path)
    device = resolve_device(device or bundle.config.train.device)
    return bundle, bundle.build_model().to(device).eval(), device


@torch.no_grad()
def _in_batches(fn, x: np.ndarray, device, progress=None, cond: np.ndarray | None = None) -> np.ndarray:
    """``fn(batch, cond batch)`` over ``x`` in batches (cond: a conditional model's label indices, or None)."""
    outs = []
    for start in range(0, len(x), _BATCH):
        batch = torch.as_tensor(x[start:start + _BATCH], dtype=torch.float32, device=device)
        c = None if cond is None else torch.as_tensor(cond[start:start + _BATCH], device=device)
        outs.append(fn(batch, c).float().cpu().numpy())
        if progress:
            progress(min(start + _BATCH, len(x)), len(x))
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def encode_folder(model_path: Path, input_dir: Path, out: Path, *, device=None, progress=None) -> dict:
    """The latent code of every usable image under ``input_dir`` (the posterior mean for a VAE)."""
    input_dir, out = Path(input_dir).absolute(), Path(out).absolute()
    ensure_outside(out, input_dir)
    bundle, model, device = load_model(model_path, device)
    cfg = bundle.config
    with output_folder(out) as stage:
        scan = scan_folder(input_dir, cfg.data, cfg.model.image_size)
        if len(scan.images) == 0:
            raise NoUsableImagesError(f"no usable image under {input_dir} ({len(scan.skipped)} files skipped)")
        cond = scan.contrast_index if model.conditional else None
        codes = _in_batches(model.encode, scan.images[:, None], device, progress, cond).astype(np.float32)
        paths = np.array([printable_path(e.path) for e in scan.entries])
        frames = np.array([-1 if e.frame is None else e.frame for e in scan.entries], dtype=np.int64)
        digest = model_sha256(model_path)
        labels = {} if cond is None else {"label": cond.astype(np.int64), "labels": np.array(cfg.model.labels)}
        np.savez(stage / "codes.npz", codes=codes, path=paths, frame=frames, model_sha256=np.array(digest),
                 kind=np.array(cfg.model.kind), image_size=np.array(cfg.model.image_size), **labels)
        with (stage / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["row", "path", "frame"])
            for i, (p, f) in enumerate(zip(paths, frames, strict=True)):
                writer.writerow([i, p, "" if f < 0 else int(f)])
        summary = {"images": len(codes), "latent_dim": int(codes.shape[1]), "model_sha256": digest,
                   "kind": cfg.model.kind, "skipped": [{"path": printable_path(s.path), "reason": s.reason}
                                                        for s in scan.skipped]}
        write_json(stage / "summary.json", summary)
    return summary


def read_codes(codes: Path) -> dict[str, np.ndarray]:
    """A codes folder from `encode_folder` (or its ``codes.npz``), checked."""
    codes = Path(codes)
    path = codes / "codes.npz" if codes.is_dir() else codes
    if not path.is_file():
        raise DataError(f"no codes at {codes}: expected the folder `medae encode` wrote (with codes.npz)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a codes file ({type(exc).__name__}); write it with `medae encode`") from None
    c = data.get("codes")
    if c is None or c.ndim != 2 or not np.issubdtype(c.dtype, np.floating) or not np.isfinite(c).all():
        raise DataError(f"{path} holds no finite [N, latent_dim] array 'codes'")
    return data


def decode_codes(model_path: Path, codes: Path, out: Path, *, device=None, progress=None) -> dict:
    """Images from latent codes, one PNG per code, named after the image it was encoded from."""
    data = read_codes(codes)
    bundle, model, device = load_model(model_path, device)
    z = data["codes"].astype(np.float32)
    if z.shape[1] != bundle.config.model.latent_dim:
        raise ConfigError(f"the codes have {z.shape[1]} dimensions; this {bundle.config.model.kind} decodes "
                          f"{bundle.config.model.latent_dim}: decode with the model that encoded them")
    cond = None
    if model.conditional:  # each code is decoded with the label it was encoded with
        cond = data.get("label")
        if cond is None or cond.shape != (len(z),) or list(data.get("labels", [])) != list(bundle.config.model.labels):
            raise DataError("these codes carry no labels of this conditional VAE: encode them with it "
                            "(`medae encode`), which records each image's label")
    digest = model_sha256(model_path)
    same = str(data.get("model_sha256", "")) == digest
    out = Path(out).absolute()
    with output_folder(out) as stage:
        images = _in_batches(model.decode, z, device, progress, cond)[:, 0]
        paths = data.get("path", np.array([f"code-{i}" for i in range(len(z))]))
        frames = data.get("frame", np.full(len(z), -1))
        names = [safe_file_name(str(p), None if int(f) < 0 else int(f), i + 1) + ".png"
                 for i, (p, f) in enumerate(zip(paths, frames, strict=True))]
        for name, image in zip(names, images, strict=True):
            write_png(stage / name, image)
        summary = {"images": len(names), "model_sha256": digest, "codes_from_this_model": same}
        write_json(stage / "summary.json", summary)
    return summary


def sample_images(model_path: Path, n: int, out: Path, *, seed: int = 0, fmt: str = "png", device=None,
                  label: str | None = None) -> dict:
    """``n`` new images from a VAE's prior, as PNG or synthetic DICOM; other model kinds are refused.

    A conditional VAE needs ``label`` (one of its ``model.labels``): the kind of image to make.
    """
    if n < 1:
        raise ConfigError(f"--n must be at least 1; got {n}")
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}; got {fmt!r}")
    bundle, model, device = load_model(model_path, device)
    if not hasattr(model, "sample"):
        raise ConfigError(f"`sample` needs a VAE: this bundle is a {bundle.config.model.kind!r}, whose codes have "
                          "no prior to draw from (train with model.kind = \"vae\")")
    labels = bundle.config.model.labels
    if model.conditional and label not in labels:
        raise ConfigError(f"this conditional VAE makes images of a chosen kind: give --label, one of "
                          f"{', '.join(labels)}" + (f" (got {label!r})" if label is not None else ""))
    if not model.conditional and label is not None:
        raise ConfigError(f"--label is for a conditional VAE (model.kind = \"cvae\"); this bundle is a "
                          f"{bundle.config.model.kind!r}")
    out = Path(out).absolute()
    generator = torch.Generator().manual_seed(int(seed))

    def draw(k: int) -> np.ndarray:
        cond = None if label is None else torch.full((k,), labels.index(label), device=device)
        return model.sample(k, generator, cond=cond).float().cpu().numpy()[:, 0]

    with output_folder(out) as stage:
        images = np.concatenate([draw(min(_BATCH, n - s)) for s in range(0, n, _BATCH)])
        series = _synthetic_series(seed) | {"label": label or ""}
        for i, image in enumerate(images):
            if fmt == "png":
                write_png(stage / f"sample-{i + 1:05d}.png", image)
            else:
                write_synthetic_dicom(stage / f"sample-{i + 1:05d}.dcm", image, series, i)
        summary = {"images": int(n), "format": fmt, "seed": int(seed), "model_sha256": model_sha256(model_path),
                   "privacy": "post-processing of the trained model: spends no ε"}
        if label is not None:
            summary["label"] = label
        write_json(stage / "summary.json", summary)
    return summary


# -- writers -----------------------------------------------------------------------
def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray((np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L").save(path, format="PNG")


def _synthetic_series(seed: int) -> dict[str, str]:
    from pydicom.uid import generate_uid

    return {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid(), "seed": str(seed)}


def write_synthetic_dicom(path: Path, image: np.ndarray, series: dict[str, str], index: int) -> None:
    """One generated image as DICOM Secondary Capture: synthetic patient, DERIVED\\SECONDARY, no site identifier."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series["study"], series["series"]
    ds.FrameOfReferenceUID = series["frame"]
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Modality = "OT"
    ds.ConversionType = "SYN"  # synthetic image
    ds.PatientName = "Synthetic^medae"
    ds.PatientID = f"SYNTHETIC-{series['seed']}-{index + 1:05d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.StudyDescription = "medae synthetic images (VAE samples, not a real patient)"
    label = series.get("label", "")
    ds.SeriesDescription = f"{label.upper()} SYNTHETIC medae CVAE sample" if label else "synthetic: medae VAE sample"
    ds.Manufacturer = "medae"
    ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (np.clip(image, 0.0, 1.0) * 65535.0 + 0.5).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
