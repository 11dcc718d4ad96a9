"""The attribution and checks sections of synthetic stores (see synthetic.py).

Maps are smooth blobs with noise, path methods carry completeness errors, and
the checks' scores follow what the real ones show: insensitive methods keep
their similarity as layers are randomized, the others lose it.
"""

from __future__ import annotations

import json

import h5py
import numpy as np

from atlas.store.schema import METHODS, RANDOM_CONTROL, Method

_CHUNK = 256  # channels generated at a time, to bound memory for big layers


def _method(name: str) -> Method:
    """The schema's description of a method; a method it does not know is signed, of no family."""
    return METHODS.get(name) or Method(name, "Other")


CHECKS = ("randomization", "random_logit", "deletion", "insertion", "mass_centre")  # keys of `caveats`


_PARAMS = {  # the parameters each method's `maps` carries, as the attribution stage writes them
    "smoothgrad": {"samples": 50, "noise_fraction_of_range": 0.15, "seed": 0},
    "smoothgrad_sq": {"samples": 50, "noise_fraction_of_range": 0.15, "seed": 0},
    "vargrad": {"samples": 50, "noise_fraction_of_range": 0.15, "seed": 0},
    "grad_cam": {"layer": "layer4"}, "guided_grad_cam": {"layer": "layer4"},
    "integrated_gradients": {"steps": 50, "baseline": "black"},
    "ig_max_distance": {"steps": 50, "baseline": "max distance"},
    "ig_blurred": {"steps": 50, "baseline": "blurred, sigma 20 px"},
    "ig_uniform": {"steps": 50, "baseline": "uniform noise", "draws": 4},
    "ig_gaussian": {"steps": 50, "baseline": "gaussian noise, sigma 0.25", "draws": 4},
    "expected_gradients": {"samples": 50, "baseline": "dataset images"},
    "occlusion": {"window": 16, "stride": 8, "fill": "mean"},
    "extremal_perturbation": {"areas": "[0.05, 0.1, 0.2]", "steps": 800},
}


# Noise of the dataset images' maps: at 112 px their heatmaps then take 2.1 KB each as
# the site encodes them, as the real maps of EfficientNet-Lite0's eleven quick methods do.
MAP_NOISE = 0.22


def _blobs(m: int, size: int, rng: np.random.Generator, noise: float = 0.15) -> np.ndarray:
    """[m, size, size] float32: a Gaussian blob at a random place, a mean offset and noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    centre = rng.uniform(0.3, 0.7, (m, 2, 1, 1)).astype(np.float32)
    blob = np.exp(-((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2) * 20)
    return blob - 0.3 * blob.mean() + rng.normal(0, noise, (m, size, size)).astype(np.float32)


def write_attribution(f: h5py.File, method: str, n: int, size: int, incomplete: bool, tolerance: float,
                       rng: np.random.Generator) -> None:
    """Maps for the top-1 class and for the true label, and a path method's completeness and steps."""
    g = f.require_group("attribution").create_group(method)
    rows = f["dataset/explained"][()]  # the maps are rows of the explained set
    target = f["dataset/top5"][()][rows, 0]
    labels = f["dataset/labels"][()][rows]
    maps = g.create_dataset("maps", shape=(n, size, size), dtype=np.float16)
    g.create_dataset("label_maps", shape=(n, size, size), dtype=np.float16)
    scale, label_scale = np.empty(n, np.float32), np.empty(n, np.float32)
    for start in range(0, n, 64):
        m = min(64, n - start)
        factor = rng.lognormal(-6, 1, (m, 1, 1)).astype(np.float32)  # attributions are small numbers
        top, other = _blobs(m, size, rng, MAP_NOISE) * factor, _blobs(m, size, rng, MAP_NOISE) * factor
        if not _method(method).signed:
            top, other = np.abs(top), np.abs(other)
        label = labels[start:start + m]
        other[label == target[start:start + m]] = top[label == target[start:start + m]]
        other[label < 0] = np.nan
        # as the attribution stage stores them: each map divided by its largest |value|, so float16 keeps it
        for name, values, out in (("maps", top, scale), ("label_maps", other, label_scale)):
            peak = np.abs(values).max(axis=(1, 2))
            out[start:start + m] = peak
            g[name][start:start + m] = (values / peak[:, None, None]).astype(np.float16)
    maps.attrs.update({"method": method, "signed": _method(method).signed,
                       "target_rule": "top-1 prediction", "reduction": "sum over colour",
                       "stored_as": "map / scale: multiply each image's map by `scale` for the attribution",
                       **_PARAMS.get(method, {})})
    g.create_dataset("scale", data=scale)
    g.create_dataset("label_scale", data=label_scale)
    g.create_dataset("target", data=target.astype(np.int64))
    g.create_dataset("score", data=rng.gamma(3.0, 2.0, n).astype(np.float32))
    g.create_dataset("label_target", data=labels.astype(np.int64))
    path = _method(method).path
    error = rng.uniform(0.02, 0.8, n) * tolerance if path else np.full(n, np.nan)
    if path and incomplete:
        error[::2] = rng.uniform(1.5, 12, len(error[::2])) * tolerance
    g.create_dataset("completeness", data=error.astype(np.float32))
    steps = np.where(error > tolerance, 400, rng.choice([50, 100, 200], n)) if path else np.zeros(n)
    g.create_dataset("steps", data=steps.astype(np.int32))
    g.attrs.update({"tolerance": tolerance, "completeness_failures": int((error > tolerance).sum())})


