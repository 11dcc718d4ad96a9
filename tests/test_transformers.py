"""Vision transformers as first-class models: token layers as patch grids, channels-last Swin maps,
Grad-CAM at the last block's input, and attention rollout."""

import json

import h5py
import pytest
import torch

from atlas import models
from atlas.attribution import methods
from atlas.attribution.cam import GradCAM, default_cam_layer, spread, upsample
from atlas.attribution.rollout import attention_weights, rollout
from atlas.errors import AtlasError
from atlas.layers import NHWC, TOKENS, Capture, as_bchw, discover, select


@pytest.fixture(scope="module")
def vit():
    """atlas:tiny_vit: 32 px, 8 px patches (a 4 x 4 grid after one class token), 2 blocks of width 16."""
    return models.load("atlas:tiny_vit").model


def test_a_token_sequence_is_its_patch_grid():
    # one class token, then 4 patches of 2 channels: patch p has values (p, 10 p)
    tokens = torch.tensor([[[-1.0, -1.0], [0, 0], [1, 10], [2, 20], [3, 30]]])
    grid = as_bchw(tokens)
    assert grid.shape == (1, 2, 2, 2)
    assert grid[0, 0].tolist() == [[0, 1], [2, 3]] and grid[0, 1].tolist() == [[0, 10], [20, 30]]
    assert as_bchw(torch.zeros(3, 18, 5)).shape == (3, 5, 4, 4)  # class and distillation tokens set aside
    assert as_bchw(torch.zeros(1, 16, 5)).shape == (1, 5, 4, 4)  # no extra token (global pooling)
    assert as_bchw(torch.zeros(1, 7, 5)).shape == (1, 5, 7, 1)  # no square grid: a column


def test_channels_last_is_permuted_only_when_said():
    t = torch.arange(24.0).view(1, 2, 3, 4)
    assert as_bchw(t, channels_last=True).shape == (1, 4, 2, 3)
    assert as_bchw(t, channels_last=True)[0, 1].tolist() == t[0, :, :, 1].tolist()
    assert as_bchw(t) is t


def test_discover_lays_out_a_vit_and_selects_its_blocks(vit):
    layers = {l.name: l for l in discover(vit, 32)}
    assert layers["conv_proj"].layout == "nchw" and layers["conv_proj"].shape == (16, 4, 4)
    block = layers["encoder.layers.encoder_layer_1"]
    assert block.layout == TOKENS and block.shape == (16, 4, 4)
    assert layers["encoder.layers.encoder_layer_0.mlp.0"].shape == (32, 4, 4)
    assert [l.name for l in select(vit, list(layers.values()))] == [
        "conv_proj", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]


def test_swin_blocks_are_channels_last_and_convnext_mlps_too():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    swin = SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], num_classes=10).eval()
    layers = {l.name: l for l in discover(swin, 32)}
    assert layers["features.0.0"].layout == "nchw" and layers["features.1.0"].layout == NHWC
    assert layers["features.1.0"].shape == (16, 8, 8) and layers["features.2"].shape == (32, 4, 4)
    assert layers["features.1.0.mlp.1"].shape == (64, 8, 8)  # the GELU between two channels-last Linears
    assert layers["permute"].layout == "nchw" and layers["permute"].shape == (32, 4, 4)
    x = torch.randn(2, 3, 32, 32)
    with Capture(swin, ["features.1.0"]) as cap:
        act = cap.run(x)["features.1.0"]
    assert torch.equal(act, swin.features[1](swin.features[0](x)).permute(0, 3, 1, 2))
    convnext = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=10).eval()
    layers = {l.name: l for l in discover(convnext, 32)}
    assert layers["features.1.0.block.3"].layout == NHWC and layers["features.1.0.block.3"].shape == (32, 8, 8)
    assert layers["features.1.0"].layout == "nchw" and layers["features.1.0"].shape == (8, 8, 8)


def test_a_channel_of_a_token_layer_is_that_feature_over_the_patches(vit):
    x = torch.randn(2, 3, 32, 32)
    with Capture(vit, ["encoder.layers.encoder_layer_0"]) as cap:
        act = cap.run(x)["encoder.layers.encoder_layer_0"]
    tokens = vit.encoder.layers[0](vit.encoder.dropout(
        torch.cat([vit.class_token.expand(2, -1, -1), vit._process_input(x)], 1) + vit.encoder.pos_embedding))
    assert torch.allclose(act[:, 5, 1, 2], tokens[:, 1 + 1 * 4 + 2, 5])


def test_grad_cam_weighs_the_last_blocks_input(vit):
    assert default_cam_layer(vit, 32) == "encoder.layers.encoder_layer_1.ln_1"
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    maps = GradCAM(vit, input_size=32).attribute(x, target)
    assert maps.shape == x.shape and (maps.flatten(1).std(1) > 0).all()
    assert not torch.equal(maps, GradCAM(vit, input_size=32).attribute(x, torch.tensor([3, 4])))
    # the last block's own output: the classifier reads only the class token, so no patch gets a gradient
    after = GradCAM(vit, layer="encoder.layers.encoder_layer_1").attribute(x, target)
    assert not after.any()


