"""One small model of every torchvision classification family (and timm's ViT and DeiT), as `atlas:zoo_NAME`.

Each is the family's own class, built from its constructor with random
weights (seeded), narrowed where the constructor allows it (fewer blocks,
fewer channels, a toy image size), so a whole atlas of each builds in seconds
on a CPU. tests/test_zoo.py builds one for each. Families whose constructor
fixes the width (ResNet's BasicBlock, GoogLeNet, Inception, SqueezeNet) keep
it, with fewer blocks where it can say so.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from atlas.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from atlas.models.tiny import register_tiny

CLASSES = 10


def _zoo(name: str, size: int):
    """Registers `build() -> nn.Module` as `atlas:zoo_<name>`: seeded, `size` px ImageNet-normalized inputs."""
    def wrap(build):
        def factory():
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = build()
            pre = Preprocess(size=size, crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            return model, pre, [f"class {i}" for i in range(CLASSES)]
        register_tiny(f"zoo_{name}")(factory)
        return build
    return wrap


@_zoo("resnet", 32)
def resnet():
    from torchvision.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)


@_zoo("vgg", 32)
def vgg():
    from torchvision.models.vgg import VGG, make_layers
    model = VGG(make_layers([8, "M", 16, "M", 512, "M"]), num_classes=CLASSES)
    # the classifier's width is fixed at 4096: the same three layers, 32 wide
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, CLASSES))
    return model


@_zoo("densenet", 32)
def densenet():
    from torchvision.models.densenet import DenseNet
    return DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=CLASSES)


@_zoo("mobilenet_v2", 32)
def mobilenet_v2():
    from torchvision.models.mobilenetv2 import MobileNetV2
    return MobileNetV2(num_classes=CLASSES, width_mult=0.25)


@_zoo("mobilenet_v3", 32)
def mobilenet_v3():
    from torchvision.models import mobilenet_v3_small
    return mobilenet_v3_small(num_classes=CLASSES, width_mult=0.25)


@_zoo("efficientnet", 32)
def efficientnet():
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig
    conf = partial(MBConvConfig, width_mult=0.25, depth_mult=1.0)
    return EfficientNet([conf(1, 3, 1, 32, 16, 1), conf(6, 3, 2, 16, 24, 1), conf(6, 5, 2, 24, 40, 1)],
                        dropout=0.2, num_classes=CLASSES)


@_zoo("regnet", 32)
def regnet():
    from torchvision.models.regnet import BlockParams, RegNet
    return RegNet(BlockParams.from_init_params(depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=8),
                  stem_width=8, num_classes=CLASSES)


@_zoo("convnext", 32)
def convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=CLASSES)


@_zoo("googlenet", 32)
def googlenet():
    from torchvision.models.googlenet import GoogLeNet
    return GoogLeNet(num_classes=CLASSES, aux_logits=False, init_weights=False)


@_zoo("inception", 80)  # Inception v3 takes 75 px at least
def inception():
    from torchvision.models.inception import Inception3
    return Inception3(num_classes=CLASSES, aux_logits=False, init_weights=False)


@_zoo("squeezenet", 32)
def squeezenet():
    from torchvision.models.squeezenet import SqueezeNet
    return SqueezeNet("1_1", num_classes=CLASSES)


@_zoo("shufflenet", 32)
def shufflenet():
    from torchvision.models.shufflenetv2 import ShuffleNetV2
    return ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 128], num_classes=CLASSES)


@_zoo("mnasnet", 32)
def mnasnet():
    from torchvision.models.mnasnet import MNASNet
    return MNASNet(0.25, num_classes=CLASSES)


def _draw_head(model: nn.Module, head: nn.Linear) -> nn.Module:
    nn.init.normal_(head.weight, std=0.25)  # torchvision initializes it to zero: every logit a constant
    return model


@_zoo("vit", 32)
def vit():
    from torchvision.models.vision_transformer import VisionTransformer
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=CLASSES)
    return _draw_head(model, model.heads.head)


@_zoo("swin", 32)
def swin():
    from torchvision.models.swin_transformer import SwinTransformer
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=CLASSES)


@_zoo("maxvit", 64)
def maxvit():
    from torchvision.models.maxvit import MaxVit
    return MaxVit(input_size=(64, 64), stem_channels=8, partition_size=4, block_channels=[16, 32],
                  block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=CLASSES)


@_zoo("timm_vit", 32)
def timm_vit():
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=16,
                             depth=2, num_heads=2, num_classes=CLASSES)


@_zoo("timm_deit", 32)  # a class and a distillation token before the patches
def timm_deit():
    import timm
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=16, depth=2, num_heads=2, num_classes=CLASSES)
