"""Read one file into normalised 2-D float32 slices, or say why it cannot be used.

About 550 lines: one reader per format (DICOM with its transfer syntaxes, NIfTI, raster),
each with its decoded-size check before decoding; they share the `Slice` type and the error mapping.

Every reader returns a list of `Slice` objects whose ``image`` is a 2-D float32
array in [0, 1] at the file's own resolution; `to_square` brings slices to the
model's size afterwards. A file that cannot be used raises `UnusableFile` with a
short reason for a person ("truncated pixel data", "no pixel data (RT Plan)").
Reasons are groupable: anything file-specific comes after the first ``": "``.

Formats are chosen by file name:

* ``.nii`` / ``.nii.gz``: NIfTI, read with nibabel (`_read_nifti`).
* ``.png .jpg .jpeg .bmp .tif .tiff``: raster images, read with Pillow.
* anything else is tried as DICOM. Files are opened read-only and nothing is
  ever written next to them.

DICOM without the 128-byte preamble and ``DICM`` prefix ("no meta") is read
with ``force=True`` only when the name ends in ``.dcm`` or has no extension
(numeric suffixes, as in UID-named files ``1.2.840.113619.2.55.3``, count as
none), because a forced read "succeeds" on any byte string. A forced dataset
must still contain a SOP Class UID or pixel data, else the file is
"not a DICOM file". Tested on pydicom's bundled files:
``ExplVR_LitEndNoMeta.dcm`` is then recognised and skipped as
"no pixel data (RT Ion Plan)"; ``no_meta.dcm`` parses only as garbage and is
skipped as "not a DICOM file". For a forced dataset with uncompressed pixel
data the transfer syntax is taken from the encoding pydicom detected.

Size limit (``data.max_image_mb``): one hostile file must not take a site's
memory. Before anything is decoded, the decoded size is computed from the
header (DICOM rows x columns x frames x samples x bytes per sample; NIfTI the
first volume's shape x dtype; raster width x height x bands x bytes x pages)
and a file over the limit is skipped as "too large". A DICOM file is also
refused when it is itself larger than the limit, and a Deflated Explicit VR
file is inflated in a stream, counting, before pydicom inflates it whole,
so a deflate bomb of a few kB costs no more than its limit.

Patient keys: DICOM PatientID, else StudyInstanceUID, else the file's path
relative to the scanned root. NIfTI and raster files carry no patient
identity, so each file is its own patient (key: its relative path).
"""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image, ImageSequence
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medae_core.config import DataConfig
from medae_core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Names whose DICOM reading may fall back to force=True (see module docstring).
FORCE_SUFFIXES = ("", ".dcm")
# Extensions that are never images; not even a DICOM read is attempted.
TEXT_SUFFIXES = (".csv", ".txt", ".json", ".md", ".xml", ".html", ".pdf", ".py", ".toml", ".yaml", ".yml")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Objects that carry pixel data but are not pictures of anatomy.
NOT_IMAGES = {"RTDOSE": "dose grid, not an image", "SEG": "segmentation, not an image"}
# NIfTI: a voxel is foreground when its normalised value exceeds this.
FOREGROUND_LEVEL = 0.1
PERCENTILE_SAMPLES = 32768
# BT.601 luma weights, the same Pillow uses for RGB -> "L".
LUMA = np.array([0.299, 0.587, 0.114])
MIB = 2**20
INFLATE_CHUNK = 4 * MIB  # largest piece of a deflated data set held while it is counted
# Bytes per band of Pillow's modes; anything else counts as 4 (the widest, "I" / "F").
RASTER_BAND_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 1, "RGB": 1, "RGBA": 1, "CMYK": 1, "YCbCr": 1,
                     "I;16": 2, "I;16B": 2, "I;16L": 2}


class UnusableFile(DataError):
    """A file holds no usable image; ``reason`` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Slice:
    image: np.ndarray  # [H, W] float32 in [0, 1]
    frame: int | None  # DICOM frame / NIfTI axial slice / TIFF page; None for single images
    patient: str
    modality: str = ""  # DICOM Modality (MR, CT, ...); "" for other formats
    photometric: str = ""  # DICOM PhotometricInterpretation; "" for other formats
    series: str = ""  # DICOM SeriesDescription (where a contrast label is read); "" for other formats
    position: float | None = None  # DICOM: slice position along the slice normal (mm); else None


# -- dispatch -----------------------------------------------------------------
def suffix_of(path: Path) -> str:
    """Lower-case extension; ``.nii.gz`` as one, numeric (UID-like) suffixes as none."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    suffix = Path(name).suffix
    return "" if suffix[1:].isdigit() else suffix


