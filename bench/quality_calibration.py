"""Calibration of ``lorapipe ingest``'s image-quality audit on real photographs.

    python bench/quality_calibration.py

The clean set is every photograph scikit-image ships (``skimage.data``: astronaut, coffee,
chelsea, camera, rocket, coins, moon, brick, grass, gravel, hubble_deep_field, retina,
immunohistochemistry, and ``motorcycle_left.png``) and matplotlib's ``grace_hopper.jpg``; the
JPEG files among them are measured with their own quantisation tables, as ingest reads them.
Each photo gets degraded copies, one kind per code:

- blurry: Gaussian blur of 1, 2, 4 and 16 px per 512 px of the shorter side;
- upscaled: shrunk to 128 px on the shorter side, enlarged (bicubic) to 768;
- jpeg_artifacts: saved as JPEG at quality 5 and 10 (the tables are read), and the quality-10
  JPEG decoded and kept as pixels, as a PNG of it would be (blockiness is measured);
- overexposed: gain 255 / the median of the pixels' highest channel (the brighter half clips),
  and a fixed gain of 2.5;
- underexposed: that median subtracted (the darker half crushed), and a gain of 0.25 with the
  black level at 16 (what was below 84 goes black);
- low_contrast: the range squashed to 15 % around mid-grey.

For each code it prints the default threshold, the worst clean value (the one nearest the
threshold) and the false-positive rate on the clean photos, and per degradation the worst
degraded value, the detection rate and the margin (how many times the worst clean value is
beyond the worst degraded one; above 1, the threshold separates them). Then: the focus
change when the contrast is halved, the relative check (each image against the clean set's
median focus), the demo world's 40 procedural scenes (flat shapes on plain backgrounds, a
third watermarked) as a second clean set, and the audit's cost per image.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from lorapipe import quality

SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "camera",
    "rocket",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)
# skimage.data functions whose photo is a JPEG file in the wheel: measured from the file
SKIMAGE_JPEGS = {"rocket": "rocket.jpg", "hubble_deep_field": "hubble_deep_field.jpg"}
SKIMAGE_JPEGS["retina"] = "retina.jpg"


@dataclass(frozen=True)
class Sample:
    """An image as ingest sees it: decoded RGB pixels and the file's JPEG tables, if any."""

    image: Image.Image
    quantization: dict[int, list[int]] | None = None

    def measures(self) -> quality.Measures:
        found = quality.measure(self.image, self.quantization)
        assert found is not None
        return found


def photos() -> dict[str, Sample]:
    """The clean set, by name."""
    import matplotlib
    import skimage
    import skimage.data

    data = Path(skimage.__file__).parent / "data"
    files = {name: data / file for name, file in SKIMAGE_JPEGS.items()}
    files["motorcycle"] = data / "motorcycle_left.png"
    files["grace_hopper"] = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    found = {}
    for name in (*SKIMAGE_PHOTOS, "motorcycle", "grace_hopper"):
        if name in files:
            found[name] = from_file(files[name])
        else:
            pixels = getattr(skimage.data, name)()
            found[name] = Sample(Image.fromarray(pixels).convert("RGB"))
    return found


def from_file(path: Path | io.BytesIO) -> Sample:
    with Image.open(path) as image:
        image.load()
        tables = dict(image.quantization) if image.format == "JPEG" else None
        return Sample(image.convert("RGB"), tables)


def blur(per_512: float) -> Callable[[Sample], Sample]:
    def degrade(sample: Sample) -> Sample:
        radius = per_512 * min(sample.image.size) / 512
        return Sample(sample.image.filter(ImageFilter.GaussianBlur(radius)))

    return degrade


def upscaled(sample: Sample) -> Sample:
    image = sample.image
    small = image.resize(_scaled(image.size, 128), Image.Resampling.LANCZOS)
    return Sample(small.resize(_scaled(small.size, 768), Image.Resampling.BICUBIC))


def _scaled(size: tuple[int, int], short: int) -> tuple[int, int]:
    factor = short / min(size)
    return round(size[0] * factor), round(size[1] * factor)


