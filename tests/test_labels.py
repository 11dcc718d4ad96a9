"""Unit labels, facets and polysemanticity: the statistics, the clustering, and the stage on a hand-set model."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import hypergeom
from sklearn.metrics import silhouette_score

from atlas.dataset.concepts import (ALPHA, SEPARATED, concepts_of, draws, facet_sets, kmeans, label_sets, project,
                                    silhouette)
from atlas.models.tiny import CONCEPT_COLOURS

RGB = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "yellow": (200, 200, 30),
       "cyan": (30, 200, 200), "grey": (120, 120, 120)}


def _colour_folder(root, per_class: int, shuffled: bool = False):
    """per_class 16 px images of each colour in CONCEPT_COLOURS' folders, with pixel noise; `shuffled`:
    each image's folder (its label) drawn at random, so labels say nothing of colour."""
    rng = np.random.default_rng(0)
    colours = [c for c in CONCEPT_COLOURS for _ in range(per_class)]
    folders = list(rng.permutation(colours)) if shuffled else colours
    for i, (colour, folder) in enumerate(zip(colours, folders)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.array(RGB[colour]) + rng.normal(0, 12, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / folder / f"{i:03d}.png")
    return root


def _labelled_store(tmp_path, config, build_stages, shuffled: bool = False):
    data = _colour_folder(tmp_path / "photos", 30, shuffled)
    cfg = config(tmp_path, data, model="atlas:concept_probe", layers=("units",), topk=4, explain=4)
    _, path = build_stages(cfg, ("dataset",))
    return path


def _unit(g: h5py.Group, names: list[str], c: int) -> dict:
    return {"label": names[g["label"][c]] if g["label"][c] >= 0 else None,
            "count": int(g["count"][c, 0]), "drawn": int(g["drawn"][c]), "p": float(g["p"][c, 0]),
            "polysemantic": bool(g["polysemantic"][c]),
            "facets": sorted(names[x] for x, size in zip(g["facet_label"][c], g["facet_size"][c])
                             if x >= 0 and size >= 3)}


def test_labels_facets_and_polysemantic_units_on_a_hand_set_model(tmp_path, config, build_stages):
    path = _labelled_store(tmp_path, config, build_stages)
    with h5py.File(path, "r") as f:
        names = [s.decode() for s in f["dataset/concepts"][...]]
        g = f["layers/units/labels"]
        red, red_or_blue, green = (_unit(g, names, c) for c in range(3))
        assert g.attrs["search"] == 180 and int(g["drawn"][0]) == draws(50, 180, 4) == 18
        # every example is a row of /dataset, best first
        rows = g["examples"][0]
        assert (rows >= 0).all() and len(set(rows.tolist())) == len(rows)
    # a unit that fires only on one class gets it, with every top image of it
    assert red["label"] == "red" and red["count"] == red["drawn"] and red["p"] < ALPHA
    assert green["label"] == "green" and not green["polysemantic"]
    assert not red["polysemantic"]
    # a unit of two unrelated classes: two facets, each labelled, and the flag
    assert red_or_blue["polysemantic"] and red_or_blue["facets"] == ["blue", "red"]

    # the site: the label and its evidence on unit pages, captions and filters in the grid, the search index
    from atlas import site
    site.render(path, tmp_path / "site", progress=False)
    pages = tmp_path / "site" / "atlas-2Dconcept_probe" / "units"
    unit0, unit1 = ((pages / f"{c}.html").read_text() for c in (0, 1))
    assert "label <strong>red</strong>" in unit0 and "polysemantic" not in unit0.split("Evidence")[0]
    assert 'class="badge poly"' in unit1 and "<h3>Facets</h3>" in unit1
    assert unit1.count("<li><strong>blue</strong>") == 1 and unit1.count("<li><strong>red</strong>") == 1
    grid = (pages / "index.html").read_text()
    assert 'data-l="red"' in grid and 'data-p="1"' in grid and 'name="label"' in grid
    assert '<option value="poly">' in grid
    index = (tmp_path / "site" / "atlas-2Dconcept_probe" / "search.js").read_text()
    assert '"unitLabels":{' in index and '"red":{"units":[[0,0]]' in index


def test_a_unit_on_randomly_labelled_images_stays_unlabelled(tmp_path, config, build_stages):
    path = _labelled_store(tmp_path, config, build_stages, shuffled=True)
    with h5py.File(path, "r") as f:
        g = f["layers/units/labels"]
        assert (g["label"][...] == -1).all()
        assert not g["polysemantic"][...].any()
        assert (g["p"][:, 0] >= ALPHA).all()


def test_the_p_value_is_the_hypergeometric_tail_times_the_concepts_tested():
    rng = np.random.default_rng(1)
    image_class = rng.integers(0, 20, 400)
    image_class[:12] = 7  # the unit's top images: 12 of class 7, then 8 others
    members = np.arange(20)[None]
    labels = label_sets(members, np.ones_like(members, bool), image_class, np.full(20, -1), 20)
    base = int((image_class == 7).sum())
    expected = min(1.0, hypergeom.sf(12 - 1, 400, base, 20) * 20)
    assert labels.concept[0, 0] == 7 and labels.count[0, 0] == 12
    assert labels.p[0, 0] == pytest.approx(expected, rel=1e-5)
    assert labels.lift[0, 0] == pytest.approx((12 / 20) / (base / 400), rel=1e-5)
    assert labels.label[0] == 7


def test_small_search_sets_draw_a_tenth_and_do_not_label_from_a_handful():
    assert draws(50, 50_000, 10) == 50 and draws(50, 32, 10) == 10 and draws(50, 300, 10) == 30
    # 32 photos of distinct classes: no unit can be labelled, whatever its top images
    image_class = np.arange(32)
    members = np.arange(10)[None]
    labels = label_sets(members, np.ones_like(members, bool), image_class, np.full(32, -1), 32)
    assert labels.label[0] == -1 and labels.p[0, 0] == 1.0


def test_imagenet_groups_label_a_unit_of_many_breeds_as_dog():
    from atlas import models
    classes = models.load(models.DEFAULT_MODEL).class_names
    names, group_of = concepts_of(classes)
    dog = names.index("dog")
    assert group_of[151] == group_of[268] == dog and group_of[150] != dog and group_of[269] != dog
    assert names[group_of[281]] == "cat" and names[group_of[22]] == "bird"
    rng = np.random.default_rng(0)
    image_class = rng.integers(0, 1000, 20_000)
    image_class[:40] = np.arange(151, 191)  # the top 40: forty different breeds, one image each
    members = np.arange(50)[None]
    labels = label_sets(members, np.ones_like(members, bool), image_class, group_of, len(names))
    assert names[labels.label[0]] == "dog" and labels.count[0, 0] >= 40
    assert concepts_of(["a", "b"])[0] == ["a", "b"]  # no groups for other class lists


def test_batched_kmeans_finds_planted_clusters_and_silhouette_matches_scikit_learn():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    sets = []
    for _ in range(5):
        points = np.concatenate([centres[j] + 0.1 * rng.normal(size=(10, 16)) for j in rng.permutation(3)])
        sets.append(points / np.linalg.norm(points, axis=1, keepdims=True))
    x = torch.tensor(np.stack(sets), dtype=torch.float32)
    labels = kmeans(x, 3)
    for u in range(5):
        groups = labels[u].view(3, 10)
        assert all(len(set(g.tolist())) == 1 for g in groups) and len(set(groups[:, 0].tolist())) == 3
    ours = silhouette(x, labels, 3)
    for u in range(5):
        assert float(ours[u]) == pytest.approx(silhouette_score(x[u].numpy(), labels[u].numpy()), abs=1e-4)
    # a wrong split scores as scikit-learn scores it too, singletons included
    odd = torch.tensor([[0, 0, 1] + [2] * 27])
    assert float(silhouette(x[:1], odd, 3)[0]) == pytest.approx(silhouette_score(x[0].numpy(), odd[0].numpy()),
                                                                 abs=1e-4)


def test_one_cloud_of_embeddings_has_no_facets():
    rng = np.random.default_rng(0)
    embedding = (rng.normal(size=(200, 8)) + 5).astype(np.float16)  # one tight direction
    members = np.arange(30)[None]
    facets = facet_sets(embedding, members, rng.integers(0, 4, 200), np.full(4, -1), 4)
    assert facets.silhouette[0] < SEPARATED and not facets.polysemantic[0]


def test_the_projection_is_fixed_and_keeps_angles():
    x = torch.randn(8, 512, 1, 1, generator=torch.Generator().manual_seed(3))
    a, b = project(x), project(x)
    assert a.dtype == torch.float16 and a.shape == (8, 64) and torch.equal(a, b)
    v = x.flatten(1)
    cos = torch.nn.functional.cosine_similarity(v[:, None], v[None], dim=2)
    cos_p = torch.nn.functional.cosine_similarity(a.float()[:, None], a.float()[None], dim=2)
    assert (cos - cos_p).abs().max() < 0.4


def test_faceted_feature_visualization_steers_each_facet_toward_its_images(tmp_path, config, build_stages):
    data = _colour_folder(tmp_path / "photos", 30)
    cfg = config(tmp_path, data, model="atlas:concept_probe", layers=("units",), topk=4, explain=4, fv_size=16,
                 fv_steps=40, fv_facets=True, fv_caricatures=0)
    _, path = build_stages(cfg, ("featurevis", "dataset"))
    with h5py.File(path, "r") as f:
        names = [s.decode() for s in f["dataset/concepts"][...]]
        g = f["layers/units/facets"]
        assert set(g["channel"][...].tolist()) == {1} and g["done"][...].all()
        labels = f["layers/units/labels/facet_label"][1]
        colour = {names[labels[int(k)]]: g["images"][row].reshape(-1, 3).mean(0)
                  for row, k in enumerate(g["facet"][...])}
        assert (g["alignment"][...] > 0).all()
    # the unit fires on red and on blue; steered toward a facet, its picture takes that facet's colour
    assert colour["red"][0] > colour["red"][2] and colour["blue"][2] > colour["blue"][0]
    from atlas import site
    site.render(path, tmp_path / "site", progress=False)
    unit1 = (tmp_path / "site" / "atlas-2Dconcept_probe" / "units" / "1.html").read_text()
    assert unit1.count('class="facet-fv"') == 2
    assert len(list((tmp_path / "site" / "atlas-2Dconcept_probe" / "units").glob("1-facet*.*"))) == 2
