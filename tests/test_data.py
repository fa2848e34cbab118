"""Reading DICOM/NIfTI/PNG into slices, skip reasons, site layout and patient splits.

Built on the files pydicom and nibabel ship with, copied into tmp_path trees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIB_DATA
from PIL import Image
from pydicom.data import get_testdata_file

from medae_core.config import DataConfig
from medae_core.data import (
    UnusableFile,
    check_data,
    load_site,
    read_file,
    read_labels,
    scan_folder,
    split_patients,
    to_square,
)
from medae_core.data import dataset as dataset_module
from medae_core.data.readers import window_scale
from medae_core.errors import ConfigError, DataError, NoUsableImagesError

CFG = DataConfig()
SIZE = 32


def dcm(name: str) -> Path:
    """A file bundled with pydicom (never one it would download)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with this pydicom"
    return Path(path)


def read(path: Path, data: DataConfig = CFG):
    return read_file(path, path.name, data)


def reason_of(path: Path, data: DataConfig = CFG) -> str:
    with pytest.raises(UnusableFile) as info:
        read(path, data)
    return info.value.reason


def copy_into(folder: Path, *names: str, rename: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(dcm(name), folder / (rename or {}).get(name, name))
    return folder


def save_dicom(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def mr_with(path: Path, **attrs) -> Path:
    """MR_small with some attributes changed (None deletes the attribute)."""
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    for keyword, value in attrs.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return save_dicom(ds, path)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def gradient(h: int = 40, w: int = 60) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w)).astype(np.uint8)


# -- DICOM decoding ------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_expb.dcm",
    ],
)
def test_lossless_transfer_syntaxes_decode_to_the_same_image(name):
    reference = read(dcm("MR_small.dcm"))[0].image
    image = read(dcm(name))[0].image
    assert image.shape == reference.shape == (64, 64)
    np.testing.assert_allclose(image, reference, atol=1e-6)


def test_lossy_jpeg_and_jpeg2000_decode_to_the_same_picture():
    jpeg_extended = read(dcm("JPGExtended.dcm"))[0].image  # 12-bit JPEG, lossy process 2/4
    jpeg2000 = read(dcm("JPEG2000.dcm"))[0].image
    assert jpeg_extended.shape == jpeg2000.shape == (1024, 256)
    # two lossy encodings of one noisy NM image: their raw pixels correlate at 0.95
    assert np.corrcoef(jpeg_extended.ravel(), jpeg2000.ravel())[0, 1] > 0.9
    for name in ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_dcmtk_+eb+cy+n1.dcm", "JPEGLSNearLossless_16.dcm"):
        image = read(dcm(name))[0].image
        assert image.dtype == np.float32 and image.ndim == 2 and 0 <= image.min() < image.max() <= 1


def test_jpeg_file_no_installed_decoder_can_read_is_skipped_as_undecodable():
    # pydicom's JPEG-lossy.dcm has a malformed scan header; pylibjpeg and Pillow both refuse it.
    assert reason_of(dcm("JPEG-lossy.dcm")).startswith("undecodable (JPEG Extended (Process 2 and 4)): ")


@pytest.mark.parametrize(
    "name, reason",
    [
        ("MR_truncated.dcm", "truncated pixel data"),
        ("rtplan.dcm", "no pixel data (RT Plan)"),
        ("rtstruct.dcm", "no pixel data (RT Structure Set)"),  # has no preamble: read with force
        ("rtdose.dcm", "dose grid, not an image (RT Dose)"),
        ("test-SR.dcm", "no pixel data (Comprehensive SR)"),
        ("waveform_ecg.dcm", "no pixel data (12-lead ECG Waveform)"),
        ("ExplVR_LitEndNoMeta.dcm", "no pixel data (RT Ion Plan)"),  # no meta, parsed with force
        ("no_meta.dcm", "not a DICOM file"),  # no meta, force parses only garbage
    ],
)
def test_non_images_and_broken_files_are_unusable_with_a_reason(name, reason):
    assert reason_of(dcm(name)) == reason


