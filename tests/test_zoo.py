"""The zoo: a tiny atlas of every torchvision classification family, and of timm's ViT and DeiT.

Each model is its family's own class at a reduced size with random weights
(atlas/models/families.py). Each build runs every stage on two layers of
the default selection: the first, and the deepest of at most 32 channels (in
a transformer: the patch embedding and the last encoder block; in Swin a
channels-last block). The site is rendered for the families whose layers
are laid out differently (token sequences, channels-last maps) and for one
convolutional family: the site reads only the store, which every family
writes alike.
"""

import json

import h5py
import pytest

from atlas import models, pipeline
from atlas.layers import TOKENS, discover, select

FAMILIES = ("resnet", "vgg", "densenet", "mobilenet_v2", "mobilenet_v3", "efficientnet", "regnet", "convnext",
            "googlenet", "inception", "squeezenet", "shufflenet", "mnasnet", "vit", "swin", "maxvit",
            "timm_vit", "timm_deit")
NARROW = 32  # the second layer built: the deepest this narrow (else the second selected: full-width families)
ROLLOUT = {"vit", "timm_vit", "timm_deit"}  # global self-attention: the others skip attention rollout
SITE = ROLLOUT | {"swin", "maxvit", "resnet"}  # rendered to a site as well


def test_the_zoo_covers_every_torchvision_family():
    import torchvision.models as tvm
    classes = {type(models.load(f"atlas:zoo_{name}").model).__module__.rsplit(".", 1)[-1] for name in FAMILIES}
    modules = {m.__name__.rsplit(".", 1)[-1] for m in (tvm.resnet, tvm.vgg, tvm.densenet, tvm.mobilenetv2,
               tvm.mobilenetv3, tvm.efficientnet, tvm.regnet, tvm.convnext, tvm.googlenet, tvm.inception,
               tvm.squeezenet, tvm.shufflenetv2, tvm.mnasnet, tvm.vision_transformer, tvm.swin_transformer,
               tvm.maxvit)}
    assert modules <= classes and "vision_transformer" in classes


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_atlas_of_each_family(family, tmp_path, config, images):
    loaded = models.load(f"atlas:zoo_{family}")
    chosen = select(loaded.model, discover(loaded.model, loaded.input_size))
    first, last = chosen[0], ([l for l in chosen[1:] if l.channels <= NARROW] or chosen[1:2])[-1]
    cfg = config(tmp_path, images, model=f"atlas:zoo_{family}", layers=(first.name, last.name), fv_size=16,
                 fv_steps=2, fv_batch=256, topk=2, explain=3, max_images=6, crop_size=32, attr_unit_topk=1,
                 attr_unit_size=16, attr_methods=("gradient", "grad_cam", "attention_rollout"),
                 fv_caricatures=0, attr_blocks_units=2, fuse=False, fv_redirect_steps=0)
    built = pipeline.build(cfg, progress=False, render=family in SITE)
    with h5py.File(built.store, "r") as f:
        for layer in (first, last):
            g = f["layers"][layer.name]
            assert g["featurevis/channel_done"][...].all()
            assert g["topk/index"].shape == (layer.channels, 2) and "unit_attribution" in g
        assert f["attribution/grad_cam/maps"][...].any(), "Grad-CAM is zero everywhere"
        skipped = json.loads(f["attribution"].attrs.get("skipped", "{}"))
    if family in ROLLOUT:
        assert last.layout == TOKENS and "attention_rollout" not in skipped
    else:
        assert "no global self-attention" in skipped["attention_rollout"]
    if family in SITE:
        unit_pages = [p for p in cfg.site_dir.glob("*/*/0.html") if p.parent.name != "images"]
        assert len(unit_pages) == 2  # unit 0 of each layer
