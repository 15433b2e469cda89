"""lora-scripts' ``metadata.csv`` (``filename,text``), read and written in one place.

ingest reads it beside raw images, train reads it beside a plain image folder, tag writes it
for lora-scripts; one reader means one answer to a file that is not UTF-8 (a one-line
``InputError`` naming the line and saying to re-save it as UTF-8, never a traceback).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from lorapipe.errors import InputError

log = logging.getLogger(__name__)

METADATA_CSV = "metadata.csv"
HEADER = ("filename", "text")


@dataclass(frozen=True)
class MetadataRow:
    line: int  # where the row starts in the file, 1-based (the header is line 1)
    filename: str  # stripped; "" when the row has no filename cell
    text: str  # stripped caption; "" when the file has no text column


def parse(data: bytes, label: str) -> list[MetadataRow]:
    """The rows of a ``metadata.csv``: UTF-8 with or without BOM, a ``filename,text`` header in
    any case (``file_name``/``caption`` also accepted), quoted fields with commas, quotes and
    newlines, blank rows skipped. ``label`` names the file in errors. Not UTF-8, no filename
    column or broken quoting is an InputError; no text column is a warning (empty captions)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InputError(
            f"{label} line {line}: not UTF-8 (byte 0x{data[error.start]:02x}); "
            "save the file as UTF-8"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        filename_column = _column(header, "filename", "file_name")
        text_column = _column(header, "text", "caption")
        found = ", ".join(header) or "nothing"
        if filename_column is None and text_column is None:
            raise InputError(
                f"{label} line 1: the header must name the columns 'filename' and 'text' "
                f"(found {found})"
            )
        if filename_column is None:
            raise InputError(
                f"{label} line 1: no 'filename' column in the header (found: {found}); "
                "the first line must be filename,text"
            )
        if text_column is None:
            log.warning("%s has no 'text' column; every caption will be empty", label)
        rows = []
        last_line = reader.line_num
        for row in reader:
            line, last_line = last_line + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            filename = row[filename_column].strip() if len(row) > filename_column else ""
            caption = ""
            if text_column is not None and len(row) > text_column:
                caption = row[text_column].strip()
            rows.append(MetadataRow(line, filename, caption))
    except csv.Error as error:
        raise InputError(
            f"{label} line {reader.line_num}: {error}; check the quoting of that row"
        ) from None
    return rows


def read(path: Path) -> list[MetadataRow]:
    """:func:`parse` of a local file, named by its path in errors."""
    return parse(path.read_bytes(), str(path))


def warn_repeated(label: str, name: str, lines: list[int]) -> None:
    """One warning per file that several rows name, naming every line and the one whose
    caption is kept (the first): a silently dropped caption is a LoRA trained on the wrong
    text. Ingest and train both keep the first row."""
    log.warning(
        "%s: '%s' is named on lines %s; the caption of line %d (the first) is kept, the "
        "others are ignored; delete the rows you do not mean",
        label, name, ", ".join(map(str, lines)), lines[0],
    )  # fmt: skip


def _column(header: list[str], *names: str) -> int | None:
    return next((header.index(name) for name in names if name in header), None)


class MetadataWriter:
    """Writes ``metadata.csv`` row by row as lora-scripts reads it: UTF-8 without BOM,
    ``filename,text`` header, ``\\n`` line ends, fields quoted where needed."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("w", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow(HEADER)

    def write(self, filename: str, text: str) -> None:
        self._writer.writerow([filename, text])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetadataWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
