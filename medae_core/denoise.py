"""`medae denoise` and `medae translate`: a model's image for every input image, in the input's format and units.

`medae denoise` writes the model's clean reconstruction; `medae translate` writes what a
conditional VAE makes of the image with another label (T1 in, a synthetic T2 out). Both
go through the same readers and writers; only the model call and the tags differ.

For each usable image (read as training reads it, so every skip reason and size
limit applies) the model reconstructs the slice at its own size; the
reconstruction is resized back to the file's matrix (the reader's centred
square padding undone) and mapped back to the stored units.

The map back: the reader turned stored values into [0, 1] by a linear window
or percentile scaling. `back_to_units` fits that line (least squares over the
pixels the reader did not clip) and applies its inverse, so any linear
mapping, MONOCHROME1 included, is undone exactly. Intensities outside the
window the model sees are clipped to its edges: the model never saw them.

Outputs: DICOM stays DICOM (same geometry and patient, new SOP and Series
Instance UIDs, ImageType ``DERIVED\\SECONDARY``, a SeriesDescription and
DerivationDescription that say medae made it, written uncompressed; a translation
also says in ImageComments that it is synthetic and not a diagnostic image); NIfTI
stays NIfTI (the first volume, same affine and voxel order, float32, the
header's ``descrip`` says medae made it); PNG, JPEG, BMP and TIFF pages become
PNG (16-bit when the input had more than 8 bits).

Each file is read twice: once by training's reader (normalised slices for the
model) and once for its stored values, which are what the output replaces. No
folder-wide scan holds every image in memory.
The input folder is only read; the output folder is complete or absent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medae_core.data import UnusableFile, file_format, list_files, read_checked, to_square
from medae_core.data.readers import axial_view, first_volume, from_axial_view
from medae_core.errors import ConfigError, NoUsableImagesError
from medae_core.fileio import ensure_outside, output_folder, printable_path, write_json

log = logging.getLogger(__name__)

# Pixels the reader mapped strictly inside (0, 1) by this margin define the line that is inverted.
_UNCLIPPED = (0.002, 0.998)
_MIN_PIXELS = 16


def back_to_units(normalised: np.ndarray, stored: np.ndarray, values: np.ndarray) -> np.ndarray | None:
    """``values`` (in the reader's [0, 1]) in the units of ``stored``, by the line that maps stored → normalised.

    None when the mapping cannot be recovered (too few unclipped pixels, or a flat line).
    """
    inside = (normalised > _UNCLIPPED[0]) & (normalised < _UNCLIPPED[1])
    if inside.sum() < _MIN_PIXELS:
        return None
    x, y = normalised[inside].astype(np.float64), stored[inside].astype(np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    if not np.isfinite(slope) or abs(slope) < 1e-12:
        return None
    return slope * np.clip(values, 0.0, 1.0) + intercept


def to_matrix(square: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Undo `to_square`: resize to the padded side, then cut out the original ``shape`` (centred)."""
    h, w = shape
    side = max(h, w)
    big = np.asarray(Image.fromarray(square.astype(np.float32)).resize((side, side), resample=Image.BILINEAR))
    top, left = (side - h) // 2, (side - w) // 2
    return big[top:top + h, left:left + w]


@dataclass(frozen=True)
class Derivation:
    """What a derived image says about itself: its NIfTI ``descrip`` and DICOM tags."""

    verb: str  # "denoised", or "synthetic t2" for a translation
    model: str  # the bundle's sha256
    description: str  # DerivationDescription
    comments: str = ""  # ImageComments (a translation: synthetic, not diagnostic)
    series: str = ""  # SeriesDescription; default: "medae <verb> <the input's>"


# Decodes the slices of one file (its path relative to the input folder) into the model's images.
ModelCall = Callable[[list, str], np.ndarray]


def denoise_folder(model_path: Path, input_dir: Path, out: Path, *, device=None, progress=None) -> dict:
    from medae_core.latent import load_model, model_sha256

    bundle, model, device = load_model(model_path, device)
    if model.conditional:
        raise ConfigError("this bundle is a conditional VAE: use `medae translate` (with --to) for its images")
    size = bundle.config.model.image_size

    @torch.no_grad()
    def reconstruct(slices: list, rel: str) -> np.ndarray:
        x = torch.as_tensor(np.stack([to_square(s.image, size) for s in slices])[:, None], device=device)
        return model.reconstruct(x).float().cpu().numpy()[:, 0]

    digest = model_sha256(model_path)
    how = Derivation("denoised", digest, f"medae denoise: autoencoder reconstruction, model sha256 {digest[:16]}")
    return derive_folder(bundle.config.data, input_dir, out, reconstruct, how, {"model_sha256": digest},
                         progress=progress)


SYNTHETIC_NOTE = ("SYNTHETIC IMAGE made by medae translate (a conditional VAE); "
                  "not an acquired image and not for diagnosis")


def translate_folder(model_path: Path, input_dir: Path, out: Path, to: str, *, device=None, progress=None) -> dict:
    """Every image of ``input_dir`` as the CVAE shows it with the label ``to``, in the input's format and units.

    An image's own label is read as training reads it (`medae_core.data.dataset.contrast_of`);
    an image without one, or already of ``to``, is skipped with the reason.
    """
    from medae_core.data.dataset import contrast_of
    from medae_core.latent import load_model, model_sha256

    bundle, model, device = load_model(model_path, device)
    labels = bundle.config.model.labels
    if not model.conditional:
        raise ConfigError(f"`translate` needs a conditional VAE (model.kind = \"cvae\"); this bundle is a "
                          f"{bundle.config.model.kind!r}")
    if to not in labels:
        raise ConfigError(f"--to must be one of this model's labels: {', '.join(labels)}; got {to!r}")
    size, data = bundle.config.model.image_size, bundle.config.data

    @torch.no_grad()
    def translate(slices: list, rel: str) -> np.ndarray:
        source = contrast_of(slices[0].series, rel, data)
        if source == to:
            raise UnusableFile(f"already {to}")
        x = torch.as_tensor(np.stack([to_square(s.image, size) for s in slices])[:, None], device=device)
        cond = torch.full((len(x),), labels.index(source), device=device)
        return model.translate(x, cond, torch.full_like(cond, labels.index(to))).float().cpu().numpy()[:, 0]

    digest = model_sha256(model_path)
    how = Derivation(f"synthetic {to}", digest,
                     f"medae translate to {to}: conditional VAE, model sha256 {digest[:16]}",
                     comments=SYNTHETIC_NOTE, series=f"{to.upper()} SYNTHETIC medae translate")
    return derive_folder(data, input_dir, out, translate, how,
                         {"model_sha256": digest, "to": to, "synthetic": True, "note": SYNTHETIC_NOTE},
                         progress=progress)


def derive_folder(data, input_dir: Path, out: Path, model_call: ModelCall, how: Derivation, info: dict, *,
                  progress=None) -> dict:
    """The model's image for each usable input file, written like it into ``out`` (complete or absent)."""
    input_dir, out = Path(input_dir).absolute(), Path(out).absolute()
    ensure_outside(out, input_dir)
    with output_folder(out) as stage:
        files, left_out = list_files(input_dir)
        written, skipped = [], [{"path": printable_path(s.path), "reason": s.reason} for s in left_out]
        series: dict[str, str] = {}
        for n, rel in enumerate(files, 1):
            try:
                written += _derive_file(input_dir / rel, rel, stage, data, model_call, series, how)
            except UnusableFile as exc:
                skipped.append({"path": printable_path(rel), "reason": exc.reason})
            if progress:
                progress(n, len(files))
        if not written:
            raise NoUsableImagesError(f"no usable image under {input_dir} ({len(skipped)} files skipped)")
        summary = {"files_written": len(written), "skipped": skipped, **info}
        write_json(stage / "summary.json", summary)
    return summary


def _derive_file(path: Path, rel: str, stage: Path, data, model_call: ModelCall, series: dict,
                 how: Derivation) -> list:
    slices = read_checked(path, rel, data)  # every reason and size limit of training's reader applies
    recons = model_call(slices, rel)
    target = stage / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    kind = file_format(path)
    if kind == "dicom":
        return [_write_dicom(path, target, slices, recons, series, how)]
    if kind == "nifti":
        return [_write_nifti(path, target, slices, recons, how)]
    return _write_raster(path, target, slices, recons)


def _write_nifti(path: Path, target: Path, slices, recons, how: Derivation) -> Path:
    """The first volume with every reconstructed axial slice replaced, in the file's own voxel order and affine.

    The reader works on the closest-canonical (RAS+) volume and shows its axial
    slices like DICOM (`axial_view`); both are undone here. Slices the reader
    leaves out (too little foreground) are copied unchanged. Stored as float32
    (no scaling), so the restored units are exact.
    """
    import nibabel as nib

    img = first_volume(nib.load(path))
    canonical = nib.as_closest_canonical(img)
    volume = np.nan_to_num(canonical.get_fdata(dtype=np.float32))
    for s, recon in zip(slices, recons, strict=True):
        shown = axial_view(volume[:, :, s.frame])
        units = back_to_units(s.image, shown, to_matrix(recon, s.image.shape))
        if units is None:
            raise UnusableFile("its intensity mapping cannot be inverted (too few unclipped pixels)")
        volume[:, :, s.frame] = from_axial_view(units)
    header = canonical.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    header["descrip"] = f"medae {how.verb} {how.model[:16]}".encode()[:79]
    out = nib.Nifti1Image(volume.astype(np.float32), canonical.affine, header)
    back = nib.orientations.ornt_transform(nib.io_orientation(canonical.affine), nib.io_orientation(img.affine))
    out = out.as_reoriented(back)
    name = target if target.name.endswith((".nii", ".nii.gz")) else target.with_suffix(".nii.gz")
    nib.save(out, name)
    return name


def _write_dicom(path: Path, target: Path, slices, recons, series: dict, how: Derivation) -> Path:
    import pydicom
    from pydicom.pixels import apply_modality_lut
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.dcmread(path)
    if int(ds.get("SamplesPerPixel", 1)) != 1 or str(ds.get("PhotometricInterpretation", "")).startswith("PALETTE"):
        raise UnusableFile("colour image: medae writes monochrome images only")
    if "ModalityLUTSequence" in ds:
        raise UnusableFile("modality LUT sequence: the stored units cannot be restored")
    stored = ds.pixel_array
    frames = stored if int(ds.get("NumberOfFrames") or 1) > 1 else stored[None]
    values = apply_modality_lut(frames, ds).astype(np.float64)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    out = frames.copy()
    for s, recon in zip(slices, recons, strict=True):
        f = s.frame or 0
        units = back_to_units(s.image, values[f], to_matrix(recon, s.image.shape))
        if units is None:
            raise UnusableFile("its intensity mapping cannot be inverted (too few unclipped pixels)")
        out[f] = np.clip(np.rint((units - intercept) / slope), low, high).astype(frames.dtype)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # written uncompressed, little endian
    ds.PixelData = np.ascontiguousarray(out if len(out) > 1 else out[0]).astype(
        out.dtype.newbyteorder("<")).tobytes()
    old_series = str(ds.get("SeriesInstanceUID", ""))
    ds.SeriesInstanceUID = series.setdefault(old_series, generate_uid())
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    kept = list(ds.get("ImageType", []))[2:]
    ds.ImageType = ["DERIVED", "SECONDARY", *kept]
    ds.SeriesDescription = (how.series or f"medae {how.verb} {ds.get('SeriesDescription', '')}").strip()[:64]
    ds.DerivationDescription = how.description[:1024]
    if how.comments:
        ds.ImageComments = how.comments[:10240]
    ds.save_as(target, enforce_file_format=True)
    return target


def _write_raster(path: Path, target: Path, slices, recons) -> list[Path]:
    written = []
    with Image.open(path) as im:
        pages = [page.copy() for page in _pages(im)]
    for s, recon in zip(slices, recons, strict=True):
        page = pages[s.frame or 0]
        deep = page.mode in ("I", "I;16", "I;16B", "I;16L", "F")
        gray = np.asarray(page if deep else page.convert("L"), dtype=np.float64)
        units = back_to_units(s.image, gray, to_matrix(recon, s.image.shape))
        if units is None:
            raise UnusableFile("its intensity mapping cannot be inverted (too few unclipped pixels)")
        name = target.with_suffix(".png") if s.frame is None else target.with_name(
            f"{target.stem}__{s.frame:04d}.png")
        if deep:
            Image.fromarray(np.clip(np.rint(units), 0, 65535).astype(np.uint16)).save(name, format="PNG")
        else:
            Image.fromarray(np.clip(np.rint(units), 0, 255).astype(np.uint8), mode="L").save(name, format="PNG")
        written.append(name)
    return written


def _pages(im: Image.Image):
    from PIL import ImageSequence

    return list(ImageSequence.Iterator(im))
