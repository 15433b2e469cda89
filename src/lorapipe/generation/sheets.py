"""Contact sheets: one labelled grid of thumbnails per prompt x negative preset x image size
(rows CFG, columns LoRA scale, one image per seed inside each column); a sheet holds one size,
so portrait and landscape thumbnails never share a row."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont

from lorapipe.generation.grid import Cell, group_by, safe_name
from lorapipe.generation.layout import IMAGES_DIR, SHEETS_DIR
from lorapipe.generation.report import SheetSection

if TYPE_CHECKING:
    from lorapipe.stages.generate import GenerateConfig

SHEET_GAP = 4
SHEET_ROW_LABEL_WIDTH = 90
SHEET_TITLE_HEIGHT = 28
SHEET_HEADER_HEIGHT = 40


def write_contact_sheets(
    directory: Path, cells: Sequence[Cell], config: GenerateConfig
) -> list[SheetSection]:
    """One sheet per prompt x negative preset x size, named and titled with the size: rows
    CFG, columns LoRA scale, one image per seed inside each column."""
    scales = config.lora_scales or [None]
    columns = [f"LoRA {s:g}" if s is not None else "LoRA as tagged" for s in scales]
    sheets = []
    for (prompt_index, preset, size), group in group_by(
        cells, lambda cell: (cell.prompt_index, cell.negative_preset, cell.size)
    ):
        images = {
            (
                config.cfg_scales.index(cell.cfg_scale),
                scales.index(cell.lora_scale),
                config.seeds.index(cell.seed),
            ): directory / IMAGES_DIR / cell.file_name
            for cell in group
        }
        title = f"prompt {prompt_index + 1} / {preset} / {size}"
        image = draw_contact_sheet(
            f"{title}: {group[0].parsed.plain_text}",
            rows=[f"CFG {cfg:g}" for cfg in config.cfg_scales],
            columns=columns,
            subcolumns=[f"seed {seed}" for seed in config.seeds],
            images=images,
            cell_size=config.sheet_cell_size,
        )
        file = f"{SHEETS_DIR}/p{prompt_index + 1:02d}_{safe_name(preset)}_{size}.png"
        image.save(directory / file)
        negatives = {columns[scales.index(cell.lora_scale)]: cell.negative.text for cell in group}
        sheets.append(
            SheetSection(
                title=title,
                prompt=config.prompts[prompt_index],
                file=file,
                negatives=list(negatives.items()),
            )
        )
    return sheets


def draw_contact_sheet(
    title: str,
    rows: Sequence[str],
    columns: Sequence[str],
    subcolumns: Sequence[str],
    images: Mapping[tuple[int, int, int], Path],
    cell_size: int,
) -> Image.Image:
    """A labelled grid of thumbnails: ``rows`` down, ``columns`` across, each column holding
    one thumbnail per ``subcolumns`` entry. ``images`` maps (row, column, subcolumn) indices to
    image files of one size; the longest side of a thumbnail is ``cell_size``."""
    with Image.open(next(iter(images.values()))) as first:
        scale = cell_size / max(first.size)
        thumb_w, thumb_h = max(1, round(first.width * scale)), max(1, round(first.height * scale))
    gap = SHEET_GAP
    column_width = len(subcolumns) * (thumb_w + gap) + gap
    top = SHEET_TITLE_HEIGHT + SHEET_HEADER_HEIGHT
    width = max(400, SHEET_ROW_LABEL_WIDTH + len(columns) * column_width)
    height = top + len(rows) * (thumb_h + gap) + gap
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)

    draw.text((8, 6), fit_text(draw, title, font, width - 16), fill="black", font=font)
    for c, column in enumerate(columns):
        x = SHEET_ROW_LABEL_WIDTH + c * column_width
        draw.line([(x, SHEET_TITLE_HEIGHT), (x, height)], fill="#bbbbbb")
        draw.text(
            (x + gap, SHEET_TITLE_HEIGHT), fit_text(draw, column, font, column_width), "black", font
        )
        for s, subcolumn in enumerate(subcolumns):
            label = fit_text(draw, subcolumn, small, thumb_w)
            draw.text(
                (x + gap + s * (thumb_w + gap), SHEET_TITLE_HEIGHT + 20), label, "#555", small
            )
    for r, row in enumerate(rows):
        y = top + r * (thumb_h + gap)
        draw.text(
            (8, y + thumb_h // 2 - 8),
            fit_text(draw, row, font, SHEET_ROW_LABEL_WIDTH - 12),
            "black",
            font,
        )
    for (r, c, s), path in images.items():
        x = SHEET_ROW_LABEL_WIDTH + c * column_width + gap + s * (thumb_w + gap)
        with Image.open(path) as image:
            thumbnail = image.convert("RGB").resize((thumb_w, thumb_h), Image.Resampling.LANCZOS)
        sheet.paste(thumbnail, (x, top + r * (thumb_h + gap)))
    return sheet


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text``, or its longest prefix that fits ``width`` pixels with an ellipsis after it
    (just the ellipsis if none does). A binary search on the cut: a 5,000-token prompt is
    measured a few dozen times, not once per character."""
    if draw.textlength(text, font=font) <= width:
        return text
    fits, too_long = 0, len(text)  # prefix lengths: text[:fits] + "…" fits (or is empty)
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if draw.textlength(text[:middle] + "…", font=font) <= width:
            fits = middle
        else:
            too_long = middle
    return text[:fits] + "…"
