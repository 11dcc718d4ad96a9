"""The pipeline: prepare a model and its store, run stages, consolidate, render.

Stages talk only through the store. Each stage module offers `run(ctx)`, which
computes the work units the store does not have yet, and `consolidate(store,
h5)`, which writes the stage's section of the consolidated .h5 from its parts.
"""

from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

import atlas
from atlas import distributed, models
from atlas.config import Config
from atlas.errors import AtlasError
from atlas.layers import LayerInfo, discover, select
from atlas.store import STAGES, Store


@dataclass
class Context:
    """What every stage needs: the config, the model on its device, the layers, the store."""

    config: Config
    loaded: models.LoadedModel
    device: torch.device
    layers: list[LayerInfo]  # the selected layers
    store: Store
    progress: bool = True
    ranks: distributed.Ranks = distributed.Ranks()  # this process among torchrun's, if several

    def bar(self, total: int, desc: str, unit: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, dynamic_ncols=True,
                    smoothing=0.05)

    def begin(self, stage: str, params: dict) -> set[str]:
        """Starts or resumes a stage; returns the units already done, the same set on every rank.

        Rank 0 checks the settings and lists the parts; the others wait for its answer,
        so every rank plans from the same finished units.
        """
        return distributed.on_main(lambda: self.store.begin(stage, params))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto picks CUDA, then MPS, then the CPU; an unavailable explicit choice is an error.

    Under torchrun, plain `cuda` (or auto) means this machine's GPU number `local_rank`.
    """
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "auto":
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AtlasError(f"--device {name}: no CUDA device is available; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AtlasError("--device mps: MPS is not available on this machine; use --device cpu or auto")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise AtlasError(f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def versions(device: torch.device) -> dict:
    import h5py
    import timm
    import torchvision
    info = {"atlas": atlas.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "h5py": h5py.__version__, "python": platform.python_version(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def prepare(config: Config, progress: bool = True) -> Context:
    """Loads the model, discovers and selects layers, opens the store (rank 0; the others wait)."""
    ranks = distributed.from_env()
    device = resolve_device(config.device, ranks.local)
    distributed.start(ranks, device)
    loaded = models.load(config.model, config.weights).to(device)
    all_layers = discover(loaded.model, loaded.input_size, device)
    layers = select(loaded.model, all_layers, config.layers)
    if not layers:
        raise AtlasError(f"no layer selected in {config.model}; pass --layers PATTERN "
                         f"(`atlas layers {config.model}` lists them)")
    store = Store(config.store_dir, loaded.name)
    p = loaded.preprocess
    meta = {
        "spec": loaded.spec, "name": loaded.name, "weights_id": loaded.weights_id,
        "input_size": loaded.input_size, "classes": loaded.class_names,
        "preprocess": {"size": p.size, "crop_pct": p.crop_pct, "mean": p.mean, "std": p.std},
        "layers": [l.__dict__ for l in layers], "config": config.to_json(),
        "versions": versions(device), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    distributed.on_main(lambda: store.open(meta))
    return Context(config, loaded, device, layers, store, progress and ranks.main, ranks)


def stage_modules() -> dict:
    from atlas import dataset
    from atlas.attribution import stage as attribution
    from atlas.featurevis import stage as featurevis
    return {"featurevis": featurevis, "dataset": dataset, "attribution": attribution}


def run_stages(ctx: Context, stages: Iterable[str]) -> Path:
    """Runs the stages in pipeline order, then rebuilds the consolidated store (rank 0).

    Under torchrun every rank runs its share of each stage, and all wait for the
    slowest before the next stage, which reads the earlier stage's parts.
    """
    modules = stage_modules()
    for stage in [s for s in STAGES if s in set(stages)]:
        modules[stage].run(ctx)
        distributed.barrier()
    return distributed.on_main(lambda: consolidate(ctx.store))


def consolidate(store: Store) -> Path:
    modules = stage_modules()
    return store.consolidate({stage: modules[stage].consolidate for stage in STAGES},
                             finalize=modules["featurevis"].derive_quality)


def build(config: Config, stages: Iterable[str] = STAGES, render: bool = True,
          progress: bool = True) -> Path:
    """Runs the whole pipeline for one model and renders its site.

    Returns:
        The path of the consolidated store.
    """
    ctx = prepare(config, progress)
    path = run_stages(ctx, stages)
    if render and ctx.ranks.main:
        from atlas import site
        site.render(path, config.site_dir, progress=progress)
    return path
