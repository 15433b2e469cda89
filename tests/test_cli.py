"""The `lorapipe` command: one line per error, tracebacks only with --debug."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorapipe.cli import COMMANDS, main
from lorapipe.errors import ModelError


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    for name in COMMANDS:
        assert name in listing


def test_every_command_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"lorapipe {name}" in capsys.readouterr().out


def test_unknown_command_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-stage"])
    assert exit_info.value.code != 0
    assert "invalid choice" in capsys.readouterr().err


def test_a_lorapipe_error_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> Path:
        raise ModelError("base model 'x' does not exist; give a diffusers-format model directory")

    monkeypatch.setattr("lorapipe.demo.tiny_model.build_sd", refuse)
    assert main(["tiny-model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "lorapipe tiny-model: error: base model 'x' does not exist; "
        "give a diffusers-format model directory\n"
    )


def test_debug_shows_the_traceback_and_keeps_the_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> Path:
        raise ModelError("nope")

    monkeypatch.setattr("lorapipe.demo.tiny_model.build_sd", refuse)
    assert main(["--debug", "tiny-model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "in refuse" in err
    assert err.splitlines()[-1] == "lorapipe tiny-model: error: nope"


@pytest.mark.parametrize("debug", [[], ["--debug"]], ids=["plain", "debug"])
def test_a_bug_is_its_traceback_and_exit_1(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    debug: list[str],
) -> None:
    def crash(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("a bug")

    monkeypatch.setattr("lorapipe.demo.tiny_model.build_sd", crash)
    assert main([*debug, "tiny-model", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.splitlines()[-1] == "RuntimeError: a bug"


def test_debug_in_a_real_process_exits_as_without_it(tmp_path: Path) -> None:
    """A script that checks the exit status behaves the same when --debug is added."""
    argv = [sys.executable, "-m", "lorapipe.cli", "select", str(tmp_path / "nowhere")]
    argv += ["--out", str(tmp_path / "lora")]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    debug = subprocess.run([*argv[:3], "--debug", *argv[3:]], capture_output=True, text=True)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1]
    assert plain.stderr.splitlines()[-1].startswith("lorapipe select: error: ")


def test_console_script_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lorapipe.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.startswith("lorapipe ")


def test_ingest_tag_augment_run_one_after_the_other_on_an_s3_prefix(
    tmp_path: Path, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The data stages as a user chains them: raw photos on S3 -> clean -> tag -> flip."""
    pytest.importorskip("deepdanbooru")
    from test_tag import build_project

    from lorapipe import store
    from lorapipe.dataset import read_records
    from lorapipe.demo.inputs import write_sample_folder

    raw = f"{s3_bucket}/raw"
    store.put_dir(write_sample_folder(tmp_path / "raw", count=9), raw)
    project = build_project(tmp_path / "tagger", ["looking_left", "rating:safe", "film_grain"])

    assert main(["ingest", raw, "--out", f"{s3_bucket}/ingested", "--workers", "1"]) == 0
    assert main(["tag", f"{s3_bucket}/ingested", "--out", f"{s3_bucket}/tagged",
                 "--project", str(project), "--threshold", "0.01", "--merge", "append"]) == 0  # fmt: skip
    assert main(["augment", f"{s3_bucket}/tagged", "--out", f"{s3_bucket}/augmented"]) == 0

    records = list(read_records(f"{s3_bucket}/augmented"))
    originals = [record for record in records if not record.flipped]
    mirrored = {record.parent_id: record for record in records if record.flipped}
    assert len(originals) == 9 and set(mirrored) == {record.id for record in originals}
    for original in originals:
        assert original.caption.startswith("filmstyle, ")
        assert "looking left" in original.caption and "rating" not in original.caption
        assert "looking right" in mirrored[original.id].caption
    assert store.exists(f"{s3_bucket}/ingested/report.md")
    assert store.exists(f"{s3_bucket}/tagged/metadata.csv")
    assert "images in" in capsys.readouterr().out


def test_an_sdxl_lora_is_trained_selected_and_reviewed_through_the_cli(
    tmp_path: Path, tiny_sdxl_dir: Path
) -> None:
    """Portrait and square photos -> ingest -> augment -> train (buckets, both text encoders) on
    the tiny SDXL -> select (kohya's SDXL keys) -> generate at a portrait size."""
    import pyarrow.parquet as pq
    from PIL import Image
    from safetensors import safe_open

    from lorapipe.demo.inputs import write_sample_folder

    raw = write_sample_folder(tmp_path / "raw", count=8)
    data, training = tmp_path / "data", tmp_path / "training"
    assert main(["ingest", str(raw), "--out", str(tmp_path / "ingested"), "--workers", "1"]) == 0
    assert main(["augment", str(tmp_path / "ingested"), "--out", str(data)]) == 0
    assert main(["train", "--train-data-dir", str(data), "--base-model", str(tiny_sdxl_dir),
                 "--output-dir", str(training), "--cache-dir", str(tmp_path / "cache"),
                 "--train-text-encoder", "--target-modules", "to_q", "to_v", "q_proj", "v_proj",
                 "--batch-size", "2", "--max-train-steps", "4", "--save-steps", "2",
                 "--validation-split", "2", "--output-name", "film"]) == 0  # fmt: skip
    report = json.loads((training / "training_report.json").read_text())
    assert report["model_family"] == "sdxl"
    assert any(b["resolution"][1] > b["resolution"][0] for b in report["buckets"])  # portraits

    assert main(["select", str(training), "--out", str(tmp_path / "lora")]) == 0
    with safe_open(tmp_path / "lora" / "film.safetensors", "pt") as kohya:
        keys, metadata = set(kohya.keys()), kohya.metadata()
    assert {key.split("_")[1] for key in keys} == {"unet", "te1", "te2"}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    review = tmp_path / "review"
    assert main(["generate", "--base-model", str(tiny_sdxl_dir), "--out", str(review),
                 "--trained-lora", str(tmp_path / "lora"), "--prompt", "filmstyle, a red circle",
                 "--size", "64x96", "--seed", "1", "--steps", "2", "--lora-scales", "0", "1",
                 "--negative-presets", "none"]) == 0  # fmt: skip
    rows = pq.read_table(review / "index.parquet").to_pylist()
    assert len(rows) == 2 and {(r["width"], r["height"]) for r in rows} == {(64, 96)}
    with Image.open(review / rows[1]["file"]) as image:
        assert image.size == (64, 96) and "Lora hashes" in image.info["parameters"]
