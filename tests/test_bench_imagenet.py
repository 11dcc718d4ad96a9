"""The ImageNet-scale benchmark's parts: its synthetic photos and its arithmetic (the benchmark itself is not run)."""
import numpy as np
import pytest
from PIL import Image

from atlas import cli
from atlas.bench.imagenet import SUMMARY, Build, over_target, summarize
from atlas.testing.photos import photo, write_photos

WNIDS = ["n01440764", "n01443537", "n01484850"]  # ImageNet's first three WordNet ids


def test_photos_are_decodable_jpegs_in_wordnet_id_folders(tmp_path):
    paths = write_photos(tmp_path, 8, WNIDS, size=224)
    assert [p.relative_to(tmp_path).parts[0] for p in paths] == [WNIDS[i % 3] for i in range(8)]
    assert len(set(paths)) == 8
    for p in paths:
        with Image.open(p) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (224, 224))
            image.load()


def test_photos_compress_like_photos(tmp_path):
    # the embedded sample photos take 6-33 KB at 224 px and quality 90, 18 KB on average
    paths = write_photos(tmp_path, 8, WNIDS, size=224)
    sizes = [p.stat().st_size / 1e3 for p in paths]
    assert 15 <= np.mean(sizes) <= 40, sizes
    assert len({round(s) for s in sizes}) > 1, "every picture should differ"


def test_a_photo_depends_only_on_its_seed(tmp_path):
    assert np.array_equal(photo(48, 5), photo(48, 5))
    assert not np.array_equal(photo(48, 5), photo(48, 6))
    first, = write_photos(tmp_path / "one", 1, WNIDS, size=48)
    again = write_photos(tmp_path / "two", 2, WNIDS, size=48)[0]
    assert first.read_bytes() == again.read_bytes()


def test_write_photos_needs_a_class():
    with pytest.raises(ValueError, match="classes"):
        write_photos("unused", 1, [])


SMALL = Build(images=100, dataset_s=12.0, pass_s=10.0, attribution_s=20.0, store_bytes=1_000_000, site_bytes=500_000)


def test_summary_numbers_and_line(capsys):
    large = Build(images=400, dataset_s=36.0, pass_s=30.0, attribution_s=23.0, store_bytes=2_200_000, site_bytes=650_000)
    result = summarize(SMALL, large, plain_s=24.0)
    # 23 / 20; 1.2 MB / 300 images; 150 KB / 300 images; the pass's (400 / 30) / (400 / 24) images per second
    assert result == pytest.approx({"attribution_time_ratio_4x": 1.15, "store_kb_per_search_image": 4.0,
                                    "site_kb_per_search_image": 0.5, "search_throughput_vs_plain_forward": 0.8})
    assert over_target(result) == []  # every number exactly at its target passes
    cli._summary("imagenet", result, SUMMARY)
    assert capsys.readouterr().out == ("imagenet: attribution_time_ratio_4x=1.15 store_kb_per_search_image=4.00 "
                                       "site_kb_per_search_image=0.50 search_throughput_vs_plain_forward=0.800\n")


def test_numbers_that_miss_their_targets_are_named():
    large = Build(images=400, dataset_s=70.0, pass_s=60.0, attribution_s=80.0, store_bytes=1_600_000, site_bytes=1_100_000)
    assert over_target(summarize(SMALL, large, plain_s=24.0)) == [
        "over target: attribution_time_ratio_4x=4.00 > 1.15",
        "over target: site_kb_per_search_image=2.00 > 1.0",
        "over target: search_throughput_vs_plain_forward=0.400 < 0.8",
    ]
