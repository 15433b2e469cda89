"""Contact sheets: any two axes of the grid across and down, a sheet per combination of the
others, readable however many values an axis has; and the labels, fitted fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from generation_helpers import grid
from PIL import Image, ImageDraw, ImageFont

from lorapipe.errors import ConfigError
from lorapipe.generation.grid import Cell
from lorapipe.generation.layout import IMAGES_DIR, SHEETS_DIR
from lorapipe.generation.sheets import (
    GRID_AXES,
    MISSING_GREY,
    Axis,
    cell_size,
    draw_grid,
    fit_text,
    sheet_layout,
    wrap_text,
    write_contact_sheets,
)
from lorapipe.stages.generate import GenerateConfig

WHITE = (255, 255, 255)


def colour(index: int) -> tuple[int, int, int]:
    """A distinct solid colour per image (up to 128), none of them white or grey."""
    return (2 * index, 255 - 2 * index, (5 * index) % 256)


def solid_images(directory: Path, cells: list[Cell]) -> dict[tuple[int, int, int], Cell]:
    """Each cell's image as a solid colour of its own; {colour: cell}."""
    (directory / IMAGES_DIR).mkdir()
    (directory / SHEETS_DIR).mkdir()
    by_colour = {}
    for index, cell in enumerate(cells):
        Image.new("RGB", (cell.width, cell.height), colour(index)).save(
            directory / IMAGES_DIR / cell.file_name
        )
        by_colour[colour(index)] = cell
    return by_colour


def has_text(image: Image.Image, box: tuple[int, int, int, int]) -> bool:
    """Whether anything dark (a label) is drawn inside ``box``."""
    return min(image.crop(box).convert("L").getdata()) < 100


# --------------------------------------------------------------------------- the drawer


def test_each_image_lands_in_its_column_and_row_and_a_missing_one_is_a_grey_box(
    tmp_path: Path,
) -> None:
    images = {}
    for x in range(2):
        for y in range(3):
            images[(x, y)] = tmp_path / f"{x}{y}.png"
            Image.new("RGB", (64, 64), colour(3 * x + y)).save(images[(x, y)])
    del images[(1, 2)]  # an image that failed
    x_axis, y_axis = Axis("LoRA scale", ["0.5", "1"]), Axis("seed", ["1", "2", "3"])
    sheet = draw_grid("prompt 1", x_axis, y_axis, images, thumb_short_side=128)

    layout = sheet_layout(2, 3, cell_size(images.values(), 128))
    assert layout.cell == (128, 128) and sheet.size == layout.size
    for x, y in images:
        assert sheet.getpixel(layout.centre(x, y)) == colour(3 * x + y)
    assert sheet.getpixel(layout.centre(1, 2)) == MISSING_GREY
    # labelled: the column labels above each column, the row labels left of each row
    for x in range(2):
        left, top, right, _ = layout.box(x, 0)
        assert has_text(sheet, (left, top - 20, right, top))
    for y in range(3):
        _, top, _, bottom = layout.box(0, y)
        assert has_text(sheet, (0, top, layout.box(0, y)[0], bottom))


def test_sizes_of_different_aspect_share_equal_cells_letterboxed_not_stretched(
    tmp_path: Path,
) -> None:
    portrait, landscape = tmp_path / "portrait.png", tmp_path / "landscape.png"
    Image.new("RGB", (64, 96), (255, 0, 0)).save(portrait)
    Image.new("RGB", (96, 64), (0, 0, 255)).save(landscape)
    images = {(0, 0): portrait, (1, 0): landscape}
    sheet = draw_grid(
        "t", Axis("size", ["64x96", "96x64"]), Axis("seed", ["1"]), images, thumb_short_side=128
    )
    layout = sheet_layout(2, 1, cell_size(images.values(), 128))
    assert layout.cell == (192, 192)  # each thumbnail keeps 128 px on its short side
    left, top, right, bottom = layout.box(0, 0)  # 128 x 192 centred: 32 px white either side
    middle = (top + bottom) // 2
    assert sheet.getpixel((left + 28, middle)) == WHITE
    assert sheet.getpixel((left + 36, middle)) == (255, 0, 0)
    left, top, right, bottom = layout.box(1, 0)  # 192 x 128: 32 px white above and below
    centre = (left + right) // 2
    assert sheet.getpixel((centre, top + 28)) == WHITE
    assert sheet.getpixel((centre, top + 36)) == (0, 0, 255)


