"""The image-quality audit of ``lorapipe ingest``: measurements that need no model, and the
thresholds that turn them into flags.

A blurry, upscaled or over-compressed training image teaches the LoRA its defect; cleaning it
out of the data is cheaper than fighting it with a negative prompt later. Every measure is a
ratio or a fraction, so it means the same on every image:

- ``focus`` (``blurry``): ``sqrt(E[laplacian^2] / E[gradient^2])`` of the luma, about
  ``0.7 / edge width`` in pixels. Both energies scale with the square of the contrast, so a
  change of contrast does not move it.
- ``detail`` (``upscaled``): the share of the luma's spectral energy above a third of Nyquist
  (of the energy above 1/16 of it, so the coarsest scales, which vary most with the subject,
  are left out). An image enlarged from a thumbnail has almost none.
- ``jpeg_quality`` (``jpeg_artifacts``, JPEG files): the IJG quality whose scaled standard
  tables are closest (least squares) to the file's quantisation tables.
- ``blockiness`` (``jpeg_artifacts``, other formats): the mean neighbour difference of the
  strongest of the 8 column (and row) phases over that of the second strongest; 1 for a clean
  image (and for flat graphics, which have nothing in their blocks to judge by), well above 1
  when JPEG's 8x8 grid shows. Measured at the file's own resolution, where the grid is.
- ``clipped_highlights`` (``overexposed``): the fraction of pixels with a channel at 250 or
  above (blown; a bright colour clips in one channel long before its luma does).
- ``clipped_shadows`` (``underexposed``): the fraction of pixels with every channel at 5 or
  below (crushed to black).
- ``contrast`` (``low_contrast``): the 1st to 99th percentile luma range, 0 to 1.

Everything but the JPEG measures is taken on a copy shrunk (never enlarged) to
``NORMALISED_SIDE`` px on its shorter side, so images of any size are judged at one scale; the
luma is Pillow's (ITU-R 601-2).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

BLURRY = "blurry"
UPSCALED = "upscaled"
JPEG_ARTIFACTS = "jpeg_artifacts"
OVEREXPOSED = "overexposed"
UNDEREXPOSED = "underexposed"
LOW_CONTRAST = "low_contrast"
# in the order the report lists them
CODES = (BLURRY, UPSCALED, JPEG_ARTIFACTS, OVEREXPOSED, UNDEREXPOSED, LOW_CONTRAST)

NORMALISED_SIDE = 384
# an image smaller than this on a side has no 8x8 grid or edges to measure
MIN_AUDITED_SIDE = 16
# the relative focus check needs a set whose median means something
MIN_RELATIVE_SET = 5
HIGHLIGHT_LEVEL = 250
SHADOW_LEVEL = 5
CONTRAST_PERCENTILES = (0.01, 0.99)
# detail's bands, in cycles per pixel (Nyquist is 0.5)
DETAIL_FROM = 0.5 / 3
DETAIL_BASE_FROM = 0.5 / 16
# the variance rounding to 8 bits adds to a pixel (uniform error of +-0.5 level)
ROUNDING_VARIANCE = 1 / 12
BLOCK = 8
BLOCKINESS_STRIP_ROWS = 256  # native-resolution rows differenced at a time, bounding memory
# mean neighbour difference (levels) below which a phase is flat: an image flat but on one
# phase is flat graphics (colour blocks, pixel art enlarged 8x), with nothing in its blocks to
# tell a JPEG grid by; a quality-1 JPEG of a photo keeps several times more (moon: 0.05)
FLAT_PHASE = 0.01

# the IJG (libjpeg) standard quantisation tables, natural order (JPEG spec, Annex K)
_IJG_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_IJG_CHROMA = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8,) * 4,
)


def _ijg_tables() -> np.ndarray:
    """(100, 2, 64): the baseline tables libjpeg writes at quality 1..100."""
    base = np.array([_IJG_LUMA, _IJG_CHROMA], dtype=np.int64).reshape(2, 64)
    quality = np.arange(1, 101)
    scale = np.where(quality < 50, 5000 // quality, 200 - 2 * quality)
    tables = (base[None] * scale[:, None, None] + 50) // 100
    return np.clip(tables, 1, 255).astype(np.float64)


_IJG_BY_QUALITY = _ijg_tables()


@dataclass(frozen=True)
class Measures:
    """One image's measurements; ``jpeg_quality`` for JPEG files, ``blockiness`` for others."""

    focus: float
    detail: float
    jpeg_quality: int | None
    blockiness: float | None
    clipped_highlights: float
    clipped_shadows: float
    contrast: float

    def as_dict(self) -> dict[str, float | int]:
        """The measured values, rounded for a report; the measure a format lacks left out."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        return {
            name: value if isinstance(value, int) else round(value, 4)
            for name, value in values.items()
            if value is not None
        }


def normalised(image: Image.Image) -> Image.Image:
    """``image`` shrunk (never enlarged) to ``NORMALISED_SIDE`` px on its shorter side: the
    copy the measures are taken on (ingest hashes it too)."""
    scale = NORMALISED_SIDE / min(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    factors = (image.width // size[0], image.height // size[1])
    if (size[0] * factors[0], size[1] * factors[1]) == image.size:
        return image.reduce(factors)  # a whole factor (1024x768 -> 512x384): the box average
    # reduce() by the whole factor first: the same box average, several times faster
    return image.resize(size, Image.Resampling.BOX, reducing_gap=1.0)


def measure(
    image: Image.Image,
    quantization: Mapping[int, Sequence[int]] | None = None,
    small: Image.Image | None = None,
) -> Measures | None:
    """The measures of an 8-bit RGB ``image``; ``quantization`` is the source file's JPEG
    quantisation tables (``Image.quantization``) when it was a JPEG, ``small`` its
    ``normalised`` copy where the caller has made it. None for an image too small to
    measure."""
    if min(image.size) < MIN_AUDITED_SIDE:
        return None
    small = normalised(image) if small is None else small
    grey = small.convert("L")
    luma = np.asarray(grey, dtype=np.float32)
    channels = np.asarray(small)
    brightest = np.maximum(np.maximum(channels[..., 0], channels[..., 1]), channels[..., 2])
    pixels = small.width * small.height
    low, high = _percentile_levels(np.asarray(grey.histogram()), CONTRAST_PERCENTILES)
    return Measures(
        focus=focus(luma),
        detail=detail(luma),
        jpeg_quality=jpeg_quality(quantization) if quantization else None,
        blockiness=None if quantization else blockiness(np.asarray(image.convert("L"))),
        clipped_highlights=np.count_nonzero(brightest >= HIGHLIGHT_LEVEL) / pixels,
        clipped_shadows=np.count_nonzero(brightest <= SHADOW_LEVEL) / pixels,
        contrast=(high - low) / 255.0,
    )


def focus(luma: np.ndarray) -> float:
    """``sqrt(E[laplacian^2] / E[gradient^2])``: the 4-neighbour Laplacian against forward
    differences, over the same interior pixels, each less what 8-bit rounding alone adds
    (without that, the rounding of a smooth, badly blurred image would read as sharp edges);
    0 for an image with no gradient above the rounding. The Laplacian is the difference of
    neighbouring differences, so the differences are taken once."""
    across = np.diff(luma, axis=1)[1:-1]  # luma[i, j + 1] - luma[i, j] on interior rows
    down = np.diff(luma, axis=0)[:, 1:-1]  # luma[i + 1, j] - luma[i, j] on interior columns
    dx, dy = across[:, :-1], down[:-1]
    laplacian = across[:, 1:] - dx
    laplacian += down[1:] - dy
    # white noise of variance v has E[gradient^2] = 4v and E[laplacian^2] = 20v
    gradient = float(np.mean(dx * dx) + np.mean(dy * dy)) - 4 * ROUNDING_VARIANCE
    if gradient <= 0:
        return 0.0
    curvature = max(float(np.mean(laplacian * laplacian)) - 20 * ROUNDING_VARIANCE, 0.0)
    return float(np.sqrt(curvature / gradient))


def detail(luma: np.ndarray) -> float:
    """The share of spectral energy above a third of Nyquist among that above 1/16 of it, of
    the mean-removed luma under a Hann window (so the frame's edges add no false detail),
    each band less what 8-bit rounding alone (white noise) puts in it. In float64, where
    NumPy's FFT is several times faster than in float32."""
    luma = np.asarray(luma, dtype=np.float64)
    window, rounding = _window(*luma.shape)
    centred = luma - luma.mean()
    centred *= window
    spectrum = np.fft.rfft2(centred)
    # the power of each bin, as the squares of its real and imaginary parts side by side,
    # summed by a dot product with each band's weights repeated for both
    squares = spectrum.view(np.float64).ravel()
    squares *= squares
    base_band, detail_band = _bands(*luma.shape)

    def energy(band: tuple[np.ndarray, int]) -> float:
        weights, bins = band
        return max(float(squares @ weights) - rounding * bins, 0.0)

    base = energy(base_band)
    if base == 0:
        return 0.0
    return energy(detail_band) / base


@functools.lru_cache(maxsize=16)
def _window(height: int, width: int) -> tuple[np.ndarray, float]:
    """The 2-D Hann window of a shape and the rounding noise it passes into each bin: most
    images of a set share a few shapes."""
    window = np.outer(np.hanning(height), np.hanning(width))
    return window, ROUNDING_VARIANCE * float(np.sum(window**2))


@functools.lru_cache(maxsize=16)
def _bands(height: int, width: int) -> tuple[tuple[np.ndarray, int], ...]:
    """The rfft2 bins at or above 1/16 and at or above a third of Nyquist, each as 0/1
    weights (a dot product is several times faster than a masked sum) and its bin count."""
    squared = np.fft.fftfreq(height)[:, None] ** 2 + np.fft.rfftfreq(width)[None, :] ** 2
    bands = (squared >= DETAIL_BASE_FROM**2, squared >= DETAIL_FROM**2)
    # 0/1 weights for the real and the imaginary square of each bin (``detail``'s layout)
    return tuple((np.repeat(band.astype(np.float64).ravel(), 2), int(band.sum())) for band in bands)


def jpeg_quality(quantization: Mapping[int, Sequence[int]]) -> int:
    """The IJG quality (1-100) whose luma (and chroma) tables fit the file's best, by least
    squares; for an encoder with its own tables, the IJG quality they are nearest."""
    used = [np.asarray(quantization[key], dtype=np.float64) for key in sorted(quantization)[:2]]
    errors = sum(
        ((_IJG_BY_QUALITY[:, index] - table) ** 2).sum(axis=1) for index, table in enumerate(used)
    )
    return int(np.argmin(errors)) + 1


def blockiness(luma: np.ndarray) -> float:
    """How far the strongest of the 8 phases of neighbour differences stands above the next,
    across columns and across rows (averaged): JPEG's 8x8 grid shows as one phase, wherever
    a crop put it; 1 where the next phase is flat (``FLAT_PHASE``). Differenced in strips of
    rows, so a large image costs little memory."""
    height, width = luma.shape
    across = np.zeros(width - 1)
    down = np.zeros(height - 1)
    for top in range(0, height, BLOCKINESS_STRIP_ROWS):
        strip = luma[top : top + BLOCKINESS_STRIP_ROWS + 1].astype(np.int16)
        own = strip[:BLOCKINESS_STRIP_ROWS]
        across += np.abs(np.diff(own, axis=1)).sum(axis=0)
        down[top : top + len(strip) - 1] = np.abs(np.diff(strip, axis=0)).sum(axis=1)
    ratios = []
    for profile in (across / height, down / width):
        phases = sorted(float(profile[phase::BLOCK].mean()) for phase in range(BLOCK))
        ratios.append(1.0 if phases[-2] < FLAT_PHASE else phases[-1] / phases[-2])
    return float(np.mean(ratios))


def _percentile_levels(histogram: np.ndarray, shares: Iterable[float]) -> list[int]:
    """The lowest level at which the cumulative histogram reaches each share of the pixels."""
    cumulative = np.cumsum(histogram)
    return [int(np.searchsorted(cumulative, share * cumulative[-1])) for share in shares]


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Thresholds:
    """Where each measure flags; calibrated by ``bench/quality_calibration.py``. A ``min_``
    threshold of 0 (or a ``max_`` fraction of 1) never flags."""

    min_focus: float = 0.9
    min_detail: float = 0.06
    min_jpeg_quality: int = 30
    max_blockiness: float = 1.5
    max_clipped_highlights: float = 0.15
    max_clipped_shadows: float = 0.3
    min_contrast: float = 0.18
    relative_focus: float = 0.5


@dataclass(frozen=True)
class Flag:
    """One code an image is flagged with: the measure, its value, the threshold it crossed and
    the rule that set it (``< min_focus 0.9``)."""

    code: str
    measure: str
    value: float
    threshold: float
    rule: str

    @property
    def detail(self) -> str:
        """``focus 0.512 < min_focus 0.9``: what a drop or a report line says."""
        return f"{self.measure} {self.value:.3g} {self.rule}"

    def as_dict(self) -> dict[str, str | float]:
        return {
            "code": self.code,
            "measure": self.measure,
            "value": round(self.value, 4),
            "threshold": round(self.threshold, 4),
            "rule": self.rule,
        }


# code, measure, threshold key, whether the measure flags below (True) or above the threshold
_RULES = (
    (BLURRY, "focus", "min_focus", True),
    (UPSCALED, "detail", "min_detail", True),
    (JPEG_ARTIFACTS, "jpeg_quality", "min_jpeg_quality", True),
    (JPEG_ARTIFACTS, "blockiness", "max_blockiness", False),
    (OVEREXPOSED, "clipped_highlights", "max_clipped_highlights", False),
    (UNDEREXPOSED, "clipped_shadows", "max_clipped_shadows", False),
    (LOW_CONTRAST, "contrast", "min_contrast", True),
)


def flags(measures: Measures, thresholds: Thresholds) -> list[Flag]:
    """The absolute flags of one image, in ``CODES`` order."""
    found = []
    for code, name, key, below in _RULES:
        value = getattr(measures, name)
        limit = getattr(thresholds, key)
        if value is None or not (value < limit if below else value > limit):
            continue
        sign = "<" if below else ">"
        found.append(Flag(code, name, value, limit, f"{sign} {key} {limit:g}"))
    return found


def set_median_focus(values: Sequence[float]) -> float | None:
    """The median focus of a set, or None for a set too small for the relative check."""
    if len(values) < MIN_RELATIVE_SET:
        return None
    return float(np.median(values))


def relative_flag(measures: Measures, median: float | None, factor: float) -> Flag | None:
    """``blurry`` for an image whose focus is far below the set's: under ``factor`` times the
    median. Catches a soft image in a set sharper than the absolute threshold assumes."""
    if median is None or factor == 0:
        return None
    limit = factor * median
    if measures.focus >= limit:
        return None
    rule = f"< relative_focus {factor:g} x set median {median:.3g} = {limit:.3g}"
    return Flag(BLURRY, "focus", measures.focus, limit, rule)


def verdict(measures: Measures, thresholds: Thresholds, median: float | None) -> list[Flag]:
    """Every flag of one image: the absolute ones, and the relative focus check when the
    absolute one did not already call it blurry."""
    found = flags(measures, thresholds)
    if not any(flag.code == BLURRY for flag in found):
        relative = relative_flag(measures, median, thresholds.relative_focus)
        if relative:
            found.insert(0, relative)
    return found
