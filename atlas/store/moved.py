"""Compacted parts: once a stage is consolidated, its parts give their bulk arrays to the store.

A finished work unit's bulk arrays (pixels, maps, crops) are copied into the
consolidated .h5 by consolidation. Kept in the part too, they would double the
store on disk. So after the consolidated file is safely in place, each part
whose bulk now lives in it is rewritten without those arrays, and with an
attribute `moved` that says where each went: `{name: [path in the store,
first row, rows]}`. The part stays a finished unit (resume still skips it),
and every reader sees the same arrays as before: `Part` serves a moved array
from the consolidated store, rows and all. The next consolidation reads the
old .h5 while it writes the new one (which keeps every row in its place), so
nothing is lost. Parts whose store has gone missing cannot be served and are
removed, to be computed again (`Store.begin` does it, with a note).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from atlas.errors import AtlasError

MOVED = "moved"  # part attribute: JSON {array name: [dataset path in the store, first row, rows]}


class MovedArray:
    """Rows [first, first + rows) of a dataset of the consolidated store, read like the part's own array."""

    def __init__(self, dataset: h5py.Dataset, first: int, rows: int):
        self.dataset, self.first, self.rows = dataset, first, rows
        self.shape = (rows, *dataset.shape[1:])
        self.dtype, self.ndim = dataset.dtype, dataset.ndim

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, key):
        head, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if head is Ellipsis:
            head = slice(None)
        if isinstance(head, (int, np.integer)):
            block = self.dataset[self.first + int(head) % self.rows]
            return block[rest] if rest else block
        if isinstance(head, slice):
            start, stop, step = head.indices(self.rows)
            block = self.dataset[self.first + start:self.first + stop][::step]
        else:  # increasing row numbers, as h5py reads them
            rows = np.asarray(head, np.int64).reshape(-1)
            block = self.dataset[list(self.first + rows)] if rows.size else self.dataset[0:0]
        return block[(slice(None), *rest)] if rest else block


class Part:
    """A finished work unit as the stages read it: an open part file, its moved arrays served from the store.

    Reads like the h5py.File it wraps (`part[name]`, `name in part`, `part.attrs`,
    `part.keys()`, `visititems`); use as a context manager.
    """

    def __init__(self, path: Path, store_path: Path):
        self.file = h5py.File(path, "r")
        self.attrs = {k: v for k, v in self.file.attrs.items() if k != MOVED}  # what the unit was written with
        self.filename = self.file.filename
        self.moved: dict[str, list] = json.loads(self.file.attrs.get(MOVED, "{}"))
        self._store_path = store_path
        self._store: h5py.File | None = None

    def __enter__(self) -> Part:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        self.file.close()

    def __contains__(self, name: str) -> bool:
        return name in self.moved or name in self.file

    def keys(self) -> list[str]:
        return [*self.file.keys(), *self.moved]

    def visititems(self, fn) -> None:
        self.file.visititems(fn)

    def __getitem__(self, name: str):
        if name not in self.moved:
            return self.file[name]
        path, first, rows = self.moved[name]
        if self._store is None:
            if not self._store_path.is_file():
                raise AtlasError(f"{self.filename} was compacted into {self._store_path}, which is missing; "
                                 f"re-run the stage to compute it again")
            self._store = h5py.File(self._store_path, "r")
        return MovedArray(self._store[path], int(first), int(rows))


def compact(path: Path, moved: dict[str, tuple[str, int, int]], write) -> bool:
    """Rewrites one part without the arrays in `moved`, recording where each went.

    Args:
        path: the part file.
        moved: array name -> (dataset path in the consolidated store, first row, rows).
        write: `atomic_write(path, fn)`, so the rewrite is all or nothing.

    Returns:
        True if the part was rewritten (False: nothing left to move).
    """
    with h5py.File(path, "r") as f:
        todo = {k: list(v) for k, v in moved.items() if k in f}
        if not todo:
            return False
        already = json.loads(f.attrs.get(MOVED, "{}"))

    def rewrite(tmp: Path) -> None:
        with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
            for k, v in src.attrs.items():
                dst.attrs[k] = v
            dst.attrs[MOVED] = json.dumps({**already, **todo})
            for name in src:
                if name not in todo:
                    src.copy(src[name], dst, name)
    write(path, rewrite)
    return True


def is_compacted(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        return MOVED in f.attrs
