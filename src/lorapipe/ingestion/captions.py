"""The captions of ``lorapipe ingest``: lora-scripts ``metadata.csv`` rows (``filename,text``)
matched to the input's files. Of rows naming one file the first gives its caption; a row
naming a file outside the input is refused and never read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorapipe import metadata_csv, store
from lorapipe.ingestion.inputs import Input, clean_name, unsafe_name


@dataclass
class Captions:
    """Captions from metadata.csv by image name, and the rows that could not be used."""

    source: str | None = None
    rows: int = 0
    by_name: dict[str, str] = field(default_factory=dict)
    missing: list[dict[str, Any]] = field(default_factory=list)  # file not in the input
    refused: list[dict[str, Any]] = field(default_factory=list)  # unsafe or repeated rows
    duplicate_rows: int = 0  # rows naming a file an earlier row captions


def read_captions(source: Input, metadata_uri: str | None) -> Captions:
    """Match metadata.csv rows to the input's files, refusing rows that point outside it. Of
    rows naming one file the first gives its caption; the others are refused, counted and
    warned about (a silently dropped caption is a LoRA trained on the wrong text)."""
    located = (metadata_uri, metadata_uri) if metadata_uri else source.metadata
    if located is None:
        return Captions()
    uri, label = located
    rows = metadata_csv.parse(store.read_bytes(uri), label)
    captions = Captions(source=label, rows=len(rows))
    known = source.known()
    lines_of: dict[str, list[int]] = {}  # captioned file -> its rows' lines, the kept one first
    for line, filename, text in ((row.line, row.filename, row.text) for row in rows):
        entry = {"line": line, "filename": filename}
        name = clean_name(filename)
        why = unsafe_name(filename)
        if why is None and source.escapes(name):
            why = "a path resolving outside the input"
        if why:
            captions.refused.append({**entry, "reason": f"{why}; refused, not read"})
        elif name in captions.by_name:
            kept = lines_of[name][0]
            reason = f"a second row for this file; the caption of line {kept} is kept"
            captions.refused.append({**entry, "reason": reason})
            captions.duplicate_rows += 1
            lines_of[name].append(line)
        elif name not in known:
            captions.missing.append(entry)
        else:
            captions.by_name[name] = text
            lines_of[name] = [line]
    for name, lines in lines_of.items():
        if len(lines) > 1:
            metadata_csv.warn_repeated(label, name, lines)
    return captions
