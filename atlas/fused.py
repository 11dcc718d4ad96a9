"""Element-wise and reduction code fused into single passes by torch.compile, with an eager fallback.

Eager PyTorch reads a tensor once per operation and allocates temporaries the
size of it; a compiled kernel reads it once. Atlas compiles the few small
functions that touch every feature map (the dataset pass's reductions, the
redirected ReLU's gradient), with dynamic sizes, so one compilation serves
every layer. Where compilation is unavailable (no C++ compiler, an
unsupported device), each function falls back to eager mode, once, with a
warning, and gives the same numbers.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch
import torch.fx.experimental._config as fx_config


class Fused:
    """`fn`, compiled on first use; `fn` itself where compiling fails or `fuse` is off.

    `threads` caps the CPU threads a compiled kernel splits its work over (None: all of
    them). One thread suits a small kernel that runs beside other processes: a kernel split
    over every core waits at its end for the slowest, and where other work holds a core
    (image decoders) that wait is a scheduler time slice, longer than the kernel itself.
    """

    def __init__(self, fn: Callable, what: str, threads: int | None = None):
        self.fn, self.what = fn, what
        self.options = {"cpp.threads": threads} if threads else None
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, *args, fuse: bool = True):
        if not fuse or self.failed:
            return self.fn(*args)
        try:
            if self.compiled is None:
                # compiling for the CPU on a machine without CUDA is expected, not worth a warning
                logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
                self.compiled = torch.compile(self.fn, dynamic=True, options=self.options)
            # no "duck" sizes: a batch of 32 images of a 32-channel layer must not tie the two sizes
            # together, or every other layer recompiles (seconds each, on a 2-core CPU)
            with fx_config.patch(use_duck_shape=False):
                return self.compiled(*args)
        except Exception as exc:  # any compiler failure: the eager path gives the same numbers
            self.failed = True
            warnings.warn(f"fused {self.what} unavailable ({type(exc).__name__}); using eager mode")
            return self.fn(*args)
