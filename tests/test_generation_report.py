"""What ``lorapipe generate`` writes for people: ``report.json`` (the sheets, the facts, the
checks) and ``report.html``, the run report's generate section alone."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

from PIL import Image

from lorapipe.generation.loras import LoraSource
from lorapipe.generation.report import SheetSection, run_report, write_reports

JOB = {
    "prompts": ["a <script>alert(1)</script> cat, <lora:film:0.7>"],
    "negative_presets": ["portrait"],
    "sizes": ["64x64"],
    "lora_scales": [0.7],
    "cfg_scales": [7.0],
    "seeds": [1],
    "samplers": ["Euler a"],
    "steps": [4],
    "grid_x": "lora_scale",
    "grid_y": "seed",
    "guidance_rescale": 0.0,
    "clip_model": None,
}


def write_report(directory: Path, lints: list[dict]) -> dict:
    (directory / "sheets").mkdir(parents=True)
    Image.new("RGB", (1800, 600), (200, 40, 40)).save(directory / "sheets" / "p01.png")
    (directory / "job.yaml").write_text("prompts: [a cat]\n")
    sheet = SheetSection(
        title="prompt 1 / portrait / 64x64",
        prompt=JOB["prompts"][0],
        file="sheets/p01.png",
        negatives=[("LoRA 0.7", "low quality, blurry")],
    )
    report = run_report(
        base_model_uri="models/tiny-sd",
        output_uri=str(directory),
        job=JOB,
        model_hash="abc123",
        loras=[LoraSource("film", "film.safetensors", "film.safetensors", "0123456789ab", "a0")],
        lints=lints,
        rows=[],
        sheets=[sheet],
        environment={"lorapipe": "0", "device": "cpu", "dtype": "float32"},
        render_seconds=2.0,
        seconds=3.0,
    )
    write_reports(directory, report)
    return report


def test_report_json_carries_what_the_page_shows(tmp_path: Path) -> None:
    report = write_report(tmp_path, lints=[])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["sheet_pages"] == [
        {
            "title": "prompt 1 / portrait / 64x64",
            "prompt": JOB["prompts"][0],
            "file": "sheets/p01.png",
            "negatives": [["LoRA 0.7", "low quality, blurry"]],
        }
    ]
    assert saved["summary"]["LoRAs"] == "film (0123456789ab)"
    assert saved["summary"]["sampler"] == "Euler a, 4 steps"
    assert report["sheets"] == ["sheets/p01.png"]


def test_the_page_escapes_prompts_embeds_the_sheet_and_links_its_full_size(
    tmp_path: Path,
) -> None:
    write_report(
        tmp_path,
        lints=[{"level": "warning", "rule": "check_term_count", "count": 2,
                "message": "20 negative terms (more than 15)", "where": "prompt 1"}],
    )  # fmt: skip
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "&lt;lora:film:0.7&gt;" in html
    (source,) = re.findall(r'src="(data:image/jpeg;base64,[^"]+)"', html)
    embedded = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
    assert embedded.size == (1400, 467), "shrunk for the page"
    assert 'href="sheets/p01.png"' in html, "full size on click"
    for text in ("check_term_count", "20 negative terms", "low quality, blurry", "job.yaml"):
        assert text in html


def test_a_report_without_warnings_says_so(tmp_path: Path) -> None:
    write_report(tmp_path, lints=[])
    assert "No warnings" in (tmp_path / "report.html").read_text()