def jpeg(quality_level: int, keep_tables: bool = True) -> Callable[[Sample], Sample]:
    def degrade(sample: Sample) -> Sample:
        buffer = io.BytesIO()
        sample.image.save(buffer, format="JPEG", quality=quality_level)
        decoded = from_file(io.BytesIO(buffer.getvalue()))
        return decoded if keep_tables else Sample(decoded.image)

    return degrade


def _pixels(sample: Sample) -> np.ndarray:
    return np.asarray(sample.image, dtype=np.float64)


def _from_pixels(pixels: np.ndarray) -> Sample:
    return Sample(Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)))


def _median_brightest(sample: Sample) -> float:
    """The median of each pixel's highest channel (what the clipping measures read)."""
    return float(np.median(_pixels(sample).max(axis=2)))


def gain(factor: float | None) -> Callable[[Sample], Sample]:
    """Multiply by ``factor``, or (None) by 255 / the median highest channel (the brighter half
    of the pixels clips), clipping at 255."""

    def degrade(sample: Sample) -> Sample:
        times = factor if factor is not None else 255 / max(_median_brightest(sample), 1)
        return _from_pixels(_pixels(sample) * times)

    return degrade


def crushed(sample: Sample) -> Sample:
    """The median highest channel subtracted, clipping at 0: the darker half goes black."""
    return _from_pixels(_pixels(sample) - _median_brightest(sample))


def darkened(sample: Sample) -> Sample:
    """Gain 0.25 and the black level raised to 16: whatever falls below 84 is black."""
    return _from_pixels(_pixels(sample) * 0.25 - 16)


def squashed(sample: Sample) -> Sample:
    return _from_pixels(128 + (_pixels(sample) - 128) * 0.15)


# code -> measure, threshold key, flags below the threshold, the degradations
CASES: dict[str, tuple[str, str, bool, dict[str, Callable[[Sample], Sample]]]] = {
    quality.BLURRY: (
        "focus",
        "min_focus",
        True,
        {
            "blur 1 px/512": blur(1),
            "blur 2 px/512": blur(2),
            "blur 4 px/512": blur(4),
            "blur 16 px/512": blur(16),
        },
    ),
    quality.UPSCALED: ("detail", "min_detail", True, {"128 px -> 768 px": upscaled}),
    quality.JPEG_ARTIFACTS: (
        "jpeg_quality",
        "min_jpeg_quality",
        True,
        {"JPEG q5": jpeg(5), "JPEG q10": jpeg(10)},
    ),
    "jpeg_artifacts (PNG)": (
        "blockiness",
        "max_blockiness",
        False,
        {"q10 as PNG": jpeg(10, keep_tables=False), "q5 as PNG": jpeg(5, keep_tables=False)},
    ),
    quality.OVEREXPOSED: (
        "clipped_highlights",
        "max_clipped_highlights",
        False,
        {"gain 255/median": gain(None), "gain x2.5": gain(2.5)},
    ),
    quality.UNDEREXPOSED: (
        "clipped_shadows",
        "max_clipped_shadows",
        False,
        {"minus median": crushed, "x0.25 - 16": darkened},
    ),
    quality.LOW_CONTRAST: ("contrast", "min_contrast", True, {"range x0.15": squashed}),
}


