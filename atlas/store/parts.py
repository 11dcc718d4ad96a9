"""The store: one HDF5 file per model, built from crash-safe work-unit parts.

Layout on disk (schema.py names the layout inside the .h5; docs/store.md describes it):

    <store_dir>/<model>.h5            consolidated store, what the site reads
    <store_dir>/<model>.parts/
        meta.json                     model spec, weights, layers, versions
        <stage>/params.json           the parameters the stage's parts were made with
        <stage>/<unit key>.h5         one finished work unit

Each unit is written to a temporary name, flushed to disk and renamed into
place, so a part either exists whole or not at all: killing the process at any
instant loses at most the unit in flight. Resume lists the parts. The .h5 is
rebuilt from the parts the same way (temporary file, fsync, atomic rename), so
it always opens, and readers never see a half-written file. Once it is in
place, the parts hand their bulk arrays over to it (moved.py), so the parts
folder does not hold a second copy of the store.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

import atlas
from atlas.errors import AtlasError
from atlas.store.files import atomic_write, write_h5, write_json
from atlas.store.moved import Part, compact, is_compacted
from atlas.store.read import write_root
from atlas.store.schema import STORE_FORMAT


# What consolidation did with each part's bulk arrays: unit key -> {array name: (dataset path
# in the consolidated store, first row, rows)}.
Moves = dict[str, dict[str, tuple[str, int, int]]]


class Store:
    """Work-unit parts of one model's store and their consolidation into one .h5."""

    def __init__(self, directory: str | os.PathLike, name: str):
        self.directory = Path(directory)
        self.name = name
        self.path = self.directory / f"{name}.h5"
        self.parts = self.directory / f"{name}.parts"

    # --- model-level metadata ---
    def open(self, meta: dict) -> None:
        """Creates the store, or checks that an existing one was made for the same model.

        Args:
            meta: JSON-able description: spec, weights_id, input_size, classes, layers, config.
        """
        self.parts.mkdir(parents=True, exist_ok=True)
        meta = {**meta, "atlas_version": atlas.__version__, "store_format": STORE_FORMAT}
        old = self.meta() if (self.parts / "meta.json").exists() else None
        if old is not None:
            self._check_compatible(old, meta)
            meta["layers"] = _merge_layers(old.get("layers", []), meta.get("layers", []))
        write_json(self.parts / "meta.json", meta)

    def _check_compatible(self, old: dict, new: dict) -> None:
        if old.get("store_format") != STORE_FORMAT:
            raise AtlasError(f"{self.parts} was written by Atlas {old.get('atlas_version')} (store format "
                             f"{old.get('store_format')}); this is Atlas {atlas.__version__} (format "
                             f"{STORE_FORMAT}): use another --store-dir or delete it")
        for key in ("spec", "weights_id"):
            if old.get(key) != new.get(key):
                raise AtlasError(f"{self.parts} holds {key} {old.get(key)!r}, not {new.get(key)!r}: "
                                 f"use another --store-dir or delete it")

    def meta(self) -> dict:
        path = self.parts / "meta.json"
        if not path.exists():
            raise AtlasError(f"no store at {self.parts}; run `atlas build` first")
        return json.loads(path.read_text())

    # --- stages and units ---
    def begin(self, stage: str, params: dict) -> set[str]:
        """Starts or resumes a stage; returns the keys of the units already done.

        Raises:
            AtlasError: the stage's parts were made with other parameters.
        """
        folder = self.parts / stage
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
        if not self.path.is_file():
            self._drop_compacted(stage)
        params = json.loads(json.dumps(params, default=str))
        path = folder / "params.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != params:
                diff = ", ".join(f"{k}: {old.get(k)!r} -> {params.get(k)!r}"
                                 for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k))
                raise AtlasError(f"the {stage} parts in {folder} were made with other settings ({diff}); "
                                 f"keep the settings, or delete {folder} to redo the stage")
        else:
            write_json(path, params)
        return self.done(stage)

    def _drop_compacted(self, stage: str) -> None:
        """Removes the parts whose bulk arrays went to a consolidated store that is gone: they are redone."""
        lost = [p for p in (self.parts / stage).glob("*.h5") if not p.name.startswith(".") and is_compacted(p)]
        for p in lost:
            p.unlink()
        if lost:
            print(f"atlas: {self.path} is missing; {len(lost)} {stage} unit(s) whose arrays it held "
                  f"are computed again")

    def done(self, stage: str) -> set[str]:
        folder = self.parts / stage
        if not folder.is_dir():
            return set()
        return {urllib.parse.unquote(p.stem) for p in folder.glob("*.h5") if not p.name.startswith(".")}

    def params(self, stage: str) -> dict | None:
        path = self.parts / stage / "params.json"
        return json.loads(path.read_text()) if path.exists() else None

    def _unit_path(self, stage: str, key: str) -> Path:
        return self.parts / stage / (urllib.parse.quote(key, safe="") + ".h5")

    def write_unit(self, stage: str, key: str, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> None:
        """Writes one finished work unit atomically, stamped with when it was computed (`written`)."""
        attrs = {**(attrs or {}), "written": time.time_ns()}
        atomic_write(self._unit_path(stage, key), lambda tmp: write_h5(tmp, arrays, attrs))

    def read_unit(self, stage: str, key: str) -> Part:
        """Opens one finished unit for reading (use as a context manager)."""
        return Part(self._unit_path(stage, key), self.path)

    def units(self, stage: str, prefix: str = "") -> Iterator[tuple[str, Part]]:
        """Yields (key, open part) for every finished unit whose key starts with `prefix`, in key order."""
        for key in sorted(k for k in self.done(stage) if k.startswith(prefix)):
            with self.read_unit(stage, key) as part:
                yield key, part

    # --- consolidation ---
    def consolidate(self, writers: dict[str, Callable[[Store, h5py.File], Moves | None]],
                    finalize: Callable[[h5py.File], None] | None = None) -> Path:
        """Rebuilds the .h5 from the parts, then lets the parts hand their bulk arrays over to it.

        Args:
            writers: `writers[stage]` writes each stage's section, in order, and returns
                where it put each part's bulk arrays (`Moves`), or None to keep the parts whole.
            finalize: derives what needs several stages, after all sections are written.
        """
        meta = self.meta()
        moves: dict[str, Moves] = {}

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                write_root(f, meta)
                for stage, writer in writers.items():
                    if self.done(stage):
                        moves[stage] = writer(self, f) or {}
                if finalize is not None:
                    finalize(f)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f".{self.path.name}.tmp*"):  # left by a consolidation that was killed
            stale.unlink(missing_ok=True)
        atomic_write(self.path, write)
        for stage, plan in moves.items():
            for key, arrays in plan.items():
                compact(self._unit_path(stage, key), arrays, atomic_write)
        return self.path


def _merge_layers(old: list[dict], new: list[dict]) -> list[dict]:
    names = {l["name"] for l in old}
    return old + [l for l in new if l["name"] not in names]