def test_attention_weights_are_read_without_changing_the_model(vit):
    import timm
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), attention_weights(vit) as kept:
        out = vit(x)
    assert torch.equal(out, vit(x)) and len(kept) == 2 and kept[0].shape == (2, 17, 17)
    block, seen = vit.encoder.layers[0], {}
    handle = block.ln_1.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    vit(x)
    handle.remove()
    attn = block.self_attention
    q, k, _ = torch.nn.functional.linear(seen["x"], attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
    assert torch.allclose(kept[0], _average_heads(q, k, 2), atol=1e-5)

    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=16, depth=2, num_heads=2).eval()
    fused = deit.blocks[0].attn.fused_attn
    with torch.no_grad(), attention_weights(deit) as kept:
        deit(x)
    assert len(kept) == 2 and kept[0].shape == (2, 18, 18) and deit.blocks[0].attn.fused_attn == fused
    qkv = deit.blocks[0].attn.qkv
    seen.clear()
    handle = deit.blocks[0].norm1.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    deit(x)
    handle.remove()
    q, k, _ = qkv(seen["x"]).chunk(3, -1)
    assert torch.allclose(kept[0], _average_heads(q, k, 2), atol=1e-5)


def _average_heads(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    d = q.shape[-1] // heads
    per = [torch.softmax(q[..., h * d:(h + 1) * d] @ k[..., h * d:(h + 1) * d].mT / d ** 0.5, -1) for h in range(heads)]
    return torch.stack(per).mean(0)


def test_rollout_by_hand():
    a1 = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    a2 = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
    # (A + I) / 2: [[.5, .5], [.5, .5]] then [[.75, .25], [0, 1]]; their product, the later layer on the left
    assert torch.allclose(rollout([a1, a2]), torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
    assert torch.allclose(rollout([a2]), torch.tensor([[[0.75, 0.25], [0.0, 1.0]]]))


def test_rollout_reads_the_class_token_row_over_the_patches(vit):
    x = torch.randn(2, 3, 32, 32)
    maps = methods.get("attention_rollout", vit).attribute(x, torch.tensor([0, 0]))
    with torch.no_grad(), attention_weights(vit) as kept:
        vit(x)
    row = rollout(kept)[:, 0, 1:].reshape(2, 1, 4, 4)
    assert torch.allclose(maps, spread(upsample(row, x)), atol=1e-6)
    assert torch.allclose(row.sum((1, 2, 3)), 1 - rollout(kept)[:, 0, 0], atol=1e-5)  # the rest stays at the class token
    assert torch.equal(maps, methods.get("attention_rollout", vit).attribute(x, torch.tensor([5, 7])))


def test_rollout_refuses_a_convolutional_model(convnet):
    with pytest.raises(AtlasError, match="no global self-attention"):
        methods.get("attention_rollout", convnet).attribute(torch.randn(1, 3, 32, 32), 0)


def test_transformer_methods_run_with_their_checks(tmp_path, config, build_stages, images):
    cfg = config(tmp_path, images, model="atlas:tiny_vit", layers=("encoder.layers.*",), fv_size=16, fv_steps=2,
                 attr_methods=("grad_cam", "attention_rollout"), attr_check_images=2, attr_check_groups=2,
                 attr_check_points=5, attr_unit_topk=1, explain=4)
    _, path = build_stages(cfg, ("dataset", "attribution"))
    with h5py.File(path, "r") as f:
        assert "skipped" not in f["attribution"].attrs or not json.loads(f["attribution"].attrs["skipped"])
        for method in ("grad_cam", "attention_rollout"):
            assert f[f"attribution/{method}/maps"][...].any()
            assert method in f["checks"]
        topk = f["layers/encoder.layers.encoder_layer_1/topk/box"][...]
        assert (topk[..., 2] - topk[..., 0] == 32).all()  # a patch after attention sees the whole image


def test_lucent_sees_a_token_layer_as_its_patch_grid(vit):
    pytest.importorskip("lucent")
    from lucent.optvis import objectives
    from lucent.optvis.render import hook_model

    from atlas.bench.lucent_tokens import grid_views
    x = torch.randn(1, 3, 32, 32)
    with Capture(vit, ["encoder.layers.encoder_layer_1"]) as cap:
        grid = cap.run(x)["encoder.layers.encoder_layer_1"]
    with grid_views(vit):
        hook = hook_model(vit, lambda: x)
    vit(x)
    value = objectives.channel("encoder_layers_encoder_layer_1", 3)(hook)
    assert torch.allclose(-value, grid[0, 3].mean())  # Lucent's objectives return the negated mean
