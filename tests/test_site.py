"""Site-side evaluation: what a server pools from histograms equals what the site measures exactly."""

import pytest

from medae_core.federated import auprc_from_histograms, auroc_from_histograms, dice_best_from_histograms
from medae_core.models import build_model
from medae_core.evaluation import LabelledSet, evaluate_site
from medae_core.site import load_site_data


def test_pooled_histogram_metrics_match_the_exact_site_metrics(tiny_benchmark, tiny_cfg):
    data = load_site_data(tiny_benchmark / "site-1", tiny_cfg)
    model = build_model(tiny_cfg.model, seed=0).eval()
    exact, hist = evaluate_site(model, LabelledSet.of(data.test), tiny_cfg, "cpu", None)
    assert exact["pixel_auroc"] is not None
    assert auroc_from_histograms(hist["image_pos"], hist["image_neg"]) == pytest.approx(exact["image_auroc"], abs=0.02)
    assert auroc_from_histograms(hist["pixel_pos"], hist["pixel_neg"]) == pytest.approx(exact["pixel_auroc"], abs=0.01)
    assert auprc_from_histograms(hist["pixel_pos"], hist["pixel_neg"]) == pytest.approx(exact["pixel_auprc"], abs=0.01)
    assert dice_best_from_histograms(hist["pixel_pos"], hist["pixel_neg"]) == pytest.approx(exact["dice_best"], abs=0.01)


# -- one read of a site per simulation, shared between processes (`load_site_data`'s snapshots) ----------
def _private_dir(tmp_path, name="snapshots"):
    folder = tmp_path / name
    folder.mkdir(mode=0o700)
    return folder


def _same(a, b):
    import numpy as np

    assert np.array_equal(a.train_images, b.train_images) and np.array_equal(a.val_images, b.val_images)
    assert np.array_equal(a.train_patients, b.train_patients) and a.skipped == b.skipped
    assert np.array_equal(a.test.images, b.test.images) and np.array_equal(a.test.masks, b.test.masks)


def test_another_process_loads_the_kept_site_instead_of_scanning_it(tiny_benchmark, tiny_cfg, tmp_path, monkeypatch):
    import medae_core.site as site_module

    snapshots = _private_dir(tmp_path)
    site_module._load_site_data_cached.cache_clear()
    first = load_site_data(tiny_benchmark / "site-2", tiny_cfg, snapshots=snapshots)
    assert len(list(snapshots.iterdir())) == 1
    site_module._load_site_data_cached.cache_clear()  # as a fresh Ray actor: nothing in memory

    def no_scan(*args, **kwargs):
        raise AssertionError("the site was scanned again")

    monkeypatch.setattr(site_module, "load_site", no_scan)
    _same(load_site_data(tiny_benchmark / "site-2", tiny_cfg, snapshots=snapshots), first)
    site_module._load_site_data_cached.cache_clear()
    with pytest.raises(AssertionError, match="scanned again"):  # without the folder, it is a scan
        load_site_data(tiny_benchmark / "site-2", tiny_cfg)
    with pytest.raises(AssertionError, match="scanned again"):  # another setting is another read
        load_site_data(tiny_benchmark / "site-2", tiny_cfg.with_overrides({"data.val_fraction": 0.5}),
                       snapshots=snapshots)
    site_module._load_site_data_cached.cache_clear()


def test_a_damaged_or_foreign_kept_site_is_read_again(tiny_benchmark, tiny_cfg, tmp_path, caplog):
    import pickle

    import medae_core.site as site_module

    snapshots = _private_dir(tmp_path)
    site_module._load_site_data_cached.cache_clear()
    truth = load_site_data(tiny_benchmark / "site-1", tiny_cfg, snapshots=snapshots)
    (kept,) = snapshots.iterdir()
    for content in (b"\x80\x05garbage", pickle.dumps({"not": "a site"})):
        kept.write_bytes(content)
        site_module._load_site_data_cached.cache_clear()
        with caplog.at_level("WARNING", logger="medae_core.site"):
            _same(load_site_data(tiny_benchmark / "site-1", tiny_cfg, snapshots=snapshots), truth)
        assert "ignoring the kept copy of site site-1" in caplog.text
        caplog.clear()
    site_module._load_site_data_cached.cache_clear()
    _same(site_module._load_snapshot(kept, truth.root, "site-1"), truth)  # and it was written afresh
    assert site_module._load_snapshot(kept, truth.root, "site-2") is None  # the same file asked for another site


@pytest.mark.parametrize("where", ["shared", "inside the data"])
def test_a_folder_others_can_read_or_inside_the_data_is_not_used(tiny_benchmark, tiny_cfg, tmp_path, caplog, where):
    import shutil

    import medae_core.site as site_module

    site = tmp_path / "site"
    shutil.copytree(tiny_benchmark / "site-1", site)
    if where == "shared":
        snapshots = _private_dir(tmp_path)
        snapshots.chmod(0o755)
    else:
        snapshots = _private_dir(site, ".kept")
    site_module._load_site_data_cached.cache_clear()
    with caplog.at_level("WARNING", logger="medae_core.site"):
        data = load_site_data(site, tiny_cfg, snapshots=snapshots)
    assert len(data.train_images) > 0 and list(snapshots.iterdir()) == []
    assert "only a folder of this user's alone, outside the data" in caplog.text
    site_module._load_site_data_cached.cache_clear()
