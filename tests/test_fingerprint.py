"""Fingerprints: a digest per input that changes when a file is added, removed or rewritten and
stays when nothing changes, local and on S3, and the run's digest over inputs and settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorapipe import store
from lorapipe.cli import main as cli
from lorapipe.errors import ConfigError, InputError
from lorapipe.fingerprint import fingerprint_input, fingerprint_run


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(name.encode() * 100)
    (folder / "metadata.csv").write_text("filename,text\na.png,film\n")
    return folder


def test_a_local_folder_changes_its_digest_exactly_when_its_files_change(tmp_path: Path) -> None:
    folder = _images(tmp_path / "raw")
    before = fingerprint_input(str(folder))
    assert fingerprint_input(str(folder)) == before  # read twice, nothing changed
    assert (before.files, before.bytes) == (3, 2 * 500 + len("filename,text\na.png,film\n"))

    (folder / "c.png").write_bytes(b"new")
    added = fingerprint_input(str(folder))
    (folder / "c.png").unlink()
    assert fingerprint_input(str(folder)) == before  # removed again: as before
    (folder / "b.png").unlink()
    removed = fingerprint_input(str(folder))
    (folder / "a.png").write_bytes(b"A" * 200)  # same size, new content and mtime
    os.utime(folder / "a.png", ns=(1, 1))
    rewritten = fingerprint_input(str(folder))

    digests = [before.digest, added.digest, removed.digest, rewritten.digest]
    assert len(set(digests)) == 4


def test_an_s3_prefix_changes_its_digest_exactly_when_its_objects_change(
    tmp_path: Path, s3_bucket: str
) -> None:
    prefix = f"{s3_bucket}/raw"
    store.put_dir(_images(tmp_path / "raw"), prefix)
    before = fingerprint_input(prefix)
    assert fingerprint_input(prefix + "/").digest == before.digest

    store.write_bytes(f"{prefix}/c.png", b"new")
    added = fingerprint_input(prefix)
    store.delete(f"{prefix}/c.png")
    assert fingerprint_input(prefix).digest == before.digest
    store.write_bytes(f"{prefix}/a.png", b"A" * 200)  # same size, another ETag
    rewritten = fingerprint_input(prefix)

    assert len({before.digest, added.digest, rewritten.digest}) == 3


def test_a_single_object_such_as_an_archive_has_a_digest(tmp_path: Path, s3_bucket: str) -> None:
    store.write_bytes(f"{s3_bucket}/photos.zip", b"PK...")
    (tmp_path / "photos.zip").write_bytes(b"PK...")
    assert fingerprint_input(f"{s3_bucket}/photos.zip").files == 1
    assert fingerprint_input(str(tmp_path / "photos.zip")).bytes == 5


def test_an_input_with_no_files_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"data_uri '.*nothing' holds no files"):
        fingerprint_input(str(tmp_path / "nothing"), "data_uri")


def test_the_run_digest_covers_every_input_and_the_settings_by_value(tmp_path: Path) -> None:
    folder = _images(tmp_path / "raw")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    uris = {"data_uri": str(folder), "base_model_uri": str(model), "tagger_uri": ""}
    run = fingerprint_run(uris, {"training_config": "{lora_rank: 16, epochs: 2}"})

    respelled = fingerprint_run(uris, {"training_config": "epochs: 2\nlora_rank: 16\n"})
    other_rank = fingerprint_run(uris, {"training_config": "{lora_rank: 8, epochs: 2}"})
    (model / "model_index.json").write_text('{"v": 2}')
    os.utime(model / "model_index.json", ns=(2, 2))
    other_model = fingerprint_run(uris, {"training_config": "{lora_rank: 16, epochs: 2}"})

    assert respelled.run == run.run
    assert other_rank.run != run.run and other_rank.data == run.data
    assert other_model.run != run.run and other_model.data == run.data
    assert set(run.to_dict()["inputs"]) == {"data_uri", "base_model_uri"}  # no tagger given
    with pytest.raises(ConfigError, match="training_config is not valid YAML"):
        fingerprint_run(uris, {"training_config": "{lora_rank: [16"})


def test_the_cli_prints_the_digest_the_pipeline_shows(tmp_path: Path, capsys) -> None:
    folder = _images(tmp_path / "raw")
    (tmp_path / "other.csv").write_text("filename,text\n")

    assert cli(["fingerprint", str(folder)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line == f"{fingerprint_input(str(folder)).digest}  {folder}  (3 files, 1025 bytes)"

    assert cli(["fingerprint", str(folder), str(tmp_path / "other.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[-1].endswith("all 2 inputs")
    assert cli(["fingerprint", str(tmp_path / "missing")]) == 2
    assert "holds no files" in capsys.readouterr().err