def test_scan_skips_bad_files_and_keeps_the_good_ones(tmp_path):
    bad = ["MR_truncated.dcm", "rtplan.dcm", "rtstruct.dcm", "rtdose.dcm", "test-SR.dcm", "waveform_ecg.dcm"]
    folder = copy_into(tmp_path / "mixed", "CT_small.dcm", "MR_small.dcm", "no_meta.dcm", *bad)
    scan = scan_folder(folder, CFG, SIZE)
    assert [e.path for e in scan.entries] == ["CT_small.dcm", "MR_small.dcm"]
    assert scan.images.shape == (2, SIZE, SIZE) and scan.images.dtype == np.float32
    assert 0 <= scan.images.min() and scan.images.max() <= 1
    assert sorted(s.path for s in scan.skipped) == sorted(bad + ["no_meta.dcm"])
    assert scan.skipped_by_reason()["truncated pixel data"] == 1
    assert scan.labels is None and scan.masks is None


def test_force_is_used_only_for_dcm_or_extensionless_names(tmp_path):
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    del ds.file_meta
    ds.preamble = None  # no preamble, no "DICM", no meta: only a forced read parses it
    no_meta = tmp_path / "1.2.840.113619.2.55"  # UID-like name: numeric suffix counts as none
    pydicom.dcmwrite(no_meta, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    reference = read(dcm("CT_small.dcm"))[0].image
    np.testing.assert_allclose(read(no_meta)[0].image, reference, atol=1e-6)
    shutil.copy(no_meta, tmp_path / "ct.bin")
    assert reason_of(tmp_path / "ct.bin") == "not an image file (.bin)"
    shutil.copy(dcm("ExplVR_LitEndNoMeta.dcm"), tmp_path / "PLAN")
    assert reason_of(tmp_path / "PLAN") == "no pixel data (RT Ion Plan)"
    # A DICOM file with the DICM prefix is read whatever its extension.
    shutil.copy(dcm("MR_small.dcm"), tmp_path / "scan.IMA")
    assert len(read(tmp_path / "scan.IMA")) == 1


def test_rescale_slope_intercept_is_applied_before_the_configured_window():
    window = replace(CFG, intensity="window", window_center=40.0, window_width=400.0)
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    hounsfield = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip((hounsfield - (40 - 200)) / 400, 0, 1)
    np.testing.assert_allclose(read(dcm("CT_small.dcm"), window)[0].image, expected, atol=1e-5)


def test_window_mode_without_a_window_is_a_config_error(tmp_path):
    bad = replace(CFG, intensity="window")
    with pytest.raises(ConfigError, match="window_center"):
        read(dcm("CT_small.dcm"), bad)
    with pytest.raises(ConfigError):  # a scan must not turn a config mistake into skipped files
        scan_folder(copy_into(tmp_path / "ct", "CT_small.dcm"), bad, SIZE)


def test_auto_uses_the_files_window_and_percentile_ignores_it():
    ds = pydicom.dcmread(dcm("MR_small.dcm"))  # WindowCenter 600, WindowWidth 1600
    auto = read(dcm("MR_small.dcm"))[0].image
    np.testing.assert_allclose(auto, window_scale(ds.pixel_array.astype(float), 600, 1600), atol=1e-3)
    percentile = read(dcm("MR_small.dcm"), replace(CFG, intensity="percentile"))[0].image
    assert percentile.max() == 1.0 and percentile.min() == 0.0
    assert np.abs(percentile - auto).max() > 0.1


def test_monochrome1_is_inverted(tmp_path):
    normal = read(dcm("MR_small.dcm"))[0].image
    inverted = read(mr_with(tmp_path / "m1.dcm", PhotometricInterpretation="MONOCHROME1"))[0].image
    np.testing.assert_allclose(inverted, 1.0 - normal, atol=1e-6)


def test_multiframe_gives_one_slice_per_frame(tmp_path):
    slices = read(dcm("SC_rgb_rle_2frame.dcm"))
    assert [s.frame for s in slices] == [0, 1]
    assert read(dcm("MR_small.dcm"))[0].frame is None
    scan = scan_folder(copy_into(tmp_path / "mf", "SC_rgb_rle_2frame.dcm"), CFG, SIZE)
    assert [(e.path, e.frame) for e in scan.entries] == [("SC_rgb_rle_2frame.dcm", 0), ("SC_rgb_rle_2frame.dcm", 1)]


def test_colour_is_converted_to_luminance():
    ds = pydicom.dcmread(dcm("SC_rgb_rle.dcm"))
    expected = ds.pixel_array @ np.array([0.299, 0.587, 0.114]) / 255
    np.testing.assert_allclose(read(dcm("SC_rgb_rle.dcm"))[0].image, expected, atol=1e-5)
    # the same picture stored as JPEG YBR_FULL is converted to RGB first
    ybr = read(dcm("SC_rgb_dcmtk_+eb+cy+n1.dcm"))[0].image
    assert np.abs(ybr - expected).mean() < 0.02


def test_patients_come_from_patient_id_then_study_uid_then_path(tmp_path):
    folder = tmp_path / "patients"
    mr_with(folder / "a1.dcm", PatientID="A")
    mr_with(folder / "a2.dcm", PatientID="A")
    mr_with(folder / "b.dcm", PatientID="B")
    mr_with(folder / "study.dcm", PatientID="", StudyInstanceUID="1.2.3")
    mr_with(folder / "sub/anon.dcm", PatientID=None, StudyInstanceUID=None)
    scan = scan_folder(folder, CFG, SIZE)
    assert [e.patient for e in scan.entries] == ["A", "A", "B", "1.2.3", "sub/anon.dcm"]
    assert scan.patients == ["1.2.3", "A", "B", "sub/anon.dcm"]
    assert scan.patient_index.tolist() == [1, 1, 2, 0, 3]


# -- NIfTI ---------------------------------------------------------------------------
def test_nifti_volumes_become_axial_slices(caplog):
    anatomical = read(Path(NIB_DATA) / "anatomical.nii")  # 33 x 41 x 25, LAS
    assert [s.frame for s in anatomical] == list(range(25))
    assert anatomical[0].image.shape == (41, 33)  # rows = anterior-posterior
    assert {s.patient for s in anatomical} == {"anatomical.nii"}
    with caplog.at_level(logging.INFO, logger="medae_core.data.readers"):
        four_d = read(Path(NIB_DATA) / "example4d.nii.gz")  # 128 x 96 x 24 x 2
    assert "first volume" in caplog.text
    assert len(four_d) == 24 and four_d[0].image.shape == (96, 128)


def nifti(path: Path, volume: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), path)
    return path


