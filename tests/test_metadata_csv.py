"""metadata.csv: one reader for ingest and training (same one-line errors), one writer for tag."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from lorapipe import metadata_csv
from lorapipe.errors import InputError
from lorapipe.metadata_csv import MetadataRow, MetadataWriter
from lorapipe.train_config import TrainConfig
from lorapipe.training.data import load_examples

LATIN_1 = "filename,text\na.png,fine\nb.png,café\n".encode("latin-1")


def test_utf8_with_or_without_bom_quoted_fields_and_any_header_case() -> None:
    text = 'FileName,Text\n"a, b.png","say ""hi"", then\nleave"\n\n c.png , x \n'
    rows = metadata_csv.parse(text.encode(), "m.csv")
    assert rows == [
        MetadataRow(2, "a, b.png", 'say "hi", then\nleave'),
        MetadataRow(5, "c.png", "x"),
    ]
    assert metadata_csv.parse(b"\xef\xbb\xbf" + text.encode(), "m.csv") == rows


def test_without_a_text_column_every_caption_is_empty(caplog: pytest.LogCaptureFixture) -> None:
    assert metadata_csv.parse(b"file_name\na.png\n", "m.csv") == [MetadataRow(2, "a.png", "")]
    assert "no 'text' column" in caplog.text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (LATIN_1, r"^m.csv line 3: not UTF-8 \(byte 0xe9\); save the file as UTF-8$"),
        (b"file,text\na.png,x\n", r"m.csv line 1: no 'filename' column"),
        (b"file,caption text\n", r"m.csv line 1: the header must name the columns"),
    ],
)
def test_unusable_files_are_one_line_naming_the_line(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as error:
        metadata_csv.parse(data, "m.csv")
    assert "\n" not in str(error.value)


def test_a_latin1_metadata_csv_given_to_training_is_the_same_error_as_ingest(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "white").save(folder / name)
    (folder / "metadata.csv").write_bytes(LATIN_1)
    config = TrainConfig(train_data_dir=str(folder))

    with pytest.raises(InputError, match=r"metadata.csv line 3: not UTF-8") as error:
        load_examples(config, tmp_path / "cache")
    assert "\n" not in str(error.value) and str(folder / "metadata.csv") in str(error.value)
    with pytest.raises(InputError) as from_ingest:
        metadata_csv.parse(LATIN_1, str(folder / "metadata.csv"))
    assert str(from_ingest.value) == str(error.value)


def test_the_writer_writes_what_lora_scripts_and_the_reader_read(tmp_path: Path) -> None:
    path = tmp_path / metadata_csv.METADATA_CSV
    with MetadataWriter(path) as writer:
        writer.write("a.png", "1girl, smile")
        writer.write("sub/é.png", 'a "quoted" caption')
    data = path.read_bytes()
    assert data.startswith(b"filename,text\n") and b"\r" not in data
    with path.open(encoding="utf-8", newline="") as file:
        assert [row["text"] for row in csv.DictReader(file)] == [
            "1girl, smile",
            'a "quoted" caption',
        ]
    assert [(r.filename, r.text) for r in metadata_csv.read(path)] == [
        ("a.png", "1girl, smile"),
        ("sub/é.png", 'a "quoted" caption'),
    ]
