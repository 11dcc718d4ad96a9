"""Durable writes: a file either exists whole or not at all.

Each file is written to a temporary name, flushed to disk and renamed into
place, then its folder is flushed, so killing the process at any instant (or
a power loss) never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from atlas.errors import AtlasError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` then renames tmp to `path`, durably.

    A full disk or any error leaves `path` as it was and removes the temporary.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == 28:  # ENOSPC
            raise AtlasError(f"disk full while writing {path}; finished units are kept, "
                             f"free space and re-run the same command to continue") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: dict) -> None:
    """Writes `obj` as indented JSON, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def write_bytes(ds: h5py.Dataset, values) -> None:
    """Fills a 1-D variable-length uint8 dataset element by element (numpy would stack equal lengths)."""
    for i, v in enumerate(values):
        ds[i] = np.asarray(v, np.uint8)


def write_h5(tmp: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Writes arrays (text as HDF5 strings, object arrays of uint8 arrays as variable-length bytes) and
    attributes (containers and None as JSON) to a new file."""
    with h5py.File(tmp, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) or v is None else v
        for k, v in arrays.items():
            v = np.asarray(v)
            if v.dtype.kind == "U":
                f.create_dataset(k, data=v.astype(object), dtype=h5py.string_dtype())
            elif v.dtype == object:  # one byte array per element (encoded pictures)
                write_bytes(f.create_dataset(k, v.shape, h5py.vlen_dtype(np.uint8)), v)
            else:
                f.create_dataset(k, data=v)
