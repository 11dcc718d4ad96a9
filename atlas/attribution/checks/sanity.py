"""Sanity checks that say whether an attribution method can be trusted.

Model-parameter randomization and the random-logit test (Adebayo et al. 2018)
ask whether a method's maps change when what they should explain changes;
deletion, insertion and mass-centre ablation (`atlas.attribution.checks.ablation`)
ask whether the pixels a map points at matter to the model. `run_checks`
returns everything for one method, nested as the store's `/checks/<method>/`
group (see docs/store.md); `run_controls` the random-order control
(`/checks/random/`). A dict's "attrs" entry holds the attributes of its group.
"""

from __future__ import annotations

import copy
import math
import zlib
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atlas.attribution.base import Attribution
from atlas.attribution.checks import ablation
from atlas.attribution.checks.similarity import compare

Group = tuple[str, list[str]]
MakeMethod = Callable[[nn.Module], Attribution]
Result = dict[str, "np.ndarray | Result | dict"]

THRESHOLD = 0.5  # mean Spearman (absolute values) above which maps are called insensitive
STRIP_SIZE = 56  # side of the stored maps of the first checked image after each randomization step
TOP_FRACTION = 1 / 3  # the randomization verdict looks at the top third of the parameter groups
SCORES = ("spearman_abs", "spearman", "ssim")

CAVEATS = {
    "randomization": (
        "The verdict depends on the threshold and on which layers are re-initialized: it reads the "
        "maps after the top third of the parameter groups are randomized. Spearman of absolute "
        "values ignores sign, so a map whose signs flip still scores as similar."),
    "random_logit": (
        "Assumes the random class is decided by different evidence than the predicted one; for "
        "similar classes (two dog breeds) alike maps can be right."),
    "deletion": (
        "Images with pixels replaced are off the data distribution, so the model may react to the "
        "replacement itself. Such scores favour blurry, low-frequency maps that remove whole regions."),
    "insertion": (
        "Partly restored images are off the data distribution. Such scores favour blurry, "
        "low-frequency maps, and the blurred start image already holds the object's coarse shape."),
    "mass_centre": (
        "One box says little about a map spread over several objects; compare with the random-box "
        "control, and mind that the mean-coloured box is itself unlike any training image."),
}


def parameter_groups(model: nn.Module, example: torch.Tensor, count: int) -> list[Group]:
    """The modules that own parameters, top (logits) first, cut into at most `count` groups.

    The order is the order of the modules' first calls in one forward pass of
    `example`; modules never called are left out (they do not affect the
    output). Split rule: the module called last (the classifier) is group 0
    alone, as Adebayo et al. start with the logits layer; the others, from the
    top down, are cut into `count - 1` consecutive groups of equal size (the
    upper groups one module larger when it does not divide).

    Args:
        model: the classifier.
        example: an input batch, e.g. one image [1, 3, H, W].
        count: the most groups.

    Returns:
        [(label, [module names])], top first; a label names the group's top
        and bottom module ("classifier" or "blocks.6.0.conv .. blocks.5.2.bn").
    """
    if count < 1:
        raise ValueError(f"count: expected at least one parameter group, got {count}")
    owners = _forward_order(model, example)[::-1]
    if not owners:
        raise ValueError("model: no module with parameters is called in the forward pass")
    parts = [owners] if count == 1 else [owners[:1], *_split(owners[1:], count - 1)]
    return [(_label(names), names) for names in parts]


