"""How long a full atlas's feature visualization takes: measured per layer, projected to every channel.

For each selected layer, a batch is optimized for a few steps with the preset's
settings (the forward pass stops at that layer, so shallow layers cost less);
the time per image-step times the layer's images (channels x images per
channel over the preset's views) times the preset's steps gives its share.
"""

from __future__ import annotations

import time

from atlas import models
from atlas.bench.common import sync
from atlas.config import preset
from atlas.devices import resolve_device
from atlas.featurevis.objectives import channel
from atlas.featurevis.render import RenderSettings, render
from atlas.featurevis.stage import images_per_channel, settings_of
from atlas.layers import discover, select


def run(model: str = "resnet50", weights: str = models.RANDOM, preset_name: str = "full", batch: int = 8,
        steps: int = 3, device: str = "cpu") -> dict:
    """Returns seconds per channel (all views) and the projected total, printing a line per layer."""
    cfg = preset(preset_name)
    dev = resolve_device(device)
    loaded = models.load(model, weights).to(dev)
    layers = select(loaded.model, discover(loaded.model, loaded.input_size, dev))
    full = settings_of(cfg)
    probe = RenderSettings(size=full.size, steps=steps, lr=full.lr, redirect_steps=full.redirect_steps,
                           param=full.param)
    per_channel_images = sum(images_per_channel(v, cfg) for v in cfg.fv_views)
    total = 0.0
    for layer in layers:
        chans = [c % layer.channels for c in range(batch)]
        render(loaded.model, loaded.preprocess, channel(layer.name, chans), list(range(batch)),
               RenderSettings(size=full.size, steps=1), dev)  # warm-up
        sync()
        start = time.perf_counter()
        render(loaded.model, loaded.preprocess, channel(layer.name, chans), list(range(batch)), probe, dev)
        sync()
        image_step = (time.perf_counter() - start) / (steps * batch)
        seconds = image_step * full.steps * per_channel_images * layer.channels
        total += seconds
        print(f"{layer.name:24} {layer.channels:5d} ch  {image_step * 1e3:7.1f} ms/image-step  "
              f"{seconds / 3600:8.2f} h", flush=True)
    units = sum(l.channels for l in layers)
    print(f"{model}, preset {preset_name} ({full.size} px, {full.steps} steps, views {', '.join(cfg.fv_views)}: "
          f"{per_channel_images} images per channel), {dev}: {units} channels", flush=True)
    return {"seconds_per_channel": total / units, "total_hours": total / 3600, "channels": units}
