"""The CUDA path against the CPU, on the tiny model: runs wherever a GPU is available."""

import h5py
import numpy as np
import pytest
import torch

from atlas import pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _build(config, tmp_path, images, device: str):
    cfg = config(tmp_path / device, images, device=device, fv_steps=16,
                 attr_methods=("gradient", "smoothgrad", "integrated_gradients", "grad_cam"), attr_unit_topk=2,
                 attr_check_images=2)
    return pipeline.run_stages(pipeline.prepare(cfg, progress=False), ("featurevis", "dataset", "attribution"))


def test_cuda_build_matches_the_cpu(tmp_path, config, make_images):
    images = make_images(tmp_path / "images", 10)
    cpu, cuda = _build(config, tmp_path, images, "cpu"), _build(config, tmp_path, images, "cuda")
    with h5py.File(cpu, "r") as a, h5py.File(cuda, "r") as b:
        assert b.attrs["versions"] and "cuda" in str(b.attrs["versions"])
        for layer in a["layers"]:
            la, lb = a["layers"][layer], b["layers"][layer]
            np.testing.assert_array_equal(la["topk/index"][()], lb["topk/index"][()], err_msg=layer)
            np.testing.assert_allclose(la["topk/value"][()], lb["topk/value"][()], rtol=1e-3, atol=1e-4)
            # renders follow 16 optimizer steps: allow for float reassociation, not for different images
            pa, pb = la["featurevis/channel"][()].astype(float), lb["featurevis/channel"][()].astype(float)
            assert np.abs(pa - pb).mean() < 4.0, layer
        for method in ("gradient", "smoothgrad", "integrated_gradients", "grad_cam"):
            ma = a[f"attribution/{method}/maps"][()].astype(np.float32) * a[f"attribution/{method}/scale"][()][:, None, None]
            mb = b[f"attribution/{method}/maps"][()].astype(np.float32) * b[f"attribution/{method}/scale"][()][:, None, None]
            peak = np.abs(ma).max()
            assert np.abs(ma - mb).max() <= 2e-2 * peak, method
