"""Contact sheets, as WebUI's X/Y/Z plot draws them: two axes of the grid across and down
(``grid_x``, ``grid_y``), one sheet per combination of the other axes' values.

:func:`draw_grid` is the drawer, usable for any labelled grid of image files (the select stage
draws checkpoint x seed grids of training samples with it): a sheet stays readable however many
values X has, because X wraps into bands stacked down the sheet, each repeating the column
labels, until the sheet is at most about 3:1.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont

from lorapipe.generation.grid import Cell, group_by, safe_name
from lorapipe.generation.layout import IMAGES_DIR, SHEETS_DIR
from lorapipe.generation.report import SheetSection

if TYPE_CHECKING:
    from lorapipe.stages.generate import GenerateConfig

GAP = 4
TITLE_HEIGHT = 28
HEADER_HEIGHT = 24  # a band's column labels
BAND_GAP = 12
ROW_LABEL_WIDTH = 180
ROW_LABEL_LINES = 3
LINE_HEIGHT = 16
MIN_WIDTH = 400  # room for the title
MAX_ASPECT = 3.0  # width / height a sheet stays under, wrapping X into bands
MISSING_GREY = (200, 200, 200)


# --------------------------------------------------------------------------- the drawer


@dataclass(frozen=True)
class Axis:
    """One direction of a sheet: what varies along it and a label per value, in order."""

    name: str
    labels: Sequence[str]


@dataclass(frozen=True)
class SheetLayout:
    """Where a sheet's parts go: X wrapped into ``bands`` of ``columns`` cells, each band its
    column labels above ``rows`` rows of cells of ``cell`` (width, height) pixels."""

    columns: int
    bands: int
    rows: int
    cell: tuple[int, int]

    @property
    def band_height(self) -> int:
        return HEADER_HEIGHT + self.rows * (self.cell[1] + GAP) + BAND_GAP

    @property
    def size(self) -> tuple[int, int]:
        width = ROW_LABEL_WIDTH + self.columns * (self.cell[0] + GAP) + GAP
        return max(MIN_WIDTH, width), TITLE_HEIGHT + self.bands * self.band_height

    def band_top(self, band: int) -> int:
        return TITLE_HEIGHT + band * self.band_height

    def box(self, x: int, y: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the cell of X value ``x`` and Y value ``y``."""
        band, column = divmod(x, self.columns)
        left = ROW_LABEL_WIDTH + GAP + column * (self.cell[0] + GAP)
        top = self.band_top(band) + HEADER_HEIGHT + y * (self.cell[1] + GAP)
        return left, top, left + self.cell[0], top + self.cell[1]

    def centre(self, x: int, y: int) -> tuple[int, int]:
        left, top, right, bottom = self.box(x, y)
        return (left + right) // 2, (top + bottom) // 2


