"""`atlas bench references`: its measures, its summary line, skips, and the cheap pairs run end to end."""

import math

import pytest
import torch
from click.testing import CliRunner

from atlas import cli, models
from atlas.bench import references
from atlas.errors import AtlasError


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


def test_the_extremal_pair_runs_both_counts_and_torchray_against_itself(lite0, capsys):
    pytest.importorskip("torchray")
    result = references.extremal_pair(lite0, images=1, steps=2)
    for key in ("extremal_mask_iou_vs_torchray", "extremal_torchray_self_iou", "extremal_image_area_iou"):
        assert 0 <= result[key] <= 1
    assert result["extremal_mask_iou_vs_torchray"] > 0.95  # two steps: the trajectories have not parted yet
    assert "torchray against itself" in capsys.readouterr().out


def test_a_missing_reference_is_a_recorded_skip(lite0, monkeypatch, capsys):
    import builtins
    real = builtins.__import__
    missing = ("horama", "torchray", "quantus", "lucent")

    def without(name, *args, **kw):
        if name.split(".")[0] in missing:
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", without)
    assert math.isnan(references.maco_pair(lite0, 2, 1, 32)["maco_activation_vs_horama"])
    assert math.isnan(references.extremal_pair(lite0, 1, 2)["extremal_mask_iou_vs_torchray"])
    assert math.isnan(references.quantus_pair(lite0, torch.zeros(1, 3, 224, 224), torch.zeros(1).long())
                      ["quantus_max_abs_diff"])
    assert math.isnan(references.lucent_pair(lite0, 2, 1, 32)["lucid_quality_vs_lucent_224"])
    out = capsys.readouterr().out
    assert "skipped, horama is not installed" in out and references.HORAMA in out
    assert "skipped, torchray is not installed" in out
    assert "skipped, quantus is not installed" in out and "pip install quantus==0.6.0" in out
    assert "Lucid recipe: skipped" in out and "pip install --no-deps torch-lucent==0.1.8" in out


@pytest.fixture
def tiny_batch():
    """atlas:tiny_convnet, three random 32 px images and its top-1 class for each; one thread meanwhile
    (convolutions this small only lose time to a second thread on a busy machine)."""
    tiny = models.load("atlas:tiny_convnet")
    x = tiny.preprocess.normalize(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        target = tiny.model(x).argmax(1)
    yield tiny, x, target
    torch.set_num_threads(threads)


def test_the_quantus_pair_agrees_on_a_tiny_model(tiny_batch, capsys):
    pytest.importorskip("quantus")
    result = references.quantus_pair(*tiny_batch)
    assert set(result["quantus_diffs"]) == {"deletion_mean", "deletion_blur", "random_logit_spearman_abs",
                                            "random_logit_spearman", "mprt_spearman_abs"}
    assert 0 <= result["quantus_max_abs_diff"] <= 1e-3
    assert "MPRT over 5 layers" in capsys.readouterr().out


def test_the_lrp_pair_conserves_on_a_tiny_residual_model_and_is_zennits(tiny_batch, capsys):
    result = references.lrp_pair(*tiny_batch)
    assert result["lrp_conservation_error"] < 1e-4
    assert max(result["lrp_max_abs_diff_vs_zennit"].values()) < 1e-6
    assert all(float(v.max()) < 1e-4 for v in result["lrp_dropped"].values())
    assert "1 residual sums" in capsys.readouterr().out


def test_the_lucent_pair_reads_both_renders_at_224(tiny_batch, monkeypatch):
    try:
        references.featurevis.import_lucent()
    except AtlasError:
        pytest.skip("Lucent 0.1.8 is not installed")
    sizes, real = [], references.featurevis.activation

    def activation(loaded, pixels, layer, chans, device, size=None):
        sizes.append((pixels.shape[1], size))
        return real(loaded, pixels, layer, chans, device, size)
    monkeypatch.setattr(references.featurevis, "activation", activation)
    result = references.lucent_pair(tiny_batch[0], steps=2, units=2, size=32)
    assert math.isfinite(result["lucid_quality_vs_lucent_224"]) and result["lucid_quality_vs_lucent_224"] > 0
    assert sizes and all(s == (32, 224) for s in sizes)  # both tools' 32 px images, each read at 224 px


def test_the_summary_line_has_the_six_figures_in_order(monkeypatch):
    keys = ["lucid_quality_vs_lucent_224", "maco_activation_vs_horama", "maco_time_vs_horama",
            "extremal_mask_iou_vs_torchray", "quantus_max_abs_diff", "lrp_conservation_error"]
    assert list(references.SUMMARY) == keys and set(references.TARGETS) == set(keys)
    figures = dict(zip(keys, [math.nan, 1.25, 0.5, 0.75, 1.5e-8, 0.9277]))
    monkeypatch.setattr(references, "run", lambda **o: {**figures, "options": o})
    out = CliRunner().invoke(cli.main, ["bench", "references", "--only", "quantus,lrp"])
    assert out.exit_code == 0, out.output
    assert out.output.strip().splitlines()[-1] == (
        "references: lucid_quality_vs_lucent_224=nan maco_activation_vs_horama=1.250 maco_time_vs_horama=0.500 "
        "extremal_mask_iou_vs_torchray=0.750 quantus_max_abs_diff=1.50e-08 lrp_conservation_error=0.9277")


def test_only_runs_the_chosen_pairs_and_the_others_are_nan(monkeypatch, capsys):
    tiny = models.load("atlas:tiny_convnet")
    monkeypatch.setattr(references.models, "load", lambda name: tiny)
    monkeypatch.setattr(references, "photo_batch", lambda loaded, n: (torch.zeros(n, 3, 32, 32),
                                                                      torch.zeros(n).long()))
    ran = []
    for pair, key in (("lucent", "lucid_quality_vs_lucent_224"), ("maco", "maco_activation_vs_horama"),
                      ("extremal", "extremal_mask_iou_vs_torchray"), ("quantus", "quantus_max_abs_diff"),
                      ("lrp", "lrp_conservation_error")):
        monkeypatch.setattr(references, f"{pair}_pair",
                            lambda *a, pair=pair, key=key: ran.append(pair) or {key: 1.0})
    result = references.run(only="lrp, quantus", check_photos=2)
    assert ran == ["quantus", "lrp"]
    assert result["quantus_max_abs_diff"] == 1.0 and result["lrp_conservation_error"] == 1.0
    assert all(math.isnan(result[k]) for k in references.SUMMARY if k not in ("quantus_max_abs_diff",
                                                                             "lrp_conservation_error"))
    assert "maco skipped (not in --only)" in capsys.readouterr().out


def test_an_unknown_pair_is_an_error_that_lists_the_pairs():
    with pytest.raises(AtlasError, match="lucent, maco, extremal, quantus, lrp"):
        references.pairs("quantus,lpr")
    out = CliRunner().invoke(cli.main, ["bench", "references", "--only", "lpr"])
    assert out.exit_code == 2 and "expected some of lucent, maco" in out.output


def test_the_featurevis_units_are_block_outputs_lucent_can_name():
    """Lucent names a layer by its module: the units are blocks' outputs, never a module's second call
    (`layer1.0.relu@1`, which the default selection holds for the activations inside a block)."""
    loaded = models.load("resnet18", models.RANDOM)
    units = references.featurevis.pick_units(loaded, 8, torch.device("cpu"))
    assert units == {"layer1.0": [16, 48], "layer2.0": [32, 96], "layer3.1": [64, 192], "layer4.1": [128, 384]}