def write_unit_attribution(g: h5py.Group, ku: int, size: int, rng: np.random.Generator) -> None:
    """What made each unit fire on its first `ku` top images; NaN where topk has no image."""
    if "topk/index" not in g or ku < 1:
        return
    index = g["topk/index"][:, :ku]
    channels = len(index)
    sub = g.create_group("unit_attribution")
    maps = sub.create_dataset("maps", shape=(channels, ku, size, size), dtype=np.float16)
    scale = sub.create_dataset("scale", shape=(channels, ku), dtype=np.float32)
    for start in range(0, channels, _CHUNK):
        n = min(_CHUNK, channels - start)
        factor = rng.lognormal(-4, 1, (n, ku, 1, 1)).astype(np.float32)  # attributions are small numbers
        chunk = _blobs(n * ku, size, rng, noise=0.1).reshape(n, ku, size, size) * factor
        chunk[index[start:start + n] < 0] = np.nan
        peak = np.abs(chunk).max(axis=(2, 3))  # NaN where there is no image
        scale[start:start + n] = peak
        # as the attribution stage stores them: each map divided by its largest |value|
        maps[start:start + n] = (chunk / np.where(peak > 0, peak, 1)[..., None, None]).astype(np.float16)
    sub.attrs.update({"method": "gradient_x_input", "target": "channel spatial max", "k": ku, "size": size})


CAVEATS = {
    "randomization": "Maps that stay alike after the weights are randomized do not explain what the model "
                     "learned (Adebayo et al. 2018). A pass is necessary, not sufficient: a map can change "
                     "with the weights and still be unfaithful. Rank correlation of absolute values ignores "
                     "sign flips.",
    "random_logit": "A map for a random other class that looks like the top-1 map does not explain the "
                    "class (Sixt et al. 2020). Classes that share evidence lower this score legitimately.",
    "deletion": "Replacing pixels makes images unlike any the model was trained on: a fast drop can come "
                "from the artefacts, not from the pixels' importance (Hooker et al. 2019). Compare against "
                "the random order, and the two fills against each other.",
    "insertion": "Restoring pixels into a mean or blurred image is just as out of distribution as deletion; "
                 "a blurred start already keeps the coarse shape.",
    "mass_centre": "A coarse test of localization: it rewards maps concentrated in one place, and says "
                   "nothing of maps that are spread out for good reason.",
}


def _groups(layers: list[str], g: int) -> list[list[str]]:
    """G parameter groups from the logits down: the store's layers, padded with made-up names."""
    names = layers[::-1]
    if len(names) >= g:
        return [list(chunk) for chunk in np.array_split(np.array(names, dtype=object), g)]
    return [[n] for n in names] + [[f"stem.{i}"] for i in range(g - len(names))]


