import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from atlas import models
from atlas.dataset.images import decode, sample_images
from atlas.errors import AtlasError


def test_embedded_default_is_trained():
    """The packaged ImageNet weights, loaded in key order, classify foolbox's labelled samples."""
    loaded = models.load("efficientnet_lite0")
    records = [r for r in sample_images() if r.label >= 0]
    assert len(records) == 20
    pixels = np.stack([decode(r.path, loaded.preprocess)[0] for r in records])
    with torch.no_grad():
        logits = loaded.model(loaded.preprocess.from_uint8(pixels))
    labels = torch.tensor([r.label for r in records])
    top1 = (logits.argmax(1) == labels).sum().item()
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).sum().item()
    assert top1 >= 17, top1
    assert top5 >= 19, top5
    assert loaded.class_names[labels[0]] and len(loaded.class_names) == 1000
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_unknown_model_names_close_matches():
    with pytest.raises(AtlasError, match="unknown model 'resnet5'.*resnet50"):
        models.load("resnet5")
    with pytest.raises(AtlasError, match="unknown timm model"):
        models.load("timm:not_a_model_at_all")


def test_weights_file_errors(tmp_path: Path, tiny):
    with pytest.raises(AtlasError, match="weights file not found"):
        models.load("atlas:tiny_convnet", tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(AtlasError, match="cannot read weights file"):
        models.load("atlas:tiny_convnet", junk)
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    with pytest.raises(AtlasError, match="do not fit.*another architecture"):
        models.load("atlas:tiny_convnet", other)


def test_local_weights_replace_defaults(tmp_path: Path, tiny):
    state = {k: torch.zeros_like(v) for k, v in tiny.model.state_dict().items()}
    path = tmp_path / "zeros.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = models.load("atlas:tiny_convnet", path)
    assert all(float(p.abs().sum()) == 0 for p in loaded.model.parameters())
    assert "zeros.pth" in loaded.weights_id


def test_torchvision_offline_error_names_file_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(AtlasError) as info:
        models.load("resnet18")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "--weights" in message and "\n" not in message


def test_preprocess_crop_and_normalize():
    pre = models.Preprocess(size=4, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    from PIL import Image
    image = Image.new("RGB", (8, 4), (255, 0, 0))
    pixels = pre.to_unit(image)
    assert pixels.shape == (4, 4, 3)
    x = pre.from_uint8(pixels[None])
    assert x.shape == (1, 3, 4, 4)
    assert torch.allclose(x[0, 0], torch.ones(4, 4)) and torch.allclose(x[0, 1], -torch.ones(4, 4))


@pytest.mark.parametrize("name, head", [("googlenet", "aux1"), ("inception_v3", "AuxLogits")])
def test_state_dicts_without_their_auxiliary_heads_load_with_a_note(tmp_path: Path, capfd, name, head):
    import torchvision.models as tvm
    torch.manual_seed(0)
    plain = tvm.get_model(name, weights=None, aux_logits=False, init_weights=False)
    path = tmp_path / f"{name}.pth"
    torch.save(plain.state_dict(), path)
    loaded = models.load(name, path)  # torchvision builds these with their auxiliary heads
    note = capfd.readouterr().err
    assert note.count("\n") == 1 and note.startswith("atlas: note: ") and head in note and "never uses" in note
    own = loaded.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in plain.state_dict().items())
    # the other way round: a state dict with the heads, into a model built without them
    full = tvm.get_model(name, weights=None, init_weights=False)
    assert models.fit_state_dict(plain, full.state_dict(), "full.pth", loaded.input_size) is not None

    # anything else missing is still refused
    state = plain.state_dict()
    state.pop("fc.weight")
    torch.save(state, path)
    with pytest.raises(AtlasError, match="1 missing"):
        models.load(name, path)
