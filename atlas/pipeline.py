"""The pipeline: prepare a model and its store, run stages, consolidate, render.

Stages talk only through the store. Each stage package (featurevis, dataset,
attribution) offers `run(ctx)`, which computes the work units the store does
not have yet, and `consolidate(store, h5)`, which writes the stage's section
of the consolidated .h5 from its parts. The site reads only that .h5.
"""

from __future__ import annotations

import datetime
import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

import atlas
from atlas import attribution, dataset, distributed, featurevis, models, preflight
from atlas.config import Config
from atlas.devices import keep_host_memory, resolve_device
from atlas.errors import AtlasError
from atlas.layers import LayerInfo, discover, select
from atlas.models.fold import fold_batchnorm
from atlas.store import Store
from atlas.store.schema import STAGES

STAGE_PACKAGES = {"featurevis": featurevis, "dataset": dataset, "attribution": attribution}


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

    @functools.cached_property
    def gradient_model(self) -> nn.Module:
        """The model for feature visualization and gradient attributions: each BatchNorm folded into the
        convolution before it where the selected layers' outputs stay the same (`models.fold`); the
        loaded model itself where none folds. Weight-level work (checks, kernels, LRP) uses the loaded one."""
        keep = frozenset(layer.module for layer in self.layers)
        return fold_batchnorm(self.loaded.model, keep)[0]

    def bar(self, total: int, desc: str, unit: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, dynamic_ncols=True,
                    smoothing=0.05)

    def begin(self, stage: str, params: dict) -> set[str]:
        """Starts or resumes a stage; returns the units already done, the same set on every rank.

        Rank 0 checks the settings and lists the parts; the others wait for its answer,
        so every rank plans from the same finished units.
        """
        return distributed.on_main(lambda: self.store.begin(stage, params))


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
    preflight.check(config)  # bad input fails here, before the model loads or any stage runs
    ranks = distributed.from_env()
    device = resolve_device(config.device, ranks.local)
    distributed.start(ranks, device)
    if device.type == "cpu":  # the feature maps live in host memory: reuse it batch to batch
        keep_host_memory()
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
        "layers": [l.__dict__ for l in layers], "config": config.to_dict(public=True),
        "versions": versions(device), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    distributed.on_main(lambda: store.open(meta))
    return Context(config, loaded, device, layers, store, progress and ranks.main, ranks)


def run_stages(ctx: Context, stages: Iterable[str]) -> Path:
    """Runs the stages in pipeline order, then rebuilds the consolidated store (rank 0).

    Under torchrun every rank runs its share of each stage, and all wait for the
    slowest before the next stage, which reads the earlier stage's parts.
    """
    wanted = [s for s in STAGES if s in set(stages)]
    for stage in wanted:
        STAGE_PACKAGES[stage].run(ctx)
        distributed.barrier()
    if featurevis.STAGE in wanted and wanted[-1] != featurevis.STAGE:
        # what needs a later stage's results: the neuron groups it has just found, the explained images
        featurevis.run_later(ctx)
        distributed.barrier()
    return distributed.on_main(lambda: consolidate(ctx.store))


def consolidate(store: Store) -> Path:
    """Rebuilds the consolidated .h5 from every stage's parts."""
    return store.consolidate({stage: STAGE_PACKAGES[stage].consolidate for stage in STAGES},
                             finalize=featurevis.derive_quality)


@dataclass(frozen=True)
class Built:
    """What a build made: the consolidated store, and the site's render report (see `site.render`)."""

    store: Path
    site: dict | None  # None when the site was not rendered (render=False, or a rank other than 0)


def build(config: Config, stages: Iterable[str] = STAGES, render: bool = True,
          progress: bool = True) -> Built:
    """Runs the whole pipeline for one model and renders its site.

    Returns:
        The store's path and the render's report.
    """
    ctx = prepare(config, progress)
    path = run_stages(ctx, stages)
    report = None
    if render and ctx.ranks.main:
        from atlas import site  # the site needs no model: imported only when rendering
        report = site.render(path, config.site_dir, progress=progress)
    return Built(path, report)
