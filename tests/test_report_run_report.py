"""``lorapipe report``: one page for the stages of a run, each a section in DAG order."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from lorapipe.cli import main as cli
from lorapipe.errors import ConfigError
from lorapipe.report.run_report import StageOutputs, run_page, stage_page
from lorapipe.stages.augment import AugmentConfig
from lorapipe.stages.augment import run as augment
from lorapipe.stages.ingest import IngestConfig
from lorapipe.stages.ingest import run as ingest


@pytest.fixture(scope="module")
def stage_outputs(tmp_path_factory: pytest.TempPathFactory) -> StageOutputs:
    """A real ingest (one image too small to keep) and augment of three images."""
    root = tmp_path_factory.mktemp("report-run")
    raw = root / "raw"
    raw.mkdir()
    for index, size in enumerate([(96, 64), (64, 96), (16, 16)]):
        # a stripe per image at its own place: flat images would be near duplicates
        image = Image.new("RGB", size, (60 * index, 90, 160))
        ImageDraw.Draw(image).rectangle((0, 0, size[0] // (index + 2), size[1]), fill="white")
        image.save(raw / f"image_{index}.png")
    (raw / "metadata.csv").write_text(
        "filename,text\nimage_0.png,a cat on the left\nimage_1.png,a dog\n"
    )
    ingest(str(raw), str(root / "ingested"), IngestConfig(min_size=32, workers=1))
    augment(str(root / "ingested"), str(root / "augmented"), AugmentConfig())
    return StageOutputs(ingest=str(root / "ingested"), augment=str(root / "augmented"))


def test_the_run_page_has_a_section_per_stage_that_ran_in_dag_order(
    stage_outputs: StageOutputs,
) -> None:
    html = run_page(stage_outputs)
    assert html.index('id="ingest"') < html.index('id="augment"')
    assert 'id="train"' not in html
    assert "image_2.png" in html and "too_small" in html
    assert "2 rows in, 2 mirrored, 4 rows out" in html


def test_a_stage_page_is_its_section_alone(stage_outputs: StageOutputs) -> None:
    assert stage_outputs.augment is not None
    html = stage_page("augment", stage_outputs.augment)
    assert html.count('<section class="stage"') == 1 and 'id="augment"' in html


def test_the_cli_writes_the_page_and_names_what_it_holds(
    stage_outputs: StageOutputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    code = cli(["report", "--ingest", str(stage_outputs.ingest), "--augment",
                str(stage_outputs.augment), "--out", str(out)])  # fmt: skip
    assert code == 0 and out.is_file()
    assert capsys.readouterr().out.strip() == f"wrote {out}: ingest, augment"


def test_a_page_of_nothing_or_of_a_folder_that_is_no_stage_output_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="give at least one stage output"):
        run_page(StageOutputs())
    assert cli(["report", "--train", str(tmp_path), "--out", str(tmp_path / "r.html")]) != 0
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "training_report.json is missing" in error
