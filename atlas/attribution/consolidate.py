"""Writes the attribution stage's sections of the consolidated store from its parts.

/attribution/<method>/ (rows aligned with /dataset/explained), /layers/<layer>/unit_attribution/
and /checks/ (images as /dataset rows) — the layout docs/store.md documents.
"""

from __future__ import annotations

import json

import h5py
import numpy as np

from atlas.attribution.maps import DIAGNOSTICS
from atlas.store import Store, read_attrs
from atlas.store.schema import ATTRIBUTION, BLOCKS, CHECKS, CIRCUITS, DATASET, LAYERS, UNIT_ATTRIBUTION

STAGE = ATTRIBUTION
_PER_IMAGE = {"target": (np.int64, -1), "score": (np.float32, np.nan), "label_target": (np.int64, -1),
              **DIAGNOSTICS, "scale": (np.float32, np.nan), "label_scale": (np.float32, np.nan),
              "finite": (np.bool_, True)}


def consolidate(store: Store, f: h5py.File) -> dict:
    """Writes every attribution section the parts have.

    Returns:
        Where the map parts' maps went (`Moves`): those parts hand them over to the store.
    """
    if DATASET not in f or "explained" not in f[DATASET]:
        return {}
    search = f[DATASET]["source_index"][...]
    source = search[f[DATASET]["explained"][...]]  # of each explained row
    groups: dict[str, h5py.Group] = {}
    moves = {}
    for key, part in store.units(STAGE):
        kind, _, rest = key.partition("/")
        if kind == "skipped":
            skipped = json.loads(f.require_group(ATTRIBUTION).attrs.get("skipped", "{}"))
            skipped[rest] = str(part.attrs["reason"])
            f[ATTRIBUTION].attrs["skipped"] = json.dumps(skipped)
        elif kind == "checks":
            _write_check(f, rest, part, search)
        elif kind == "unit":
            moves[key] = _write_unit_part(f, part)
            _write_inputs(f, part)
        elif kind == "kernel":
            _write_kernel(f, part)
        elif kind == BLOCKS:
            _write_blocks(f, part, source)
        else:
            if kind not in groups:
                groups[kind] = _create(f, kind, source.size, part)
            moves[key] = _write_maps(groups[kind], part, source)
    for name, g in groups.items():
        done = g["target"][...] >= 0
        g.attrs["completeness_failures"] = int(np.sum(g["completeness"][...][done] > g.attrs["tolerance"]))
        g.attrs["non_finite"] = int(np.sum(~g["finite"][...][done]))
    return {key: m for key, m in moves.items() if m}


def _create(f: h5py.File, name: str, n: int, part: h5py.File) -> h5py.Group:
    g = f.require_group(ATTRIBUTION).create_group(name)
    size = part["maps"].shape[1]
    attrs = {k: v for k, v in part.attrs.items() if k != "tolerance"}
    g.attrs["tolerance"] = float(part.attrs.get("tolerance", np.nan))
    for k in ("maps", "label_maps"):
        d = g.create_dataset(k, (n, size, size), np.float16, chunks=(1, size, size), fillvalue=np.nan)
        d.attrs.update(attrs)
    g["maps"].attrs["stored_as"] = "map / scale: multiply each image's map by `scale` for the attribution"
    for k, (dtype, fill) in _PER_IMAGE.items():
        g.create_dataset(k, (n,), dtype, fillvalue=fill)
    return g


def _write_maps(g: h5py.Group, part, source: np.ndarray) -> dict:
    """Copies one part's rows; returns where its maps went when they are one run of rows."""
    rows = np.searchsorted(source, part["index"][...])
    block = bool(rows.size) and rows[-1] - rows[0] + 1 == rows.size  # a chunk's images are one run of rows
    for k in ("maps", "label_maps", *_PER_IMAGE):
        if k not in part:
            continue
        if block:
            g[k][rows[0]:rows[-1] + 1] = part[k][...]
        else:
            for j, row in enumerate(rows):
                g[k][row] = part[k][j]
    if not block:
        return {}
    return {k: (g[k].name, int(rows[0]), int(rows.size)) for k in ("maps", "label_maps") if k in part}


def _write_unit_part(f: h5py.File, part) -> dict:
    a = read_attrs(part)
    layer = f[LAYERS].get(a["layer"])
    if layer is None:
        return {}
    maps = part["maps"]
    if UNIT_ATTRIBUTION not in layer:
        g = layer.create_group(UNIT_ATTRIBUTION)
        shape = (int(layer.attrs["channels"]), *maps.shape[1:])
        g.create_dataset("maps", shape, np.float16, chunks=(1, *maps.shape[1:]), fillvalue=np.nan)
        g.create_dataset("scale", shape[:2], np.float32, fillvalue=np.nan)
        g.attrs.update({"method": a["method"], "target": a["target"], "k": a["k"], "size": a["size"]})
    layer[UNIT_ATTRIBUTION]["maps"][a["first"]:a["end"]] = maps[...]
    if "scale" in part:
        layer[UNIT_ATTRIBUTION]["scale"][a["first"]:a["end"]] = part["scale"][...]
    return {"maps": (layer[UNIT_ATTRIBUTION]["maps"].name, int(a["first"]), int(a["end"]) - int(a["first"]))}