def test_nifti_is_shown_anterior_up_and_patient_right_on_image_left(tmp_path):
    volume = np.ones((20, 30, 4))
    volume[0, -1, :] = 10  # LAS voxel axes: x=0 is the patient's right, y=-1 anterior
    image = read(nifti(tmp_path / "las.nii.gz", volume, np.diag([-1.0, 1, 1, 1])))[0].image
    assert image.shape == (30, 20)
    assert np.unravel_index(image.argmax(), image.shape) == (0, 0)  # top (anterior), left (right)


def test_nifti_slices_without_foreground_are_left_out(tmp_path):
    volume = np.zeros((16, 16, 5))
    volume[4:12, 4:12, 1:3] = np.random.default_rng(0).uniform(1, 2, (8, 8, 2))
    slices = read(nifti(tmp_path / "v.nii", volume, np.eye(4)))
    assert [s.frame for s in slices] == [1, 2]
    assert reason_of(nifti(tmp_path / "empty.nii", np.zeros((8, 8, 3)), np.eye(4))) == "no slice with foreground"


# -- raster images and other files --------------------------------------------------------
def test_png_and_jpeg_are_read_as_gray(tmp_path):
    eight_bit = gradient()
    image = read(write_png(tmp_path / "g8.png", eight_bit))[0]
    np.testing.assert_allclose(image.image, eight_bit / 255, atol=1e-6)  # 8-bit: divided by 255
    assert image.frame is None and image.patient == "g8.png"
    sixteen_bit = eight_bit.astype(np.uint16) * 16  # 12-bit data in 16 bits
    assert read(write_png(tmp_path / "g16.png", sixteen_bit))[0].image.max() == 1.0  # percentile-scaled
    rgb = np.stack([eight_bit, eight_bit, eight_bit], axis=-1)
    jpeg = read(write_png(tmp_path / "c.jpg", rgb))[0].image
    assert jpeg.shape == (40, 60) and np.abs(jpeg - eight_bit / 255).mean() < 0.02


