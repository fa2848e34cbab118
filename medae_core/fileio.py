"""Atomic file writes: readers (a report, a resumed run, `medae score`) never see half a file.

`output_folder` does the same for a whole folder of outputs: they are complete or absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from medae_core.errors import DataError


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], *, durable: bool = True) -> Path:
    """Write through ``write(fh)`` into a temporary file beside ``path``, fsync, then rename over ``path``.

    ``durable=False`` skips the fsync: for files that live no longer than the run that writes them.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as fh:
        write(fh)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: Path, data: Any) -> Path:
    """JSON, atomically; numpy values as plain numbers."""
    text = json.dumps(data, indent=2, default=_plain)
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


MARKER = "summary.json"  # what every medae output folder ends with


@contextlib.contextmanager
def output_folder(out: Path, marker: str = MARKER) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; on success it replaces ``out`` whole.

    On any error the staging folder is removed and ``out`` is left as it was, so
    an output folder is complete or absent. An existing ``out`` is replaced only
    when it is empty or an earlier output (it holds ``marker``); anything else
    is refused, so that no folder of other files is ever deleted.
    """
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise DataError(f"{out} exists and is not an earlier medae output; choose a new --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def printable_path(path: str) -> str:
    """A file path as text that can always be written (undecodable bytes as \\xNN escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def safe_file_name(path: str, frame: int | None, index: int, limit: int = 120) -> str:
    """A unique, short, portable file name for output about input ``path`` (frame ``frame``).

    ``index`` (the row number) makes it unique (``a/b.dcm`` and ``a__b.dcm`` no longer meet); the
    readable part is cut to ``limit`` characters, with a hash of the full path so it still identifies it.
    """
    readable = "".join(c if c.isalnum() or c in "-._" else "_" for c in printable_path(path).replace("/", "__"))
    if len(readable) > limit:
        digest = hashlib.sha1(os.fsencode(path)).hexdigest()[:8]
        readable = f"{readable[: limit - 9]}-{digest}"
    suffix = "" if frame is None else f"__{frame:04d}"
    return f"{index:05d}_{readable}{suffix}"


def ensure_outside(out: Path, data: Path) -> None:
    """Refuse an output folder inside a data folder: we never write there."""
    out, data = Path(out).resolve(), Path(data).resolve()
    if out == data or data in out.parents:
        raise DataError(f"output folder {out} is inside the data folder {data}; choose a folder outside it")
