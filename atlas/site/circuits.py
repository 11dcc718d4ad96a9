"""The circuits section of a unit page: its strongest inputs and outputs among the neighbouring layers.

A layer's `circuits/inputs` [C, C_from] holds each unit's inputs from the
previous selected layer (activation x gradient of its spatial maximum); a
unit's outputs are its column in the next layer's inputs, read from there,
not computed again. Where one convolution connects the two layers, the kernel
slice between the pair (`circuits/kernel` [C, C_from, kh, kw]) is drawn as a
small signed heatmap beside each link.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from atlas.site import pictures as img
from atlas.site.data import Layer, Model
from atlas.store.schema import CIRCUITS, FEATUREVIS

TOP = 5  # strongest excitatory and inhibitory links shown each way


@dataclass
class LayerCircuits:
    """One layer's circuit inputs (and kernel slices) from the layer before it."""

    source: str
    inputs: np.ndarray  # float32 [C, C_from]
    kernel: np.ndarray | None  # float32 [C, C_from, kh, kw]
    k: int  # top images each unit's inputs were averaged over


def read_circuits(g: h5py.Group) -> LayerCircuits | None:
    """A layer's circuits, or None where the store has none (the first layer, unit attributions off)."""
    if CIRCUITS not in g or "inputs" not in g[CIRCUITS]:
        return None
    c = g[CIRCUITS]
    kernel = c["kernel"][...].astype(np.float32) if "kernel" in c else None
    return LayerCircuits(str(c["inputs"].attrs["from"]), c["inputs"][...], kernel, int(c["inputs"].attrs.get("k", 0)))


def rendered(g: h5py.Group) -> np.ndarray:
    """Which channels of a layer have a feature-visualization picture in the site."""
    channels = int(g.attrs["channels"])
    fv = g.get(FEATUREVIS)
    if fv is None or "channel" not in fv:
        return np.zeros(channels, bool)
    done = fv.get("channel_done")
    return done[...].astype(bool) if isinstance(done, h5py.Dataset) else np.ones(channels, bool)


def unit_circuits(model: Model, i: int, c: int, here: LayerCircuits | None, after: LayerCircuits | None,
                  drawn: dict[str, np.ndarray]) -> dict | None:
    """The circuits of unit c of layer i: inputs (from layer i-1) and outputs (into layer i+1), each split
    into excitatory and inhibitory links; None where the store has neither.

    Args:
        here: layer i's circuits; after: layer i+1's.
        drawn: per layer name, which channels have a feature-visualization picture.
    """
    by_name = {l.name: l for l in model.layers}
    out = {}
    if here is not None and here.source in by_name:
        kernel = here.kernel[c] if here.kernel is not None else None
        out["inputs"] = _links(by_name[here.source], here.inputs[c], kernel, drawn)
        out["inputs_from"], out["k"] = here.source, here.k
    if after is not None and i + 1 < len(model.layers):
        nxt = model.layers[i + 1]
        kernel = after.kernel[:, c] if after.kernel is not None else None
        out["outputs"] = _links(nxt, after.inputs[:, c], kernel, drawn)
        out["outputs_to"], out["k"] = nxt.name, out.get("k", after.k)
    return out or None


def _links(layer: Layer, values: np.ndarray, kernels: np.ndarray | None, drawn: dict[str, np.ndarray]) -> dict:
    """The TOP strongest positive and negative entries of `values` as links to `layer`'s units."""
    finite = np.where(np.isfinite(values), values, 0.0)
    total = float(np.abs(finite).sum()) or 1.0
    largest = float(np.abs(finite).max(initial=0)) or 1.0
    order = np.argsort(-finite, kind="stable")
    picked = {"excite": [j for j in order[:TOP] if finite[j] > 0],
              "inhibit": [j for j in order[::-1][:TOP] if finite[j] < 0]}
    scale = max((float(np.abs(kernels[j]).max()) for js in picked.values() for j in js), default=0.0) \
        if kernels is not None else 0.0
    has = drawn.get(layer.name)
    return {kind: [{"label": f"{layer.name}:{j}", "href": f"../{layer.slug}/{j}.html",
                    "fv": f"../{layer.slug}/{j}.{img.PICTURE_EXT}" if has is not None and has[j] else None,
                    "value": float(finite[j]), "share": abs(float(finite[j])) / total,
                    "bar": abs(float(finite[j])) / largest,
                    "kernel": _cells(kernels[j], scale) if kernels is not None else None}
                   for j in js] for kind, js in picked.items()} | {"units": int(np.isfinite(values).sum())}


def _cells(kernel: np.ndarray, scale: float) -> dict:
    """A kernel slice as rows of CSS colours (red positive, blue negative, white 0) on a shared scale."""
    rows = [[_colour(v / scale if scale > 0 else 0.0) for v in row] for row in kernel]
    return {"rows": rows, "size": kernel.shape, "max": float(np.abs(kernel).max())}


def _colour(t: float) -> str:
    t = float(np.clip(t, -1, 1))
    fade = round(255 * (1 - abs(t)))
    return f"rgb(255,{fade},{fade})" if t >= 0 else f"rgb({fade},{fade},255)"