def _write_inputs(f: h5py.File, part) -> None:
    """A range of units' circuit inputs into /layers/<layer>/circuits/inputs [C, C_from]."""
    g, a = _circuits(f, part, "inputs")
    if g is None:
        return
    if "inputs" not in g:
        shape = (int(f[LAYERS][a["layer"]].attrs["channels"]), part["inputs"].shape[1])
        g.create_dataset("inputs", shape, np.float32, fillvalue=np.nan)
        g["inputs"].attrs.update({"from": a["inputs_from"], "method": a["inputs_method"], "k": a["k"]})
    g["inputs"][a["first"]:a["end"]] = part["inputs"][...]


def _write_kernel(f: h5py.File, part) -> None:
    """A layer's kernel slices from the previous selected layer (where one convolution connects them)."""
    g, a = _circuits(f, part, "kernel")
    if g is None:
        return
    if "kernel" in g:
        del g["kernel"]
    g.create_dataset("kernel", data=part["kernel"][...])
    g["kernel"].attrs.update({k: a[k] for k in ("conv", "norm", "from")})


def _circuits(f: h5py.File, part, array: str) -> tuple[h5py.Group | None, dict]:
    """The circuits group of the part's layer, where the store has the layer and the part `array`."""
    a = read_attrs(part)
    layer = f[LAYERS].get(a["layer"])
    if layer is None or array not in part:
        return None, a
    return layer.require_group(CIRCUITS), a


_BLOCK_FILL = {"target": -1, "logit": np.nan, "units": -1, "contribution": np.nan, "total": np.nan}
_GROUP_FILL = {"maps": np.nan, "units": -1, "weights": np.nan, "directions": np.nan}


def _write_blocks(f: h5py.File, part, source: np.ndarray) -> None:
    """One chunk's building blocks into /blocks/ at its rows of the explained set; a part computed for
    another choice of layers than the first is left out (the next run computes it again)."""
    a = read_attrs(part)
    if BLOCKS not in f:
        g = f.create_group(BLOCKS)
        g.attrs.update({k: json.dumps(v) if isinstance(v, list) else v for k, v in a.items() if k != "written"})
        for k, fill in _BLOCK_FILL.items():
            g.create_dataset(k, (source.size, *part[k].shape[1:]), part[k].dtype, fillvalue=fill)
        for j, layer in enumerate(a["nmf_layers"]):
            nmf = g.create_group(f"nmf/{layer}")
            nmf.attrs["layer"] = layer
            for k, fill in _GROUP_FILL.items():
                d = part[f"nmf/{j}/{k}"]
                nmf.create_dataset(k, (source.size, *d.shape[1:]), d.dtype, fillvalue=fill)
    g = f[BLOCKS]
    if json.loads(g.attrs["layers"]) != a["layers"] or g.attrs["k"] != a["k"]:
        return
    rows = np.searchsorted(source, part["index"][...])
    for k in _BLOCK_FILL:
        g[k][np.sort(rows)] = part[k][...][np.argsort(rows)]
    for j, layer in enumerate(a["nmf_layers"]):
        for k in _GROUP_FILL:
            g[f"nmf/{layer}/{k}"][np.sort(rows)] = part[f"nmf/{j}/{k}"][...][np.argsort(rows)]


def _write_check(f: h5py.File, name: str, part, source: np.ndarray) -> None:
    checks = f.require_group(CHECKS)
    if "images" not in checks:
        checks["images"] = np.searchsorted(source, part["images"][...])
        from atlas.attribution.checks import ablation, sanity
        checks.attrs.update({
            "caveats": json.dumps(sanity.CAVEATS), "threshold": sanity.THRESHOLD,
            "verdict_step": f"cascading, once the top {sanity.TOP_FRACTION:.2f} of the parameter groups are re-initialized",
            "target": "top-1 prediction", "order": "signed map, descending; all colour channels of a pixel together",
            "mean_replacement": "0 in the model's input space (the normalization mean)",
            "blur_sigma_fraction_of_side": ablation.BLUR_SIGMA, "mass_centre_box_fraction_of_side": ablation.BOX_FRACTION,
            "seed": int(part.attrs.get("seed", 0))})
    g = checks.create_group(name)
    nested = json.loads(part.attrs.get("nested_attrs", "{}"))

    def copy(path: str, obj) -> None:
        if isinstance(obj, h5py.Dataset) and path != "images":
            if path == "fractions":
                if "fractions" not in checks:
                    checks["fractions"] = obj[...]
            else:
                g[path] = obj[...]
    part.visititems(copy)
    for path, attrs in nested.items():
        target = g if path in ("", ".") else g.require_group(path) if path not in g else g[path]
        for k, v in attrs.items():
            target.attrs[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
