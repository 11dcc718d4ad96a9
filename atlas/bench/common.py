"""What the benchmarks share: timing, peak memory of a child process, sample images."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Callable

import torch

from atlas.dataset.images import ImageRecord, sample_images


def best_time(fn: Callable[[], object], repeats: int = 2) -> float:
    """The fastest of `repeats` timed calls (after the caller's warm-up), in seconds."""
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """`fn()` and the seconds it took (GPU work included)."""
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def repeated_samples(n: int) -> list[ImageRecord]:
    """n records cycling through the embedded photos, each under its own name."""
    base = sample_images()
    return [ImageRecord(r.path, r.label, f"{i:06d}-{r.name}") for i in range(n) for r in [base[i % len(base)]]]


def child_peak(module: str, args: dict) -> dict:
    """Runs `module`'s `peak(**args)` in a fresh interpreter; returns its JSON result.

    A fresh process makes the peak resident memory (ru_maxrss) belong to one run alone.
    """
    code = (f"import json, resource, sys; from {module} import peak; "
            f"out = peak(**json.loads(sys.argv[1])); "
            f"out['maxrss_kb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
