"""The built-in synthetic DICOM benchmark (medae_core.benchmark)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from medae_core.benchmark import LESION_KINDS, MIN_LESION_PIXELS, MR_IMAGE_STORAGE, make_benchmark
from medae_core.errors import DataError

TINY = dict(sites=2, patients=4, seed=3, slices_per_patient=6)  # >= 6: all kinds per site


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")  # exists and is empty: must be accepted
    calls: list[tuple[int, int]] = []
    summary = make_benchmark(out, progress=lambda d, t: calls.append((d, t)), **TINY)
    return out, summary, calls


def _labels(site_dir: Path) -> list[dict[str, str]]:
    with (site_dir / "test" / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _values(ds) -> np.ndarray:
    """Modality values (rescaled), windowed to [0, 1] with the file's VOI window."""
    v = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    return np.clip((v - (c - w / 2)) / w, 0, 1)


def test_layout_and_labels_csv_are_consistent(bench):
    out, summary, _ = bench
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.json", "site-1", "site-2"]
    assert json.loads((out / "benchmark.json").read_text()) == summary
    for site in summary["sites"]:
        sdir = out / site["name"]
        with (sdir / "test" / "labels.csv").open(newline="") as fh:
            assert fh.readline().strip() == "path,label,mask"
        rows = _labels(sdir)
        dcms = sorted(p.relative_to(sdir / "test").as_posix() for p in (sdir / "test").rglob("*.dcm"))
        assert sorted(r["path"] for r in rows) == dcms  # every test image listed, every listed path exists
        assert len(rows) == site["test"]["slices"] == site["test"]["patients"] * TINY["slices_per_patient"]
        for r in rows:
            assert "\\" not in r["path"] and r["label"] in ("0", "1")
            if r["label"] == "1":
                pid, name = r["path"].split("/")
                assert r["mask"] == f"masks/{pid}_{name[:-4]}.png"
                mask = np.array(Image.open(sdir / "test" / r["mask"]))
                assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
                assert (mask == 255).sum() >= MIN_LESION_PIXELS  # the label rule: no slivers
                ds = pydicom.dcmread(sdir / "test" / r["path"])
                assert mask.shape == (ds.Rows, ds.Columns)
            else:
                assert r["mask"] == ""
        masks = {p.name for p in (sdir / "test" / "masks").iterdir()}
        assert masks == {Path(r["mask"]).name for r in rows if r["mask"]}  # no mask for healthy slices
        n_anom = sum(r["label"] == "1" for r in rows)
        assert n_anom == site["test"]["anomalous_slices"]
        assert 0 < n_anom < len(rows)  # both classes present in test


def test_train_holds_only_healthy_patients(bench):
    out, summary, _ = bench
    for site in summary["sites"]:
        sdir = out / site["name"]
        train_patients = {p.name for p in (sdir / "train").iterdir()}
        assert len(train_patients) == site["train"]["patients"] == 2
        assert all(not (sdir / "train" / p / "masks").exists() for p in train_patients)
        labelled = {r["path"].split("/")[0] for r in _labels(sdir)}
        assert not labelled & train_patients
        assert not {k.split("/")[0] for k in site["anomalous_slice_kinds"]} & train_patients
        assert len(list((sdir / "train").rglob("*.dcm"))) == site["train"]["slices"] == 2 * TINY["slices_per_patient"]


