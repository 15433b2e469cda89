"""The contact sheet."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from lorapipe.generation.sheets import draw_contact_sheet


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