def file_format(path: Path) -> str:
    """'nifti', 'raster' or 'dicom' (the latter meaning: try DICOM)."""
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in RASTER_SUFFIXES:
        return "raster"
    return "dicom"


def read_file(path: Path, rel: str, data: DataConfig) -> list[Slice]:
    """Read ``path`` (``rel`` is its path relative to the scanned root) into slices."""
    _reject_by_name(path)
    reader = {"nifti": _read_nifti, "raster": _read_raster, "dicom": _read_dicom}[file_format(path)]
    return reader(path, rel, data)


def _reject_by_name(path: Path) -> None:
    suffix = suffix_of(path)
    if path.name.startswith("."):
        raise UnusableFile("not an image file (hidden)")
    if path.name.upper() == "DICOMDIR":
        raise UnusableFile("not an image file (DICOMDIR)")
    if suffix in TEXT_SUFFIXES:
        raise UnusableFile(f"not an image file ({suffix})")


# -- size limit -------------------------------------------------------------------
def check_decoded_size(nbytes: int, data: DataConfig, what: str = "decodes to") -> None:
    """Raise `UnusableFile` ("too large: ...") when ``nbytes`` exceeds ``data.max_image_mb``."""
    if nbytes > data.max_image_mb * MIB:
        raise UnusableFile(
            f"too large: {what} {_size(nbytes)}, over the limit data.max_image_mb = {data.max_image_mb:g} MiB"
        )


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _header_int(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UnusableFile(f"unreadable DICOM: {keyword} is not a number ({str(value)[:40]!r})") from None
    if number < 0:
        raise UnusableFile(f"unreadable DICOM: {keyword} is negative ({number})")
    return number


def dicom_decoded_bytes(ds: Dataset) -> int:
    """Bytes the pixel data decodes to, from the header alone (before any decoding)."""
    samples = _header_int(ds, "SamplesPerPixel", 1)
    bits = _header_int(ds, "BitsAllocated", 8)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        samples, bits = 3, max(bits, 16)  # the colour LUT's output
    return (
        _header_int(ds, "Rows", 0)
        * _header_int(ds, "Columns", 0)
        * max(1, _header_int(ds, "NumberOfFrames", 1))
        * max(1, samples)
        * max(1, math.ceil(bits / 8))
    )


def _check_deflated(path: Path, data: DataConfig) -> None:
    """Inflate a Deflated Explicit VR data set in a stream, counting; refuse it past the limit.

    pydicom inflates the whole data set in memory on `dcmread`; a kB-sized
    deflate bomb would become GBs before any header could be checked. Other
    transfer syntaxes return at once (only the 132-byte preamble and the file
    meta group are read).
    """
    with path.open("rb") as fp:
        try:
            read_preamble(fp, force=True)
            meta = _read_file_meta_info(fp)
        except Exception:  # no or broken meta: pydicom's own read reports it
            return
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        try:
            while not inflater.eof and (chunk := fp.read(INFLATE_CHUNK)):
                while chunk:
                    total += len(inflater.decompress(chunk, INFLATE_CHUNK))
                    check_decoded_size(total, data, "its deflated data set inflates to more than")
                    chunk = inflater.unconsumed_tail
        except zlib.error as exc:
            raise UnusableFile(f"undecodable (Deflated Explicit VR Little Endian): {_one_line(exc)}") from None


# -- intensity ------------------------------------------------------------------
def percentile_scale(values: np.ndarray, low: float, high: float, sample: np.ndarray | None = None) -> np.ndarray:
    """Map the ``low``..``high`` percentiles of ``sample`` (default: ``values``) to 0..1.

    Percentiles come from an evenly strided subsample of at most about
    `PERCENTILE_SAMPLES` values: exact enough, and 10x faster on 512 px images.
    """
    sample = (values if sample is None else sample).ravel()
    sample = sample[:: max(1, sample.size // PERCENTILE_SAMPLES)]
    if sample.size == 0:
        return np.zeros(values.shape, np.float32)
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:  # constant sample (e.g. a binary volume): its value -> 1, anything below -> 0
        return (values >= hi).astype(np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def window_scale(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window: ``center - width/2`` -> 0, ``center + width/2`` -> 1."""
    return np.clip((values - (center - width / 2)) / width, 0.0, 1.0).astype(np.float32)


def _config_window(data: DataConfig) -> tuple[float, float]:
    if data.window_center is None or data.window_width is None or data.window_width <= 0:
        raise ConfigError(
            'data.intensity = "window" needs data.window_center and a positive data.window_width '
            "(for example 40 and 400 for a CT soft-tissue window)"
        )
    return data.window_center, data.window_width


# -- DICOM ----------------------------------------------------------------------
def _read_dicom(path: Path, rel: str, data: DataConfig) -> list[Slice]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _open_dicom(path, data)
        _require_image(ds)
        frames = _decode(ds, data)
        images = _dicom_intensity(frames, ds, data)
    for w in caught:
        log.debug("%s: %s", rel, w.message)
    multi = len(images) > 1
    patient = _dicom_patient(ds, rel)
    modality, photometric = str(ds.get("Modality", "") or ""), str(ds.get("PhotometricInterpretation", "") or "")
    series, position = str(ds.get("SeriesDescription", "") or "").strip(), _slice_position(ds)
    slices = [
        Slice(img, i if multi else None, patient, modality, photometric, series, position if not multi else None)
        for i, (img, raw) in enumerate(zip(images, frames))
        if raw.max() > raw.min()
    ]
    if not slices:
        raise UnusableFile("blank image (all pixels equal)")
    return slices


def _open_dicom(path: Path, data: DataConfig) -> Dataset:
    check_decoded_size(path.stat().st_size, data, "the file is")
    _check_deflated(path, data)
    ds = _parse_dicom(path)
    _guess_transfer_syntax(ds)
    return ds


def _parse_dicom(path: Path) -> Dataset:
    may_force = suffix_of(path) in FORCE_SUFFIXES
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        if not may_force:
            raise UnusableFile(f"not an image file ({suffix_of(path)})") from None
    except Exception as exc:  # damaged header, unreadable file
        raise UnusableFile(f"unreadable DICOM: {_one_line(exc)}") from None
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:
        raise UnusableFile("not a DICOM file") from None
    if "SOPClassUID" not in ds and not _has_pixels(ds):
        raise UnusableFile("not a DICOM file")
    return ds


def _guess_transfer_syntax(ds: Dataset) -> None:
    """Give a dataset without Transfer Syntax UID (no-meta files) the one it was parsed with.

    Changes only the in-memory dataset; uncompressed pixel data then decodes.
    """
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
        ds.file_meta = meta


def _has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in PIXEL_KEYWORDS)


def _object_type(ds: Dataset) -> str:
    """Human name of the object: 'RT Plan' from 'RT Plan Storage', else the modality."""
    sop = ds.get("SOPClassUID")
    name = sop.name if sop is not None else ""
    if name and name != str(sop):
        return name.removesuffix(" Storage")
    return str(ds.get("Modality") or "unknown object type")


def _require_image(ds: Dataset) -> None:
    if not _has_pixels(ds):
        raise UnusableFile(f"no pixel data ({_object_type(ds)})")
    modality = str(ds.get("Modality", "")).upper()
    if modality in NOT_IMAGES:
        raise UnusableFile(f"{NOT_IMAGES[modality]} ({_object_type(ds)})")


def _decode(ds: Dataset, data: DataConfig) -> np.ndarray:
    """Pixel data as an array with a leading frame axis: [F, H, W] or [F, H, W, 3].

    The header's decoded size is checked against the limit first: an RLE or
    JPEG file of a few hundred bytes can claim 60000 x 60000 pixels.
    """
    check_decoded_size(dicom_decoded_bytes(ds), data)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        if "PixelData" in ds and syntax is not None and not syntax.is_compressed:
            if len(ds.PixelData) < get_expected_length(ds):
                raise UnusableFile("truncated pixel data")
        arr = ds.pixel_array
    except UnusableFile:
        raise
    except Exception as exc:
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise UnusableFile(f"undecodable ({name}): {_one_line(exc)}") from None
    frames = int(ds.get("NumberOfFrames") or 1)
    return arr if frames > 1 else arr[None]


def _dicom_intensity(frames: np.ndarray, ds: Dataset, data: DataConfig) -> list[np.ndarray]:
    """Stored values -> [0, 1] display intensities, one array per frame."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        frames = apply_color_lut(frames, ds)
    if frames.ndim == 4:  # colour: display-ready pixels, scaled by their type's range
        gray = frames.astype(np.float64) @ LUMA
        if data.intensity == "percentile":
            return [percentile_scale(g, data.percentile_low, data.percentile_high) for g in gray]
        return list((gray / np.iinfo(frames.dtype).max).astype(np.float32))
    values = apply_modality_lut(frames, ds)
    images = _gray_levels(values, ds, data)
    if photometric == "MONOCHROME1":
        images = [1.0 - img for img in images]
    return images


def _gray_levels(values: np.ndarray, ds: Dataset, data: DataConfig) -> list[np.ndarray]:
    if data.intensity == "window":
        return list(window_scale(values, *_config_window(data)))
    if data.intensity == "auto":
        voi = _file_voi(values, ds)
        if voi is not None:
            return list(voi)
    return [percentile_scale(v, data.percentile_low, data.percentile_high) for v in values]


def _file_voi(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The file's own VOI LUT or window via pydicom, rescaled to [0, 1]; None if absent/invalid."""
    has_lut = bool(ds.get("VOILUTSequence"))
    if not has_lut and ("WindowCenter" not in ds or "WindowWidth" not in ds):
        return None
    try:
        out = apply_voi_lut(values, ds)
        if has_lut:
            lo, hi = 0.0, 2.0 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1
        else:  # pydicom's window output spans [y_min, y_max]; its ends are what +-inf map to
            lo, hi = apply_voi_lut(np.array([-np.inf, np.inf]), ds)
    except Exception as exc:
        log.debug("ignoring the file's VOI (%s); using percentiles", _one_line(exc))
        return None
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _slice_position(ds: Dataset) -> float | None:
    """ImagePositionPatient along the slice normal (mm), the key that pairs slices across series."""
    try:
        orientation = [float(v) for v in ds.ImageOrientationPatient]
        origin = [float(v) for v in ds.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(orientation) != 6 or len(origin) != 3:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    value = float(np.dot(normal, origin))
    return round(value, 3) if np.isfinite(value) else None


def _dicom_patient(ds: Dataset, rel: str) -> str:
    for keyword in ("PatientID", "StudyInstanceUID"):
        value = str(ds.get(keyword) or "").strip()
        if value:
            return value
    return rel


# -- NIfTI ----------------------------------------------------------------------
def _read_nifti(path: Path, rel: str, data: DataConfig) -> list[Slice]:
    """Axial slices of the RAS-reoriented volume; slices with little foreground are left out.

    Intensities are scaled once for the whole volume (percentiles of the
    non-zero voxels, or the configured window, e.g. on CT in HU), so slices of
    one volume stay comparable.
    """
    volume = _nifti_volume(path, rel, data)
    if data.intensity == "window":
        norm = window_scale(volume, *_config_window(data))
    else:
        nonzero = volume[volume != 0]
        norm = percentile_scale(volume, data.percentile_low, data.percentile_high, sample=nonzero)
    slices = []
    for k in range(norm.shape[2]):
        img = axial_view(norm[:, :, k])
        if (img > FOREGROUND_LEVEL).mean() >= data.min_foreground:
            slices.append(Slice(img, k, rel))
    if not slices:
        raise UnusableFile("no slice with foreground")
    return slices


def _nifti_volume(path: Path, rel: str, data: DataConfig) -> np.ndarray:
    """First 3-D volume, reoriented to the closest canonical (RAS+) axes, NaN-free float32.

    nibabel reads the header only on `load`; the first volume's size is checked
    against the limit before its voxels are read (a gzip of zeros whose header
    claims 2000^3 voxels is a few kB).
    """
    try:
        img = nib.load(path)
        shape = tuple(int(n) for n in img.shape[:3])
        itemsize = max(img.get_data_dtype().itemsize, np.dtype(np.float32).itemsize)
        check_decoded_size(math.prod(shape) * itemsize, data, f"its first volume {shape} decodes to")
        if len(img.shape) > 3:
            log.info("%s is %d-D; using its first volume", rel, len(img.shape))
        elif len(img.shape) < 3:
            raise UnusableFile(f"not a volume: NIfTI with shape {img.shape}")
        img = first_volume(img)
        volume = nib.as_closest_canonical(img).get_fdata(dtype=np.float32)
    except UnusableFile:
        raise
    except Exception as exc:
        raise UnusableFile(f"unreadable NIfTI: {_one_line(exc)}") from None
    return np.nan_to_num(volume, nan=0.0, posinf=0.0, neginf=0.0)


def first_volume(img):
    """The first 3-D volume of a NIfTI image (the image itself when it is 3-D): the one medae reads."""
    if len(img.shape) > 3:
        return img.slicer[(slice(None),) * 3 + (0,) * (len(img.shape) - 3)]
    return img


def axial_view(ras_slice: np.ndarray) -> np.ndarray:
    """Display an [x, y] RAS slice like a DICOM axial image.

    Anterior at the top and the patient's right on the image's left
    (radiological convention), so NIfTI and DICOM of the same anatomy look alike.
    """
    return np.ascontiguousarray(ras_slice[::-1, ::-1].T)


def from_axial_view(image: np.ndarray) -> np.ndarray:
    """The [x, y] RAS slice that `axial_view` shows as ``image`` (its inverse)."""
    return np.ascontiguousarray(image.T[::-1, ::-1])


# -- raster images ----------------------------------------------------------------
def _read_raster(path: Path, rel: str, data: DataConfig) -> list[Slice]:
    """PNG/JPEG/BMP/TIFF to gray. Multi-page TIFFs give one slice per page.

    8-bit images are display-ready and divided by 255, so intensities stay
    comparable between images. Images with more bits (16-bit PNG/TIFF, float
    TIFF) often use only part of their range (12-bit data in 16 bits), so they
    get per-image percentile scaling. ``data.intensity = "percentile"`` scales
    every image by percentiles.
    """
    pages = _raster_pages(path, data, lambda page: _raster_gray(page, data))
    multi = len(pages) > 1
    slices = [Slice(img, i if multi else None, rel) for i, img in enumerate(pages) if img.max() > img.min()]
    if not slices:
        raise UnusableFile("blank image (all pixels equal)")
    return slices


def _raster_pages(path: Path, data: DataConfig, convert) -> list[np.ndarray]:
    """``convert(page)`` for every page, after the size check; any failure is an `UnusableFile`."""
    try:
        with Image.open(path) as im:
            check_decoded_size(_raster_bytes(im), data)
            return [convert(page) for page in ImageSequence.Iterator(im)]
    except UnusableFile:
        raise
    except Image.DecompressionBombError as exc:
        raise UnusableFile(f"too large: {_one_line(exc)}") from None
    except Exception as exc:
        raise UnusableFile(f"unreadable image file: {_one_line(exc)}") from None


def _raster_bytes(im: Image.Image) -> int:
    """Decoded size of all pages from the header (Pillow opens lazily)."""
    width, height = im.size
    per_band = RASTER_BAND_BYTES.get(im.mode, 4)
    return width * height * len(im.getbands()) * per_band * max(1, int(getattr(im, "n_frames", 1)))


def _raster_gray(page: Image.Image, data: DataConfig) -> np.ndarray:
    if page.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(page, dtype=np.float32)
        return percentile_scale(values, data.percentile_low, data.percentile_high)
    gray = np.asarray(page.convert("L"), dtype=np.float32)
    if data.intensity == "percentile":
        return percentile_scale(gray, data.percentile_low, data.percentile_high)
    return gray / 255.0


# -- masks ------------------------------------------------------------------------
def read_mask(path: Path, data: DataConfig) -> list[np.ndarray]:
    """Ground-truth mask as boolean 2-D arrays, one per frame/slice (non-zero = anomalous).

    Oriented like the images `read_file` returns, without intensity scaling or
    slice selection, so mask ``i`` belongs to image frame ``i`` (frame None -> 0).
    Masks must be stored losslessly (PNG, NIfTI, DICOM incl. SEG). The same
    size limit as for images applies.
    """
    fmt = file_format(path)
    if fmt == "nifti":
        volume = _nifti_volume(path, path.name, data)
        return [axial_view(volume[:, :, k]) != 0 for k in range(volume.shape[2])]
    if fmt == "raster":
        return _raster_pages(path, data, lambda page: np.asarray(page.convert("L")) > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _open_dicom(path, data)
        if not _has_pixels(ds):
            raise UnusableFile(f"no pixel data ({_object_type(ds)})")
        frames = _decode(ds, data)
    if frames.ndim == 4:
        frames = frames.max(axis=-1)
    return list(frames != 0)


# -- resizing ---------------------------------------------------------------------
def to_square(img: np.ndarray, size: int, order: int = 1) -> np.ndarray:
    """Pad to a centred square with the background (the minimum), then resize to ``size``.

    Padding keeps the aspect ratio. ``order`` 1 is bilinear with Pillow's
    antialiasing (plain zoom would alias when shrinking 512 px to 64 px);
    order 0 is nearest. Boolean masks always use nearest and stay boolean.
    """
    is_mask = img.dtype == bool
    h, w = img.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    fill = False if is_mask else img.min()
    square = np.full((side, side), fill, dtype=np.uint8 if is_mask else np.float32)
    square[top : top + h, left : left + w] = img
    if side == size:
        return square.astype(bool) if is_mask else square
    resample = Image.NEAREST if is_mask or order == 0 else {1: Image.BILINEAR, 3: Image.BICUBIC}[order]
    out = np.asarray(Image.fromarray(square).resize((size, size), resample=resample))
    return out.astype(bool) if is_mask else out.astype(np.float32)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
