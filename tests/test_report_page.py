"""The page every report is: pictures embedded small and linked to their full-size files when
those lie beside the page, text escaped, numbers as a person reads them."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from lorapipe.report.page import (
    Page,
    PageLinks,
    Section,
    format_number,
    picture,
    picture_of_file,
    render,
)
from lorapipe.thumbnails import thumbnail_jpeg


def decoded(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_a_picture_is_a_shrunk_jpeg_that_never_enlarges() -> None:
    wide = picture(Image.new("RGBA", (800, 400)), "wide", max_side=200)
    assert wide.src.startswith("data:image/jpeg;base64,") and (wide.width, wide.height) == (
        200,
        100,
    )
    assert decoded(wide.src).size == (200, 100)
    small = picture(Image.new("L", (40, 30)), "small", max_side=200)
    assert (small.width, small.height) == (40, 30)


def test_a_stored_thumbnail_is_embedded_as_it_is_not_encoded_again() -> None:
    stored = thumbnail_jpeg(Image.new("RGB", (300, 200), (200, 10, 10)))
    shown = picture(stored, "flagged", max_side=160)
    assert base64.b64decode(shown.src.split(",", 1)[1]) == stored
    assert (shown.width, shown.height) == (160, 107)


def test_full_size_links_are_relative_to_the_page_and_absent_when_it_travels_alone(
    tmp_path: Path,
) -> None:
    image = tmp_path / "run" / "generate" / "sheets" / "p01.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(image)

    beside = picture_of_file(str(image), "sheet", max_side=32, links=PageLinks(tmp_path / "out"))
    assert beside is not None and beside.href == "../run/generate/sheets/p01.png"
    alone = picture_of_file(str(image), "sheet", max_side=32, links=PageLinks())
    assert alone is not None and alone.href is None
    assert PageLinks(tmp_path).href("s3://bucket/sheet.png") is None
    assert (
        picture_of_file(str(tmp_path / "pruned.png"), "gone", max_side=32, links=PageLinks())
        is None
    )


def test_text_from_the_data_is_escaped(tmp_path: Path) -> None:
    report = {"input_rows": 1, "mirrored": 0, "output_rows": 1, "already_mirrored": 0,
              "skipped": [{"source": "<img src=x onerror=alert(1)>.png", "reason": "a & b"}]}  # fmt: skip
    html = render(Page("lorapipe <augment>", [Section("augment", {"report": report})]))
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;.png" in html
    assert "a &amp; b" in html and "<title>lorapipe &lt;augment&gt;</title>" in html


def test_numbers_read_as_a_person_writes_them() -> None:
    assert [format_number(v) for v in (None, True, 12345, 0.000123456, 2.5, "x")] == [
        "–", "yes", "12,345", "0.0001235", "2.5", "x",
    ]  # fmt: skip
