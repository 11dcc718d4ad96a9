"""Models that accept only their own input side (vision transformers): every stage respects it."""

import h5py

from atlas import models


def test_a_fixed_size_model_is_recognized(tiny):
    vit = models.load("atlas:tiny_vit")
    assert vit.preprocess.fixed and vit.input_size == 32
    assert not tiny.preprocess.fixed  # a convolutional model takes any side


def test_every_stage_runs_on_a_fixed_size_model(tmp_path, config, build_stages, images):
    # feature visualizations of 16 px, half the model's side: the model sees them resized to 32
    cfg = config(tmp_path, images, model="atlas:tiny_vit", layers=("conv_proj",), fv_size=16, fv_steps=3,
                 attr_methods=("gradient", "integrated_gradients", "occlusion"), attr_unit_topk=1,
                 fv_caricatures=1, fv_caricature_steps=2, atlas_layers=1, explain=4)
    _, path = build_stages(cfg, ("featurevis", "dataset", "attribution"))
    with h5py.File(path, "r") as f:
        g = f["layers/conv_proj"]
        assert g["featurevis/channel"].shape == (16, 16, 16, 3) and g["featurevis/channel_done"][...].all()
        assert g["topk/index"].shape[0] == 16 and "unit_attribution" in g
        assert "caricatures" in g and g["caricatures/images"].shape[1] == 32
        assert "maps" in f["attribution/gradient"]