def _similarity(level: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """spearman_abs, spearman and ssim scattered around `level` (any shape)."""
    noise = lambda s: rng.normal(0, s, level.shape)  # noqa: E731
    return {"spearman_abs": np.clip(level + noise(0.05), 0, 1).astype(np.float32),
            "spearman": np.clip(level * 0.8 + noise(0.08), -1, 1).astype(np.float32),
            "ssim": np.clip(level * 0.6 + noise(0.05), -1, 1).astype(np.float32)}


def _curves(g: h5py.Group, fractions: np.ndarray, n: int, speed: float, drop: float,
            rng: np.random.Generator) -> None:
    """Deletion and insertion curves (faster for a higher `speed`) and the mass-centre drop."""
    for kind in ("deletion", "insertion"):
        sub = g.create_group(kind)
        for fill, slow in (("mean", 1.0), ("blur", 1.6)):
            rate = speed / slow * rng.lognormal(0, 0.2, (n, 1))
            gone = 1 - np.exp(-rate * fractions)
            curve = 1 - gone if kind == "deletion" else gone / gone[:, -1:]
            curve = np.clip(curve + rng.normal(0, 0.02, curve.shape), 0, 1.2).astype(np.float32)
            sub.create_dataset(fill, data=curve)
            sub.attrs[f"auc_{fill}"] = float(_trapezoid(curve, fractions).mean())
    g.create_group("mass_centre").create_dataset(
        "drop", data=np.clip(drop + rng.normal(0, 0.1, n), 0, 1).astype(np.float32))


def _trapezoid(curves: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Area under each row of `curves` [n, P] sampled at `x` [P]."""
    return ((curves[:, 1:] + curves[:, :-1]) / 2 * np.diff(x)).sum(axis=1)


CHECK_SETTINGS = {  # the settings attributes of /checks, as the attribution stage writes them
    "verdict_step": "cascading, once the top 0.33 of the parameter groups are re-initialized",
    "target": "top-1 prediction", "order": "signed map, descending; all colour channels of a pixel together",
    "mean_replacement": "0 in the model's input space (the normalization mean)",
    "blur_sigma_fraction_of_side": 1 / 20, "mass_centre_box_fraction_of_side": 0.25, "seed": 0,
}


def _strips(groups: int, size: int, insensitive: bool, signed: bool,
            rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """Randomization strips, float16 [G + 1, R, R] per mode: the original map, then one per step.

    An insensitive method keeps its blob whatever is re-initialized; a sensitive
    one turns to noise, step by step when cascading, from the top groups most
    when independent. Each map is scaled to a largest |value| of 1; unsigned
    methods' maps are non-negative. None when `size` is 0 (no strips).
    """
    if size < 1:
        return None
    original = _blobs(1, size, rng, noise=0.05)[0]
    amount = np.linspace(0.1, 1, groups)
    out = {}
    for mode in ("cascading", "independent"):
        keep = 0.9 - 0.1 * amount if insensitive else (1 - amount if mode == "cascading" else amount * 0.8)
        noise = rng.normal(0, 0.5, (groups, size, size)).astype(np.float32)
        steps = keep[:, None, None] * original + (1 - keep[:, None, None]) * noise
        if mode == "independent":
            steps[0] = out["cascading"][1]  # group 0 alone is the first cascading step
        maps = np.concatenate([original[None], steps])
        if not signed:
            maps = np.abs(maps)
        maps /= np.maximum(np.abs(maps).max(axis=(1, 2), keepdims=True), 1e-12)
        out[mode] = maps.astype(np.float16)
    return out


def write_checks(f: h5py.File, methods: list[str], settings: dict[str, int], insensitive: set[str],
                  layers: list[str], rng: np.random.Generator) -> None:
    """/checks: randomization, random logit, deletion, insertion, mass centre, and the random control."""
    explained, n_classes = f["dataset/explained"][()], len(f["classes"])
    n = min(settings["images"], len(explained))
    rows = explained[np.unique(np.linspace(0, len(explained) - 1, n).round().astype(np.int64))]  # /dataset rows
    n = len(rows)
    fractions = np.linspace(0, 1, settings["points"]).astype(np.float32)
    threshold = 0.5
    c = f.create_group("checks")
    c.create_dataset("images", data=rows)
    c.create_dataset("fractions", data=fractions)
    c.attrs.update({"caveats": json.dumps(CAVEATS), "threshold": threshold, **CHECK_SETTINGS})
    groups = _groups(layers, settings["groups"])
    steps = np.linspace(0, 1, len(groups))[:, None]
    for method in methods:
        g = c.create_group(method)
        bad = method in insensitive
        r = g.create_group("randomization")
        cascading = 0.9 - 0.1 * steps if bad else 0.55 * np.exp(-4 * steps) + 0.05
        independent = 0.9 - 0.05 * steps if bad else 0.3 + 0.5 * steps
        strips = _strips(len(groups), settings["strip"], bad, _method(method).signed, rng)
        for name, level in (("cascading", cascading), ("independent", independent)):
            sub = r.create_group(name)
            for key, value in _similarity(np.broadcast_to(level, (len(groups), n)), rng).items():
                sub.create_dataset(key, data=value)
            if strips is not None:
                sub.create_dataset("maps", data=strips[name])
        score = float(r["cascading/spearman_abs"][:2].mean())
        labels = [names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}" for names in groups]
        r.attrs.update({"groups": json.dumps(groups), "labels": json.dumps(labels),
                        "verdict": "fail" if score > threshold else "pass", "score": score, "threshold": threshold})
        logit = g.create_group("random_logit")
        for key, value in _similarity(np.full(n, 0.85 if bad else 0.3), rng).items():
            logit.create_dataset(key, data=value)
        top1 = f["dataset/top5"][:, 0][rows]
        logit.create_dataset("target", data=((top1 + rng.integers(1, max(n_classes, 2), n)) % n_classes))
        score = float(logit["spearman_abs"][()].mean())
        logit.attrs.update({"verdict": "fail" if score > threshold else "pass", "score": score,
                            "threshold": threshold})
        _curves(g, fractions, n, 3.0 if bad else 8.0, 0.2 if bad else 0.45, rng)
    _curves(c.create_group(RANDOM_CONTROL), fractions, n, 1.2, 0.12, rng)