def test_other_files_are_skipped_with_a_reason(tmp_path):
    write_png(tmp_path / "ok.png", gradient())
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "table.csv").write_text("a,b\n")
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1\2")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    shutil.copy(dcm("MR_small.dcm"), tmp_path / "DICOMDIR")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("x")
    os.symlink(tmp_path / "nowhere.dcm", tmp_path / "dangling.dcm")
    reasons = {s.path: s.reason for s in scan_folder(tmp_path, CFG, SIZE).skipped}
    assert reasons == {
        ".DS_Store": "not an image file (hidden)",
        ".git/": "hidden folder, not scanned",
        "DICOMDIR": "not an image file (DICOMDIR)",
        "broken.png": reasons["broken.png"],
        "dangling.dcm": "broken link",
        "empty.dcm": "empty file",
        "meta.json": "not an image file (.json)",
        "notes.txt": "not an image file (.txt)",
        "table.csv": "not an image file (.csv)",
    }
    assert reasons["broken.png"].startswith("unreadable image file: ")


def test_to_square_pads_with_background_and_keeps_masks_boolean():
    image = np.full((10, 20), 0.5, np.float32)
    image[0, 0] = 0.2
    square = to_square(image, 20)
    assert square.shape == (20, 20) and square.dtype == np.float32
    assert square[0, 10] == pytest.approx(0.2) and square[10, 10] == pytest.approx(0.5)  # padding = min
    mask = np.zeros((30, 10), bool)
    mask[10:20, :] = True
    small = to_square(mask, 6)
    assert small.dtype == bool and small.shape == (6, 6) and small[3, 3] and not small[0, 0]


def test_scan_order_and_symlink_cycles(tmp_path):
    data = tmp_path / "d"
    for name in ("b.png", "a/z.png", "a/b.png"):
        write_png(data / name, gradient())
    os.symlink(data, data / "a" / "loop")  # a cycle must not hang the walk
    scan = scan_folder(data, CFG, SIZE)
    assert [e.path for e in scan.entries] == ["a/b.png", "a/z.png", "b.png"]


def test_worker_processes_give_the_same_scan(tmp_path, monkeypatch):
    if dataset_module.usable_cpus() < 2:
        pytest.skip("needs two CPUs")
    folder = copy_into(tmp_path / "many", "CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "SC_rgb_rle_2frame.dcm")
    serial = scan_folder(folder, CFG, SIZE)
    monkeypatch.setattr(dataset_module, "PARALLEL_MIN_FILES", 1)
    pooled = scan_folder(folder, CFG, SIZE)
    np.testing.assert_array_equal(pooled.images, serial.images)
    assert pooled.entries == serial.entries and pooled.skipped == serial.skipped


# -- labels.csv ----------------------------------------------------------------------------
def labelled_test_folder(root: Path, csv_text: str) -> Path:
    test = root / "test"
    write_png(test / "sick.png", gradient())
    write_png(test / "well.png", gradient()[::-1].copy())
    write_png(test / "unlabelled.png", gradient()[:, ::-1].copy())
    if "mask" in csv_text.splitlines()[0]:
        mask = np.zeros((40, 60), np.uint8)
        mask[10:20, 10:30] = 255
        write_png(test / "masks" / "sick_mask.png", mask)
    (test / "labels.csv").write_text(csv_text)
    return test


def test_labels_and_masks_are_attached(tmp_path):
    test = labelled_test_folder(tmp_path, "path,label,mask\nsick.png,1,masks/sick_mask.png\nwell.png,0,\ngone.png,1,\n")
    scan = scan_folder(test, CFG, SIZE, labels_csv=test / "labels.csv")
    assert [e.path for e in scan.entries] == ["sick.png", "unlabelled.png", "well.png"]  # csv and mask are not images
    assert scan.labels.tolist() == [1, -1, 0] and scan.labels.dtype == np.int8
    assert scan.has_mask.tolist() == [True, False, False]
    assert scan.masks.dtype == bool and scan.masks[0].any() and not scan.masks[1:].any()
    assert [(s.path, s.reason) for s in scan.skipped] == [
        ("gone.png", "listed in labels.csv but unusable: file not found (line 4)")
    ]
    assert scan.skipped_by_reason() == {"listed in labels.csv but unusable": 1}


def test_nifti_mask_slices_follow_the_kept_image_slices(tmp_path):
    test = tmp_path / "test"
    test.mkdir()
    volume = np.zeros((16, 16, 4))
    volume[2:14, 2:14, 1:4] = 1 + np.random.default_rng(0).random((12, 12, 3))  # slice 0 is empty
    mask = np.zeros((16, 16, 4))
    mask[3:6, 3:6, 2] = 1  # lesion on slice 2 only
    nifti(test / "vol.nii.gz", volume, np.eye(4))
    nifti(test / "vol_mask.nii.gz", mask, np.eye(4))
    (test / "labels.csv").write_text("path,label,mask\nvol.nii.gz,1,vol_mask.nii.gz\n")
    scan = scan_folder(test, CFG, 16, labels_csv=test / "labels.csv")
    assert [e.frame for e in scan.entries] == [1, 2, 3]
    assert [bool(m.any()) for m in scan.masks] == [False, True, False]
    assert scan.has_mask.all() and scan.labels.tolist() == [1, 1, 1]


def test_unusable_labelled_file_says_it_is_listed(tmp_path):
    test = tmp_path / "test"
    copy_into(test, "MR_small.dcm", "MR_truncated.dcm")
    (test / "labels.csv").write_text("path,label\nMR_truncated.dcm,1\n")
    scan = scan_folder(test, CFG, SIZE, labels_csv=test / "labels.csv")
    assert [s.reason for s in scan.skipped] == ["listed in labels.csv but unusable: truncated pixel data"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("file,label\nsick.png,1\n", "line 1: header must be"),
        ("path,label\nsick.png,1\nwell.png,yes\n", "line 3: label must be 0"),
        ("path,label\nsick.png,1,extra\n", "line 2: expected 2 columns"),
        ("path,label\n../outside.png,0\n", "line 2: '../outside.png' must be a path inside"),
        ("path,label\nsick.png,1\nsick.png,0\n", "line 3: 'sick.png' is listed twice"),
    ],
)
def test_malformed_labels_csv_is_a_clear_error(tmp_path, text, message):
    test = labelled_test_folder(tmp_path, text)
    with pytest.raises(DataError, match=message):
        read_labels(test / "labels.csv", test)


