"""`atlas bench references`: its measures, and the MACO pair run end to end on a small view."""

import math

import pytest
import torch

from atlas import models
from atlas.bench import references


def test_top_fraction_and_iou():
    mask = torch.arange(100.0).view(10, 10)
    top = references.top_fraction(mask, 0.1)
    assert top.sum() == 10 and top[-1].all()  # the ten highest values: the last row
    flat = torch.zeros(10, 10)  # all tied: the first positions win, deterministically
    assert references.top_fraction(flat, 0.1)[0].all()
    assert references.iou(top, top) == 1.0
    assert references.iou(top, references.top_fraction(-mask, 0.1)) == 0.0
    half = torch.zeros(10, 10, dtype=torch.bool)
    half[-1, :5] = True
    assert references.iou(top, half) == 0.5


@pytest.fixture(scope="module")
def lite0():
    return models.load(models.DEFAULT_MODEL)


def test_the_maco_pair_renders_both_tools_on_the_same_units(lite0):
    pytest.importorskip("horama")
    result = references.maco_pair(lite0, steps=2, per_layer=1, size=32)
    for key in ("maco_activation_vs_horama", "maco_time_vs_horama"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert result["maco_atlas_s"] > 0 and result["maco_horama_s"] > 0


def test_a_missing_reference_is_a_recorded_skip(lite0, monkeypatch, capsys):
    import builtins
    real = builtins.__import__

    def no_horama(name, *args, **kw):
        if name == "horama" or name.startswith("torchray"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_horama)
    assert math.isnan(references.maco_pair(lite0, 2, 1, 32)["maco_activation_vs_horama"])
    assert math.isnan(references.extremal_pair(lite0, 1, 2)["extremal_mask_iou_vs_torchray"])
    out = capsys.readouterr().out
    assert "skipped, horama is not installed" in out and references.HORAMA in out
    assert "skipped, torchray is not installed" in out
