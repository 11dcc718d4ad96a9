"""Feature visualization for less compute: per-image stopping and coarse-to-fine views."""

import numpy as np
import pytest
import torch
from torch import nn

from atlas.featurevis import objectives as O
from atlas.featurevis.render import Plateau, RenderSettings, render
from atlas.featurevis.transforms import Robustness
from atlas.models import Preprocess

PRE = Preprocess(size=32, crop_pct=1.0, mean=(0.0,) * 3, std=(1.0,) * 3)


def _colour_and_edges() -> nn.Module:
    """conv: channel 0 is red minus green (bounded: it rises for a hundred steps, then creeps); channel 1 is
    a vertical edge of red (it settles on its stripes within a few dozen steps); channel 2 is 0 on every
    image."""
    conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1], conv.weight[0, 1, 1, 1] = 1.0, -1.0
        conv.weight[1, 0, :, 0], conv.weight[1, 0, :, 2] = 1.0, -1.0
    model = nn.Sequential()
    model.add_module("conv", conv)
    return model.eval().requires_grad_(False)


# little jitter, so that the per-step objective is not much noisier than the trend it is judged by
SETTINGS = RenderSettings(size=24, steps=240, lr=0.2, loss_points=8, redirect_steps=0,
                          robustness=Robustness(pad=0, jitter=(1,), scales=(1.0,), angles=(0,)),
                          plateau=Plateau(window=16, tol=0.01))


def test_an_image_that_stops_early_ends_within_one_percent_of_the_full_run():
    model, seeds = _colour_and_edges(), [3, 4]
    stopped = render(model, PRE, O.channel("conv", [0, 1]), seeds, SETTINGS)
    full = render(model, PRE, O.channel("conv", [0, 1]), seeds, RenderSettings(**{**SETTINGS.__dict__,
                                                                                     "plateau": None}))
    assert full.steps.tolist() == [240, 240]
    assert stopped.steps[1] < 120  # the edge unit settles first
    assert stopped.steps[1] < stopped.steps[0] < 240  # the colour unit later, and still before the end
    assert (stopped.objective >= 0.99 * full.objective).all(), (stopped.objective, full.objective)
    # the loss curve of a stopped image stays at its last value
    assert stopped.loss[1, -1] == stopped.loss[1, -2]


def test_a_stopped_image_is_the_picture_it_had_when_it_stopped_and_leaves_the_others_alone():
    model, seeds = _colour_and_edges(), [3, 4]
    stopped = render(model, PRE, O.channel("conv", [0, 1]), seeds, SETTINGS)
    at_stop = render(model, PRE, O.channel("conv", [0]), seeds[:1],
                     RenderSettings(**{**SETTINGS.__dict__, "plateau": None, "steps": int(stopped.steps[0])}))
    assert np.abs(stopped.images[0].astype(int) - at_stop.images[0].astype(int)).max() <= 1
    # the other image's trajectory does not depend on its neighbour leaving the batch
    alone = render(model, PRE, O.channel("conv", [1]), seeds[1:],
                   RenderSettings(**{**SETTINGS.__dict__, "plateau": None, "steps": int(stopped.steps[1])}))
    assert np.abs(stopped.images[1].astype(int) - alone.images[0].astype(int)).max() <= 1


def test_a_dead_unit_stops_at_the_first_check_and_a_set_objective_never_stops():
    model = _colour_and_edges()
    dead = render(model, PRE, O.channel("conv", 2), [5], SETTINGS)
    assert dead.steps[0] == 2 * SETTINGS.plateau.window
    # diversity compares the images of a set: none may leave the batch
    diverse = O.channel("conv", 0) + 0.5 * O.diversity("conv")
    assert not diverse.separable and O.channel("conv", 0).separable
    kept = render(model, PRE, diverse, [1, 2], SETTINGS)
    assert kept.steps.tolist() == [240, 240]


def test_plateau_checks_only_at_window_ends_and_after_the_settling_steps():
    plateau = Plateau(window=4, tol=0.01)
    flat = torch.ones(2, 12)
    assert not plateau.done(flat, 6, 100, 0).any()  # not a window's end
    assert plateau.done(flat, 7, 100, 0).all()  # flat for two windows
    assert not plateau.done(flat, 7, 100, 2).any()  # two windows have not passed since step 2
    rising = torch.arange(12.0).expand(2, -1) + 10
    assert not plateau.done(rising, 11, 100, 0).any()  # +1 a step over 88 steps left is far above 1 %
    assert plateau.done(rising, 11, 12, 0).all()  # nothing left to gain


@pytest.mark.parametrize("coarse", [0, 2, 5])
def test_coarse_steps_show_the_model_the_frame_at_its_own_side_first(tiny, coarse):
    seen = []
    handle = tiny.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[-1]))
    settings = RenderSettings(size=12, steps=5, loss_points=1, robustness=Robustness().scaled(0.1),
                              coarse_steps=coarse)
    try:
        render(tiny.model, tiny.preprocess, O.channel("conv2", 0), [5], settings)
    finally:
        handle.remove()
    frame = settings.view
    assert seen[:5] == [frame] * min(coarse, 5) + [32] * (5 - min(coarse, 5))
    assert seen[5] == 32  # the final image is judged at the model's side
