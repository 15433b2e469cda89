"""Aspect-ratio buckets: which size an image trains at, that only the rounding crops it, and
what a run reports about them (its own report and kohya's ``ss_bucket_info``)."""

from __future__ import annotations

import json

import pytest

from lorapipe.errors import ConfigError
from lorapipe.training.buckets import (
    BucketRule,
    Placed,
    bucket_report,
    bucket_table,
    crop_fraction,
    crop_warning,
    default_limits,
    kohya_bucket_info,
    size_conditioning,
    source_box,
)

SD15 = BucketRule(resolution=512)  # kohya's defaults: 256..1024 in steps of 64


@pytest.mark.parametrize(
    ("image_size", "bucket"),
    [
        ((600, 1200), (320, 704)),  # 1:2 portrait
        ((1200, 600), (704, 320)),  # and turned
        ((512, 512), (512, 512)),
        ((1000, 700), (576, 384)),
        ((512, 768), (384, 576)),  # the seed article's portrait size: an exact 2:3 bucket
        ((768, 512), (576, 384)),
        ((100, 100), (512, 512)),  # small images are scaled up...
    ],
)
def test_an_image_goes_to_the_bucket_of_closest_aspect_ratio(
    image_size: tuple[int, int], bucket: tuple[int, int]
) -> None:
    assert SD15.bucket_for(image_size) == bucket


def test_with_no_upscale_a_small_image_trains_at_its_own_size_rounded_down() -> None:
    rule = BucketRule(resolution=512, no_upscale=True)
    assert rule.bucket_for((300, 200)) == (256, 192)
    assert rule.bucket_for((100, 100)) == (64, 64)
    assert rule.bucket_for((700, 700)) == (512, 512)  # large ones still get a bucket
    assert rule.bucket_for((600, 1200)) == (320, 704)


def test_every_bucket_is_on_the_grid_within_the_limits_and_the_target_area() -> None:
    for width, height in SD15.sizes:
        assert width % 64 == 0 and height % 64 == 0
        assert min(width, height) >= 256 and max(width, height) <= 1024
        assert width * height <= 512 * 512
    assert {(256, 1024), (1024, 256), (512, 512), (384, 640)} <= set(SD15.sizes)  # kohya's own


@pytest.mark.parametrize("aspect", [0.3, 0.5, 0.62, 0.75, 0.9, 1.0, 1.1, 1.45, 2.0, 3.2])
def test_the_crop_is_never_more_than_the_rounding_to_the_grid(aspect: float) -> None:
    """Between two neighbouring grid widths the aspect ratio moves by at most one step; the
    crop of an image in its bucket stays below that."""
    image_size = (round(1000 * aspect), 1000)
    bucket = SD15.bucket_for(image_size)
    width, height = bucket
    step_error = max(64 / width, 64 / height)
    assert crop_fraction(image_size, bucket) <= step_error


def test_the_crop_box_is_the_largest_of_the_bucket_s_shape_at_the_crop_position() -> None:
    assert source_box((600, 900), (384, 576), None) == (0, 0, 600, 900)
    assert source_box((200, 100), (64, 64), None) == (50, 0, 150, 100)
    assert source_box((200, 100), (64, 64), (0.0, 0.5)) == (0, 0, 100, 100)
    assert crop_fraction((200, 100), (64, 64)) == pytest.approx(0.5)


def test_without_buckets_every_image_is_a_square_of_the_resolution() -> None:
    square = BucketRule(resolution=512, enabled=False)
    assert square.sizes == ((512, 512),)
    assert square.bucket_for((600, 1200)) == (512, 512)


def test_defaults_are_kohya_s_at_512_and_scale_down_below_it() -> None:
    assert default_limits(512) == (256, 1024, 64)
    assert default_limits(1024) == (256, 2048, 64)
    assert default_limits(64) == (32, 128, 8)


def test_limits_that_leave_no_square_bucket_are_one_line_errors() -> None:
    with pytest.raises(
        ConfigError, match="outside \\[min_bucket_reso 600, max_bucket_reso 1024\\]"
    ):
        BucketRule.for_training(
            512,
            enable_bucket=True,
            min_bucket_reso=600,
            max_bucket_reso=None,
            bucket_reso_steps=None,
            bucket_no_upscale=False,
        )


# --------------------------------------------------------------------------- reports


IMAGES = [
    Placed("portrait.png", (512, 768), SD15.bucket_for((512, 768))),
    Placed("square.png", (512, 512), SD15.bucket_for((512, 512))),
    Placed("panorama.png", (4000, 600), SD15.bucket_for((4000, 600))),
]


def test_the_report_counts_each_bucket_and_compares_its_crop_with_square_training() -> None:
    report = bucket_report(SD15, IMAGES)
    assert [(b["resolution"], b["images"]) for b in report["buckets"]] == [
        ([384, 576], 1),
        ([512, 512], 1),
        ([1024, 256], 1),
    ]
    portrait = report["buckets"][0]
    assert portrait["mean_crop_fraction"] == 0 and portrait[
        "square_crop_fraction"
    ] == pytest.approx(1 / 3)
    assert report["most_cropped"][0]["name"] == "panorama.png"  # 6.7:1 is beyond the 4:1 bucket
    assert report["heavily_cropped_images"] == 1
    assert "| 384x576 | 1 | 0.0% |" in bucket_table(report)
    assert "1 training images lose more than 20%" in crop_warning(report)


def test_square_training_warns_about_the_images_it_crops_most() -> None:
    square = BucketRule(resolution=512, enabled=False)
    placed = [Placed(i.name, i.size, square.bucket_for(i.size)) for i in IMAGES]
    warning = crop_warning(bucket_report(square, placed))
    assert warning.startswith("2 training images lose more than 20% of their pixels")
    assert "panorama.png 85%" in warning and "portrait.png 33%" in warning
    assert warning.endswith("enable_bucket: true trains them whole")


def test_kohya_bucket_info_has_kohya_s_shape() -> None:
    info = kohya_bucket_info(bucket_report(SD15, IMAGES))
    assert json.loads(json.dumps(info)) == {
        "buckets": {
            "0": {"resolution": [384, 576], "count": 1},
            "1": {"resolution": [512, 512], "count": 1},
            "2": {"resolution": [1024, 256], "count": 1},
        },
        "mean_img_ar_error": pytest.approx((0 + 0 + (4000 / 600 - 4)) / 3),
    }
    square = BucketRule(resolution=512, enabled=False)
    assert kohya_bucket_info(bucket_report(square, [])) is None


def test_sdxl_size_conditioning_is_the_original_size_the_crop_and_the_bucket() -> None:
    """(original h, w, crop top, left, target h, w), the crop in the scaled image's pixels."""
    assert size_conditioning((600, 900), (384, 576), None, flip=False) == (900, 600, 0, 0, 576, 384)
    # 200x100 scaled to cover 64x64 is 128x64: the centre crop starts 32 px in, a left one at 0
    assert size_conditioning((200, 100), (64, 64), None, flip=False) == (100, 200, 0, 32, 64, 64)
    assert size_conditioning((200, 100), (64, 64), (0.0, 0.5), flip=False)[2:4] == (0, 0)
    assert size_conditioning((200, 100), (64, 64), (0.0, 0.5), flip=True)[2:4] == (0, 64)
