"""Aspect-ratio buckets: the size each image trains at, and how much of it the crop removes.

A batch is one tensor, so its images share one size. Cropping every image to a square loses
the top and bottom of a portrait (and with them what "full body" in its caption describes).
Instead, as in kohya sd-scripts, each image goes to a *bucket*: a (width, height) on a grid of
``bucket_reso_steps`` pixels whose area is close to ``resolution``², the one whose aspect ratio
is closest to the image's. The image is scaled to cover its bucket and cropped only by what the
rounding to the grid leaves over (at the centre, or at a random position with ``crop: random``).

The bucket set: kohya's (for every width on the grid, the tallest height whose area is at most
``resolution``², and the same turned sideways), plus every other grid size with at least
``MIN_AREA_FRACTION`` of that area: finer aspect ratios than kohya's alone, so a 2:3 portrait
finds a 2:3 bucket, at the cost of at most a fifth of the pixels. Both sides lie within
[``min_bucket_reso``, ``max_bucket_reso``]. With ``bucket_no_upscale`` an image is never
enlarged: one smaller than that area trains at its own size rounded down to the grid, a larger
one in the closest bucket that fits inside it.

With ``enable_bucket: false`` every image trains in the one square bucket (short side scaled
to ``resolution``, the rest cropped), as lorapipe did before buckets.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lorapipe.errors import ConfigError

Size = tuple[int, int]  # (width, height) in pixels
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in the image's pixels

MIN_AREA_FRACTION = 0.8
# an image that loses more than this share of its pixels to the crop is named in a warning
CROP_WARNING_FRACTION = 0.2
MOST_CROPPED_SHOWN = 5
# kohya's defaults at SD 1.x's 512 px; below 512 they scale with the resolution
KOHYA_MIN_BUCKET_RESO, KOHYA_BUCKET_RESO_STEPS = 256, 64


@dataclass(frozen=True)
class BucketRule:
    """Which buckets exist and which one each image goes to."""

    resolution: int
    enabled: bool = True
    min_reso: int = KOHYA_MIN_BUCKET_RESO
    max_reso: int = 1024
    step: int = KOHYA_BUCKET_RESO_STEPS
    no_upscale: bool = False

    @classmethod
    def for_training(
        cls,
        resolution: int,
        *,
        enable_bucket: bool,
        min_bucket_reso: int | None,
        max_bucket_reso: int | None,
        bucket_reso_steps: int | None,
        bucket_no_upscale: bool,
    ) -> BucketRule:
        """The rule of a training config at its resolved ``resolution``, defaults filled in
        (see ``default_limits``); a set of limits that leaves no bucket is a ``ConfigError``."""
        default_min, default_max, default_step = default_limits(resolution)
        rule = cls(
            resolution=resolution,
            enabled=enable_bucket,
            min_reso=min_bucket_reso or default_min,
            max_reso=max_bucket_reso or default_max,
            step=bucket_reso_steps or default_step,
            no_upscale=bucket_no_upscale,
        )
        if rule.enabled:
            rule.check()
        return rule

    def check(self) -> None:
        if self.min_reso > self.max_reso:
            raise ConfigError(
                f"min_bucket_reso {self.min_reso} is above max_bucket_reso {self.max_reso}; "
                "swap them or leave both unset"
            )
        square = self.resolution // self.step * self.step
        if not self.min_reso <= square <= self.max_reso:
            raise ConfigError(
                f"resolution {self.resolution} (its square bucket {square}x{square} on the "
                f"{self.step} px grid) is outside [min_bucket_reso {self.min_reso}, "
                f"max_bucket_reso {self.max_reso}]; widen the range or leave it unset"
            )

    @functools.cached_property
    def sizes(self) -> tuple[Size, ...]:
        """Every bucket, sorted by width then height."""
        if not self.enabled:
            return ((self.resolution, self.resolution),)
        target = self.resolution**2
        grid = range(math.ceil(self.min_reso / self.step) * self.step, self.max_reso + 1, self.step)
        found: set[Size] = set()
        for width in grid:
            tallest = min(self.max_reso, target // width // self.step * self.step)
            if tallest >= self.min_reso:
                found |= {(width, tallest), (tallest, width)}
            found |= {
                (width, height)
                for height in grid
                if MIN_AREA_FRACTION * target <= width * height <= target
            }
        return tuple(sorted(found))

    def bucket_for(self, image_size: Size) -> Size:
        """The bucket of an image of ``image_size``: the closest aspect ratio, ties to the
        larger bucket."""
        if not self.enabled:
            return (self.resolution, self.resolution)
        candidates: Sequence[Size] = self.sizes
        width, height = image_size
        if self.no_upscale:
            candidates = [(w, h) for w, h in candidates if w <= width and h <= height]
            if not candidates or width * height < MIN_AREA_FRACTION * self.resolution**2:
                return self._own_size(image_size)
        aspect = math.log(width / height)
        return min(candidates, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))

    def _own_size(self, image_size: Size) -> Size:
        """``image_size`` rounded down to the grid (at least one step, at most max_reso)."""
        width, height = image_size
        if max(width, height) > self.max_reso:  # a long thin image: shrink it to fit
            scale = self.max_reso / max(width, height)
            width, height = width * scale, height * scale
        return (
            max(self.step, int(width) // self.step * self.step),
            max(self.step, int(height) // self.step * self.step),
        )


def default_limits(resolution: int) -> tuple[int, int, int]:
    """(min_bucket_reso, max_bucket_reso, bucket_reso_steps) when unset: kohya's 256 and 64
    (at 512 px), scaled down for smaller resolutions, and twice the resolution as the maximum
    (1024 for SD 1.x)."""
    return (
        min(KOHYA_MIN_BUCKET_RESO, resolution // 2),
        2 * resolution,
        max(8, min(KOHYA_BUCKET_RESO_STEPS, resolution // 64 * 8)),
    )


# --------------------------------------------------------------------------- crop geometry


def source_box(image_size: Size, bucket: Size, position: tuple[float, float] | None) -> Box:
    """The part of the image that is scaled to ``bucket``: the largest box of the bucket's
    aspect ratio, placed at ``position`` (fractions of the free space; None: the centre)."""
    width, height = image_size
    scale = max(bucket[0] / width, bucket[1] / height)
    kept_width, kept_height = bucket[0] / scale, bucket[1] / scale
    fraction_x, fraction_y = position or (0.5, 0.5)
    left = (width - kept_width) * fraction_x
    top = (height - kept_height) * fraction_y
    return (left, top, left + kept_width, top + kept_height)


def size_conditioning(
    image_size: Size, bucket: Size, position: tuple[float, float] | None, *, flip: bool
) -> tuple[int, int, int, int, int, int]:
    """SDXL's size and crop conditioning of an image trained in ``bucket``: (original height,
    original width, crop top, crop left, target height, target width), the crop measured in
    the image scaled to cover the bucket (kohya's and diffusers' convention). A mirrored
    sample's crop is measured from the side the model sees on the left."""
    left, top, right, _ = source_box(image_size, bucket, position)
    scale = bucket[0] / (right - left)
    crop_left = left * scale
    if flip:
        crop_left = image_size[0] * scale - bucket[0] - crop_left
    width, height = image_size
    return (height, width, round(top * scale), round(crop_left), bucket[1], bucket[0])