def test_32_values_across_wrap_into_bands_that_repeat_the_column_labels(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    Image.new("RGB", (512, 768), (0, 128, 0)).save(path)
    images = {(x, 0): path for x in range(32)}
    x_axis = Axis("seed", [str(seed) for seed in range(32)])
    sheet = draw_grid("32 seeds", x_axis, Axis("CFG", ["7"]), images, thumb_short_side=128)

    layout = sheet_layout(32, 1, cell_size(images.values(), 128))
    assert layout.bands > 1 and layout.columns * layout.bands >= 32
    assert sheet.width <= 3 * sheet.height and sheet.height <= 3 * sheet.width
    assert min(layout.cell) >= 128
    assert sheet.getpixel(layout.centre(31, 0)) == (0, 128, 0)  # the last, in the last band
    last_band_column = layout.box(31, 0)
    assert has_text(
        sheet,
        (
            last_band_column[0],
            last_band_column[1] - 20,
            *last_band_column[2:3],
            last_band_column[1],
        ),
    )


# --------------------------------------------------------------------------- generate's sheets


def test_the_default_axes_put_lora_scales_across_and_seeds_down_on_one_readable_sheet(
    tmp_path: Path,
) -> None:
    values = {"prompts": ["a street"], "lora_scales": [0, 0.4, 0.8, 1], "seeds": list(range(8))}
    cells = grid(**values)
    by_colour = solid_images(tmp_path, cells)
    (sheet,) = write_contact_sheets(tmp_path, cells, GenerateConfig(**values))

    assert (sheet.file, sheet.title) == ("sheets/p01_base_64x64.png", "prompt 1 / base / 64x64")
    image = Image.open(tmp_path / sheet.file)
    width, height = image.size
    assert width <= 3 * height and height <= 3 * width  # not one row of 32 thumbnails
    layout = sheet_layout(4, 8, (256, 256))  # sheet_cell_size 256 on the short side
    assert image.size == layout.size
    for x, scale in enumerate(values["lora_scales"]):
        for y, seed in enumerate(values["seeds"]):
            cell = by_colour[image.getpixel(layout.centre(x, y))]
            assert (cell.lora_scale, cell.seed) == (scale, seed)
    assert [label for label, _ in sheet.negatives] == [
        "LoRA scale 0",
        "LoRA scale 0.4",
        "LoRA scale 0.8",
        "LoRA scale 1",
    ]


@pytest.mark.parametrize(
    ("grid_x", "grid_y"),
    [("lora_scale", "seed"), ("cfg", "prompt"), ("sampler", "steps"), ("size", "negative")],
)
def test_any_two_axes_make_a_sheet_per_combination_of_the_others(
    tmp_path: Path, grid_x: str, grid_y: str
) -> None:
    values = {
        "prompts": ["a street", "a car"],
        "negative_presets": ["base", "none"],
        "sizes": ["64x64", "128x128"],
        "samplers": ["Euler a", "DDIM"],
        "steps": [10, 20],
        "lora_scales": [0.5, 1.0],
        "cfg_scales": [7.0],  # one value: no sheet of its own
        "seeds": [1, 2],
    }
    cells = grid(**values)
    by_colour = solid_images(tmp_path, cells)
    config = GenerateConfig(**values, grid_x=grid_x, grid_y=grid_y, sheet_cell_size=128)
    sheets = write_contact_sheets(tmp_path, cells, config)

    x_axis, y_axis = GRID_AXES[grid_x], GRID_AXES[grid_y]
    xs = list(dict.fromkeys(x_axis.value(cell) for cell in cells))
    ys = list(dict.fromkeys(y_axis.value(cell) for cell in cells))
    assert len(sheets) == len(cells) // (len(xs) * len(ys))
    assert len({sheet.file for sheet in sheets}) == len(sheets)
    layout = sheet_layout(len(xs), len(ys), (128, 128))
    placed = []
    for sheet in sheets:
        image = Image.open(tmp_path / sheet.file)
        shown = [
            by_colour[image.getpixel(layout.centre(x, y))]
            for x in range(len(xs))
            for y in range(len(ys))
        ]
        for index, cell in enumerate(shown):
            x, y = divmod(index, len(ys))
            assert (x_axis.value(cell), y_axis.value(cell)) == (xs[x], ys[y])
        others = {
            tuple(axis.value(cell) for axis in GRID_AXES.values() if axis not in (x_axis, y_axis))
            for cell in shown
        }
        assert len(others) == 1  # a sheet holds one combination of the other axes' values
        placed += shown
    assert sorted(placed, key=cells.index) == cells  # every image once


def test_each_size_gets_its_own_sheet_named_and_titled_with_the_size(tmp_path: Path) -> None:
    values = {"prompts": ["a street"], "sizes": ["64x96", "96x64"], "seeds": [1, 2]}
    cells = grid(**values)
    solid_images(tmp_path, cells)
    portrait, landscape = write_contact_sheets(tmp_path, cells, GenerateConfig(**values))
    assert (portrait.file, landscape.file) == (
        "sheets/p01_base_64x96.png",
        "sheets/p01_base_96x64.png",
    )
    assert (portrait.title, landscape.title) == (
        "prompt 1 / base / 64x96",
        "prompt 1 / base / 96x64",
    )
    assert Image.open(tmp_path / portrait.file).size == sheet_layout(1, 2, (256, 384)).size
    assert Image.open(tmp_path / landscape.file).size == sheet_layout(1, 2, (384, 256)).size


def test_grid_x_and_grid_y_must_be_two_different_axes() -> None:
    config = GenerateConfig(prompts=["a"], grid_x="seed", grid_y="seed")
    with pytest.raises(ConfigError, match="grid_y is 'seed', the axis grid_x already shows"):
        config.validate()
    with pytest.raises(
        ConfigError, match="grid_x .colour. is not an axis; use one of prompt, negative, size"
    ):
        GenerateConfig(prompts=["a"], grid_x="colour").validate()


# --------------------------------------------------------------------------- labels

FONT = ImageFont.load_default(size=14)


def canvas() -> ImageDraw.ImageDraw:
    return ImageDraw.Draw(Image.new("RGB", (8, 8)))


def shortened_one_character_at_a_time(text: str, width: int) -> str:
    """The rule a label follows, as the slow loop it replaced spelt it."""
    draw = canvas()
    if draw.textlength(text, font=FONT) <= width:
        return text
    while text and draw.textlength(text + "…", font=FONT) > width:
        text = text[:-1]
    return text + "…"


@pytest.mark.parametrize("width", [0, 5, 40, 150, 400, 2000])
def test_a_label_too_wide_keeps_its_longest_prefix_that_fits_then_an_ellipsis(width: int) -> None:
    text = "prompt 1 / portrait / 512x768: street photo in Tokyo rain, 35mm film grain"
    assert fit_text(canvas(), text, FONT, width) == shortened_one_character_at_a_time(text, width)


def measured_characters(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every text measured from now on."""
    measured: list[int] = []
    textlength = ImageDraw.ImageDraw.textlength

    def counting(self, text, *args, **kwargs):
        measured.append(len(text))
        return textlength(self, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "textlength", counting)
    return measured


def test_a_100000_character_label_costs_what_a_short_one_does(monkeypatch) -> None:
    measured = measured_characters(monkeypatch)
    short = fit_text(canvas(), ", ".join(["street"] * 30), FONT, 384)
    short_cost = (len(measured), sum(measured))
    measured.clear()
    huge = ", ".join(["street"] * 12_500)  # 100,000 characters, a 25,000-token prompt
    label = fit_text(canvas(), huge, FONT, 384)
    assert len(measured) <= short_cost[0] + 1
    assert sum(measured) <= 2 * short_cost[1]  # never the whole text, never once per character
    assert label == short and label.endswith("…") and canvas().textlength(label, font=FONT) <= 384


def test_a_row_label_wraps_at_spaces_onto_three_lines_then_an_ellipsis(monkeypatch) -> None:
    assert wrap_text(canvas(), "seed 1", FONT, 168) == ["seed 1"]
    measured = measured_characters(monkeypatch)
    lines = wrap_text(canvas(), "prompt 1: " + "street photo in rain " * 5000, FONT, 168)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(canvas().textlength(line, font=FONT) <= 168 for line in lines)
    assert lines[0] == "prompt 1: street photo in"  # broken at a space
    assert sum(measured) < 5000  # of a 105,000-character label
