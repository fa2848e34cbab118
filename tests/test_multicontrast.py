"""Issue 14: the paired multi-contrast benchmark, contrast labels from DICOM, translation and labelled samples."""

from __future__ import annotations

import hashlib

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from medae.cli import main
from medae_core.benchmark import make_benchmark
from medae_core.bundle import Bundle, save_bundle
from medae_core.config import DataConfig, RunConfig
from medae_core.data import scan_folder
from medae_core.data.dataset import contrast_of
from medae_core.data.readers import UnusableFile
from medae_core.errors import ConfigError
from medae_core.models import build_model

LABELS = ("t1", "t2", "flair")


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    root = tmp_path_factory.mktemp("paired") / "data"
    summary = make_benchmark(root, sites=1, patients=4, seed=0, slices_per_patient=3, contrasts=LABELS)
    return root, summary


def _tree_digest(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_every_patient_is_one_study_with_a_series_per_contrast_of_the_same_slices(paired):
    root, summary = paired
    patient = root / "site-1" / "train" / "S1-P001"
    assert sorted(p.name for p in patient.iterdir()) == sorted(LABELS)
    series = {}
    for contrast in LABELS:
        files = sorted((patient / contrast).glob("*.dcm"))
        assert len(files) == 3
        ds = [pydicom.dcmread(f) for f in files]
        assert {d.SeriesDescription for d in ds} == {f"{contrast.upper()} axial synthetic"}
        series[contrast] = ds
    study = {d.StudyInstanceUID for ds in series.values() for d in ds}
    frame = {d.FrameOfReferenceUID for ds in series.values() for d in ds}
    assert len(study) == 1 and len(frame) == 1
    assert len({ds[0].SeriesInstanceUID for ds in series.values()}) == 3
    positions = {c: [d.ImagePositionPatient for d in ds] for c, ds in series.items()}
    assert positions["t1"] == positions["t2"] == positions["flair"]
    # Not the same image three times: CSF (the ventricles) is dark on T1 and FLAIR, bright on T2.
    t1, t2 = (series[c][1].pixel_array.astype(float) for c in ("t1", "t2"))
    assert np.corrcoef(t1.ravel(), t2.ravel())[0, 1] < 0.9
    assert summary["parameters"]["contrasts"] == "t1,t2,flair"


def test_labels_list_every_contrasts_file_with_the_slices_one_mask(paired):
    root, _ = paired
    rows = (root / "site-1" / "test" / "labels.csv").read_text().splitlines()[1:]
    by_slice = {}
    for row in rows:
        path, label, mask = row.split(",")
        patient, contrast, name = path.split("/")
        by_slice.setdefault((patient, name), set()).add((contrast, label, mask))
    for entries in by_slice.values():
        assert {c for c, _, _ in entries} == set(LABELS)
        assert len({(label, mask) for _, label, mask in entries}) == 1  # one label and one mask per slice


def test_the_default_benchmark_keeps_its_t1_only_layout(tmp_path):
    make_benchmark(tmp_path / "b", sites=1, patients=3, seed=0, slices_per_patient=2, test_patients=2)
    patient = tmp_path / "b" / "site-1" / "train" / "S1-P001"
    assert sorted(p.name for p in patient.iterdir()) == ["000.dcm", "001.dcm"]
    with pytest.raises(Exception, match="contrasts must be distinct names"):
        make_benchmark(tmp_path / "c", sites=1, patients=3, contrasts=("t1", "pd"))


def test_the_contrast_is_read_from_dicom_then_the_map_then_the_folders(paired):
    root, _ = paired
    data = DataConfig(contrasts=LABELS)
    scan = scan_folder(root / "site-1" / "train", data, 64)
    by_path = {e.path: e.contrast for e in scan.entries}
    assert by_path["S1-P001/t2/000.dcm"] == "t2" and by_path["S1-P001/flair/002.dcm"] == "flair"
    assert list(scan.contrast_index[:3]) == [LABELS.index(scan.entries[i].contrast) for i in range(3)]
    # the header wins over a misleading folder; then the config's map; then the folder
    assert contrast_of("AX T2 FSE", "P1/flair/1.dcm", data) == "t2"
    assert contrast_of("AX T2 FLAIR", "P1/1.dcm", data) == "flair"  # the most specific word
    with pytest.raises(UnusableFile, match="no contrast label"):
        contrast_of("DWI_st1_b1000", "P1/1.dcm", data)  # words, not parts of words
    mapped = DataConfig(contrasts=LABELS, contrast_map=("MPRAGE=t1",))
    assert contrast_of("sag MPRAGE 1mm", "P1/x.dcm", mapped) == "t1"
    assert contrast_of("", "P1/FLAIR/x.png", data) == "flair"
    with pytest.raises(UnusableFile, match="no contrast label"):
        contrast_of("localizer", "P1/x.dcm", data)
    with pytest.raises(UnusableFile, match="not read by this run"):
        contrast_of("T2 axial", "P1/x.dcm", DataConfig(contrasts=("flair",), contrast_map=("T2=t2",)))
    # a run that reads FLAIR only leaves the rest out, with the reason
    flair = scan_folder(root / "site-1" / "train", DataConfig(contrasts=("flair",)), 64)
    assert {e.contrast for e in flair.entries} == {"flair"} and len(flair.entries) * 3 == len(scan.entries)
    assert any("no contrast label" in s.reason for s in flair.skipped)


def test_check_data_counts_the_contrasts_it_reads(paired, tmp_path, capsys):
    root, _ = paired
    (tmp_path / "c.toml").write_text('[data]\ncontrasts = ["t2", "flair"]\n')
    assert main(["check-data", str(root / "site-1"), "--config", str(tmp_path / "c.toml"), "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["by_contrast"] == {"flair": 12, "t2": 12}  # 4 patients x 3 slices each (train and test)
    assert report["skipped_by_reason"]["no contrast label"] == 6  # the training patients' T1 series


def test_a_cvae_reads_its_labels_and_the_config_says_what_is_wrong():
    cfg = RunConfig.from_dict({"model": {"kind": "cvae", "labels": list(LABELS)}})
    assert cfg.data.contrasts == LABELS and RunConfig.from_flat(cfg.to_flat()) == cfg
    with pytest.raises(ConfigError, match="must be empty or model.labels"):
        RunConfig.from_dict({"model": {"kind": "cvae", "labels": ["t1", "t2"]}, "data": {"contrasts": ["t2"]}})
    with pytest.raises(ConfigError, match="short lower-case names"):
        DataConfig(contrasts=("T1 MPRAGE",))
    with pytest.raises(ConfigError, match="SeriesDescription text=label"):
        DataConfig(contrast_map=("MPRAGE",))


@pytest.fixture
def cvae_bundle(tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({"model.kind": "cvae", "model.labels": list(LABELS),
                                   "data.contrasts": list(LABELS)})
    model = build_model(cfg.model, seed=3)
    with torch.no_grad():
        for film in model.film:  # as if trained: the label changes the image
            film.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    save_bundle(tmp_path / "cvae", Bundle(cfg, model.state_dict(), None))
    return tmp_path / "cvae", cfg


def test_translation_keeps_format_geometry_and_patient_and_marks_the_output_synthetic(paired, cvae_bundle, tmp_path):
    root, _ = paired
    bundle, cfg = cvae_bundle
    images = root / "site-1" / "test"
    before = _tree_digest(images)
    assert main(["translate", "--model", str(bundle), "--input", str(images), "--to", "t2",
                 "--out", str(tmp_path / "t2")]) == 0
    assert _tree_digest(images) == before  # the input is only read
    src = pydicom.dcmread(images / "S1-P003" / "t1" / "001.dcm")
    out = pydicom.dcmread(tmp_path / "t2" / "S1-P003" / "t1" / "001.dcm")
    assert out.pixel_array.shape == src.pixel_array.shape and out.PatientID == src.PatientID
    assert out.ImagePositionPatient == src.ImagePositionPatient and out.PixelSpacing == src.PixelSpacing
    assert out.SOPInstanceUID != src.SOPInstanceUID and out.SeriesInstanceUID != src.SeriesInstanceUID
    assert list(out.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert "SYNTHETIC" in out.ImageComments and "not for diagnosis" in out.ImageComments
    assert "translate to t2" in out.DerivationDescription
    assert not np.array_equal(out.pixel_array, src.pixel_array)
    # read back as training reads it: a T2 now, of the model's own translation
    back = scan_folder(tmp_path / "t2", cfg.data, 64)
    assert {e.contrast for e in back.entries} == {"t2"}
    assert not (tmp_path / "t2" / "S1-P003" / "t2").exists()  # already T2: skipped, with the reason
    import json

    summary = json.loads((tmp_path / "t2" / "summary.json").read_text())
    assert summary["synthetic"] is True and any(s["reason"] == "already t2" for s in summary["skipped"])


def test_translation_of_a_png_uses_its_folder_for_the_label_and_writes_png(cvae_bundle, tmp_path):
    bundle, _ = cvae_bundle
    (tmp_path / "in" / "flair").mkdir(parents=True)
    yy, xx = np.mgrid[:80, :80]
    disc = (((yy - 40) ** 2 + (xx - 40) ** 2) < 900).astype(np.uint8) * (120 + (xx % 7) * 10).astype(np.uint8)
    Image.fromarray(disc, mode="L").save(tmp_path / "in" / "flair" / "a.png")
    assert main(["translate", "--model", str(bundle), "--input", str(tmp_path / "in"), "--to", "t1",
                 "--out", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "flair" / "a.png") as im:
        assert im.size == (80, 80)


def test_translate_and_sample_refuse_what_they_cannot_do(paired, cvae_bundle, tiny_cfg, tmp_path, capsys):
    root, _ = paired
    bundle, _ = cvae_bundle
    assert main(["translate", "--model", str(bundle), "--input", str(root), "--to", "pd",
                 "--out", str(tmp_path / "x")]) == 2
    assert "one of this model's labels: t1, t2, flair" in capsys.readouterr().err
    vae = tmp_path / "vae"
    save_bundle(vae, Bundle(tiny_cfg.with_overrides({"model.kind": "vae"}),
                            build_model(tiny_cfg.with_overrides({"model.kind": "vae"}).model).state_dict(), None))
    assert main(["translate", "--model", str(vae), "--input", str(root), "--to", "t2",
                 "--out", str(tmp_path / "y")]) == 2
    assert "needs a conditional VAE" in capsys.readouterr().err
    assert main(["sample", "--model", str(bundle), "--n", "2", "--out", str(tmp_path / "s")]) == 2
    assert "give --label, one of t1, t2, flair" in capsys.readouterr().err
    assert main(["sample", "--model", str(vae), "--n", "2", "--label", "t2", "--out", str(tmp_path / "s")]) == 2
    assert "--label is for a conditional VAE" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("x", "y", "s"))


def test_sample_with_a_label_makes_that_kind_of_image(cvae_bundle, tmp_path):
    bundle, _ = cvae_bundle
    for label in ("t1", "t2"):
        assert main(["sample", "--model", str(bundle), "--n", "3", "--label", label, "--seed", "1",
                     "--format", "dicom", "--out", str(tmp_path / label)]) == 0
    a = [pydicom.dcmread(p) for p in sorted((tmp_path / "t1").glob("*.dcm"))]
    b = [pydicom.dcmread(p) for p in sorted((tmp_path / "t2").glob("*.dcm"))]
    assert len(a) == len(b) == 3
    assert a[0].SeriesDescription.startswith("T1 SYNTHETIC") and b[0].SeriesDescription.startswith("T2 SYNTHETIC")
    assert not np.array_equal(a[0].pixel_array, b[0].pixel_array)  # same draws, another label


def test_a_cvae_encodes_with_each_images_label_and_decodes_with_it(paired, cvae_bundle, tmp_path):
    root, _ = paired
    bundle, cfg = cvae_bundle
    images = root / "site-1" / "test"
    assert main(["encode", "--model", str(bundle), "--input", str(images), "--out", str(tmp_path / "codes")]) == 0
    with np.load(tmp_path / "codes" / "codes.npz") as npz:
        assert list(npz["labels"]) == list(LABELS) and npz["label"].shape == (len(npz["codes"]),)
        assert set(npz["label"].tolist()) == {0, 1, 2}
    assert main(["decode", "--model", str(bundle), "--codes", str(tmp_path / "codes"),
                 "--out", str(tmp_path / "decoded")]) == 0
    assert len(list((tmp_path / "decoded").glob("*.png"))) == len(npz_rows(tmp_path / "codes"))


def npz_rows(codes):
    with np.load(codes / "codes.npz") as npz:
        return list(npz["path"])


def test_the_reports_reference_slices_are_of_a_contrast_the_run_reads(cvae_bundle, tiny_cfg):
    from medae_core.bundle import load_bundle
    from medae_core.report import reference_figures, reference_images

    flair_only = tiny_cfg.with_overrides({"data.contrasts": ["flair"]})
    images, _ = reference_images(flair_only)  # a run that reads FLAIR alone gets FLAIR slices
    assert len(images) == 6
    bundle, cfg = cvae_bundle
    figures = reference_figures(load_bundle(bundle), reference_images(cfg))
    assert figures and all("<img" in f or "data:image/png" in f for f in figures)