def main() -> None:
    thresholds = quality.Thresholds()
    clean = photos()
    clean_measures = {name: sample.measures() for name, sample in clean.items()}
    print(f"{len(clean)} clean photos; defaults {thresholds}")
    print()
    header = (
        f"{'code':22} {'measure':18} {'threshold':>9} {'clean worst':>18} {'FP':>6} "
        f"{'degradation':16} {'degraded worst':>20} {'detected':>8} {'margin':>6}"
    )
    print(header)
    print("-" * len(header))
    for code, (name, key, below, degradations) in CASES.items():
        limit = getattr(thresholds, key)
        values = {
            photo: getattr(found, name)
            for photo, found in clean_measures.items()
            if getattr(found, name) is not None
        }
        pick = min if below else max
        worst = pick(values, key=values.__getitem__)
        false_positives = sum(_flags(value, limit, below) for value in values.values())
        row = (
            f"{code:22} {name:18} {limit:9g} {values[worst]:8.3g} {worst[:9]:>9} "
            f"{false_positives}/{len(values):<4}"
        )
        for index, (label, degrade) in enumerate(degradations.items()):
            found = {
                photo: getattr(degrade(image).measures(), name) for photo, image in clean.items()
            }
            degraded = {photo: value for photo, value in found.items() if value is not None}
            worst_degraded = (max if below else min)(degraded, key=degraded.__getitem__)
            hits = sum(_flags(value, limit, below) for value in degraded.values())
            margin = _margin(values[worst], degraded[worst_degraded], below)
            prefix = row if index == 0 else " " * len(row)
            print(
                f"{prefix} {label:16} {degraded[worst_degraded]:8.3g} "
                f"{worst_degraded[:11]:>11} {hits:>3}/{len(degraded):<4} {margin:6.2f}"
            )
    print()
    _contrast_invariance(clean)
    _relative(clean_measures, clean, thresholds)
    _demo_world(thresholds)
    _cost(clean)


def _flags(value: float, limit: float, below: bool) -> bool:
    return value < limit if below else value > limit


def _margin(clean: float, degraded: float, below: bool) -> float:
    """How many times the worst clean value is beyond the worst degraded one."""
    low, high = (degraded, clean) if below else (clean, degraded)
    return high / low if low > 0 else float("inf")


def _contrast_invariance(clean: dict[str, Sample]) -> None:
    changes = []
    for sample in clean.values():
        halved = _from_pixels(128 + (_pixels(sample) - 128) * 0.5)
        before, after = sample.measures().focus, halved.measures().focus
        changes.append(abs(after - before) / before)
    print(f"focus with the contrast halved: at most {100 * max(changes):.1f} % different")


def _relative(
    measures: dict[str, quality.Measures], clean: dict[str, Sample], thresholds: quality.Thresholds
) -> None:
    median = quality.set_median_focus([found.focus for found in measures.values()])
    assert median is not None
    factor = thresholds.relative_focus
    ratios = {name: found.focus / median for name, found in measures.items()}
    lowest = min(ratios, key=ratios.__getitem__)
    false_positives = sum(ratio < factor for ratio in ratios.values())
    print(
        f"relative focus (relative_focus {factor:g}, clean median {median:.3f}): clean lowest "
        f"{ratios[lowest]:.2f} x median ({lowest}), {false_positives}/{len(ratios)} flagged"
    )
    for label, degrade in CASES[quality.BLURRY][3].items():
        degraded = [degrade(sample).measures().focus / median for sample in clean.values()]
        hits = sum(ratio < factor for ratio in degraded)
        print(f"  {label}: highest {max(degraded):.2f} x median, {hits}/{len(degraded)} flagged")


def _demo_world(thresholds: quality.Thresholds) -> None:
    from lorapipe.demo import inputs, world

    counts = dict.fromkeys(quality.CODES, 0)
    scenes = inputs.demo_scenes()
    for scene, seed, frame in scenes:
        found = quality.measure(world.render(scene, frame, seed=seed))
        assert found is not None
        for flag in quality.flags(found, thresholds):
            counts[flag.code] += 1
    fired = ", ".join(f"{code} {n}" for code, n in counts.items() if n) or "none"
    print(f"demo world, {len(scenes)} scenes as ingest gets them: flagged {fired}")


def _cost(clean: dict[str, Sample]) -> None:
    sample = clean["hubble_deep_field"]  # 1000 x 872, a JPEG: measured like most inputs
    buffer = io.BytesIO()
    sample.image.save(buffer, format="PNG")
    rounds = 20
    started = time.perf_counter()
    for _ in range(rounds):
        sample.measures()
    measured = (time.perf_counter() - started) / rounds
    started = time.perf_counter()
    for _ in range(rounds):
        from_file(io.BytesIO(buffer.getvalue()))
    decoded = (time.perf_counter() - started) / rounds
    print(
        f"cost on hubble_deep_field (1000x872): audit {1000 * measured:.1f} ms, decoding the "
        f"PNG {1000 * decoded:.1f} ms"
    )


if __name__ == "__main__":
    main()
