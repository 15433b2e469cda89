"""The contact sheet."""

from __future__ import annotations

from pathlib import Path

import pytest
from generation_helpers import grid
from PIL import Image, ImageDraw, ImageFont

from lorapipe.generation.layout import IMAGES_DIR, SHEETS_DIR
from lorapipe.generation.sheets import draw_contact_sheet, fit_text, write_contact_sheets
from lorapipe.stages.generate import GenerateConfig


def test_a_contact_sheet_places_each_image_in_its_row_column_and_seed(tmp_path: Path) -> None:
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (64, 96), (255, 0, 0)).save(red)
    Image.new("RGB", (64, 96), (0, 0, 255)).save(blue)
    sheet = draw_contact_sheet(
        "prompt 1 / portrait",
        rows=["CFG 7", "CFG 9"],
        columns=["LoRA 0.5", "LoRA 1"],
        subcolumns=["seed 1", "seed 2"],
        images={(0, 0, 0): red, (1, 1, 1): blue},
        cell_size=48,
    )
    # thumbnails keep the aspect ratio: 32 x 48
    assert sheet.height == 28 + 40 + 2 * (48 + 4) + 4
    first = sheet.getpixel((90 + 4 + 16, 28 + 40 + 24))
    last = sheet.getpixel((90 + (2 * 36 + 4) + 4 + 36 + 16, 28 + 40 + 52 + 24))
    assert first == (255, 0, 0) and last == (0, 0, 255)
    assert sheet.getpixel((90 + 4 + 36 + 16, 28 + 40 + 24)) == (255, 255, 255)  # no image there


def test_each_size_gets_its_own_sheet_named_and_titled_with_the_size(tmp_path: Path) -> None:
    values = {"prompts": ["a street"], "sizes": ["64x96", "96x64"], "seeds": [1, 2]}
    cells = grid(**values)
    (tmp_path / IMAGES_DIR).mkdir()
    (tmp_path / SHEETS_DIR).mkdir()
    for cell in cells:
        Image.new("RGB", (cell.width, cell.height), "red").save(
            tmp_path / IMAGES_DIR / cell.file_name
        )
    portrait, landscape = write_contact_sheets(tmp_path, cells, GenerateConfig(**values))
    assert (portrait.file, landscape.file) == (
        "sheets/p01_base_64x96.png",
        "sheets/p01_base_96x64.png",
    )
    assert (portrait.title, landscape.title) == (
        "prompt 1 / base / 64x96",
        "prompt 1 / base / 96x64",
    )
    # thumbnails keep each size's aspect ratio: the longest side is sheet_cell_size (256)
    assert portrait.image.height == 28 + 40 + 256 + 2 * 4
    assert landscape.image.height == 28 + 40 + round(256 * 64 / 96) + 2 * 4
    assert (tmp_path / portrait.file).is_file() and (tmp_path / landscape.file).is_file()


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


def test_a_5000_token_prompt_is_fitted_in_a_few_dozen_measurements(monkeypatch) -> None:
    measured: list[int] = []
    textlength = ImageDraw.ImageDraw.textlength

    def counting(self, text, *args, **kwargs):
        measured.append(len(text))
        return textlength(self, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "textlength", counting)
    prompt = ", ".join(["street"] * 2500)  # 5,000 tokens: a word and a comma each time
    label = fit_text(canvas(), prompt, FONT, 384)
    assert len(measured) <= 1 + len(prompt).bit_length()  # a binary search, not one per char
    assert label.endswith("…") and canvas().textlength(label, font=FONT) <= 384
