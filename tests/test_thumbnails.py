"""Thumbnails of flagged images: small, beside the report, and inline where the report travels
alone (the KFP UI's Markdown artifact)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

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


def test_inlined_thumbnails_carry_their_bytes_and_missing_ones_stay_links(tmp_path: Path) -> None:
    (tmp_path / "flagged").mkdir()
    jpeg = thumbnails.thumbnail_jpeg(Image.new("RGB", (300, 200), (200, 10, 10)))
    (tmp_path / thumbnails.thumbnail_name("kept")).write_bytes(jpeg)
    markdown = (
        f"| {thumbnails.markdown_image('flagged/kept.jpg', 'x|y')} | watermark |\n"
        f"{thumbnails.markdown_image('flagged/gone.jpg', 'gone')}\n"
        "![elsewhere](../outside.jpg)\n"
    )
    inlined = thumbnails.inline_images(markdown, tmp_path)

    data = base64.b64encode(jpeg).decode("ascii")
    assert f"| ![x\\|y](data:image/jpeg;base64,{data}) | watermark |" in inlined
    assert "![gone](flagged/gone.jpg)" in inlined
    assert "![elsewhere](../outside.jpg)" in inlined
