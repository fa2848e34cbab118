"""Atomic file writes: readers (a report, a resumed run, `medae score`) never see half a file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write through ``write(fh)`` into a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as fh:
        write(fh)
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
