"""`medae encode`, `decode` and `sample` on tiny bundles: outputs, formats, round trips, refusals."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pydicom
import pytest
import torch

from medae.cli import main
from medae_core.bundle import Bundle, save_bundle
from medae_core.data import scan_folder
from medae_core.models import build_model


def _bundle(cfg, kind, path):
    cfg = cfg.with_overrides({"model.kind": kind})
    save_bundle(path, Bundle(cfg, build_model(cfg.model, seed=3).state_dict(), None))
    return cfg


def _tree_digest(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_encode_then_decode_gives_the_models_own_reconstruction(tiny_benchmark, tiny_cfg, tmp_path):
    cfg = _bundle(tiny_cfg, "vae", tmp_path / "model")
    images = tiny_benchmark / "site-1" / "test"
    before = _tree_digest(images)
    assert main(["encode", "--model", str(tmp_path / "model"), "--input", str(images),
                 "--out", str(tmp_path / "codes")]) == 0
    scan = scan_folder(images, cfg.data, cfg.model.image_size)
    with np.load(tmp_path / "codes" / "codes.npz") as npz:
        codes, paths, frames = npz["codes"], npz["path"], npz["frame"]
        assert str(npz["kind"]) == "vae"
    assert codes.shape == (len(scan.images), cfg.model.latent_dim) and codes.dtype == np.float32
    assert list(paths) == [e.path for e in scan.entries]
    with (tmp_path / "codes" / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == list(paths) and len(frames) == len(rows)

    assert main(["decode", "--model", str(tmp_path / "model"), "--codes", str(tmp_path / "codes"),
                 "--out", str(tmp_path / "decoded")]) == 0
    pngs = sorted((tmp_path / "decoded").glob("*.png"))
    assert len(pngs) == len(scan.images)
    model = build_model(cfg.model, seed=3).eval()
    with torch.no_grad():
        expected = model.reconstruct(torch.as_tensor(scan.images[:, None])).numpy()[:, 0]
    from PIL import Image

    decoded = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255.0 for p in pngs])
    assert np.abs(decoded - expected).max() <= 1.0 / 255.0 + 1e-6  # 8-bit PNG of the same reconstruction
    assert _tree_digest(images) == before  # the input folder is untouched


def test_decode_refuses_codes_of_another_size(tiny_benchmark, tiny_cfg, tmp_path, capsys):
    _bundle(tiny_cfg, "ae", tmp_path / "model")
    np.savez(tmp_path / "wrong.npz", codes=np.zeros((2, tiny_cfg.model.latent_dim + 1), np.float32))
    assert main(["decode", "--model", str(tmp_path / "model"), "--codes", str(tmp_path / "wrong.npz"),
                 "--out", str(tmp_path / "decoded")]) == 2
    assert "dimensions" in capsys.readouterr().err
    assert not (tmp_path / "decoded").exists()  # complete or absent


def test_sample_writes_synthetic_dicom_without_site_identifiers(tiny_cfg, tmp_path):
    cfg = _bundle(tiny_cfg, "vae", tmp_path / "model")
    assert main(["sample", "--model", str(tmp_path / "model"), "--n", "5", "--out", str(tmp_path / "samples"),
                 "--format", "dicom", "--seed", "7"]) == 0
    files = sorted((tmp_path / "samples").glob("*.dcm"))
    assert len(files) == 5
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert "synthetic" in ds.SeriesDescription.lower()
        assert ds.PatientID.startswith("SYNTHETIC-") and ds.PatientIdentityRemoved == "YES"
        assert "InstitutionName" not in ds and "site" not in str(ds).lower()
        assert ds.pixel_array.shape == (cfg.model.image_size, cfg.model.image_size)
    assert len({ds.SOPInstanceUID for ds in datasets}) == 5  # new UIDs, one per image
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    first = [ds.pixel_array for ds in datasets]
    assert main(["sample", "--model", str(tmp_path / "model"), "--n", "5", "--out", str(tmp_path / "again"),
                 "--format", "dicom", "--seed", "7"]) == 0
    again = [pydicom.dcmread(f).pixel_array for f in sorted((tmp_path / "again").glob("*.dcm"))]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))  # the seed repeats the draws


@pytest.mark.parametrize("kind", ["ae", "dae", "sae"])
def test_sample_refuses_a_model_without_a_prior(tiny_cfg, tmp_path, capsys, kind):
    _bundle(tiny_cfg, kind, tmp_path / "model")
    assert main(["sample", "--model", str(tmp_path / "model"), "--n", "2", "--out", str(tmp_path / "s")]) == 2
    assert "needs a VAE" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_score_warns_when_the_input_is_another_modality_or_far_from_the_training_data(tiny_benchmark, tiny_cfg,
                                                                                         tmp_path):
    import json

    from medae_core.bundle import Threshold

    mr = tiny_benchmark / "site-1" / "test"
    ct = tmp_path / "ct"
    ct.mkdir()
    for f in sorted(p for p in mr.rglob("*.dcm"))[:4]:
        ds = pydicom.dcmread(f)
        ds.Modality = "CT"
        ds.save_as(ct / f.name)
    trained = {"format": ["dicom"], "modality": ["MR"], "photometric": ["MONOCHROME2"]}
    state = build_model(tiny_cfg.model, seed=3).state_dict()

    def score(threshold, folder, out):
        save_bundle(tmp_path / "model", Bundle(tiny_cfg, state, Threshold(threshold, 95.0, 10, "validation-percentile"),
                                               info={"inputs": trained}))
        assert main(["score", "--model", str(tmp_path / "model"), "--input", str(folder), "--out", str(out),
                     "--no-heatmaps"]) == 0
        return json.loads((out / "summary.json").read_text())["warnings"]

    assert score(1e9, mr, tmp_path / "s1") == []  # the training kind, scores well below the threshold
    (warning,) = score(1e9, ct, tmp_path / "s2")
    assert "modality CT" in warning and "trained on MR" in warning
    (warning,) = score(1e-9, mr, tmp_path / "s3")
    assert "median image scores" in warning and "× the threshold" in warning


def test_denoise_keeps_dicom_geometry_and_marks_the_output_derived(tiny_benchmark, tiny_cfg, tmp_path):
    _bundle(tiny_cfg, "dae", tmp_path / "model")
    images = tiny_benchmark / "site-1" / "test"
    before = _tree_digest(images)
    assert main(["denoise", "--model", str(tmp_path / "model"), "--input", str(images),
                 "--out", str(tmp_path / "clean")]) == 0
    inputs = sorted(images.rglob("*.dcm"))
    outputs = sorted((tmp_path / "clean").rglob("*.dcm"))
    assert [p.relative_to(tmp_path / "clean") for p in outputs] == [p.relative_to(images) for p in inputs]
    for src, dst in zip(inputs, outputs, strict=True):
        a, b = pydicom.dcmread(src), pydicom.dcmread(dst)
        assert (b.Rows, b.Columns, list(b.PixelSpacing)) == (a.Rows, a.Columns, list(a.PixelSpacing))
        assert b.PatientID == a.PatientID and b.pixel_array.dtype == a.pixel_array.dtype
        assert b.SOPInstanceUID != a.SOPInstanceUID and b.SeriesInstanceUID != a.SeriesInstanceUID
        assert list(b.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "medae" in b.SeriesDescription
    assert len({pydicom.dcmread(p).SeriesInstanceUID for p in outputs}) == len(
        {pydicom.dcmread(p).SeriesInstanceUID for p in inputs})  # one new series per input series
    assert _tree_digest(images) == before


def test_the_intensity_map_back_restores_stored_units(tiny_benchmark, tiny_cfg):
    from pydicom.pixels import apply_modality_lut

    from medae_core.data import read_file
    from medae_core.denoise import back_to_units, to_matrix

    path = sorted((tiny_benchmark / "site-1" / "train").rglob("*.dcm"))[0]
    (s,) = read_file(path, path.name, tiny_cfg.data)
    ds = pydicom.dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    restored = back_to_units(s.image, values, s.image)  # the reader's own image maps back to the file's units
    inside = (s.image > 0.01) & (s.image < 0.99)
    assert np.abs(restored - values)[inside].max() <= 1e-3 * (values.max() - values.min())
    square = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    assert to_matrix(square, (64, 40)).shape == (64, 40)
    assert back_to_units(np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 8))) is None  # nothing to fit
    from medae_core.data.readers import axial_view, from_axial_view

    ras = np.arange(20 * 24, dtype=np.float32).reshape(20, 24)
    assert np.array_equal(from_axial_view(axial_view(ras)), ras)  # NIfTI slices go back where they came from


def test_denoise_writes_png_for_raster_input_and_nifti_for_nifti(tiny_cfg, tmp_path):
    import json

    import nibabel as nib
    from PIL import Image

    _bundle(tiny_cfg, "ae", tmp_path / "model")
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((80, 60)) * 200 + 20).astype(np.uint8), mode="L").save(src / "a.png")
    Image.fromarray((rng.random((50, 50)) * 4000 + 100).astype(np.uint16)).save(src / "deep.png")
    # A volume stored left-to-right flipped (LAS): the output must keep that voxel order and affine.
    volume = np.zeros((20, 24, 6), np.float32)
    volume[4:16, 5:20, 1:5] = rng.random((12, 15, 4)) * 900 + 100
    affine = np.diag([-2.0, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), src / "v.nii.gz")
    (src / "notes.txt").write_text("not an image")
    before = _tree_digest(src)
    assert main(["denoise", "--model", str(tmp_path / "model"), "--input", str(src),
                 "--out", str(tmp_path / "clean")]) == 0
    a, deep = Image.open(tmp_path / "clean" / "a.png"), Image.open(tmp_path / "clean" / "deep.png")
    assert a.size == (60, 80) and a.mode == "L"
    assert deep.size == (50, 50) and np.asarray(deep).dtype == np.uint16
    out = nib.load(tmp_path / "clean" / "v.nii.gz")
    assert out.shape == volume.shape and np.allclose(out.affine, affine)
    assert b"medae denoised" in out.header["descrip"].tobytes()
    denoised = out.get_fdata()
    assert np.array_equal(denoised[:, :, 0], volume[:, :, 0])  # no foreground: copied unchanged
    changed = denoised[:, :, 1:5][volume[:, :, 1:5] > 0]
    assert not np.allclose(changed, volume[:, :, 1:5][volume[:, :, 1:5] > 0])  # replaced by the reconstruction
    assert 0 <= changed.min() and changed.max() <= 1000 + 1e-3  # in the stored units, inside their window
    summary = json.loads((tmp_path / "clean" / "summary.json").read_text())
    assert summary["files_written"] == 3
    assert [s["path"] for s in summary["skipped"]] == ["notes.txt"]
    assert _tree_digest(src) == before


def test_training_adds_synthetic_units_from_a_private_vae_and_refuses_one_that_is_not(tiny_benchmark, tiny_cfg,
                                                                                        tmp_path):
    from medae_core.errors import ConfigError
    from medae_core.privacy import PrivacyLedger
    from medae_core.site import SiteTrainer, load_site_data

    vae_cfg = _bundle(tiny_cfg, "vae", tmp_path / "vae")  # tiny_cfg trains under DP: its samples are private
    cfg = tiny_cfg.with_overrides({"train.augment_with_samples": 0.5, "train.augment_model": str(tmp_path / "vae")})
    assert vae_cfg.privacy.enabled
    data = load_site_data(tiny_benchmark / "site-1", cfg)
    ledger = PrivacyLedger.for_config(cfg.privacy, site=data.name, path=tmp_path / "ledger.jsonl")
    trainer = SiteTrainer(data, cfg, ledger)
    images, units, n_units = trainer.training_set()
    extra = round(0.5 * data.n_train_patients)
    assert n_units == data.n_train_patients + extra and len(images) == len(data.train_images) + extra
    assert len(np.unique(units)) == n_units  # each sample is a unit of its own
    result = trainer.train_round(None, run_id="aug", server_round=1)
    assert result.sample_rate == pytest.approx(min(1.0, cfg.train.batch_size / n_units))
    assert result.epsilon <= cfg.privacy.budget_epsilon

    public_ae = tiny_cfg.with_overrides({"privacy.enabled": False})
    save_bundle(tmp_path / "nodp", Bundle(public_ae.with_overrides({"model.kind": "vae"}),
                                          build_model(public_ae.with_overrides({"model.kind": "vae"}).model).state_dict(),
                                          None))
    for path, why in ((tmp_path / "nodp", "trained without DP"), (tmp_path / "ae", "must be a VAE")):
        if path.name == "ae":
            _bundle(tiny_cfg, "ae", path)
        bad = tiny_cfg.with_overrides({"train.augment_with_samples": 0.5, "train.augment_model": str(path)})
        with pytest.raises(ConfigError, match=why):
            SiteTrainer(data, bad, ledger).training_set()
    with pytest.raises(ConfigError, match="needs train.augment_model"):
        tiny_cfg.with_overrides({"train.augment_with_samples": 0.5})
