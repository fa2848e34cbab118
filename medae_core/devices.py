"""Where and how training runs: the device, the thread count, and the allocator setting that keeps steps fast."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

import torch

from medae_core.errors import ConfigError, MedaeError


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` honoured."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MedaeError(
                f"train.device is {name!r} but CUDA is not available on this machine "
                "(no GPU, or a CPU-only PyTorch build); use device = \"auto\" or \"cpu\""
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MedaeError(
                f"train.device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type != "cpu":
        raise ConfigError(f"train.device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Keep freed large blocks in the process heap while training (glibc only).

    By default glibc returns every large (> 32 MiB at most) allocation to the
    OS on free, so each training step page-faults its activations and
    gradients back in; measured here, that was ~30% of a DP step on CPU (per-
    sample gradients are large). Restored afterwards and the heap trimmed.
    Applied to DP and non-DP training alike.
    """
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            libc = None
    if libc is None:
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_max, 65536)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    if n <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
