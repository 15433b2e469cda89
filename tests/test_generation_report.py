"""The one-file HTML report."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from PIL import Image

from lorapipe.generation.report import ReportPage, SheetSection, image_data_uri, render_report


def write_images(directory: Path, count: int, size: tuple[int, int]) -> list[Path]:
    paths = []
    for index in range(count):
        path = directory / f"{index}.png"
        Image.new("RGB", size, (index * 40 % 256, 100, 200)).save(path)
        paths.append(path)
    return paths


def test_the_report_is_one_self_contained_file(tmp_path: Path) -> None:
    (sheet_path,) = write_images(tmp_path, 1, (120, 80))
    page = ReportPage(
        title="lorapipe generate: 4 images",
        summary={"base model": "models/tiny-sd"},
        sheets=[
            SheetSection(
                title="prompt 1 / portrait",
                prompt="a <script>alert(1)</script> cat, <lora:film:0.7>",
                image=Image.open(sheet_path),
                file="sheets/p01_portrait.png",
                negatives=[("LoRA 0.7", "low quality, blurry")],
            )
        ],
        lints=[
            {
                "level": "warning",
                "rule": "check_term_count",
                "message": "20 negative terms (more than 15)",
                "count": 2,
                "where": "prompt 1 / portrait / LoRA 0.7 / CFG 7",
            }
        ],
        metric_columns={"cfg_scale": "CFG", "sharpness": "sharpness"},
        metric_rows=[{"cfg_scale": 7.0, "sharpness": 1234.5678}],
        reproduce_command="lorapipe generate --job out/job.yaml --out out",
        job_text="prompts: [a cat]\n",
    )
    html = render_report(page)
    assert html.startswith("<!DOCTYPE html>")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "&lt;lora:film:0.7&gt;" in html
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(source.startswith("data:image/jpeg;base64,") for source in sources)
    embedded = base64.b64decode(sources[0].split(",", 1)[1])
    assert Image.open(io.BytesIO(embedded)).size == (120, 80)
    for text in (
        "check_term_count",
        "20 negative terms",
        "1235",
        "low quality, blurry",
        "job.yaml",
    ):
        assert text in html


def test_a_report_without_warnings_says_so() -> None:
    page = ReportPage(title="t", summary={}, sheets=[])
    assert "No warnings" in render_report(page)


def test_image_data_uri_is_a_jpeg() -> None:
    uri = image_data_uri(Image.new("RGBA", (10, 10), (1, 2, 3, 4)))
    assert uri.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",")[1]))).format == "JPEG"
