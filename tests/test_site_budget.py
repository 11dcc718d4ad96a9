"""The site's size: pages that stay small, the secondary views that shrink to fit the budget,
and the size report (what the command line prints of it)."""

from __future__ import annotations

import json
import re

import h5py
from click.testing import CliRunner
from PIL import Image

from atlas.cli import main
from atlas.site import render, report_lines
from atlas.site.budget import CANDIDATES
from atlas.site.pictures import PICTURE_EXT as EXT
from atlas.store.schema import VIEWS
from atlas.testing.synthetic import write_synthetic_store


def test_big_layer_page_stays_small(tmp_path, refs):
    store = write_synthetic_store(tmp_path / "big.h5", [("wide", 2048, 1)], n_images=3, k=2, fv_size=8,
                                  image_size=16, methods=())
    render(store, tmp_path / "site", progress=False)
    page = tmp_path / "site" / "synthetic" / "wide" / "index.html"
    assert len(re.findall(r"<li data-q=\S+ data-m=", page.read_text())) > 1900  # sort keys on (nearly) all
    assert page.stat().st_size < 200_000
    assert len({u for u in refs(page).urls if u.endswith(f".{EXT}")}) <= 20


def test_secondary_views_shrink_to_fit_the_budget(tmp_path, crawl, site_store):
    """Past the budget the views other than channel are written smaller, and the pages say so."""
    store = site_store(tmp_path, name="big", views=VIEWS, fv_size=64)
    report = render(store, tmp_path / "roomy", progress=False)
    estimates = report["estimates"]
    assert report["view_scale"] == 1.0 and report["crop_side"] is None and set(estimates) == set(CANDIDATES)
    assert estimates[1.0, 1.0] > estimates[0.75, 1.0] > estimates[0.5, 1.0] > estimates[0.5, 0.75]
    actual = sum(report["site_bytes"].values())
    assert 0.5 < estimates[1.0, 1.0] / actual < 2.0  # the estimate is of the right size
    unit = tmp_path / "roomy" / "big" / "block.0.relu-401" / "7.html"
    assert Image.open(unit.parent / f"7-views.{EXT}").size == (6 * 64, 64)
    assert "shown at" not in unit.read_text() and report["views_note"] is None

    budget = (estimates[0.75, 1.0] + estimates[0.5, 1.0]) / 2  # only half size fits
    report = render(store, tmp_path / "tight", progress=False, max_site_mb=budget / 1e6)
    assert report["view_scale"] == 0.5 and report["crop_side"] is None
    unit = tmp_path / "tight" / "big" / "block.0.relu-401" / "7.html"
    assert Image.open(unit.parent / f"7-views.{EXT}").size == (6 * 32, 32)
    assert Image.open(unit.parent / f"7.{EXT}").size == (64, 64)  # the channel view keeps its side
    note = "views other than channel shown at 32 px of the stored 64 to keep the site within"
    assert note in unit.read_text() and note in (unit.parent.parent / "about.html").read_text()
    assert note in report["views_note"] and f"  {report['views_note']}" in report_lines(report, tmp_path)[0]
    crawl(tmp_path / "tight" / "index.html")

    budget = (estimates[0.5, 0.75] + estimates[0.5, 0.5]) / 2  # then the example crops give too
    report = render(store, tmp_path / "tighter", progress=False, max_site_mb=budget / 1e6)
    assert report["view_scale"] == 0.5 and report["crop_side"] == 48
    unit = tmp_path / "tighter" / "big" / "block.0.relu-401" / "7.html"
    assert Image.open(unit.parent / f"7-examples.{EXT}").size == (2 * 4 * 48, 48)  # 4 top and 4 bottom crops
    assert "example crops at 48 px of the stored 96" in report["views_note"]


