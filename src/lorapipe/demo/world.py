"""A procedural image world with ground truth, so every pipeline stage can be measured on CPU.

Scenes are a few flat shapes (shape, colour, count, position) on a plain neutral background,
optionally in the ``filmstyle`` style (a warm sepia grade with faded blacks and a dark
vignette: the thing a LoRA should learn) and with known defects (blur, grain, over-exposure, a
"SAMPLE" watermark: the things a negative prompt should remove). Every scene has a caption,
ground-truth tags and, for the style and each defect, a pure-computation statistic.

Scenes render square or at any (width, height). Positions are fractions of each side and an
object's radius one length in pixels, so a portrait or landscape scene spreads over its whole
frame (a portrait's column of objects runs down its whole height) with round circles; the
vignette follows the frame, and the watermark plate keeps its shape in the bottom-right corner.
A square renders exactly as it did before frames existed, so the committed base model and
tagger, trained on squares, keep their meaning.

The statistics are measured on a copy of the image with a short side of ``ANALYSIS_SIZE`` (64)
px at the image's own aspect: 64 is the resolution the demo model generates at, so a 512 px
training image and a 64 px generated one are on one scale, and a pixel of the copy is the same
share of the short side in every frame, so an edge, the grain and the plate measure as on a
square. The style and the defects are drawn at sizes relative to the image for the same
reason: they survive the resize to 64 px that training applies. The style is deliberately
coarse (a grade and a vignette, no fine texture): the demo model's 8 x 8 latents can carry it.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from lorapipe.image_metrics import highlight_clipping, luma, to_rgb_array

SHAPES = ("circle", "square", "triangle")
# saturated, and no channel above 225, so a clean render never clips (overexposure_score 0)
COLOURS = {
    "red": (210, 45, 45),
    "green": (40, 165, 70),
    "blue": (45, 80, 210),
    "yellow": (225, 195, 40),
    "purple": (140, 60, 180),
}
POSITIONS = ("left", "middle", "right")
# neutral, so a colour grade is the only thing that tints them (style_score reads that tint)
BACKGROUNDS = {"white": (216, 215, 212), "grey": (128, 128, 128), "black": (34, 36, 42)}
DEFECTS = ("blurry", "grainy", "overexposed", "watermark")
STYLE = "filmstyle"

ANALYSIS_SIZE = 64
# an object edge, for blur_score: a slope that rises this many levels, measured out to where
# its steps fall below EDGE_FLOOR of the steepest one, at most EDGE_REACH pixels a side
EDGE_CONTRAST, EDGE_FLOOR, EDGE_REACH = 40.0, 0.3, 4
VIGNETTE = 0.5  # how much the grade darkens the corners: luma x (1 - VIGNETTE * r^2), r = 1 there
# the object-free bands along the top and bottom edges (fractions of the height), where
# style_score reads the vignette
_EDGE_BANDS = ((0.0, 0.07), (0.96, 1.0))
WATERMARK_TEXT = "SAMPLE"
# the watermark's plate (left, top, right, bottom) on a square, in the bottom-right corner below
# every object; ``_watermark_box`` places it in other frames
WATERMARK_BOX = (0.52, 0.82, 0.96, 0.95)
OBJECT_TOP, OBJECT_BOTTOM = 0.08, 0.74  # fractions of the height
# objects are sized by the height, at most this many widths: beyond a 2:3 portrait they would
# not fit in their third of the width
OBJECT_SCALE_MAX_WIDTHS = 1.5

_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_POSITION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
_POSITION_X = {"left": 0.22, "middle": 0.5, "right": 0.78}
# stroke letters on a unit box (x right, y down): deterministic on every Pillow, no font files
_LETTERS = {
    "S": [[(1, 0), (0, 0), (0, 0.5), (1, 0.5), (1, 1), (0, 1)]],
    "A": [[(0, 1), (0.5, 0), (1, 1)], [(0.25, 0.55), (0.75, 0.55)]],
    "M": [[(0, 1), (0, 0), (0.5, 0.5), (1, 0), (1, 1)]],
    "P": [[(0, 1), (0, 0), (1, 0), (1, 0.5), (0, 0.5)]],
    "L": [[(0, 0), (0, 1), (1, 1)]],
    "E": [[(1, 0), (0, 0), (0, 1), (1, 1)], [(0, 0.5), (0.8, 0.5)]],
}


@dataclass(frozen=True)
class Scene:
    """One image's ground truth: what is drawn, which defects spoil it, whether it is styled."""

    shape: str
    colour: str
    count: int
    position: str
    background: str
    defects: tuple[str, ...] = ()
    styled: bool = False

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if self.count not in _COUNT_WORDS:
            raise ValueError(f"count must be 1, 2 or 3, got {self.count!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS}")
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {self.background!r}; expected one of {tuple(BACKGROUNDS)}"
            )
        unknown = [defect for defect in self.defects if defect not in DEFECTS]
        if unknown:
            raise ValueError(f"unknown defects {unknown}; expected some of {DEFECTS}")


