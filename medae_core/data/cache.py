"""Decoded, normalised images kept between runs, outside every data folder (``data.cache = true``).

Reading a site decodes every file (pydicom, JPEG 2000, NIfTI), normalises its
intensities and resizes it to the model's size: a few milliseconds a file, paid
again in every run and, in a simulation with more sites than a node process
keeps in memory, in every round. With the cache on, each file's outcome (its
slices at model size, or the reason it is unusable) is stored once under a key
made of the file's bytes (SHA-256), its path relative to the scanned folder (the
patient may come from it) and everything that shapes the result (`DataConfig`
less what only splits patients, the image size, the cache format and medae's
version). A changed file or setting is a miss, never a stale hit.

Where: ``$MEDAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/medae/images``, else
``~/.cache/medae/images``. It is a second copy of patient pixels: keep it on
storage as protected as the data. Folders are made owner-only (0700), files
0600. It is refused inside the data folder being read. ``medae cache`` shows its
size; ``medae cache --clear`` (or deleting the folder) empties it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medae_core.config import DataConfig

CACHE_FORMAT = 3  # 2: slices carry their SeriesDescription and position; 3: one raw file per entry
SUFFIX = ".img"
OLD_SUFFIXES = (".npz",)  # formats 1-2: counted and cleared, never read
CACHE_ENV = "MEDAE_CACHE_DIR"


def cache_dir() -> Path:
    """Where the image cache is (see the module's docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medae" / "images"


@functools.lru_cache(maxsize=1)
def _medae_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medae")
    except PackageNotFoundError:  # run from a source tree without installing
        return "source"


@functools.lru_cache(maxsize=32)
def preprocessing_key(data: DataConfig, size: int) -> bytes:
    """Everything besides the file itself that decides what reading it gives."""
    text = json.dumps({"data": data.preprocessing(), "size": size, "format": CACHE_FORMAT,
                       "medae": _medae_version()}, sort_keys=True)
    return hashlib.sha256(text.encode()).digest()


def file_key(path: Path, rel: str, preprocessing: bytes, max_bytes: float) -> str | None:
    """The cache key of a regular file, or None for what is not cached (not a plain file, over the size limit)."""
    try:
        if not path.is_file() or path.stat().st_size > max_bytes:  # FIFOs, devices, hostile sizes: read as usual
            return None
        digest = hashlib.sha256(preprocessing)
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _entry(root: Path, key: str) -> Path:
    return root / key[:2] / f"{key}{SUFFIX}"


# An entry is one file: MAGIC, then the lengths of the metadata (JSON) and of the pixels
# (float32 values), then the two. One read and no parsing beyond the JSON: a site's
# cached read costs little more than hashing its files (the earlier .npz entries went
# through zipfile and numpy's header parser, 0.8 ms a file).
MAGIC = b"MEDAE-IC"
_HEADER = struct.Struct("<8sQQ")  # magic, metadata bytes, float32 values


def load(root: Path, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(images [n, H, W] float32, metadata) stored under ``key``; None when absent or unreadable."""
    try:
        with _entry(root, key).open("rb") as fh:
            buf = bytearray(os.fstat(fh.fileno()).st_size)
            if fh.readinto(buf) != len(buf) or len(buf) < _HEADER.size:
                return None
        magic, n_meta, n_values = _HEADER.unpack_from(buf)
        start = _HEADER.size + n_meta
        if magic != MAGIC or len(buf) != start + 4 * n_values:  # a crashed writer's or a foreign file
            return None
        meta = json.loads(bytes(buf[_HEADER.size:start]).decode())
        shape = tuple(int(x) for x in meta["shape"])
        images = np.frombuffer(buf, dtype="<f4", count=n_values, offset=start)
        return images.reshape(shape).astype(np.float32, copy=False), meta
    except (OSError, ValueError, KeyError, TypeError):  # absent, half-written, or damaged: a miss
        return None


def store(root: Path, key: str, images: np.ndarray, meta: dict[str, Any]) -> None:
    """Store one file's outcome; complete or absent (written aside, then renamed). Failures are not errors."""
    target = _entry(root, key)
    images = np.ascontiguousarray(images, dtype="<f4")
    body = json.dumps({**meta, "shape": list(images.shape)}).encode()
    body += b" " * (-(_HEADER.size + len(body)) % 4)  # the pixels start 4-byte aligned
    with contextlib.suppress(OSError):
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_HEADER.pack(MAGIC, len(body), images.size))
                fh.write(body)
                fh.write(images.tobytes())
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _entries(root: Path) -> list[Path]:
    """Every entry file, of this format and of earlier ones (which are never read again)."""
    if not root.is_dir():
        return []
    return [p for suffix in (SUFFIX, *OLD_SUFFIXES) for p in root.glob(f"??/*{suffix}")]


def usage(root: Path) -> tuple[int, int]:
    """(entries, bytes) in the cache."""
    files = _entries(root)
    return len(files), sum(p.stat().st_size for p in files)


def clear(root: Path) -> int:
    """Delete every cache entry (and nothing else); returns how many."""
    removed = 0
    for entry in _entries(root):
        entry.unlink()
        removed += 1
    if root.is_dir():
        for sub in root.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                with contextlib.suppress(OSError):
                    sub.rmdir()
    return removed
