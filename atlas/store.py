"""The store: one HDF5 file per model, built from crash-safe work-unit parts.

Layout on disk (see docs/store.md for the layout inside the .h5):

    <store_dir>/<model>.h5            consolidated store, what the site reads
    <store_dir>/<model>.parts/
        meta.json                     model spec, weights, layers, versions
        <stage>/params.json           the parameters the stage's parts were made with
        <stage>/<unit key>.h5         one finished work unit

Each unit is written to a temporary name, flushed to disk and renamed into
place, so a part either exists whole or not at all: killing the process at any
instant loses at most the unit in flight. Resume lists the parts. The .h5 is
rebuilt from the parts the same way (temporary file, fsync, atomic rename), so
it always opens, and readers never see a half-written file.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

import atlas
from atlas.errors import AtlasError

STAGES = ("featurevis", "dataset", "attribution")


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
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def _write_h5(tmp: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    with h5py.File(tmp, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) or v is None else v
        for k, v in arrays.items():
            v = np.asarray(v)
            if v.dtype.kind == "U":
                f.create_dataset(k, data=v.astype(object), dtype=h5py.string_dtype())
            else:
                f.create_dataset(k, data=v)


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
        meta = {**meta, "atlas_version": atlas.__version__, "store_format": atlas.STORE_FORMAT}
        old = self.meta() if (self.parts / "meta.json").exists() else None
        if old is not None:
            self._check_compatible(old, meta)
            meta["layers"] = _merge_layers(old.get("layers", []), meta.get("layers", []))
        write_json(self.parts / "meta.json", meta)

    def _check_compatible(self, old: dict, new: dict) -> None:
        if old.get("store_format") != atlas.STORE_FORMAT:
            raise AtlasError(f"{self.parts} was written by Atlas {old.get('atlas_version')} (store format "
                             f"{old.get('store_format')}); this is Atlas {atlas.__version__} (format "
                             f"{atlas.STORE_FORMAT}): use another --store-dir or delete it")
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
        """Writes one finished work unit atomically."""
        atomic_write(self._unit_path(stage, key), lambda tmp: _write_h5(tmp, arrays, attrs or {}))

    def read_unit(self, stage: str, key: str) -> h5py.File:
        """Opens one finished unit for reading (use as a context manager)."""
        return h5py.File(self._unit_path(stage, key), "r")

    def units(self, stage: str) -> Iterator[tuple[str, h5py.File]]:
        """Yields (key, open part file) for every finished unit, in key order."""
        for key in sorted(self.done(stage)):
            with h5py.File(self._unit_path(stage, key), "r") as f:
                yield key, f

    # --- consolidation ---
    def consolidate(self, writers: dict[str, Callable[[Store, h5py.File], None]],
                    finalize: Callable[[h5py.File], None] | None = None) -> Path:
        """Rebuilds the .h5 from the parts.

        Args:
            writers: `writers[stage]` writes each stage's section, in order.
            finalize: derives what needs several stages, after all sections are written.
        """
        meta = self.meta()

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                _write_root(f, meta)
                for stage, writer in writers.items():
                    if self.done(stage):
                        writer(self, f)
                if finalize is not None:
                    finalize(f)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f".{self.path.name}.tmp*"):  # left by a consolidation that was killed
            stale.unlink(missing_ok=True)
        atomic_write(self.path, write)
        return self.path


def _merge_layers(old: list[dict], new: list[dict]) -> list[dict]:
    names = {l["name"] for l in old}
    return old + [l for l in new if l["name"] not in names]


def _write_root(f: h5py.File, meta: dict) -> None:
    for key in ("spec", "name", "weights_id", "input_size", "atlas_version", "store_format", "created"):
        if key in meta:
            f.attrs[key] = meta[key]
    f.attrs["config"] = json.dumps(meta.get("config", {}))
    f.attrs["versions"] = json.dumps(meta.get("versions", {}))
    f.attrs["preprocess"] = json.dumps(meta.get("preprocess", {}))
    f.create_dataset("classes", data=np.array(meta.get("classes", []), dtype=object),
                     dtype=h5py.string_dtype())
    layers = f.create_group("layers")
    for i, l in enumerate(meta.get("layers", [])):
        g = layers.create_group(l["name"])
        for k in ("kind", "module", "call", "channels", "height", "width"):
            g.attrs[k] = l[k]
        g.attrs["order"] = i


def read_attrs(obj: h5py.HLObject) -> dict:
    """HDF5 attributes as plain Python values (JSON strings decoded)."""
    out = {}
    for k, v in obj.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, str) and v[:1] in "[{" or v == "null":
            try:
                v = json.loads(v)
            except ValueError:
                pass
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def open_store(path: str | os.PathLike) -> h5py.File:
    """Opens a consolidated store for reading, with a clear error for a bad path or version."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"no store file at {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise AtlasError(f"{path} is not a readable HDF5 store ({exc})") from None
    fmt, version = f.attrs.get("store_format"), f.attrs.get("atlas_version")
    if fmt != atlas.STORE_FORMAT:
        f.close()
        raise AtlasError(f"{path} was written by Atlas {version} (store format {fmt}); "
                         f"this Atlas {atlas.__version__} reads format {atlas.STORE_FORMAT}")
    return f