def sample_scenes(
    count: int, *, seed: int, styled_fraction: float = 0.0, defect_rate: float = 0.0
) -> list[Scene]:
    """``count`` deterministic scenes, balanced rather than i.i.d. so small sets are varied:
    contents walk a shuffled grid of every (shape, colour, count, position, background), so no
    content repeats before all 405 have appeared; exactly ``round(count * styled_fraction)``
    are styled and ``round(count * defect_rate)`` carry one defect each, the defects in turn.
    Defects go to unstyled scenes first, so a LoRA trained on the styled subset learns the
    style, not the defects."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    for name, value in (("styled_fraction", styled_fraction), ("defect_rate", defect_rate)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    rng = np.random.default_rng(seed)
    grid = [
        (shape, colour, number, position, background)
        for shape in SHAPES
        for colour in COLOURS
        for number in _COUNT_WORDS
        for position in POSITIONS
        for background in BACKGROUNDS
    ]
    contents: list[tuple[str, str, int, str, str]] = []
    while len(contents) < count:
        contents.extend(grid[index] for index in rng.permutation(len(grid)))
    contents = contents[:count]

    order = rng.permutation(count)
    styled = set(order[: round(count * styled_fraction)].tolist())
    # unstyled scenes first (in shuffled order), then styled ones if defects outnumber them
    candidates = [i for i in order.tolist() if i not in styled] + [
        i for i in order.tolist() if i in styled
    ]
    first_defect = int(rng.integers(len(DEFECTS)))
    defects = {
        index: (DEFECTS[(first_defect + turn) % len(DEFECTS)],)
        for turn, index in enumerate(candidates[: round(count * defect_rate)])
    }
    return [
        Scene(*content, defects=defects.get(index, ()), styled=index in styled)
        for index, content in enumerate(contents)
    ]


def render(scene: Scene, size: int | tuple[int, int] = 512, *, seed: int = 0) -> Image.Image:
    """The scene as an RGB image of ``size`` px (a square) or ``(width, height)``,
    deterministic in (scene, size, seed); ``(n, n)`` is the same image as ``n``. The layout
    (object size and jitter, light falloff) depends only on (scene, seed, aspect), so one
    scene at 64 and at 512 px is the same picture."""
    width, height = _frame(size)
    short = min(width, height)
    layout = np.random.default_rng([seed, zlib.crc32(repr(scene).encode())])
    # a square seeds its noise as before frames existed, so its pixels do not change
    frame_seed = [width] if width == height else [width, height]
    noise = np.random.default_rng([seed, zlib.crc32(repr(scene).encode()), *frame_seed])

    # background with a gentle vertical light falloff and faint sensor noise, so clean images
    # are not perfectly flat
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    tilt = float(layout.uniform(-0.04, 0.04))
    pixels = np.empty((height, width, 3))
    pixels[:] = BACKGROUNDS[scene.background]
    pixels *= 1.0 + tilt * (2.0 * rows - 1.0)
    image = Image.fromarray(_to_uint8(pixels))

    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    for centre_x, centre_y, across, down in _layout(scene, layout, width, height):
        box = [(centre_x - across) * width, (centre_y - down) * height]
        box += [(centre_x + across) * width, (centre_y + down) * height]
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            apex = (centre_x * width, box[1])
            draw.polygon([apex, (box[2], box[3]), (box[0], box[3])], fill=fill)
    pixels = to_rgb_array(image) + noise.normal(0.0, 1.5, size=(height, width, 1))

    if scene.styled:
        pixels = _film_style(pixels)
    if "blurry" in scene.defects:
        blurred = Image.fromarray(_to_uint8(pixels)).filter(ImageFilter.GaussianBlur(0.03 * short))
        pixels = to_rgb_array(blurred)
    if "overexposed" in scene.defects:
        pixels = pixels * 1.9 + 95.0
    if "grainy" in scene.defects:
        pixels = pixels + _grain(width, height, noise)[..., None]
    image = Image.fromarray(_to_uint8(pixels))
    if "watermark" in scene.defects:
        image = _watermark(image)
    return image


def caption(scene: Scene, *, trigger: str = STYLE) -> str:
    """The training caption, e.g. ``"filmstyle, two red circles on the left, white background,
    blurry"``: the trigger word only when styled, defects as trailing tags (how a negative
    prompt names them)."""
    if scene.count == 1:
        objects = f"a {scene.colour} {scene.shape}"
    else:
        objects = f"{_COUNT_WORDS[scene.count]} {scene.colour} {scene.shape}s"
    parts = [trigger] if scene.styled else []
    parts.append(f"{objects} {_POSITION_PHRASES[scene.position]}")
    parts.append(f"{scene.background} background")
    parts.extend(scene.defects)
    return ", ".join(parts)


def tags(scene: Scene) -> list[str]:
    """DeepDanbooru-like ground-truth tags, the labels a tagger is trained and scored on."""
    result = [f"{scene.colour} {scene.shape}", scene.shape, scene.colour]
    if scene.count == 1:
        result.append("one object")
    else:
        result += [f"{_COUNT_WORDS[scene.count]} objects", "multiple objects"]
    result += [_POSITION_PHRASES[scene.position], f"{scene.background} background"]
    result += list(scene.defects)
    if scene.styled:
        result.append(STYLE)
    return result


def style_score(image: Image.Image | np.ndarray) -> float:
    """How much ``filmstyle`` an image shows: warmth + vignette, both about 0 on an unstyled
    render and about 1 on a styled one. (Over-exposure erases both.)

    warmth: median over pixels of (R - B) / (luma + 20), over 0.3 (about the grade's value);
    the median pixel is background, neutral in every unstyled scene. vignette: along the top
    and bottom edge bands (where no object or watermark is drawn), how much darker the ends
    are than the centre, relative to the centre, over 0.2 (what ``VIGNETTE`` gives there); the
    world's light falloff is vertical, so unstyled rows are flat. The bands and their ends are
    fractions of the frame, as the vignette is, so a portrait or landscape image reads as a
    square does."""
    rgb = _analysis_rgb(image)
    y = luma(rgb)
    warmth = float(np.median((rgb[..., 0] - rgb[..., 2]) / (y + 20.0))) / 0.3
    height, width = y.shape
    end = round(0.12 * width)
    darkening = []
    for top, bottom in _EDGE_BANDS:
        band = y[int(top * height) : max(int(top * height) + 1, int(bottom * height))]
        centre = float(np.median(band[:, width // 2 - end : width // 2 + end]))
        ends = float(np.median(np.concatenate([band[:, :end], band[:, -end:]], axis=1)))
        darkening.append((centre - ends) / (centre + 20.0))
    vignette = float(np.mean(darkening)) / 0.2
    return max(0.0, warmth) + max(0.0, vignette)


def blur_score(image: Image.Image | np.ndarray) -> float:
    """How wide the object edges are, 0 (a hard step) to about 0.7 (smeared): 1 minus the mean
    share of an edge's rise that happens within its steepest 3 pixels, over the strong edges
    along rows and columns of each RGB channel (a green shape on grey has almost no luma
    edge). An edge runs from a step, the steepest within ``EDGE_REACH`` pixels, outwards while
    each step keeps its direction and at least ``EDGE_FLOOR`` of the steepest one's size, up
    to ``EDGE_REACH`` pixels a side; only edges that rise ``EDGE_CONTRAST`` levels count, so
    flat areas, smooth light falloff, grain and a decoder's texture are not measured. Ending
    the edge where its slope ends (as Marziliano et al.'s edge width does) reads an
    over-sharpened edge, whose halo slopes the other way, as sharp; nan for an image without
    an edge (flat, or too grainy to show one): it cannot tell."""
    rgb = _analysis_rgb(image)
    rows, columns = rgb.transpose(2, 0, 1), rgb.transpose(2, 1, 0)
    shares = np.concatenate([_central_shares(rows), _central_shares(columns)])
    if shares.size == 0:
        return float("nan")
    return float(1.0 - shares.mean())


def _central_shares(lines: np.ndarray) -> np.ndarray:
    """For each strong edge along ``lines`` (channels x lines x pixels), the share of its rise
    within its steepest 3 pixels (``blur_score``'s edges)."""
    steps = np.diff(lines.reshape(-1, lines.shape[-1]), axis=1)
    padded = np.pad(steps, ((0, 0), (EDGE_REACH, EDGE_REACH)))
    around = np.lib.stride_tricks.sliding_window_view(padded, 2 * EDGE_REACH + 1, axis=1)
    centre = around[..., EDGE_REACH]
    steepest = (np.abs(around).argmax(axis=2) == EDGE_REACH) & (centre != 0)
    on_slope = np.sign(centre)[..., None] * around >= EDGE_FLOOR * np.abs(centre)[..., None]
    rightwards = np.cumprod(on_slope[..., EDGE_REACH:], axis=2)
    leftwards = np.cumprod(on_slope[..., EDGE_REACH::-1], axis=2)[..., :0:-1]
    in_edge = np.concatenate([leftwards, rightwards], axis=2).astype(bool)
    rise = np.where(in_edge, around, 0.0).sum(axis=2)
    edges = steepest & (np.abs(rise) >= EDGE_CONTRAST)
    middle = slice(EDGE_REACH - 1, EDGE_REACH + 2)
    central_rise = np.where(in_edge[..., middle], around[..., middle], 0.0).sum(axis=2)
    return central_rise[edges] / rise[edges]


def grain_score(image: Image.Image | np.ndarray) -> float:
    """Grain strength in luma levels (0-255): median |pixel - mean of its left and right
    neighbours|. The median ignores the few edge pixels."""
    y = luma(_analysis_rgb(image))
    residual = y[:, 1:-1] - 0.5 * (y[:, :-2] + y[:, 2:])
    return float(np.median(np.abs(residual)))


def overexposure_score(image: Image.Image | np.ndarray) -> float:
    """Fraction of pixels with a channel clipped (>= 250), ``image_metrics.highlight_clipping``
    at the analysis size: clean renders never reach 250."""
    return highlight_clipping(_analysis_rgb(image))


def watermark_score(image: Image.Image | np.ndarray) -> float:
    """How much the watermark's box and the same box mirrored into the other bottom corner
    differ in mean luma (0-1): a matched filter for the one watermark the world draws, on
    either side (flip augmentation mirrors it). No object reaches below ``OBJECT_BOTTOM``, and
    the light falloff and the style's vignette are left-right symmetric, so everything but a
    plate cancels. The box is where ``render`` puts the plate in the image's frame."""
    y = luma(_analysis_rgb(image))
    height, width = y.shape
    rows, columns = _watermark_region(width, height)
    plate = y[rows, columns]
    mirrored = y[rows, width - columns.stop : width - columns.start][:, ::-1]
    return float(abs(plate.mean() - mirrored.mean()) / 255.0)


def write_world_folder(
    folder: str | Path,
    count: int,
    *,
    seed: int,
    size: int | tuple[int, int] = 512,
    styled_fraction: float = 0.0,
    defect_rate: float = 0.0,
) -> Path:
    """A training folder of ``count`` rendered scenes: ``world_NNNN.png``, a lora-scripts
    ``metadata.csv`` (filename,text) and ``ground_truth.json`` ({filename: {"scene", "tags"}})
    for scoring the tagger and the generated images. Deterministic in its arguments."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(
        count, seed=seed, styled_fraction=styled_fraction, defect_rate=defect_rate
    )
    rows = []
    truth = {}
    for index, scene in enumerate(scenes):
        name = f"world_{index:04d}.png"
        render(scene, size, seed=seed * 100_003 + index).save(folder / name)
        rows.append((name, caption(scene)))
        truth[name] = {"scene": asdict(scene), "tags": tags(scene)}
    write_metadata_csv(folder / "metadata.csv", rows)
    (folder / "ground_truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return folder


def write_metadata_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """lora-scripts' ``metadata.csv``: a ``filename,text`` header, then one row per image."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["filename", "text"])
        writer.writerows(rows)


def _layout(
    scene: Scene, rng: np.random.Generator, width: int, height: int
) -> list[tuple[float, float, float, float]]:
    """(centre x, centre y, radius across, radius down) of each object, as fractions of the
    width and the height: stacked in the position's column between ``OBJECT_TOP`` and
    ``OBJECT_BOTTOM`` (in a portrait frame, over its whole height), jittered, and above the
    watermark plate. The radius is one length in pixels, so shapes keep their proportions, and
    a share of the height, the column's length (up to ``OBJECT_SCALE_MAX_WIDTHS``): a column
    of three fits any frame as it fits a square, and a portrait shrunk to fit a square (as
    the tagger sees it) shows objects as large as a square does."""
    radius = {1: 0.14, 2: 0.11, 3: 0.085}[scene.count] * float(rng.uniform(0.85, 1.1))
    scale = min(height, OBJECT_SCALE_MAX_WIDTHS * width)
    # scale / side is exactly 1 on a square, so square renders keep their pixels
    across, down = radius * (scale / width), radius * (scale / height)
    top, bottom = OBJECT_TOP + down, OBJECT_BOTTOM - down
    if scene.count == 1:
        centres_y = [float(rng.uniform(top, bottom))]
    else:
        centres_y = list(np.linspace(top, bottom, scene.count))
    base_x = _POSITION_X[scene.position]
    objects = []
    for index, centre_y in enumerate(centres_y):
        # a zig-zag so several objects do not form a rigid column
        offset = 0.0 if scene.count == 1 else (0.04 if index % 2 else -0.04)
        centre_x = base_x + offset + float(rng.uniform(-0.02, 0.02))
        centre_x = min(max(centre_x, across + 0.02), 0.98 - across)
        objects.append((centre_x, centre_y, across, down))
    return objects


def _film_style(pixels: np.ndarray) -> np.ndarray:
    """``filmstyle``: 40 % of a sepia grade mixed in, warm lifted blacks (faded film), then a
    vignette that darkens towards the frame's corners (``VIGNETTE``; an ellipse in a portrait
    or landscape frame)."""
    sepia = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
    graded = 0.5 * pixels + 0.4 * (pixels @ sepia.T)
    graded = 0.88 * graded + np.array([28.0, 16.0, 0.0])
    height, width = pixels.shape[:2]
    down = (np.arange(height) + 0.5) / height * 2.0 - 1.0
    across = (np.arange(width) + 0.5) / width * 2.0 - 1.0
    radius_squared = (down[:, None] ** 2 + across[None, :] ** 2) / 2.0
    return graded * (1.0 - VIGNETTE * radius_squared)[..., None]


def _grain(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Luma grain: coarse noise on the analysis grid (64 cells on the short side: what
    survives a resize to 64 px) plus fine per-pixel noise (what a 512 px image shows up
    close)."""
    grid_width, grid_height = _analysis_frame(width, height)
    coarse = rng.normal(0.0, 32.0, size=(grid_height, grid_width)).astype(np.float32)
    coarse_image = Image.fromarray(coarse).resize((width, height), Image.Resampling.NEAREST)
    fine = rng.normal(0.0, 18.0, size=(height, width))
    return np.asarray(coarse_image, dtype=np.float64) + fine


def _watermark(image: Image.Image) -> Image.Image:
    """A stock-photo watermark: a 75 %-opaque white plate over ``_watermark_box`` with
    ``WATERMARK_TEXT`` cut out of it. Bold enough to survive the VAE's 8x downsampling, where
    thin letters alone do not."""
    plate = Image.new("L", image.size, 0)
    ImageDraw.Draw(plate).rectangle(list(_watermark_box(*image.size)), fill=191)
    opacity = ImageChops.subtract(plate, _letters_mask(*image.size))
    return Image.composite(Image.new("RGB", image.size, (255, 255, 255)), image, opacity)


def _letters_mask(width: int, height: int) -> Image.Image:
    """The watermark's letter strokes in a ``width`` x ``height`` frame (255 on the strokes,
    else 0)."""
    left, top, right, bottom = _watermark_box(width, height)
    cell = (right - left) / len(WATERMARK_TEXT)
    letter_width, letter_height = 0.72 * cell, bottom - top
    stroke = max(1, round(0.018 * min(width, height)))
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for index, letter in enumerate(WATERMARK_TEXT):
        x0 = left + index * cell
        for line in _LETTERS[letter]:
            points = [(x0 + x * letter_width, top + y * letter_height) for x, y in line]
            draw.line(points, fill=255, width=stroke, joint="curve")
    return mask


def _watermark_box(width: int, height: int) -> tuple[float, float, float, float]:
    """``WATERMARK_BOX`` in pixels of a ``width`` x ``height`` frame: its right and bottom
    edges at the same fractions of the frame as on a square, its size a share of the short side
    (the letters keep their shape), so it stays in the bottom-right corner below every object.
    On a square the extra length is 0 and the box is exactly ``WATERMARK_BOX`` x side."""
    short = min(width, height)
    extra_x, extra_y = width - short, height - short
    left, top, right, bottom = WATERMARK_BOX
    return (
        left * short + right * extra_x,
        top * short + bottom * extra_y,
        right * short + right * extra_x,
        bottom * short + bottom * extra_y,
    )


def _watermark_region(width: int, height: int) -> tuple[slice, slice]:
    """Rows and columns of the pixels inside ``_watermark_box``."""
    left, top, right, bottom = _watermark_box(width, height)
    rows = slice(math.ceil(top), int(bottom))
    return rows, slice(math.ceil(left), int(right))


def _frame(size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a render size: an int is a square."""
    width, height = (size, size) if isinstance(size, int) else size
    if min(width, height) < 16:
        raise ValueError(f"size must be >= 16 px a side, got {size}")
    return width, height


def _analysis_frame(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the analysis copy: ``ANALYSIS_SIZE`` on the short side, the
    image's aspect kept."""
    short = min(width, height)
    return round(ANALYSIS_SIZE * width / short), round(ANALYSIS_SIZE * height / short)


def _analysis_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """The image with a short side of ``ANALYSIS_SIZE`` px at its own aspect (area
    resampling), float 0-255."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(_to_uint8(to_rgb_array(image)))
    image = image.convert("RGB")
    target = _analysis_frame(*image.size)
    if image.size != target:
        image = image.resize(target, Image.Resampling.BOX)
    return to_rgb_array(image)


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