def _split(names: list[str], parts: int) -> list[list[str]]:
    """`names` cut into `parts` consecutive runs of equal length, the first ones longer by one if needed."""
    size, extra = divmod(len(names), parts)
    bounds = np.cumsum([0] + [size + (i < extra) for i in range(parts)])
    return [names[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules owning parameters, in the order of their first call on `example`."""
    owners = {m: name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    order: dict[str, None] = {}  # insertion-ordered: first calls only
    handles = [m.register_forward_pre_hook(lambda m, args: order.setdefault(owners[m])) for m in owners]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return list(order)


def _label(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def randomized(model: nn.Module, groups: Iterable[Group], seed: int = 0) -> nn.Module:
    """A deep copy of `model` with the parameters of `groups` re-initialized.

    Each module is reset by its own `reset_parameters()` under a generator
    seeded from (`seed`, module name), so a module gets the same new weights
    whichever other groups are randomized with it. Parameters of a module
    without `reset_parameters` are re-drawn from a zero-mean normal with their
    own standard deviation (constant ones, e.g. a layer scale of ones, stay).
    A normalization layer with running statistics (BatchNorm) is reset whole,
    as a freshly built network has it and as Quantus's randomization does:
    scale 1, shift 0, running mean 0, running variance 1. Keeping the trained
    statistics around re-drawn weights would rescale activations by numbers
    that no longer belong to them, which can collapse them and make the check
    too easy to pass. Other buffers stay. The copy keeps the model's mode (eval).

    Args:
        model: the classifier; it is not modified.
        groups: groups from `parameter_groups`.
        seed: seed of the new weights.

    Returns:
        The randomized copy.
    """
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    for _, names in groups:
        for name in names:
            _reinit(modules[name], _seed(seed, name))
    return clone


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63


def _reinit(module: nn.Module, seed: int) -> None:
    devices = sorted({p.device.index or 0 for p in module.parameters(recurse=False) if p.is_cuda})
    # running statistics reset with their layer; every other buffer (fixed tables, masks) is kept
    keep = not isinstance(module, nn.modules.batchnorm._NormBase)
    buffers = {k: b.detach().clone() for k, b in module.named_buffers(recurse=False)} if keep else {}
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            for p in module.parameters(recurse=False):
                std = float(p.float().std()) if p.numel() > 1 else 0.0
                if std > 0:
                    p.normal_(0.0, std)
        for k, b in buffers.items():
            getattr(module, k).copy_(b)


def _maps(method: Attribution, inputs: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    return method.attribute(inputs, target).sum(1).float().cpu().numpy()


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]).astype(np.float32) for k in SCORES}


def randomization(make_method: MakeMethod, model: nn.Module, inputs: torch.Tensor,
                  target: torch.Tensor | int, groups: Sequence[Group], seed: int = 0,
                  original: np.ndarray | None = None) -> Result:
    """Model-parameter randomization test, cascading and independent.

    Args:
        make_method: builds the method on a given model (copy).
        model: the trained classifier; it is not modified.
        inputs: [n, 3, H, W] in the model's input space.
        target: the explained class of each image, [n] or one int.
        groups: parameter groups, top first (`parameter_groups`).
        seed: seed of the new weights.
        original: the method's maps on `model`, [n, H, W], if already computed.

    Returns:
        {"cascading": {score: float32 [G, n]}, "independent": {score: [G, n]}}
        for score in spearman_abs, spearman, ssim: row g compares the map
        after re-initializing groups 0..g (cascading) or group g alone
        (independent) with the original map. Each mode also holds `maps`,
        float16 [G + 1, R, R]: the first image's original map, then its map
        after each step (`thumbnail`), for the site's randomization strips.
    """
    target = torch.as_tensor(target, device=inputs.device).long().reshape(-1).expand(inputs.shape[0])
    if original is None:
        original = _maps(make_method(model), inputs, target)

    strips: dict[str, list[np.ndarray]] = {"cascading": [thumbnail(original[0])], "independent": []}

    def score(chosen: Sequence[Group], mode: str) -> dict[str, np.ndarray]:
        maps = _maps(make_method(randomized(model, chosen, seed)), inputs, target)
        strips[mode].append(thumbnail(maps[0]))
        return compare(original, maps)

    cascading = [score(groups[:g + 1], "cascading") for g in range(len(groups))]
    strips["independent"] = strips["cascading"][:2]
    independent = cascading[:1] + [score(groups[g:g + 1], "independent") for g in range(1, len(groups))]
    return {mode: {**_stack(rows), "maps": np.stack(strips[mode])}
            for mode, rows in (("cascading", cascading), ("independent", independent))}


def thumbnail(m: np.ndarray, size: int = STRIP_SIZE) -> np.ndarray:
    """A map [H, W] area-resized to at most size x size and scaled to a largest |value| of 1, float16.

    A map with values that are not finite is NaN where they are and scaled by its finite values.
    """
    t = torch.as_tensor(m, dtype=torch.float32)[None, None]
    if t.shape[-1] > size:
        t = F.adaptive_avg_pool2d(t, size)
    finite = torch.isfinite(t)
    peak = t.abs().where(finite, 0).max()
    t = (t / peak if peak > 0 else t).where(finite, float("nan"))
    return t[0, 0].numpy().astype(np.float16)


def top_step(groups: int) -> int:
    """The cascading step the randomization verdict reads: the top third of `groups` randomized."""
    return max(1, math.ceil(TOP_FRACTION * groups)) - 1


def verdict(result: Result, threshold: float = THRESHOLD) -> tuple[str, float]:
    """The randomization verdict.

    Score: the mean over images of `spearman_abs` at cascading step
    `top_step(G)`, i.e. once the top third of the G groups (at least the
    classifier) are re-initialized. A method that explains the model must
    give different maps by then (Adebayo et al.: the gradient does, Guided
    Backprop does not).

    Args:
        result: the output of `randomization`.
        threshold: scores below it pass.

    Returns:
        ("pass" if score < threshold else "fail", score).
    """
    cascading = result["cascading"]["spearman_abs"]
    score = float(np.mean(cascading[top_step(cascading.shape[0])]))
    return ("pass" if score < threshold else "fail"), score


def other_classes(target: torch.Tensor | np.ndarray, n_classes: int, seed: int = 0) -> np.ndarray:
    """A random class per image, uniform over every class but its target, int64 [n]."""
    if n_classes < 2:
        raise ValueError(f"n_classes: the random-logit test needs at least 2 classes, got {n_classes}")
    target = np.asarray(torch.as_tensor(target).cpu()).reshape(-1)
    draw = np.random.default_rng(seed).integers(0, n_classes - 1, size=target.size)
    return (draw + (draw >= target)).astype(np.int64)


def random_logit(method: Attribution, inputs: torch.Tensor, target: torch.Tensor | int, n_classes: int,
                 seed: int = 0, original: np.ndarray | None = None) -> Result:
    """Random-logit test: the map of a random other class against the map of `target`.

    Args:
        method: the attribution method, bound to the model.
        inputs: [n, 3, H, W].
        target: the explained class of each image, [n] or one int.
        n_classes: the number of classes.
        seed: seed of the random classes.
        original: the maps for `target`, [n, H, W], if already computed.

    Returns:
        {"spearman_abs", "spearman", "ssim": float32 [n], "target": int64 [n] (the random class)}.
    """
    target = torch.as_tensor(target, device=inputs.device).long().reshape(-1).expand(inputs.shape[0])
    if original is None:
        original = _maps(method, inputs, target)
    other = other_classes(target, n_classes, seed)
    scores = compare(original, _maps(method, inputs, torch.from_numpy(other).to(inputs.device)))
    return {**scores, "target": other}


def random_logit_verdict(result: Result, threshold: float = THRESHOLD) -> tuple[str, float]:
    """("pass" if the mean `spearman_abs` is below `threshold` else "fail", that mean)."""
    score = float(np.mean(result["spearman_abs"]))
    return ("pass" if score < threshold else "fail"), score


def ablations(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, maps: np.ndarray | None,
              points: int, seed: int, batch: int) -> Result:
    """Deletion, insertion and mass-centre drop for `maps` (None: the random control), store layout."""
    order = "random" if maps is None else "map"
    # a map that is not finite everywhere (a diverging rule) orders nothing: its image's results are NaN
    broken = np.zeros(inputs.shape[0], bool) if maps is None else \
        ~np.isfinite(np.asarray(maps, np.float64).reshape(inputs.shape[0], -1)).all(1)
    if broken.any():
        maps = np.where(np.isfinite(maps), maps, 0.0).astype(np.float32)
    fracs, out = ablation.fractions(points), {}
    for kind in ablation.KINDS:
        curves = {r: _blank(ablation.ablation_curves(model, inputs, target, maps, points, r, order, seed, batch,
                                                     kind), broken)
                  for r in ablation.REPLACEMENTS}
        out[kind] = {**curves, "attrs": {f"auc_{r}": _mean(ablation.auc(c, fracs)) for r, c in curves.items()}}
    centres = (ablation.random_centres(inputs.shape[0], *inputs.shape[-2:], seed=seed) if maps is None
               else ablation.mass_centres(maps))
    out["mass_centre"] = {"drop": _blank(ablation.box_drop(model, inputs, target, centres, batch=batch), broken)}
    return out


def _blank(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`values` with the given rows set to NaN."""
    values = np.array(values, np.float32)
    values[rows] = np.nan
    return values


def _mean(values: np.ndarray) -> float:
    """The mean over the finite values; NaN when there are none."""
    finite = np.asarray(values, np.float64)[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def run_checks(make_method: MakeMethod, model: nn.Module, inputs: torch.Tensor, target: torch.Tensor | int,
               n_classes: int, groups_count: int = 6, points: int = 21, seed: int = 0, batch: int = 64,
               threshold: float = THRESHOLD) -> Result:
    """Every check of one method, in the layout of the store's `/checks/<method>/`.

    Args:
        make_method: builds the method on a given model (copy).
        model: the classifier, in eval mode; it is not modified.
        inputs: [n, 3, H, W] in the model's input space.
        target: the explained class of each image (the top-1), [n] or one int.
        n_classes: the number of classes (for the random logit).
        groups_count: the most parameter groups randomized.
        points: deletion / insertion curve points.
        seed: seed of the random weights, class and orders.
        batch: images per forward pass of the ablations.
        threshold: the similarity above which maps are called insensitive.

    Returns:
        {"randomization": {"cascading": {score: [G, n]}, "independent": {...},
        "attrs": {groups, labels, verdict, score, threshold}},
        "random_logit": {score: [n], "target": [n], "attrs": {verdict, score}},
        "deletion" / "insertion": {"mean", "blur": [n, P], "attrs": {auc_mean, auc_blur}},
        "mass_centre": {"drop": [n]}}.
    """
    target = torch.as_tensor(target, device=inputs.device).long().reshape(-1).expand(inputs.shape[0])
    method = make_method(model)
    raw = method.attribute(inputs, target).float()
    original = raw.sum(1).cpu().numpy()
    ranking = raw.abs().sum(1).cpu().numpy() if method.magnitude else original  # the ablations' pixel order
    groups = parameter_groups(model, inputs[:1], groups_count)
    rand = randomization(make_method, model, inputs, target, groups, seed, original)
    passed, score = verdict(rand, threshold)
    rand["attrs"] = {"groups": [names for _, names in groups], "labels": [label for label, _ in groups],
                     "verdict": passed, "score": score, "threshold": threshold}
    logit = random_logit(method, inputs, target, n_classes, seed, original)
    passed, score = random_logit_verdict(logit, threshold)
    logit["attrs"] = {"verdict": passed, "score": score, "threshold": threshold}
    return {"randomization": rand, "random_logit": logit,
            **ablations(model, inputs, target, ranking, points, seed, batch)}


def run_controls(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor | int, points: int = 21,
                 seed: int = 0, batch: int = 64) -> Result:
    """The random-order control, in the layout of the store's `/checks/random/`.

    Returns:
        {"deletion" / "insertion": {"mean", "blur": float32 [n, P], "attrs": {auc_mean, auc_blur}},
        "mass_centre": {"drop": float32 [n]}} for a random pixel order and random box centres.
    """
    target = torch.as_tensor(target, device=inputs.device).long().reshape(-1).expand(inputs.shape[0])
    return ablations(model, inputs, target, None, points, seed, batch)


def flatten(result: Result, prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Store paths of a nested result: ({"a/b/c": array}, {"a/b": attrs}).

    Args:
        result: the output of `run_checks` or `run_controls`.
        prefix: the path of `result` itself, e.g. "checks/gradient".

    Returns:
        The arrays by path and the attributes by group path.
    """
    arrays, attrs = {}, {}
    for key, value in result.items():
        path = f"{prefix}/{key}" if prefix else key
        if key == "attrs":
            attrs[prefix] = value
        elif isinstance(value, dict):
            sub_arrays, sub_attrs = flatten(value, path)
            arrays.update(sub_arrays)
            attrs.update(sub_attrs)
        else:
            arrays[path] = np.asarray(value)
    return arrays, attrs
