"""Thumbnails of flagged images: small JPEGs beside the report."""

from __future__ import annotations

import io

from PIL import Image

from lorapipe import thumbnails


def test_a_thumbnail_is_a_small_jpeg_that_keeps_the_aspect_and_never_enlarges() -> None:
    wide = Image.open(io.BytesIO(thumbnails.thumbnail_jpeg(Image.new("RGBA", (800, 400)))))
    assert wide.format == "JPEG" and wide.size == (160, 80)
    tiny = Image.open(io.BytesIO(thumbnails.thumbnail_jpeg(Image.new("L", (40, 30)))))
    assert tiny.size == (40, 30) and tiny.mode == "RGB"


def test_the_markdown_image_is_safe_inside_a_table_cell() -> None:
    image = thumbnails.markdown_image(thumbnails.thumbnail_name("ab12"), "a | b]\nc")
    assert image == "![a \\| b\\] c](flagged/ab12.jpg)"
