"""Write a corpus of hostile image files: small on disk, enormous once decoded.

    python tests/hostile_corpus.py OUT_DIR

Each file is what an attacker or a broken exporter could leave in a site's
data folder. Every one of them must be skipped with a reason, without the
scan's memory growing with what the file claims (`tests/test_hostile_input.py`).
`CORPUS` maps each file name to the start of the reason it must be skipped with.

- DICOM whose header claims 60000 x 60000 pixels, in every compressed transfer
  syntax (RLE, JPEG baseline and lossless, JPEG-LS, JPEG 2000, HTJ2K) and
  uncompressed, each with a few bytes of pixel data;
- a Deflated Explicit VR DICOM whose data set inflates to 2 GiB (about 2 MB
  on disk);
- a gzipped NIfTI whose header claims 4000 x 4000 x 1000 voxels (a few kB);
- a gzipped NIfTI with a small header and 1 GiB of zeros behind it;
- a PNG that claims 30000 x 30000 pixels (its zlib stream is a few kB).
"""

from __future__ import annotations

import gzip
import struct
import sys
import zlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

HUGE = 60000  # rows and columns claimed by the DICOM headers (7.2 GB at 16 bits)
DEFLATE_INFLATED = 2 * 2**30
NIFTI_ZEROS = 2**30
TOO_LARGE = "too large"

COMPRESSED = {
    "rle": RLELossless,
    "jpeg-baseline": JPEGBaseline8Bit,
    "jpeg-lossless": JPEGLosslessSV1,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "htj2k": HTJ2KLossless,
}

# file name -> the reason it must be skipped with (its start)
CORPUS = {
    **{f"claims-huge-{name}.dcm": TOO_LARGE for name in COMPRESSED},
    "claims-huge-uncompressed.dcm": TOO_LARGE,
    "deflate-bomb.dcm": TOO_LARGE,
    "claims-huge.nii.gz": TOO_LARGE,
    "gzip-bomb.nii.gz": "no slice with foreground",
    "claims-huge.png": TOO_LARGE,
}


def _dataset(syntax: UID, rows: int, columns: int, bits: int = 16) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientID = "HOSTILE"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    return ds


def _claims_huge(path: Path, syntax: UID) -> None:
    bits = 8 if syntax == JPEGBaseline8Bit else 16
    ds = _dataset(syntax, HUGE, HUGE, bits)
    if syntax.is_compressed:
        ds.PixelData = encapsulate([b"\x00" * 64])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = b"\x00" * 64
    ds.save_as(path, enforce_file_format=True)


def _deflate_bomb(path: Path) -> None:
    """Deflated data set: a few header elements, then 2 GiB of zeros in one OB element.

    Written without ever holding the inflated bytes: after a sync flush, the
    compressed form of a run of zeros repeats exactly, so it is written N times.
    """
    ds = _dataset(ExplicitVRLittleEndian, 64, 64)
    del ds.file_meta
    body = pydicom.filebase.DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(body, ds)
    chunk = 16 * 2**20
    length = DEFLATE_INFLATED - DEFLATE_INFLATED % chunk
    # (0009,0010) private OB element, explicit VR: tag, "OB", 2 reserved bytes, 4-byte length
    header = body.getvalue() + struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, length)
    zeros = bytes(chunk)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = comp.compress(header) + comp.compress(zeros) + comp.flush(zlib.Z_SYNC_FLUSH)
    repeat = comp.compress(zeros) + comp.flush(zlib.Z_SYNC_FLUSH)
    meta = _dataset(DeflatedExplicitVRLittleEndian, 1, 1).file_meta
    out = pydicom.filebase.DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(out, meta)
    with path.open("wb") as fh:
        fh.write(out.getvalue())
        fh.write(first)
        for _ in range(length // chunk - 1):
            fh.write(repeat)
        fh.write(b"\x03\x00")  # the final, empty block


def _nifti_header(shape: tuple[int, ...], datatype: int = 4, bitpix: int = 16) -> bytes:
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1, 1, 1))
    raw = bytearray(hdr.binaryblock)
    dims = [len(shape), *shape] + [1] * (7 - len(shape))
    raw[40:56] = struct.pack("<8h", *dims)
    raw[70:72] = struct.pack("<h", datatype)  # int16
    raw[72:74] = struct.pack("<h", bitpix)
    raw[108:112] = struct.pack("<f", 352.0)  # vox_offset
    return bytes(raw) + b"\x00" * 4


def _claims_huge_nifti(path: Path) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(_nifti_header((4000, 4000, 1000)))
        fh.write(bytes(2**20))  # the rest is missing: a reader that trusts the header allocates 32 GB


def _gzip_bomb_nifti(path: Path) -> None:
    zeros = bytes(16 * 2**20)
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(_nifti_header((64, 64, 4)))
        for _ in range(NIFTI_ZEROS // len(zeros)):
            fh.write(zeros)


def _claims_huge_png(path: Path) -> None:
    side = 30000

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    rows = comp.compress(b"\x00" * (side + 1) * 16) + comp.flush()  # 16 rows; the rest is missing
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    path.write_bytes(png + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def write_corpus(out: Path) -> dict[str, str]:
    """Write every file of `CORPUS` into ``out``; return `CORPUS`."""
    out.mkdir(parents=True, exist_ok=True)
    for name, syntax in COMPRESSED.items():
        _claims_huge(out / f"claims-huge-{name}.dcm", syntax)
    _claims_huge(out / "claims-huge-uncompressed.dcm", ExplicitVRLittleEndian)
    _deflate_bomb(out / "deflate-bomb.dcm")
    _claims_huge_nifti(out / "claims-huge.nii.gz")
    _gzip_bomb_nifti(out / "gzip-bomb.nii.gz")
    _claims_huge_png(out / "claims-huge.png")
    assert sorted(p.name for p in out.iterdir() if p.name in CORPUS) == sorted(CORPUS)
    return CORPUS


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    for name in write_corpus(target):
        print(f"{target / name}  {(target / name).stat().st_size:>10,d} bytes")
