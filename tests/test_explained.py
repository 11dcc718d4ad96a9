"""The search set and the explained set: the choice of explained images, example crops cut from the
source, sections that grow with the explained set only, and parts that hand their arrays to the store."""

import io

import h5py
import numpy as np
import pytest
from PIL import Image

from atlas.dataset.examples import choose, crop
from atlas.dataset.images import decode, list_images


def test_choice_spreads_over_classes_before_taking_a_second():
    classes = np.array([0, 0, 0, 1, 1, 2, 0, 2])
    counts = np.array([5, 9, 1, 0, 3, 2, 7, 2])
    # round 1: the best of each class (rows 1, 4, 5), most counts first; round 2: rows 6, 3, 7 ...
    assert choose(classes, counts, 3).tolist() == [1, 4, 5]
    assert choose(classes, counts, 4).tolist() == [1, 4, 5, 6]  # the best second image: class 0's row 6
    assert choose(classes, counts, 5).tolist() == [1, 4, 5, 6, 7]  # ties by source order: row 7 before 3
    assert choose(classes, counts, 8).tolist() == list(range(8))
    assert choose(classes, counts, 100).tolist() == list(range(8))  # everything when the source is small
    # a class never gets a second image while another has none
    many = np.repeat(np.arange(10), 5)
    picked = choose(many, np.arange(50)[::-1], 10)
    assert sorted(many[picked].tolist()) == list(range(10))
    assert choose(many, np.arange(50)[::-1], 10).tolist() == picked.tolist()  # deterministic


def test_crops_equal_the_box_cut_from_the_source(tmp_path, make_images, config, build_stages):
    data = make_images(tmp_path / "images", 12)
    ctx, path = build_stages(config(tmp_path, data, explain=3, crop_size=16), stages=("dataset",))
    records = list_images(str(data), ctx.loaded.class_names)
    with h5py.File(path) as f:
        source = f["dataset/source_index"][...]
        for layer in ("relu1", "block"):
            for group in ("topk", "bottomk"):
                g = f[f"layers/{layer}/{group}"]
                index, box = g["index"][...], g["box"][...]
                strip = np.asarray(Image.open(io.BytesIO(g["crops"][2].tobytes())).convert("RGB"))
                assert strip.shape == (16, 16 * index.shape[1], 3)
                for slot, row in enumerate(index[2]):
                    picture, _ = decode(records[source[row]].path, ctx.loaded.preprocess)
                    expected = crop(picture, box[2, slot], 16).astype(np.float32)
                    got = strip[:, slot * 16:(slot + 1) * 16].astype(np.float32)
                    # the noise images are JPEG's worst case (quality 92): a few levels off, where the same
                    # box moved sideways by half its side is tens of levels off
                    error = np.abs(got - expected).mean()
                    assert error < 8, (layer, group, slot)
                    x0, y0, x1, y1 = (int(v) for v in box[2, slot])
                    step = (x1 - x0) // 2 + 1
                    step = step if x1 + step <= picture.shape[1] else -step
                    if 0 <= x0 + step and x1 + step <= picture.shape[1]:
                        moved = crop(picture, (x0 + step, y0, x1 + step, y1), 16).astype(np.float32)
                        assert np.abs(got - moved).mean() > 2 * error


def _section_sizes(f: h5py.File, group: str) -> dict[str, tuple]:
    out = {}
    f[group].visititems(lambda n, o: out.__setitem__(n, (o.shape, o.dtype)) if isinstance(o, h5py.Dataset) else None)
    return out


def test_a_four_times_larger_search_set_keeps_the_explained_sections(tmp_path, make_images, config, build_stages):
    sizes, stores = [], []
    for n in (8, 32):
        data = make_images(tmp_path / f"images{n}", n)
        cfg = config(tmp_path / f"n{n}", data, explain=4, attr_methods=("gradient", "occlusion"),
                     attr_check_images=2, attr_unit_topk=1)
        ctx, path = build_stages(cfg)
        stores.append(path)
        with h5py.File(path) as f:
            assert len(f["dataset/paths"]) == n and len(f["dataset/explained"]) == 4
            assert f["dataset/images"].shape[0] == 4
            sizes.append({g: _section_sizes(f, g) for g in ("attribution", "checks")})
            # every layer's crops are one strip per unit, whatever the number of images
            assert all(f[f"layers/{name}/topk/crops"].shape == (int(layer.attrs["channels"]),)
                       for name, layer in f["layers"].items())
    assert sizes[0] == sizes[1]