def sheet_layout(
    x_count: int, y_count: int, cell: tuple[int, int], max_aspect: float = MAX_ASPECT
) -> SheetLayout:
    """The fewest bands (the widest sheet) whose width is at most ``max_aspect`` times its
    height: a long X wraps, but never into a needlessly tall column."""
    for bands in range(1, x_count + 1):
        columns = -(-x_count // bands)
        if -(-x_count // columns) != bands:
            continue  # the same layout as fewer bands
        layout = SheetLayout(columns, bands, y_count, cell)
        width, height = layout.size
        if width <= max_aspect * height:
            return layout
    return SheetLayout(1, max(1, x_count), y_count, cell)


def cell_size(images: Iterable[Path], thumb_short_side: int) -> tuple[int, int]:
    """The cell every thumbnail fits in with ``thumb_short_side`` pixels on its short side:
    images of different aspect share equal cells, letterboxed, not stretched."""
    width = height = thumb_short_side
    for path in images:
        if not path.is_file():
            continue
        with Image.open(path) as image:
            scale = thumb_short_side / min(image.size)
            width = max(width, round(image.width * scale))
            height = max(height, round(image.height * scale))
    return width, height


def draw_grid(
    title: str,
    x_axis: Axis,
    y_axis: Axis,
    images: Mapping[tuple[int, int], Path],
    *,
    thumb_short_side: int = 256,
    max_aspect: float = MAX_ASPECT,
) -> Image.Image:
    """A labelled sheet of thumbnails: ``images`` maps (x, y) value indices to image files;
    columns are labelled "name label" of ``x_axis``, rows of ``y_axis`` (on up to three
    lines); a cell without a file (an image that failed) is an empty grey box. The layout is
    :func:`sheet_layout` of :func:`cell_size`."""
    layout = sheet_layout(
        len(x_axis.labels),
        len(y_axis.labels),
        cell_size(images.values(), thumb_short_side),
        max_aspect,
    )
    sheet = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    draw.text((8, 6), fit_text(draw, title, font, sheet.width - 16), fill="black", font=font)
    cell_width, cell_height = layout.cell
    for band in range(layout.bands):
        top = layout.band_top(band)
        for x in range(band * layout.columns, min(len(x_axis.labels), (band + 1) * layout.columns)):
            left = layout.box(x, 0)[0]
            label = fit_text(draw, f"{x_axis.name} {x_axis.labels[x]}", font, cell_width)
            draw.text((left, top + 4), label, fill="black", font=font)
        for y, text in enumerate(y_axis.labels):
            lines = wrap_text(draw, f"{y_axis.name} {text}", font, ROW_LABEL_WIDTH - 12)
            row_top = layout.box(band * layout.columns, y)[1]
            line_top = row_top + (cell_height - len(lines) * LINE_HEIGHT) // 2
            for number, line in enumerate(lines):
                draw.text((8, line_top + number * LINE_HEIGHT), line, fill="black", font=font)
    for x in range(len(x_axis.labels)):
        for y in range(len(y_axis.labels)):
            box = layout.box(x, y)
            path = images.get((x, y))
            if path is None or not path.is_file():
                draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=MISSING_GREY)
                continue
            with Image.open(path) as image:
                scale = min(cell_width / image.width, cell_height / image.height)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                thumbnail = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            offset = ((cell_width - size[0]) // 2, (cell_height - size[1]) // 2)
            sheet.paste(thumbnail, (box[0] + offset[0], box[1] + offset[1]))
    return sheet


# --------------------------------------------------------------------------- labels


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text``, or its longest prefix that fits ``width`` pixels with an ellipsis after it
    (just the ellipsis if none does). Measured on prefixes of doubling length, then a binary
    search below the first too wide: the cost follows what fits, so a 100,000-character
    prompt costs what a line of it does."""
    fitting = _fitting_prefix(draw, text, font, width)
    if fitting == len(text):
        return text
    # text[:fitting + 1] is too wide, so no longer prefix fits with the ellipsis either
    return text[: _fitting_prefix(draw, text[: fitting + 1], font, width, "…")] + "…"


def wrap_text(
    draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, lines: int = ROW_LABEL_LINES
) -> list[str]:
    """``text`` on up to ``lines`` lines of ``width`` pixels, broken at spaces where one falls
    on the line, the last line fitted with an ellipsis."""
    wrapped: list[str] = []
    rest = text
    while len(wrapped) < lines - 1:
        fitting = _fitting_prefix(draw, rest, font, width)
        if fitting == len(rest):
            return [*wrapped, rest]
        if fitting == 0:
            break
        space = rest.rfind(" ", 0, fitting + 1)
        cut = space if space > 0 else fitting
        wrapped.append(rest[:cut])
        rest = rest[cut:].lstrip()
    return [*wrapped, fit_text(draw, rest, font, width)]


def _fitting_prefix(
    draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, suffix: str = ""
) -> int:
    """The length of the longest prefix of ``text`` that fits ``width`` with ``suffix`` after
    it (0 if none does). Widths grow with prefixes; prefixes of 32, 64, 128, ... characters are
    measured until one is too wide, then the cut is searched between the last two."""
    fits, probe = 0, 32
    while draw.textlength(text[:probe] + suffix, font=font) <= width:
        if probe >= len(text):
            return len(text)
        fits, probe = probe, 2 * probe
    too_long = min(probe, len(text))
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if draw.textlength(text[:middle] + suffix, font=font) <= width:
            fits = middle
        else:
            too_long = middle
    return fits


# --------------------------------------------------------------------------- generate's sheets


@dataclass(frozen=True)
class SheetAxis:
    """An axis of the generate grid as the sheets show it."""

    name: str  # as grid_x / grid_y name it
    title: str  # as a sheet labels it
    value: Callable[[Cell], Hashable]
    label: Callable[[Cell], str]  # the cell's value as its row or column label
    heading: Callable[[Cell], str]  # the cell's value in a sheet's title
    file_part: Callable[[Cell], str]  # ... and in its file name
    always_named: bool = False  # in every title and file name (as sheets were before axes)


def _scale(cell: Cell) -> str:
    return "as tagged" if cell.lora_scale is None else f"{cell.lora_scale:g}"


GRID_AXES: dict[str, SheetAxis] = {
    axis.name: axis
    for axis in (
        SheetAxis(
            "prompt",
            "prompt",
            value=lambda c: c.prompt_index,
            label=lambda c: f"{c.prompt_index + 1}: {c.parsed.plain_text}",
            heading=lambda c: f"prompt {c.prompt_index + 1}",
            file_part=lambda c: f"p{c.prompt_index + 1:02d}",
            always_named=True,
        ),
        SheetAxis(
            "negative",
            "negative preset",
            value=lambda c: c.negative_preset,
            label=lambda c: c.negative_preset,
            heading=lambda c: c.negative_preset,
            file_part=lambda c: safe_name(c.negative_preset),
            always_named=True,
        ),
        SheetAxis(
            "size",
            "size",
            value=lambda c: c.size,
            label=lambda c: c.size,
            heading=lambda c: c.size,
            file_part=lambda c: c.size,
            always_named=True,
        ),
        SheetAxis(
            "checkpoint",
            "checkpoint",
            value=lambda c: c.checkpoint,
            label=lambda c: c.checkpoint or "as loaded",
            heading=lambda c: c.checkpoint or "as loaded",
            file_part=lambda c: safe_name(c.checkpoint or "loaded"),
        ),
        SheetAxis(
            "sampler",
            "sampler",
            value=lambda c: c.sampler,
            label=lambda c: c.sampler,
            heading=lambda c: c.sampler,
            file_part=lambda c: safe_name(c.sampler),
        ),
        SheetAxis(
            "steps",
            "steps",
            value=lambda c: c.steps,
            label=lambda c: str(c.steps),
            heading=lambda c: f"{c.steps} steps",
            file_part=lambda c: f"steps{c.steps}",
        ),
        SheetAxis(
            "lora_scale",
            "LoRA scale",
            value=lambda c: c.lora_scale,
            label=_scale,
            heading=lambda c: f"LoRA {_scale(c)}",
            file_part=lambda c: f"lora{_scale(c).replace('as tagged', '-tagged')}",
        ),
        SheetAxis(
            "cfg",
            "CFG",
            value=lambda c: c.cfg_scale,
            label=lambda c: f"{c.cfg_scale:g}",
            heading=lambda c: f"CFG {c.cfg_scale:g}",
            file_part=lambda c: f"cfg{c.cfg_scale:g}",
        ),
        SheetAxis(
            "seed",
            "seed",
            value=lambda c: c.seed,
            label=lambda c: str(c.seed),
            heading=lambda c: f"seed {c.seed}",
            file_part=lambda c: f"seed{c.seed}",
        ),
    )
}
SHEET_AXES = tuple(GRID_AXES)  # what grid_x and grid_y may name
NEGATIVE_AXES = ("prompt", "negative", "lora_scale", "cfg")  # what a cell's negative follows


def write_contact_sheets(
    directory: Path, cells: Sequence[Cell], config: GenerateConfig
) -> list[SheetSection]:
    """A sheet of ``grid_x`` across and ``grid_y`` down per combination of the values of the
    other axes that have more than one; titled and named after those values (and always its
    prompt, preset and size unless they are on an axis)."""
    x_axis, y_axis = GRID_AXES[config.grid_x], GRID_AXES[config.grid_y]
    others = [axis for axis in GRID_AXES.values() if axis not in (x_axis, y_axis)]
    values = {
        axis.name: list(dict.fromkeys(axis.value(cell) for cell in cells))
        for axis in GRID_AXES.values()
    }
    split = [axis for axis in others if len(values[axis.name]) > 1]
    named = [axis for axis in others if axis.always_named or axis in split]
    xs, ys = values[x_axis.name], values[y_axis.name]
    sheets = []
    for _, group in group_by(cells, lambda cell: tuple(axis.value(cell) for axis in split)):
        first = group[0]
        x_labels = {x_axis.value(cell): x_axis.label(cell) for cell in group}
        y_labels = {y_axis.value(cell): y_axis.label(cell) for cell in group}
        images = {
            (xs.index(x_axis.value(cell)), ys.index(y_axis.value(cell))): (
                directory / IMAGES_DIR / cell.file_name
            )
            for cell in group
        }
        title = " / ".join(axis.heading(first) for axis in named)
        on_axes = "prompt" in (x_axis.name, y_axis.name)
        caption = title if on_axes else f"{title}: {first.parsed.plain_text}"
        image = draw_grid(
            caption,
            Axis(x_axis.title, [x_labels[value] for value in xs]),
            Axis(y_axis.title, [y_labels[value] for value in ys]),
            images,
            thumb_short_side=config.sheet_cell_size,
        )
        file = f"{SHEETS_DIR}/{'_'.join(axis.file_part(first) for axis in named)}.png"
        image.save(directory / file)
        prompts = dict.fromkeys(cell.prompt_index for cell in group)
        sheets.append(
            SheetSection(
                title=title,
                prompt=" · ".join(
                    config.prompts[index]
                    if len(prompts) == 1
                    else f"{index + 1}: {config.prompts[index]}"
                    for index in prompts
                ),
                file=file,
                negatives=_negatives(group, [x_axis, y_axis]),
            )
        )
    return sheets


def _negatives(cells: Sequence[Cell], axes: Sequence[SheetAxis]) -> list[tuple[str, str]]:
    """(which images, negative prompt) of a sheet: one row per value of its axes that the
    negative follows (LoRA scale, CFG, preset, prompt), one for all if none."""
    shown = [axis for axis in axes if axis.name in NEGATIVE_AXES]
    negatives = {
        " / ".join(f"{axis.title} {axis.label(cell)}" for axis in shown) or "every image": (
            cell.negative.text
        )
        for cell in cells
    }
    return list(negatives.items())
