"""Where the work runs: the device a build uses, and what to do when its memory runs out.

Every stage sizes its batches for speed and lets `fit` or `chunked` shrink
them when a batch does not fit: the failed call is retried with half the
rows, down to one row, and the size that fitted is handed back so the next
call starts from it. A unit's result never depends on the batch it ran in.
"""

from __future__ import annotations

import ctypes
import platform
from typing import Callable, TypeVar

import torch

from atlas.errors import AtlasError

T = TypeVar("T")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto picks CUDA, then MPS, then the CPU; an unavailable explicit choice is an error.

    Under torchrun, plain `cuda` (or auto) means this machine's GPU number `local_rank`.
    """
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "auto":
        return torch.device("mps") if _has_mps() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AtlasError(f"--device {name}: no CUDA device is available; use --device cpu or auto")
    if name == "mps" and not _has_mps():
        raise AtlasError("--device mps: MPS is not available on this machine; use --device cpu or auto")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise AtlasError(f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def keep_host_memory() -> None:
    """Lets memory this process frees stay with it for the next batch, instead of going back to the system.

    glibc's malloc hands every block over 32 MB (a feature map of a batch, on the CPU)
    back to the system the moment it is freed, and maps fresh pages for the next batch,
    which the kernel zero-fills one 4 KB page fault at a time: 2 to 5 million faults per
    500 images of a dataset pass at 224 px, as much time as the convolutions. Kept, the
    blocks are reused and a steady pass faults no more. The process then holds on to its
    peak memory until it exits. Nothing to do where the C library is not glibc.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt's parameter numbers (malloc.h)
    libc.mallopt(m_mmap_max, 0)  # no block gets its own mapping: all come from the reusable heap
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # the heap's free top goes back only beyond 2 GB


def _has_mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def is_oom(exc: BaseException) -> bool:
    """Out of memory on any device (CUDA raises its own type, the CPU allocator a RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))


def fit(fn: Callable[[int], T], size: int, on_halve: Callable[[int], None] | None = None,
        too_big: str | None = None) -> tuple[T, int]:
    """Calls `fn(size)`, halving `size` after each out-of-memory error until it fits.

    `fn` must change nothing before its last step that can run out of memory,
    since a failed call is simply made again.

    Args:
        fn: the work, given the number of rows it may take at once.
        size: the number to try first.
        on_halve: called with the new size after each halving (to log it, rewind a progress bar).
        too_big: what to tell the user when even one row does not fit.

    Returns:
        `fn`'s result and the size that fitted.

    Raises:
        AtlasError(too_big) when even one row does not fit; the out-of-memory error itself if
        `too_big` is None.
    """
    size = max(1, size)
    while True:
        try:
            return fn(size), size
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_oom(exc):
                raise
            if size == 1:
                if too_big is None:
                    raise
                raise AtlasError(too_big) from None
        size = max(1, size // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if on_halve is not None:
            on_halve(size)


def chunked(fn: Callable[[int, int], T], total: int, batch: int,
            too_big: str | None = None) -> tuple[list[T], int]:
    """Calls `fn(a, b)` over [0, total) in chunks of at most `batch` rows, each chunk through `fit`.

    A chunk that runs out of memory is retried in halves; later chunks keep the smaller size.
    `too_big` is what to tell the user when one row does not fit (see `fit`).

    Returns:
        The results in order, and the chunk size that fitted.
    """
    size, out, a = max(1, batch), [], 0
    while a < total:
        first = min(size, total - a)
        result, fitted = fit(lambda n: fn(a, a + n), first, too_big=too_big)
        out.append(result)
        a += fitted
        if fitted < first:
            size = fitted
    return out, size


def has_bfloat16_units(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (CUDA from Ampere on, CPUs with AMX),
    where bfloat16 autocast makes passes several times cheaper rather than emulating it."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(amx and amx())
    return False