def crop_fraction(image_size: Size, bucket: Size) -> float:
    """The share of the image's pixels that training on ``bucket`` crops away."""
    left, top, right, bottom = source_box(image_size, bucket, None)
    return 1.0 - (right - left) * (bottom - top) / (image_size[0] * image_size[1])


def aspect_error(image_size: Size, bucket: Size) -> float:
    """kohya's ``img_ar_error``: the bucket's aspect ratio minus the image's."""
    return bucket[0] / bucket[1] - image_size[0] / image_size[1]


# --------------------------------------------------------------------------- what a run reports


@dataclass(frozen=True)
class Placed:
    """An image as the bucket report sees it."""

    name: str
    size: Size
    bucket: Size


def bucket_report(rule: BucketRule, images: Sequence[Placed]) -> dict[str, Any]:
    """The buckets part of ``training_report.json``: each bucket with its image count, the share
    of pixels cropped (and what square training would crop of the same images), the images that
    lose most, and kohya's mean aspect-ratio error."""
    square = BucketRule(rule.resolution, enabled=False)
    by_bucket: dict[Size, list[Placed]] = collections.defaultdict(list)
    for image in images:
        by_bucket[image.bucket].append(image)
    cropped = {image: crop_fraction(image.size, image.bucket) for image in images}
    square_cropped = {
        image: crop_fraction(image.size, square.bucket_for(image.size)) for image in images
    }
    most_cropped = sorted(images, key=lambda image: -cropped[image])[:MOST_CROPPED_SHOWN]
    return {
        "enable_bucket": rule.enabled,
        "min_bucket_reso": rule.min_reso,
        "max_bucket_reso": rule.max_reso,
        "bucket_reso_steps": rule.step,
        "bucket_no_upscale": rule.no_upscale,
        "buckets": [
            {
                "resolution": list(bucket),
                "images": len(members),
                "mean_crop_fraction": _mean(cropped[m] for m in members),
                "square_crop_fraction": _mean(square_cropped[m] for m in members),
            }
            for bucket, members in sorted(by_bucket.items())
        ],
        "mean_crop_fraction": _mean(cropped.values()),
        "square_crop_fraction": _mean(square_cropped.values()),
        "mean_aspect_error": _mean(abs(aspect_error(i.size, i.bucket)) for i in images),
        "heavily_cropped_images": sum(1 for f in cropped.values() if f > CROP_WARNING_FRACTION),
        "most_cropped": [
            {
                "name": image.name,
                "size": list(image.size),
                "bucket": list(image.bucket),
                "crop_fraction": cropped[image],
            }
            for image in most_cropped
            if cropped[image] > 0
        ],
    }