def test_files_are_valid_dicom_with_required_tags(bench):
    out, summary, _ = bench
    for site in summary["sites"]:
        sdir = out / site["name"]
        app = site["appearance"]
        for pdir in sorted((sdir / "train").iterdir()) + sorted(p for p in (sdir / "test").iterdir() if p.is_dir() and p.name != "masks"):
            files = sorted(pdir.glob("*.dcm"))
            dss = [pydicom.dcmread(f) for f in files]  # no force: real Part 10 files
            for i, (f, ds) in enumerate(zip(files, dss)):
                assert f.read_bytes()[128:132] == b"DICM"
                assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
                assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == MR_IMAGE_STORAGE
                assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
                assert ds.Modality == "MR" and ds.PatientID == pdir.name
                assert str(ds.PatientName) == "Synthetic^" + pdir.name.replace("-", "")
                assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0 and ds.SamplesPerPixel == 1
                assert ds.BitsStored == app["bits_stored"] and ds.HighBit == ds.BitsStored - 1
                assert ds.PhotometricInterpretation == "MONOCHROME2"
                assert float(ds.RescaleSlope) == app["rescale_slope"]
                assert float(ds.RescaleIntercept) == app["rescale_intercept"]
                assert ds.Rows == ds.Columns == app["matrix"]
                assert [float(v) for v in ds.PixelSpacing] == pytest.approx([app["pixel_spacing_mm"]] * 2)
                assert ds.InstanceNumber == i + 1
                assert float(ds.ImagePositionPatient[2]) == pytest.approx(float(ds.SliceLocation))
                px = ds.pixel_array
                assert px.dtype == np.uint16 and px.shape == (app["matrix"],) * 2
                assert int(px.max()) <= 2**ds.BitsStored - 1 and px.max() > px.min()
            assert len({ds.StudyInstanceUID for ds in dss}) == 1  # one study per patient
            assert len({ds.SOPInstanceUID for ds in dss}) == len(dss)
            assert len({(str(ds.WindowCenter), str(ds.WindowWidth)) for ds in dss}) == 1  # one window per patient
            z = [float(ds.SliceLocation) for ds in dss]
            assert z == sorted(z) and len(set(z)) == len(z)


def test_sites_differ_in_appearance(bench):
    out, summary, _ = bench
    a, b = (s["appearance"] for s in summary["sites"])
    assert a["matrix"] != b["matrix"]
    assert a["rescale_slope"] != b["rescale_slope"]
    assert a["bits_stored"] != b["bits_stored"]
    # intensity statistics of healthy (train) brains differ after the loader-style windowing
    stats = []
    for site in summary["sites"]:
        vals = np.concatenate(
            [_values(pydicom.dcmread(f)).ravel() for f in sorted((out / site["name"] / "train").rglob("*.dcm"))]
        )
        brain = vals[vals > 0.2]
        stats.append((float(np.median(brain)), float(brain.std())))
    assert abs(stats[0][0] - stats[1][0]) > 0.01 or abs(stats[0][1] - stats[1][1]) > 0.01


def test_every_lesion_kind_is_present_and_counted(bench):
    _, summary, _ = bench
    for site in summary["sites"]:
        assert all(site["test"]["lesions_by_kind"][k] >= 1 for k in LESION_KINDS), site["test"]
        counted = {k: 0 for k in LESION_KINDS}
        for kinds in site["anomalous_slice_kinds"].values():
            assert kinds and set(kinds) <= set(LESION_KINDS)
            for k in kinds:
                counted[k] += 1
        assert counted == site["test"]["anomalous_slices_by_kind"]
        assert len(site["anomalous_slice_kinds"]) == site["test"]["anomalous_slices"]
    seen = {k for s in summary["sites"] for ks in s["anomalous_slice_kinds"].values() for k in ks}
    assert seen == set(LESION_KINDS)


def test_lesions_are_drawn_where_the_masks_are(bench):
    """Bright lesions are brighter, dark lesions darker than the tissue right around them."""
    out, summary, _ = bench
    diffs: dict[str, list[float]] = {"bright_wm": [], "dark_wm": []}
    for site in summary["sites"]:
        test = out / site["name"] / "test"
        for rel, kinds in site["anomalous_slice_kinds"].items():
            if len(kinds) != 1 or kinds[0] not in diffs:
                continue
            img = _values(pydicom.dcmread(test / rel))
            mask = np.array(Image.open(test / "masks" / rel.replace("/", "_").replace(".dcm", ".png"))) > 0
            ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask, iterations=1)
            diffs[kinds[0]].append(float(img[mask].mean() - img[ring].mean()))
    assert diffs["bright_wm"] and diffs["dark_wm"]
    assert np.mean(diffs["bright_wm"]) > 0.02
    assert np.mean(diffs["dark_wm"]) < -0.02


def test_progress_reports_every_patient(bench):
    _, _, calls = bench
    total = TINY["sites"] * TINY["patients"]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == list(range(total + 1))


