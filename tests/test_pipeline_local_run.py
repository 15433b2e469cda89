"""`make run`: the whole DAG through kfp.local on the sample images and the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorapipe import store
from pipelines import local_run


def _task_dir(out: Path, task: str) -> Path:
    (run_dir,) = (out / "pipeline-root").glob("lorapipe-lora-training-*")
    (directory,) = run_dir.glob(f"{task}*")
    return directory


def test_make_run_cleans_trains_selects_publishes_and_reports(tmp_path: Path) -> None:
    report = local_run.run_local(tmp_path, {})

    assert report == tmp_path / "report.html"
    assert "<html" in report.read_text().lower()
    ingest_report = (_task_dir(tmp_path, "ingest") / "report").read_text()
    for planted in ("copy_of_first.png", "truncated.jpg", "too_small.png"):
        assert planted in ingest_report
    assert not list((tmp_path / "pipeline-root").glob("*/tag*")), "no tagger: tag is skipped"
    latest = json.loads((tmp_path / "published" / "latest.json").read_text())
    published = Path(latest["uri"])
    assert (published / "filmstyle.safetensors").is_file()
    assert (published / "pytorch_lora_weights.safetensors").is_file()
    selection = json.loads((published / "selection.json").read_text())
    assert selection["chosen"]["step"] in (10, 20, 30)


def test_with_a_bucket_inputs_checkpoints_and_the_lora_live_in_s3(
    tmp_path: Path, s3_bucket: str
) -> None:
    prefix = f"{s3_bucket}/lorapipe-demo"
    local_run.run_local(tmp_path, {}, s3_prefix=prefix)

    latest = json.loads(store.read_text(f"{prefix}/loras/latest.json"))
    assert latest["uri"].startswith(f"{prefix}/loras/")
    assert store.exists(store.join(latest["uri"], "filmstyle.safetensors"))
    checkpoints = store.list_uris(f"{prefix}/checkpoints/{latest['run_id']}/")
    assert any(uri.endswith("checkpoint-30/_COMPLETE") for uri in checkpoints), checkpoints


def test_with_a_tagger_the_tag_branch_runs_instead(tmp_path: Path) -> None:
    """The other branch of dsl.If: the DeepDanbooru stage tags the cleaned images."""
    pytest.importorskip("deepdanbooru")
    from test_tag import build_project

    project = build_project(tmp_path / "tagger", ["looking_left", "film_grain"])
    local_run.run_local(
        tmp_path,
        {"tagger_uri": str(project), "tag_threshold": 0.01, "caption_merge": "append"},
    )

    tag_report = (_task_dir(tmp_path, "tag") / "report").read_text()
    assert "looking left" in tag_report
    assert not list((tmp_path / "pipeline-root").glob("*/augment-2")), "one branch only"
    assert (tmp_path / "report.html").is_file()


@pytest.mark.faults  # kfp.local retries the stage twice (10 s, then 20 s) before giving up
def test_a_failing_stage_stops_the_run_with_one_line_naming_the_task(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from lorapipe.errors import PipelineRunError

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "photo.jpg").write_text("<html>not an image</html>")
    arguments = {"data_uri": str(bad), "base_model_uri": str(tiny_model_dir)}
    with pytest.raises(PipelineRunError, match="the pipeline stopped at task 'ingest'"):
        local_run.run_local(tmp_path / "run", arguments)
    (report,) = (tmp_path / "run" / "pipeline-root").glob("*/ingest/dataset/report.md")
    assert "photo.jpg" in report.read_text() and "not_an_image" in report.read_text()
