"""`make run`: the stages one after the other on the sample data and the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorapipe.dataset import count_rows, decode_image, read_records
from lorapipe.demo import main, write_sample_dataset


def test_sample_dataset_is_captioned_512px_images(tmp_path: Path) -> None:
    assert write_sample_dataset(str(tmp_path / "samples")) == 9
    records = list(read_records(str(tmp_path / "samples")))
    assert len({record.sha256 for record in records}) == 9
    for record in records:
        assert decode_image(record).size == (512, 512)
        assert record.caption.startswith("filmstyle, a ")
    assert count_rows(str(tmp_path / "samples")) == 9


@pytest.mark.slow
def test_demo_runs_every_stage_and_prints_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(tmp_path / "demo")]) == 0
    report = Path(capsys.readouterr().out.strip().removeprefix("report: "))
    assert report.is_file() and report.name == "report.html"
    assert (tmp_path / "demo" / "lora" / "filmstyle.safetensors").is_file()
    assert (tmp_path / "demo" / "lora" / "selection.json").is_file()
