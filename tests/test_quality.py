"""The image-quality measures on real photographs (scikit-image's and matplotlib's): clean
originals are flagged by no code, each known degradation of them by its own."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import skimage
import skimage.data
from PIL import Image, ImageFilter

from lorapipe import quality

SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "immunohistochemistry",
)
# photos that are JPEG files: read from the file, so their own quantisation tables count
JPEG_FILES = {
    "rocket": Path(skimage.__file__).parent / "data" / "rocket.jpg",
    "hubble_deep_field": Path(skimage.__file__).parent / "data" / "hubble_deep_field.jpg",
    "retina": Path(skimage.__file__).parent / "data" / "retina.jpg",
    "grace_hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
}
MOTORCYCLE = Path(skimage.__file__).parent / "data" / "motorcycle_left.png"

Photo = tuple[Image.Image, dict[int, list[int]] | None]  # pixels, JPEG tables


def _open(source: Path | bytes) -> Photo:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        tables = dict(image.quantization) if image.format == "JPEG" else None
        return image.convert("RGB"), tables


@pytest.fixture(scope="module")
def photos() -> dict[str, Photo]:
    """Every photo in the clean set: what ingest would decode, with the file's JPEG tables.
    The inherently dark ones (moon, hubble_deep_field, retina's black surround, astronaut's
    space) count as clean: a dark photo is not a clipped one."""
    found: dict[str, Photo] = {
        name: (Image.fromarray(getattr(skimage.data, name)()).convert("RGB"), None)
        for name in SKIMAGE_PHOTOS
    }
    found.update({name: _open(path) for name, path in JPEG_FILES.items()})
    found["motorcycle"] = _open(MOTORCYCLE)
    return found


def _flags(photo: Photo) -> list[str]:
    measured = quality.measure(*photo)
    assert measured is not None
    return [flag.code for flag in quality.flags(measured, quality.Thresholds())]


def _pixels(photo: Photo) -> np.ndarray:
    return np.asarray(photo[0], dtype=np.float64)


def _from_pixels(pixels: np.ndarray) -> Photo:
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)), None


def _blurred(photo: Photo) -> Photo:
    image = photo[0]
    return image.filter(ImageFilter.GaussianBlur(2 * min(image.size) / 512)), None


def _scaled(image: Image.Image, short: int, resample: Image.Resampling) -> Image.Image:
    factor = short / min(image.size)
    return image.resize((round(image.width * factor), round(image.height * factor)), resample)


def _upscaled(photo: Photo) -> Photo:
    """Shrunk to a 128 px thumbnail, enlarged to 768 px."""
    thumbnail = _scaled(photo[0], 128, Image.Resampling.LANCZOS)
    return _scaled(thumbnail, 768, Image.Resampling.BICUBIC), None


def _jpeg_bytes(photo: Photo, level: int) -> bytes:
    buffer = io.BytesIO()
    photo[0].save(buffer, format="JPEG", quality=level)
    return buffer.getvalue()


def _jpeg_5(photo: Photo) -> Photo:
    return _open(_jpeg_bytes(photo, 5))


def _jpeg_5_as_png(photo: Photo) -> Photo:
    """The decoded quality-5 JPEG, cropped off its 8 px grid: a PNG of it has no tables."""
    image = _open(_jpeg_bytes(photo, 5))[0]
    return image.crop((3, 5, image.width, image.height)), None


def _brightest_median(photo: Photo) -> float:
    return float(np.median(_pixels(photo).max(axis=2)))


def _overexposed(photo: Photo) -> Photo:
    """A gain that clips the brighter half of the pixels."""
    return _from_pixels(_pixels(photo) * 255 / _brightest_median(photo))


def _underexposed(photo: Photo) -> Photo:
    """Darker by the median: the darker half crushed to black."""
    return _from_pixels(_pixels(photo) - _brightest_median(photo))


def _low_contrast(photo: Photo) -> Photo:
    return _from_pixels(128 + (_pixels(photo) - 128) * 0.15)


def test_clean_photos_are_flagged_by_no_code(photos: dict[str, Photo]) -> None:
    flagged = {name: codes for name, photo in photos.items() if (codes := _flags(photo))}
    assert flagged == {}


@pytest.mark.parametrize(
    ("degrade", "code", "also"),
    [
        # a thumbnail enlarged is blurry at the pixel scale too, and blur empties the top band
        (_blurred, quality.BLURRY, {quality.UPSCALED}),
        (_upscaled, quality.UPSCALED, {quality.BLURRY}),
        (_jpeg_5, quality.JPEG_ARTIFACTS, set()),
        (_jpeg_5_as_png, quality.JPEG_ARTIFACTS, set()),
        # what is left after clipping is a narrower range
        (_overexposed, quality.OVEREXPOSED, {quality.LOW_CONTRAST}),
        (_underexposed, quality.UNDEREXPOSED, {quality.LOW_CONTRAST}),
        (_low_contrast, quality.LOW_CONTRAST, {quality.BLURRY}),
    ],
    ids=["blur", "128px-to-768px", "jpeg-q5", "jpeg-q5-as-png", "over", "under", "contrast"],
)
def test_each_degradation_is_flagged_with_its_code(
    photos: dict[str, Photo], degrade: Callable[[Photo], Photo], code: str, also: set[str]
) -> None:
    codes = {name: set(_flags(degrade(photo))) for name, photo in photos.items()}
    assert {name for name, found in codes.items() if code not in found} == set()
    assert {name: found for name, found in codes.items() if found - {code} - also} == {}


def test_a_change_of_contrast_does_not_move_focus(photos: dict[str, Photo]) -> None:
    for name, photo in photos.items():
        halved = _from_pixels(128 + (_pixels(photo) - 128) * 0.5)
        before, after = quality.measure(*photo), quality.measure(*halved)
        assert before is not None and after is not None
        assert after.focus == pytest.approx(before.focus, rel=0.03), name


def test_heavy_blur_does_not_read_as_sharp_rounding_noise(photos: dict[str, Photo]) -> None:
    """Without the rounding floor, an 8-bit image blurred flat has only rounding noise left,
    whose Laplacian/gradient ratio is that of the sharpest image."""
    for name, photo in photos.items():
        image = photo[0]
        blurred = image.filter(ImageFilter.GaussianBlur(16 * min(image.size) / 512))
        measured = quality.measure(blurred)
        assert measured is not None
        assert measured.focus < quality.Thresholds().min_focus, name


@pytest.mark.parametrize("level", [1, 5, 10, 25, 50, 75, 90, 95, 100])
def test_jpeg_quality_is_read_from_the_quantisation_tables(
    photos: dict[str, Photo], level: int
) -> None:
    _, tables = _open(_jpeg_bytes(photos["coffee"], level))
    assert tables is not None
    assert quality.jpeg_quality(tables) == level


def test_a_greyscale_jpeg_has_one_table_and_is_still_estimated(photos: dict[str, Photo]) -> None:
    buffer = io.BytesIO()
    photos["camera"][0].convert("L").save(buffer, format="JPEG", quality=20)
    _, tables = _open(buffer.getvalue())
    assert tables is not None and len(tables) == 1
    assert quality.jpeg_quality(tables) == 20


def test_measures_cover_every_format_once(photos: dict[str, Photo]) -> None:
    """A JPEG is judged by its tables (blockiness would mix the encoder's grid with the
    scene), another format by blockiness at its own resolution."""
    jpeg = quality.measure(*photos["rocket"])
    png = quality.measure(*photos["coffee"])
    assert jpeg is not None and png is not None
    assert jpeg.jpeg_quality is not None and jpeg.blockiness is None
    assert png.jpeg_quality is None and png.blockiness is not None
    assert "blockiness" not in jpeg.as_dict() and "jpeg_quality" not in png.as_dict()


def test_flat_and_tiny_images() -> None:
    """A flat image has no focus, no detail and no contrast; one too small is not measured."""
    flat = quality.measure(Image.new("RGB", (64, 64), (90, 120, 150)))
    assert flat is not None
    assert (flat.focus, flat.detail, flat.contrast, flat.blockiness) == (0.0, 0.0, 0.0, 1.0)
    assert quality.measure(Image.new("RGB", (8, 200))) is None


def test_flat_graphics_on_the_8px_grid_are_not_jpeg_blocks(photos: dict[str, Photo]) -> None:
    """Colour blocks whose edges all fall on the 8 px grid have nothing inside the blocks to
    judge a grid by; the same photo's quality-1 JPEG, nearly as flat, still reads as blocky."""
    cells = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    blocks = Image.fromarray(cells).resize((512, 512), Image.Resampling.NEAREST)
    measured = quality.measure(blocks)
    assert measured is not None and measured.blockiness == 1.0
    worst = _open(_jpeg_bytes(photos["moon"], 1))[0]
    flagged = quality.measure(worst)
    assert flagged is not None
    assert flagged.blockiness > quality.Thresholds().max_blockiness


