"""Bucket lists, assignment (incl. rounding), crop geometry and per-epoch batches."""

import logging

import pytest

from library.data.buckets import BucketManager, compute_crop_ltrb, make_bucket_resolutions, round_bucket_limits
from library.data.image_loading import crop_top_left
from library.errors import UserInputError

# computed by hand from the spec's rule: w = 256..1024 step 64, h = min(1024, floor((A // w) / 64) * 64)
SD_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
          (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
          (1024, 256)]


def test_bucket_list_for_512():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SD_512


def test_bucket_list_non_square_resolution_uses_area():
    resos = make_bucket_resolutions((768, 512), 256, 1024, 64)
    assert all(w * h <= 768 * 512 for w, h in resos)
    assert (576, 576) in resos  # floor(sqrt(393216)/64)*64 = 576
    assert resos == sorted(set(resos))


def test_limits_rounded_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert round_bucket_limits(250, 1000, 64) == (192, 1024)
    assert "min_bucket_reso 250" in caplog.text and "max_bucket_reso 1000" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert round_bucket_limits(32, 1024, 64) == (64, 1024)  # never rounded down to 0
    assert "using 64" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert round_bucket_limits(256, 1024, 64) == (256, 1024)
    assert caplog.text == ""


def test_rounded_limits_used_for_bucket_list():
    bm = BucketManager((512, 512), True, 250, 1000, 64)
    assert min(min(r) for r in bm.predefined) == 192
    assert max(max(r) for r in bm.predefined) <= 1024


def test_resolution_outside_limits_is_an_error():
    with pytest.raises(UserInputError, match="smaller than min_bucket_reso"):
        BucketManager((128, 128), True, 256, 1024, 64)
    with pytest.raises(UserInputError, match="larger than max_bucket_reso"):
        BucketManager((2048, 512), True, 256, 1024, 64)


def test_assignment_closest_aspect_ratio_and_cover_resize():
    bm = BucketManager((512, 512), True, 256, 1024, 64)
    bucket, resized, err = bm.select(1000, 500)
    assert bucket == (704, 320)  # ar 2.2 is closest to 2.0
    assert resized == (704, 352)  # image is relatively taller: scaled by the width 704/1000
    assert err == pytest.approx(0.2)
    bucket, resized, _ = bm.select(1000, 600)  # ar 1.667: exact aspect of 640x384
    assert bucket == (640, 384) and resized == (640, 384)
    bucket, resized, _ = bm.select(1000, 420)  # ar 2.38 -> 768x320 (ar 2.4), scaled by the width
    assert bucket == (768, 320) and resized == (768, 323)
    bucket, resized, _ = bm.select(1000, 400)  # ar 2.5 -> 768x320, relatively wider: scaled by the height
    assert bucket == (768, 320) and resized == (800, 320)
    # exact match keeps the size
    assert bm.select(448, 576) == ((448, 576), (448, 576), 0.0)
    # taller-than-bucket image scaled by width
    bucket, resized, _ = bm.select(300, 301)
    assert bucket == (512, 512) and resized == (512, int(301 * 512 / 300 + 0.5))


def test_assignment_tie_takes_first_in_sorted_order():
    bm = BucketManager((64, 64), True, 32, 96, 32)
    # buckets: (32,96)...; an image with ar exactly between two buckets goes to the first
    resos = bm.predefined
    a, b = resos[0], resos[1]
    ar = (a[0] / a[1] + b[0] / b[1]) / 2
    w, h = int(ar * 1000), 1000
    got = bm.select(w, h)[0]
    assert got in (a, b)


def test_no_upscale_large_image_candidate_rounding():
    bm = BucketManager((512, 512), True, 256, 1024, 64, no_upscale=True)
    bucket, resized, _ = bm.select(1000, 500)
    assert resized == (640, 320)
    assert bucket == (640, 320)
    # ar 2: rw=724.1 -> bw=704, bh1=round(352)=320 (error 0.2); rh=362 -> bh=320, bw2=640 (error 0) -> height wins


def test_no_upscale_width_rounded_candidate():
    bm = BucketManager((512, 512), True, steps=64, no_upscale=True)
    # ar 0.75: rw=443.4 -> bw=384, bh1=round(512)=512 (error 0);
    #          rh=591.2 -> bh=576, bw2=round(432)=384 (error 0.083) -> the width-rounded candidate wins
    bucket, resized, _ = bm.select(1200, 1600)
    assert resized == (384, 512)
    assert bucket == (384, 512)


def test_no_upscale_small_image_not_resized_and_bucket_rounds_down():
    bm = BucketManager((512, 512), True, 256, 1024, 64, no_upscale=True)
    assert bm.select(300, 200) == ((256, 192), (300, 200), pytest.approx(abs(256 / 192 - 1.5)))
    # min/max bucket reso are ignored in this mode
    assert bm.select(130, 70)[0] == (128, 64)


def test_no_upscale_too_small_image_raises():
    bm = BucketManager((512, 512), True, steps=64, no_upscale=True)
    with pytest.raises(ValueError, match="smaller than bucket_reso_steps"):
        bm.select(40, 300)


def test_no_bucket_single_bucket_cover():
    bm = BucketManager((64, 48), False)
    assert bm.predefined == [(64, 48)]
    bucket, resized, _ = bm.select(128, 128)
    assert bucket == (64, 48) and resized == (64, 64)
    bucket, resized, _ = bm.select(32, 48)
    assert resized == (64, 96)


def test_select_is_memoised():
    bm = BucketManager((512, 512), True)
    assert bm.select(1000, 500) is bm.select(1000, 500)


def test_crop_ltrb_geometry():
    assert compute_crop_ltrb((640, 384), (1000, 500)) == (0, 32, 640, 352)
    assert compute_crop_ltrb((384, 640), (500, 1000)) == (32, 0, 352, 640)
    assert compute_crop_ltrb((512, 512), (512, 512)) == (0, 0, 512, 512)
    # flipped sample mirrors the left edge
    assert crop_top_left((32, 0, 352, 640), 384, False) == (0, 32)
    assert crop_top_left((32, 0, 352, 640), 384, True) == (0, 32)
    assert crop_top_left((10, 0, 300, 640), 384, True) == (0, 84)


def test_epoch_batches_repeats_sizes_and_determinism():
    bm = BucketManager((64, 64), True, 32, 128, 32)
    bm.add((64, 64), "a", 3)
    bm.add((64, 64), "b", 2)
    bm.add((32, 128), "c", 1)
    assert bm.num_batches(2) == 3 + 1
    batches = bm.epoch_batches(2, seed=7, epoch=1)
    assert sorted(len(items) for _, items in batches) == [1, 1, 2, 2]
    flat = sorted(i for _, items in batches for i in items)
    assert flat == ["a", "a", "a", "b", "b", "c"]
    again = BucketManager((64, 64), True, 32, 128, 32)
    again.add((64, 64), "a", 3)
    again.add((64, 64), "b", 2)
    again.add((32, 128), "c", 1)
    assert again.epoch_batches(2, 7, 1) == batches
    orders = {tuple(tuple(x) for _, x in bm.epoch_batches(2, 7, e)) for e in range(1, 8)}
    assert len(orders) > 1  # reshuffled per epoch
    # every batch holds one bucket only
    assert all(len({b}) == 1 for b, _ in batches)


def test_table_mentions_buckets():
    bm = BucketManager((64, 64), True, 32, 128, 32)
    bm.add((64, 64), "a", 3)
    assert "64 x 64" in bm.table() and "total 3 entries" in bm.table()