def _pixels(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): pydicom.dcmread(p).PixelData for p in sorted(root.rglob("*.dcm"))}


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    small = dict(sites=1, patients=3, slices_per_patient=3)
    a = make_benchmark(tmp_path / "a", seed=11, **small)
    b = make_benchmark(tmp_path / "b", seed=11, **small)
    make_benchmark(tmp_path / "c", seed=12, **small)
    assert a == b
    pa, pb, pc = _pixels(tmp_path / "a"), _pixels(tmp_path / "b"), _pixels(tmp_path / "c")
    assert pa == pb
    for rel in pa:  # whole files too (UIDs are derived from the seed, not from the clock)
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a/site-1/test/labels.csv").read_bytes() == (tmp_path / "b/site-1/test/labels.csv").read_bytes()
    shared = set(pa) & set(pc)
    assert shared and all(pa[k] != pc[k] for k in shared)


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty"):
        make_benchmark(tmp_path, sites=1, patients=3, slices_per_patient=2)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_refuses_a_file_and_bad_parameters(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        make_benchmark(target, sites=1, patients=3)
    with pytest.raises(DataError, match="patients"):
        make_benchmark(tmp_path / "new", sites=1, patients=2)
    with pytest.raises(DataError, match="seed"):
        make_benchmark(tmp_path / "new", sites=1, patients=3, seed=-1)
    assert not (tmp_path / "new").exists()


def test_generic_loader_reads_a_generated_site(bench):
    from medae_core.config import DataConfig
    from medae_core.data import load_site

    out, summary, _ = bench
    info = summary["sites"][0]
    site = load_site(out / info["name"], DataConfig(), image_size=32)
    assert not site.train.skipped and not site.test.skipped
    assert len(site.train.entries) == info["train"]["slices"]
    assert len(site.train.patients) == info["train"]["patients"]
    assert len(site.test.patients) == info["test"]["patients"]
    assert int((site.test.labels == 1).sum()) == info["test"]["anomalous_slices"]
    assert int((site.test.labels == 0).sum()) == info["test"]["healthy_slices"]
    assert int(site.test.has_mask.sum()) == info["test"]["anomalous_slices"]


def test_test_patients_sets_the_split_and_bad_values_are_refused(tmp_path):
    summary = make_benchmark(tmp_path / "b", sites=1, patients=5, seed=0, slices_per_patient=2, test_patients=2)
    site = summary["sites"][0]
    assert (site["train"]["patients"], site["test"]["patients"]) == (3, 2)
    for bad in (1, 5, True):
        with pytest.raises(DataError, match="test_patients"):
            make_benchmark(tmp_path / f"bad{bad}", sites=1, patients=5, test_patients=bad)
    with pytest.raises(DataError, match="nothing to write"):
        make_benchmark(tmp_path / "none", sites=0)


def test_worker_processes_write_the_same_files_as_one_process(tmp_path):
    small = dict(sites=2, patients=14, slices_per_patient=3, public=11, seed=3)  # several chunks per site
    calls = []
    one = make_benchmark(tmp_path / "one", workers=1, **small)
    two = make_benchmark(tmp_path / "two", workers=2, progress=lambda d, t: calls.append((d, t)), **small)
    assert one == two
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert len(files) > 2 * 14 * 3
    for rel in files:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    total = 2 * 14 + 11
    assert calls[0] == (0, total) and calls[-1] == (total, total)  # whole pieces of work at a time
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def _wait_for_file(path: str, seconds: float) -> str:
    """A piece of work that ends when `path` exists (or after `seconds`); module level, so a worker can run it."""
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if Path(path).exists():
            return "saw progress"
        time.sleep(0.05)
    return "no progress while it ran"


def test_worker_progress_is_reported_as_each_piece_finishes_not_at_the_end(tmp_path):
    from medae_core.benchmark import _run_tasks

    flag = tmp_path / "progress-seen"

    def progress(done, total):
        if done > 0:
            flag.touch()

    tasks = [(_wait_for_file, (str(tmp_path / "never"), 0.0), 1),  # ends at once
             (_wait_for_file, (str(flag), 20.0), 1)]  # ends when the first one's progress has been reported
    assert _run_tasks(tasks, 2, progress, workers=2)[1] == "saw progress"