def test_flags_name_the_value_and_the_threshold(photos: dict[str, Photo]) -> None:
    measured = quality.measure(*_blurred(photos["astronaut"]))
    assert measured is not None
    blurry = quality.flags(measured, quality.Thresholds(min_focus=0.8))[0]
    assert (blurry.code, blurry.measure, blurry.threshold) == (quality.BLURRY, "focus", 0.8)
    assert blurry.detail == f"focus {measured.focus:.3g} < min_focus 0.8"
    assert quality.flags(measured, quality.Thresholds(min_focus=0, min_detail=0)) == []


def test_the_relative_check_flags_focus_far_below_the_sets_median(
    photos: dict[str, Photo],
) -> None:
    """With the absolute threshold off, the one blurred image of a sharp set is flagged by
    the set's median alone; a set under five images has no median to compare with."""
    names = ["astronaut", "coffee", "chelsea", "camera", "coins"]
    sharp = [quality.measure(*photos[name]) for name in names]
    soft = quality.measure(*_blurred(photos["grass"]))
    assert soft is not None and all(sharp)
    measured = [found for found in sharp if found] + [soft]
    median = quality.set_median_focus([found.focus for found in measured])
    assert median is not None
    thresholds = quality.Thresholds(min_focus=0, min_detail=0, relative_focus=0.6)
    verdicts = [quality.verdict(found, thresholds, median) for found in measured]
    assert [len(found) for found in verdicts] == [0, 0, 0, 0, 0, 1]
    flag = verdicts[-1][0]
    assert flag.code == quality.BLURRY
    assert flag.threshold == pytest.approx(0.6 * median)
    assert f"relative_focus 0.6 x set median {median:.3g}" in flag.detail
    assert quality.set_median_focus([found.focus for found in measured[:4]]) is None
    off = quality.Thresholds(min_focus=0, min_detail=0, relative_focus=0)
    assert quality.verdict(soft, off, median) == []