# -- site layout, split, check-data ----------------------------------------------------------
def test_site_with_train_and_test_folders(tmp_path):
    copy_into(tmp_path / "train", "CT_small.dcm", "MR_small.dcm")
    labelled_test_folder(tmp_path, "path,label\nsick.png,1\nwell.png,0\n")
    calls = []
    site = load_site(tmp_path, CFG, SIZE, progress=lambda done, total: calls.append((done, total)))
    assert [e.path for e in site.train.entries] == ["CT_small.dcm", "MR_small.dcm"]
    assert site.test is not None and site.test.labels.tolist() == [1, -1, 0]
    assert [done for done, _ in calls] == list(range(1, 7)) and {total for _, total in calls} == {6}


def test_flat_site_trains_on_everything_except_test(tmp_path):
    copy_into(tmp_path / "p1", "CT_small.dcm")
    copy_into(tmp_path, "MR_small.dcm")
    labelled_test_folder(tmp_path, "path,label\nsick.png,1\n")
    site = load_site(tmp_path, CFG, SIZE)
    assert [e.path for e in site.train.entries] == ["MR_small.dcm", "p1/CT_small.dcm"]
    assert len(site.test.entries) == 3
    flat = load_site(tmp_path / "p1", CFG, SIZE)
    assert flat.test is None and len(flat.train.entries) == 1


def test_a_read_for_training_alone_leaves_test_unread_and_still_out_of_training(tmp_path, monkeypatch):
    """``with_test=False`` (a deployed site's train message) decodes no test/ file, yet never trains on one."""
    import medae_core.data.dataset as dataset

    copy_into(tmp_path / "p1", "CT_small.dcm")
    copy_into(tmp_path, "MR_small.dcm")
    labelled_test_folder(tmp_path, "path,label\nsick.png,1\n")
    listed = []
    list_files = dataset.list_files
    monkeypatch.setattr(dataset, "list_files",
                        lambda folder, *a, **k: listed.append(folder) or list_files(folder, *a, **k))
    calls = []
    site = load_site(tmp_path, CFG, SIZE, progress=lambda done, total: calls.append((done, total)), with_test=False)
    assert site.test is None
    assert [e.path for e in site.train.entries] == ["MR_small.dcm", "p1/CT_small.dcm"]
    assert tmp_path / "test" not in listed
    assert {total for _, total in calls} == {2}  # progress counts only what is read


def test_site_without_usable_images_names_folder_and_reasons(tmp_path):
    copy_into(tmp_path / "train", "rtplan.dcm", "MR_truncated.dcm")
    with pytest.raises(NoUsableImagesError) as info:
        load_site(tmp_path, CFG, SIZE)
    message = str(info.value)
    assert str(tmp_path / "train") in message
    assert "truncated pixel data (1)" in message and "no pixel data (RT Plan) (1)" in message
    with pytest.raises(DataError, match="does not exist"):
        load_site(tmp_path / "nope", CFG, SIZE)


