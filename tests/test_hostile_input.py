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


MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from medae.cli import main
    code = main(sys.argv[1:])
    print(json.dumps({"code": code, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
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
