"""The decoded-image cache (`data.cache`): hits on a second read, misses on any change, never in a data folder."""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import replace

import numpy as np
import pytest

from medae_core.config import DataConfig
from medae_core.data import cache as image_cache
from medae_core.data import dataset
from medae_core.data.dataset import load_site
from medae_core.errors import ConfigError

ON = DataConfig(cache=True)


@pytest.fixture
def site(tiny_benchmark, tmp_path):
    copy = tmp_path / "site"
    shutil.copytree(tiny_benchmark / "site-1", copy)
    (copy / "train" / "notes.txt").write_text("not an image")
    return copy


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(image_cache.CACHE_ENV, str(root))
    return root


def _tree(root):
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _same(a, b):
    for part in ("train", "test"):
        x, y = getattr(a, part), getattr(b, part)
        assert np.array_equal(x.images, y.images) and [e.patient for e in x.entries] == [e.patient for e in y.entries]
        assert [s.reason for s in x.skipped] == [s.reason for s in y.skipped]
    assert np.array_equal(a.test.labels, b.test.labels) and np.array_equal(a.test.masks, b.test.masks)


def test_a_second_read_decodes_nothing_and_gives_the_same_site(site, cache_root, monkeypatch):
    before = _tree(site)
    plain = load_site(site, DataConfig(), 32)
    first = load_site(site, ON, 32)
    entries, size = image_cache.usage(cache_root)
    assert entries == len(list(site.rglob("*.dcm"))) + 1 and size > 0  # every image, and the skipped text file

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached file was decoded again")

    monkeypatch.setattr(dataset, "read_file", no_decoding)
    second = load_site(site, ON, 32)
    _same(plain, first)
    _same(first, second)
    assert any("notes.txt" in s.path for s in second.train.skipped)  # a skipped file keeps its reason
    assert _tree(site) == before  # nothing written into the data folder
    assert stat.S_IMODE(next(cache_root.glob(f"*/*{image_cache.SUFFIX}")).stat().st_mode) == 0o600
    assert stat.S_IMODE(next(cache_root.iterdir()).stat().st_mode) == 0o700


def test_a_changed_file_or_setting_is_a_miss_never_a_stale_hit(site, cache_root, monkeypatch):
    load_site(site, ON, 32)
    decoded = []
    real = dataset.read_file
    monkeypatch.setattr(dataset, "read_file", lambda path, rel, data: decoded.append(rel) or real(path, rel, data))
    victim = sorted((site / "train").rglob("*.dcm"))[0]
    other = sorted((site / "train").rglob("*.dcm"))[1]
    shutil.copyfile(other, victim)  # new bytes at the old path
    load_site(site, ON, 32)
    assert decoded == [victim.relative_to(site / "train").as_posix()]
    decoded.clear()
    load_site(site, replace(ON, percentile_high=99.0), 32)  # other preprocessing: everything again
    assert len(decoded) == len(list(site.rglob("*.dcm"))) + 1  # the text file too
    decoded.clear()
    load_site(site, replace(ON, val_fraction=0.3), 32)  # only the patient split changed: all hits
    assert decoded == []


def test_a_damaged_entry_is_read_again_and_replaced(site, cache_root):
    first = load_site(site, ON, 32)
    entries = sorted(cache_root.glob(f"*/*{image_cache.SUFFIX}"))
    whole = entries[0].read_bytes()
    for i, entry in enumerate(entries):  # shorter than a header, cut off, one value too many, not ours
        entry.write_bytes([b"half a file", whole[:-4], whole + bytes(4), b"X" + whole[1:]][i % 4])
        assert image_cache.load(cache_root, entry.stem) is None
    _same(first, load_site(site, ON, 32))
    assert all(image_cache.load(cache_root, entry.stem) is not None for entry in entries)


def test_cached_files_are_read_here_not_sent_to_worker_processes(site, cache_root, monkeypatch):
    first = load_site(site, ON, 32)
    monkeypatch.setattr(dataset, "PARALLEL_MIN_FILES", 1)  # any file left to decode goes to workers
    monkeypatch.setattr(dataset, "usable_cpus", lambda: 4)

    def no_workers(*args, **kwargs):
        raise AssertionError("worker processes started for files the cache holds")

    monkeypatch.setattr(dataset, "ProcessPoolExecutor", no_workers)
    _same(first, load_site(site, ON, 32))


def test_entries_of_an_earlier_format_are_counted_and_cleared_never_read(site, cache_root):
    first = load_site(site, ON, 32)
    n, size = image_cache.usage(cache_root)
    old = cache_root / "ab" / ("ab" + "0" * 62 + ".npz")
    old.parent.mkdir(exist_ok=True)
    old.write_bytes(b"an entry of cache format 2")
    assert image_cache.usage(cache_root) == (n + 1, size + old.stat().st_size)
    _same(first, load_site(site, ON, 32))
    assert image_cache.clear(cache_root) == n + 1 and image_cache.usage(cache_root) == (0, 0)


def test_a_cache_inside_the_data_folder_is_refused(site, monkeypatch):
    monkeypatch.setenv(image_cache.CACHE_ENV, str(site / "train" / ".cache"))
    before = _tree(site)
    with pytest.raises(ConfigError, match="inside the data folder"):
        load_site(site, ON, 32)
    assert _tree(site) == before


def test_off_by_default_and_clear_removes_only_cache_entries(site, cache_root, capsys):
    from medae.cli import main

    load_site(site, DataConfig(), 32)
    assert not cache_root.exists()
    load_site(site, ON, 32)
    cache_root.joinpath("keep.txt").write_text("not the cache's")
    assert main(["cache"]) == 0 and str(cache_root) in capsys.readouterr().out
    n = image_cache.usage(cache_root)[0]
    assert main(["cache", "--clear"]) == 0 and f"{n} entries deleted" in capsys.readouterr().out
    assert image_cache.usage(cache_root) == (0, 0) and sorted(os.listdir(cache_root)) == ["keep.txt"]