def kohya_bucket_info(report: dict[str, Any]) -> dict[str, Any] | None:
    """``ss_bucket_info`` as kohya sd-scripts writes it (None without buckets)."""
    if not report.get("enable_bucket"):
        return None
    return {
        "buckets": {
            str(index): {"resolution": bucket["resolution"], "count": bucket["images"]}
            for index, bucket in enumerate(report["buckets"])
        },
        "mean_img_ar_error": report["mean_aspect_error"],
    }


def bucket_table(report: dict[str, Any]) -> str:
    """The bucket histogram as a Markdown table (the log and TensorBoard show it)."""
    lines = ["| bucket | images | cropped |", "|---|---:|---:|"]
    lines += [
        f"| {w}x{h} | {bucket['images']} | {bucket['mean_crop_fraction']:.1%} |"
        for bucket in report["buckets"]
        for w, h in [bucket["resolution"]]
    ]
    return "\n".join(lines)


def crop_warning(report: dict[str, Any]) -> str | None:
    """A warning naming how many images lose more than ``CROP_WARNING_FRACTION`` of their
    pixels, and the worst of them; None when none does."""
    count = report["heavily_cropped_images"]
    if not count:
        return None
    worst = ", ".join(
        f"{image['name']} {image['crop_fraction']:.0%}"
        for image in report["most_cropped"]
        if image["crop_fraction"] > CROP_WARNING_FRACTION
    )
    fix = (
        "enable_bucket: true trains them whole"
        if not report["enable_bucket"]
        else "widen min_bucket_reso / max_bucket_reso to fit their aspect ratios"
    )
    return (
        f"{count} training images lose more than {CROP_WARNING_FRACTION:.0%} of their pixels "
        f"to the crop (worst: {worst}); {fix}"
    )


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else 0.0
