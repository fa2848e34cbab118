"""Hostile files: each is skipped with a reason, memory stays bounded, the folder is untouched.

The corpus comes from `tests/hostile_corpus.py` (files of a few hundred bytes to
2 MB that claim or inflate to GBs). The scan runs in a subprocess so that its
peak resident memory can be measured on its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medae_core.config import DataConfig
from medae_core.data import UnusableFile, read_file
from tests.hostile_corpus import CORPUS, write_corpus
from tests.test_data import snapshot

PEAK_BOUND_MB = 1024  # the scan of the whole corpus must stay below this


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("hostile") / "site"
    write_corpus(site / "train")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(site / "train" / "good.png")
    return site


# The peak is read from /proc/self/status (VmHWM): ru_maxrss would carry over the peak of the
# forked parent (a long pytest process) across exec on Linux.
MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from medae.cli import main
    code = main(sys.argv[1:])
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"code": code, "peak_kb": hwm,
                      "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), file=sys.stderr)
    """
)


def test_every_hostile_file_is_skipped_with_its_reason_in_bounded_memory(hostile_site):
    before = snapshot(hostile_site)
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, "check-data", str(hostile_site), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    usage = json.loads(proc.stderr.strip().splitlines()[-1])
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    for name, expected in CORPUS.items():
        assert reasons.get(name, "").startswith(expected), (name, reasons.get(name))
    assert report["usable_images"] == 1  # good.png
    peak_mb = max(usage["peak_kb"], usage["children_kb"]) / 1024
    assert peak_mb < PEAK_BOUND_MB, f"scan peaked at {peak_mb:.0f} MB"
    assert snapshot(hostile_site) == before


def test_the_limit_is_a_config_key_and_the_default_admits_ordinary_images(tmp_path):
    path = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 65535, (512, 512), dtype=np.uint16)).save(path)
    assert len(read_file(path, path.name, DataConfig())) == 1
    with pytest.raises(UnusableFile) as info:
        read_file(path, path.name, DataConfig(max_image_mb=0.1))  # 512 KiB of 16-bit pixels
    assert info.value.reason.startswith("too large") and "data.max_image_mb" in info.value.reason


def test_a_dicom_over_the_limit_is_refused_before_its_pixels_are_read(tmp_path, monkeypatch):
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset

    def no_decoding(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(Dataset, "pixel_array", property(no_decoding))
    path = Path(get_testdata_file("CT_small.dcm", download=False))  # 128 x 128 x 16 bits = 32 KiB
    with pytest.raises(UnusableFile) as info:
        read_file(path, path.name, DataConfig(max_image_mb=0.01))
    assert info.value.reason.startswith("too large")


# -- medae score: every image its own row and heatmap; outputs complete or absent --------------
@pytest.fixture
def bundle_dir(tmp_path, tiny_cfg):
    from medae_core.bundle import Bundle, Threshold, save_bundle
    from medae_core.models import build_model

    bundle = Bundle(tiny_cfg, build_model(tiny_cfg.model, seed=0).state_dict(),
                    Threshold(value=0.05, percentile=95.0, n_healthy=10, method="validation-percentile"))
    return save_bundle(tmp_path / "model", bundle)


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48), dtype=np.uint8)).save(path)


def _score(bundle_dir: Path, input_dir, out: Path) -> int:
    from medae.cli import main

    return main(["score", "--model", str(bundle_dir), "--input", str(input_dir), "--out", str(out)])


def _rows(out: Path) -> list[dict]:
    import csv

    with (out / "scores.csv").open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_score_writes_a_row_and_a_heatmap_for_every_awkward_name(bundle_dir, tmp_path):
    import os

    data = tmp_path / "scans"
    _png(data / "a" / "b.png", 1)
    _png(data / "a__b.png", 2)  # used to share one heatmap with a/b.png
    _png(Path(os.fsdecode(bytes(data / "x")) + os.fsdecode(b"\xff.png")), 3)  # not UTF-8
    deep = data / ("d" * 60) / ("e" * 60)
    _png(deep / (("f" * 156) + ".png"), 4)  # 282 characters relative to the input
    assert max(len(str(p.relative_to(data))) for p in data.rglob("*.png")) >= 282
    before = snapshot(data)
    out = tmp_path / "out"
    assert _score(bundle_dir, data, out) == 0
    rows = _rows(out)
    assert len(rows) == 4
    assert {"a/b.png", "a__b.png", "x\\xff.png"} <= {r["path"] for r in rows}
    heatmaps = [r["heatmap"] for r in rows]
    assert len(set(heatmaps)) == 4 and all((out / h).is_file() for h in heatmaps)
    assert all(len(Path(h).name) < 200 for h in heatmaps)
    assert json.loads((out / "summary.json").read_text())["images"] == 4
    assert snapshot(data) == before


def test_score_with_a_relative_input_that_has_labels(bundle_dir, tmp_path, monkeypatch):
    data = tmp_path / "scans"
    _png(data / "sick.png", 1)
    _png(data / "well.png", 2)
    (data / "labels.csv").write_text("path,label\nsick.png,1\nwell.png,0\n")
    monkeypatch.chdir(tmp_path)
    assert _score(bundle_dir, "scans", Path("out")) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images"] == 2 and "metrics" in summary


def test_a_score_that_fails_midway_leaves_no_partial_output_and_keeps_the_last_one(bundle_dir, tmp_path,
                                                                                    monkeypatch):
    from medae_core import figures

    data = tmp_path / "scans"
    for i in range(3):
        _png(data / f"{i}.png", i)
    out = tmp_path / "out"
    assert _score(bundle_dir, data, out) == 0
    earlier = snapshot(out)
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, *args, **kwargs)

    real = figures.save_overlay
    monkeypatch.setattr(figures, "save_overlay", failing)
    assert _score(bundle_dir, data, out) != 0
    assert snapshot(out) == earlier  # the earlier complete output, untouched
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    fresh = tmp_path / "fresh"
    calls.clear()
    assert _score(bundle_dir, data, fresh) != 0
    assert not fresh.exists()


def test_score_refuses_an_out_folder_holding_other_files(bundle_dir, tmp_path):
    data = tmp_path / "scans"
    _png(data / "0.png")
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    assert _score(bundle_dir, data, out) == 2
    assert [p.name for p in out.iterdir()] == ["thesis.docx"]
