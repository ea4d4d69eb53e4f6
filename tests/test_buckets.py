import pytest

from lora_trainer.buckets import assign_bucket, make_buckets, square_bucket
from lora_trainer.errors import ConfigError

# kohya sd-scripts' make_bucket_resolutions((512, 512), 256, 1024, 64).
KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_matches_kohya_for_512():
    assert make_buckets(512, 256, 1024, 64) == KOHYA_512


@pytest.mark.parametrize("resolution,lo,hi,step", [(768, 320, 1536, 64), (1024, 256, 2048, 64), (512, 128, 768, 32)])
def test_bucket_properties(resolution, lo, hi, step):
    buckets = make_buckets(resolution, lo, hi, step)
    assert buckets == sorted(set(buckets))
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert lo <= w <= hi and lo <= h <= hi
        assert w * h <= resolution * resolution
        # maximal: one more step on one of its sides would break the area or the side limit
        # (kohya's rule makes each bucket maximal in height, and adds its transpose)
        taller = h + step > hi or w * (h + step) > resolution * resolution
        wider = w + step > hi or (w + step) * h > resolution * resolution
        assert taller or wider
        assert (h, w) in buckets  # every shape comes in both orientations


def test_square_included_even_off_step():
    buckets = make_buckets(520, 256, 1024, 64)
    assert (520, 520) in buckets
    assert all(w * h <= 520 * 520 for w, h in buckets)


def test_square_left_out_when_above_max():
    buckets = make_buckets(512, 64, 384, 64)
    assert (512, 512) not in buckets
    assert max(max(b) for b in buckets) == 384


def test_no_bucket_fits_is_a_config_error():
    with pytest.raises(ConfigError, match="no bucket fits"):
        make_buckets(64, 256, 1024, 64)


def test_assign_closest_aspect_ratio():
    buckets = make_buckets(512, 256, 1024, 64)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    assert assign_bucket(1920, 1080, buckets) == (640, 384)
    assert assign_bucket(1080, 1920, buckets) == (384, 640)  # portrait mirrors landscape
    assert assign_bucket(5000, 100, buckets) == (1024, 256)  # extreme ratio: the most extreme bucket
    assert assign_bucket(20, 20, buckets) == (512, 512)  # small images upscale by default


def test_tie_goes_to_larger_area():
    assert assign_bucket(100, 100, [(256, 256), (512, 512)]) == (512, 512)
    # 1:2 and 2:1 are equally far from square; the larger one wins
    assert assign_bucket(300, 300, [(128, 64), (96, 192)]) == (96, 192)


def test_no_upscale_small_image_gets_its_own_bucket():
    buckets = make_buckets(512, 256, 1024, 64)
    assert assign_bucket(300, 200, buckets) == (640, 384)
    assert assign_bucket(300, 200, buckets, no_upscale=True) == (256, 192)
    assert assign_bucket(300, 200, buckets, no_upscale=True, step=32) == (288, 192)


def test_no_upscale_large_image_keeps_the_shared_bucket():
    buckets = make_buckets(512, 256, 1024, 64)
    assert assign_bucket(2000, 1500, buckets, no_upscale=True) == (576, 448)


@pytest.mark.parametrize("size", [(300, 200), (900, 250), (4000, 250), (250, 4000), (700, 500), (513, 511)])
def test_no_upscale_never_enlarges(size):
    buckets = make_buckets(512, 256, 1024, 64)
    w, h = assign_bucket(*size, buckets, no_upscale=True)
    assert w <= size[0] and h <= size[1]
    assert w % 64 == 0 and h % 64 == 0
    assert w * h <= 512 * 512 and max(w, h) <= 1024


def test_no_upscale_tiny_image_gets_one_step():
    assert assign_bucket(50, 40, make_buckets(512, 256, 1024, 64), no_upscale=True) == (64, 64)


def test_assign_rejects_bad_input():
    with pytest.raises(ValueError):
        assign_bucket(0, 10, [(64, 64)])
    with pytest.raises(ValueError):
        assign_bucket(10, 10, [])


def test_square_bucket():
    assert square_bucket(512) == (512, 512)
    assert square_bucket(768) == (768, 768)