def test_split_is_by_patient_deterministic_and_never_empty(tmp_path):
    folder = tmp_path / "split"
    for i in range(10):
        for j in range(i % 3 + 1):
            mr_with(folder / f"{i}_{j}.dcm", PatientID=f"P{i}")
    scan = scan_folder(folder, CFG, SIZE)
    train_idx, val_idx = split_patients(scan, 0.3, seed=1)
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(len(scan.entries)))
    train_patients = {scan.entries[i].patient for i in train_idx}
    val_patients = {scan.entries[i].patient for i in val_idx}
    assert not train_patients & val_patients and len(val_patients) == 3
    again = split_patients(scan, 0.3, seed=1)
    assert np.array_equal(again[1], val_idx)
    assert not np.array_equal(split_patients(scan, 0.3, seed=2)[1], val_idx)
    two = scan_folder(copy_into(tmp_path / "two", "CT_small.dcm", "MR_small.dcm"), CFG, SIZE)
    assert [len(ix) for ix in split_patients(two, 0.01, seed=0)] == [1, 1]
    one = scan_folder(copy_into(tmp_path / "one", "CT_small.dcm"), CFG, SIZE)
    assert [len(ix) for ix in split_patients(one, 0.5, seed=0)] == [1, 0]


def test_check_data_reports_counts_and_every_skipped_file(tmp_path):
    copy_into(tmp_path / "train", "CT_small.dcm", "SC_rgb_rle_2frame.dcm", "rtdose.dcm")
    labelled_test_folder(tmp_path, "path,label,mask\nsick.png,1,masks/sick_mask.png\nwell.png,0,\n")
    write_png(tmp_path / "test" / "all_black.png", np.zeros((8, 8), np.uint8))
    report = check_data(tmp_path, CFG)
    json.dumps(report)  # JSON-ready
    assert report["layout"] == "site"
    assert report["usable_images"] == 3 + 3
    assert report["patients"] == 2 + 3
    assert report["by_format"] == {"dicom": 3, "raster": 3}
    assert report["skipped"] == [
        {"path": "train/rtdose.dcm", "reason": "dose grid, not an image (RT Dose)"},
        {"path": "test/all_black.png", "reason": "blank image (all pixels equal)"},
    ]
    assert report["parts"]["test"] == {
        "usable_images": 3,
        "patients": 3,
        "files_skipped": 1,
        "anomalous": 1,
        "healthy": 1,
        "unlabelled": 1,
        "with_mask": 1,
    }
    empty = tmp_path / "empty"
    copy_into(empty, "rtplan.dcm")
    flat = check_data(empty, CFG)
    assert flat["layout"] == "flat" and flat["usable_images"] == 0 and len(flat["skipped"]) == 1


# -- nothing is written into the data ------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every path under root with its content hash, mode and modification time."""
    out = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[path.relative_to(root).as_posix()] = (digest, stat.st_mode, stat.st_mtime_ns)
    return out


def test_scanning_never_writes_into_the_data_folder(tmp_path):
    site = tmp_path / "site"
    copy_into(site / "train", "CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm", "rtplan.dcm")
    shutil.copy(Path(NIB_DATA) / "example4d.nii.gz", site / "train")
    labelled_test_folder(site, "path,label,mask\nsick.png,1,masks/sick_mask.png\n")
    for path in [site, *site.rglob("*")]:  # read-only; root ignores this, hence the snapshot
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = snapshot(site)
    try:
        load_site(site, CFG, SIZE)
        check_data(site, CFG)
        scan_folder(site / "test", CFG, SIZE, labels_csv=site / "test" / "labels.csv")
        assert snapshot(site) == before
    finally:
        for path in [site, *site.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_relative_folder_and_labels_file_are_read_like_absolute_ones(tiny_benchmark, monkeypatch):
    site = tiny_benchmark / "site-1"
    absolute = scan_folder(site / "test", DataConfig(), 64, labels_csv=site / "test" / "labels.csv")
    monkeypatch.chdir(site)
    relative = scan_folder(Path("test"), DataConfig(), 64, labels_csv=Path("test/labels.csv"))
    assert np.array_equal(relative.labels, absolute.labels) and len(relative.entries) == len(absolute.entries)
