"""Reading a consolidated store, and the root section every store starts with."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

import atlas
from atlas.errors import AtlasError
from atlas.store.schema import CLASSES, LAYER_ATTRS, LAYERS, ROOT_JSON, ROOT_SCALARS, STORE_FORMAT


def write_root(f: h5py.File, meta: dict) -> None:
    """Writes the root attributes, the class names and one empty group per layer.

    The JSON attributes (config, versions, preprocess) are encoded once: a reader
    decodes them with one `json.loads`, or with `read_attrs`.
    """
    for key in ROOT_SCALARS:
        if key in meta:
            f.attrs[key] = meta[key]
    for key in ROOT_JSON:
        f.attrs[key] = json.dumps(meta.get(key, {}))
    f.create_dataset(CLASSES, data=np.array(meta.get("classes", []), dtype=object), dtype=h5py.string_dtype())
    layers = f.create_group(LAYERS)
    for i, l in enumerate(meta.get("layers", [])):
        g = layers.create_group(l["name"])
        for k in LAYER_ATTRS:
            g.attrs[k] = "" if l.get(k) is None else l[k]
        g.attrs["order"] = i


def read_attrs(obj: h5py.HLObject) -> dict:
    """HDF5 attributes as plain Python values (JSON strings decoded)."""
    out = {}
    for k, v in obj.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, str) and (v[:1] in "[{" or v == "null"):
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
    if fmt != STORE_FORMAT:
        f.close()
        raise AtlasError(f"{path} was written by Atlas {version} (store format {fmt}); "
                         f"this Atlas {atlas.__version__} reads format {STORE_FORMAT}")
    return f