def test_unit_attributions_reach_images_outside_the_explained_set(tmp_path, make_images, config, build_stages):
    data = make_images(tmp_path / "images", 10)
    ctx, path = build_stages(config(tmp_path, data, explain=1, attr_unit_topk=2))
    with h5py.File(path) as f:
        explained = set(f["dataset/explained"][...].tolist())
        top = f["layers/relu1/topk/index"][:, :2]
        maps = f["layers/relu1/unit_attribution/maps"][...]
        outside = [(c, j) for c in range(top.shape[0]) for j in range(2) if top[c, j] not in explained]
        assert outside and all(np.isfinite(maps[c, j]).all() for c, j in outside)


def _parts_bytes(store) -> int:
    return sum(p.stat().st_size for p in store.parts.rglob("*.h5"))


def test_consolidated_parts_hand_their_arrays_to_the_store(tmp_path, make_images, config, build_stages,
                                                           store_arrays, capsys):
    data = make_images(tmp_path / "images", 12)
    cfg = config(tmp_path, data, explain=12, attr_methods=("gradient", "gradient_x_input"), attr_unit_topk=1)
    ctx, path = build_stages(cfg, stages=("featurevis", "dataset", "attribution"))
    first = store_arrays(path)
    for stage, names in (("dataset", ("images", "top", "bottom")), ("attribution", ("maps", "label_maps")),
                         ("featurevis", ("images",))):
        compacted = 0
        for key, part in ctx.store.units(stage):
            if part.moved:
                compacted += 1
                assert not any(name in part.file for name in names), key  # nothing left twice on disk
        assert compacted, stage
    assert _parts_bytes(ctx.store) < path.stat().st_size

    # a rebuild reads the moved arrays from the store it replaces: the same store again
    ctx, again = build_stages(cfg, stages=("featurevis", "dataset", "attribution"))
    second = store_arrays(again)
    assert first.keys() == second.keys()
    for key in first:
        if first[key].dtype != object:
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)

    # without the store, the units whose arrays it held are computed again
    path.unlink()
    capsys.readouterr()
    ctx, rebuilt = build_stages(cfg, stages=("featurevis", "dataset", "attribution"))
    assert "are computed again" in capsys.readouterr().out
    third = store_arrays(rebuilt)
    for key in ("dataset/images", "attribution/gradient/maps", "layers/relu1/topk/index"):
        np.testing.assert_array_equal(first[key], third[key], err_msg=key)


@pytest.mark.parametrize("world", [2])
def test_summaries_of_shards_in_any_order_equal_one_pass(world):
    import torch

    from atlas.dataset.topk import LayerSummary
    acts = (torch.randn(24, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 2).clamp(min=0).round()
    whole = LayerSummary(3, 5, fuse=False)
    for a in range(0, 24, 6):
        whole.add(acts[a:a + 6], torch.arange(a, a + 6), (a, a + 5))
    shards = [LayerSummary(3, 5, fuse=False) for _ in range(world)]
    for n, a in enumerate(range(0, 24, 6)):  # ranges dealt to the ranks in turn
        shards[n % world].add(acts[a:a + 6], torch.arange(a, a + 6), (a, a + 5))
    merged = LayerSummary(3, 5, fuse=False)
    for s in reversed(shards):  # the later rank first
        merged.merge(s.arrays())
    for prefix in ("top", "bottom"):  # post-ReLU zeros tie everywhere: the lowest indices must win
        assert torch.equal(getattr(merged, prefix).index, getattr(whole, prefix).index), prefix