def test_size_report_and_budget(tmp_path, capsys, site_store):
    """`render` prints nothing and reports the site's size and whether it is over budget; the command
    line prints the size table (unless quiet) and the over-budget warning once, on stderr."""
    store, out_dir = site_store(tmp_path), tmp_path / "site"
    report = render(store, out_dir, progress=False, max_site_mb=0.001)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert report["over_budget"] is True and report["max_site_mb"] == 0.001
    assert sum(report["site_bytes"].values()) == sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    lines, warning = report_lines(report, out_dir)
    assert lines[0] == "site size:" and any("featurevis" in line for line in lines)
    assert any(line.strip().startswith("total") for line in lines)
    assert "over its budget of 0.001 MB" in warning and str(out_dir) in warning

    loud = CliRunner().invoke(main, ["render", str(store), "--out", str(out_dir), "--max-site-mb", "0.001"])
    assert loud.exit_code == 0, loud.output
    assert "featurevis" in loud.stdout and "total" in loud.stdout and "site size:" in loud.stdout
    assert loud.stderr.count("over its budget of 0.001 MB") == 1 and "over its budget" not in loud.stdout
    quiet = CliRunner().invoke(main, ["render", str(store), "--out", str(out_dir), "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert "over its budget" not in quiet.stderr and "site size:" not in quiet.stdout
    assert f"site: {out_dir / 'index.html'}" in quiet.stdout
    report = render(store, out_dir, progress=False)
    assert report["over_budget"] is False and report_lines(report, out_dir)[1] is None


def test_pages_stay_small_with_every_method(tmp_path, refs):
    """The full preset's methods and checks (18 methods, 8 images, 8 groups) keep pages under 300 KB."""
    methods = ("gradient", "gradient_x_input", "smoothgrad", "smoothgrad_sq", "vargrad", "guided_backprop",
               "grad_cam", "guided_grad_cam", "integrated_gradients", "ig_max_distance", "ig_blurred",
               "ig_uniform", "ig_gaussian", "expected_gradients", "lrp_epsilon_plus_flat", "lrp_epsilon_gamma_box",
               "occlusion", "extremal_perturbation")
    classes = [f"a rather long class name number {i}" for i in range(1000)]
    store = write_synthetic_store(tmp_path / "big.h5", [("conv", 4, 4), ("fc", 1000, 1)], n_images=8, k=10,
                                  fv_size=8, image_size=32, methods=methods, classes=classes, check_images=8,
                                  check_groups=8, unit_size=8, views=())
    render(store, tmp_path / "site", progress=False)
    model = tmp_path / "site" / "synthetic"
    for page in ("checks.html", "images/1.html", "about.html", "conv/0.html"):
        assert (model / page).stat().st_size < 300_000, page
    assert max(p.stat().st_size for p in model.rglob("*.html")) < 300_000
    pictures = {u for u in refs(model / "checks.html").urls if not u.endswith(".html") and not u.startswith("#")}
    assert len(pictures) <= 20 and f"checks-strips.{EXT}" in pictures  # 8 images, one sprite, css, js, icon, search
    assert Image.open(model / f"checks-strips.{EXT}").size == (9 * 32, 2 * len(methods) * 32)


def test_checks_page_stays_small_with_long_group_labels(tmp_path):
    """Real group labels name two modules each ("layer4.2.conv3 .. layer4.1.bn2"): still under 300 KB."""
    methods = ("gradient", "gradient_x_input", "smoothgrad", "smoothgrad_sq", "vargrad", "guided_backprop",
               "grad_cam", "guided_grad_cam", "integrated_gradients", "ig_max_distance", "ig_blurred",
               "ig_uniform", "ig_gaussian", "expected_gradients", "lrp_epsilon_plus_flat", "lrp_epsilon_gamma_box",
               "occlusion", "extremal_perturbation")
    store = write_synthetic_store(tmp_path / "long.h5", [("conv", 4, 4)], n_images=8, k=2, fv_size=8,
                                  image_size=16, methods=methods, check_images=8, check_groups=8, unit_size=8,
                                  views=(), classes=[f"a rather long class name number {i}" for i in range(1000)])
    labels = [f"features.denseblock{g}.denselayer16.conv2 .. features.denseblock{g}.denselayer1.norm1"
              for g in range(8)]
    with h5py.File(store, "r+") as f:
        for method in methods:
            f[f"checks/{method}/randomization"].attrs["labels"] = json.dumps(labels)
    render(store, tmp_path / "site", progress=False)
    page = tmp_path / "site" / "synthetic" / "checks.html"
    assert page.stat().st_size < 300_000
    text = page.read_text()
    assert f'title="{labels[3]}">features.<wbr>denseblock3.<wbr>denselayer16.<wbr>conv2</th>' in text
    # the axis tells the groups apart (the prefix all share is dropped), and the full labels are listed once
    ticks = re.findall(r'rotate\(35\)">([^<]*)</text>', text)
    assert ticks[:3] == ["denseblock0.den…", "denseblock1.den…", "denseblock2.den…"] and len(set(ticks)) == 8
    assert text.count(labels[5]) == 1 + 3 * len(methods)  # the page's list; per method a strip head and two tiles

