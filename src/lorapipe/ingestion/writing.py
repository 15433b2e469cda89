"""Pass 2 of ``lorapipe ingest``: the keepers streamed into the dataset, and the thumbnails
the report shows.

A keeper whose row keeps its file's bytes is copied, stripped of its metadata, with no
decode at all, once the stripped bytes are checked against pass 1's hash of them (a file
changed in between is decoded again instead). Every other keeper is decoded again and
re-encoded losslessly (``lorapipe.image_bytes.re_encoded``). Thumbnails come from reduced
decodes."""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorapipe import image_bytes
from lorapipe.dataset import DatasetWriter, ImageRecord
from lorapipe.errors import ImageBytesError
from lorapipe.ingestion.audit import Audit
from lorapipe.ingestion.decoding import (
    Decoded,
    decode_picture,
    failure,
    pixel_sha256,
    thumbnail_of,
)
from lorapipe.ingestion.drops import UNDECODABLE, Drop
from lorapipe.ingestion.inputs import Input
from lorapipe.ingestion.parallel import over_files
from lorapipe.ingestion.report import size_bucket
from lorapipe.thumbnails import thumbnail_jpeg, thumbnail_name


@dataclass
class Stats:
    """What the report counts of a run."""

    files: int
    drops: list[Drop]
    decoded_sizes: Counter = field(default_factory=Counter)
    kept_sizes: Counter = field(default_factory=Counter)
    fixes: Counter = field(default_factory=Counter)
    stored_formats: Counter = field(default_factory=Counter)  # rows by the format they hold
    re_encoded: int = 0  # rows whose pixels changed, so their bytes are a new encoding
    kept: int = 0
    captioned: int = 0


@dataclass
class Row:
    """What pass 2 makes of one keeper: a dataset row's image, or why it failed this time."""

    reason: str | None = None
    detail: str = ""
    image: bytes = b""
    format: str = ""
    width: int = 0
    height: int = 0
    sha256: str = ""  # of the 8-bit RGB pixels
    fixes: tuple[str, ...] = ()
    re_encoded: bool = False
    thumbnail: bytes = b""


def stored_row(path: Path, found: Decoded, max_pixels: int, thumbnail: bool) -> Row:
    """The row of a keeper: its stripped bytes when pass 1 found them keepable and they are
    unchanged, else its pixels decoded again and re-encoded. Never raises for a broken file."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return Row(*failure(error, max_pixels))
    kept = _unchanged_kept_bytes(data, found)
    if kept is not None:
        return Row(
            image=kept,
            format=found.kept_format or "",
            width=found.width,
            height=found.height,
            sha256=found.sha256,
            thumbnail=thumbnail_of(kept, max_pixels) if thumbnail else b"",
        )
    return _re_encoded_row(data, max_pixels, thumbnail)


def _unchanged_kept_bytes(data: bytes, found: Decoded) -> bytes | None:
    """The file's stripped bytes when they are those pass 1 decoded and hashed, else None."""
    if not found.kept_format:
        return None
    try:
        kept = image_bytes.strip_metadata(data, found.kept_format)
    except ImageBytesError:
        return None
    return kept if hashlib.sha256(kept).hexdigest() == found.kept_sha256 else None


def _re_encoded_row(data: bytes, max_pixels: int, thumbnail: bool) -> Row:
    try:
        picture = decode_picture(data, max_pixels, keep=False)
    except Exception as error:
        return Row(*failure(error, max_pixels))
    rgb = picture.rgb
    encoded, image_format = image_bytes.re_encoded(rgb)
    return Row(
        image=encoded,
        format=image_format,
        width=rgb.width,
        height=rgb.height,
        sha256=pixel_sha256(rgb),
        fixes=picture.fixes,
        re_encoded=True,
        thumbnail=thumbnail_jpeg(rgb) if thumbnail else b"",
    )


def write_kept(
    source: Input,
    kept: dict[str, Decoded],
    captions: dict[str, str],
    writer: DatasetWriter,
    max_pixels: int,
    workers: int,
    stats: Stats,
    audit: Audit,
) -> None:
    """Pass 2: the rows of the keepers (``kept``, by name, in order) streamed into the
    dataset, with the thumbnails of the flagged ones."""

    def task(name: str, path: Path) -> Row:
        return stored_row(path, kept[name], max_pixels, thumbnail=name in audit.flags)

    for name, row in over_files(source, list(kept), task, workers, "write"):
        if row.reason:  # the file changed since pass 1
            stats.drops.append(Drop(name, row.reason, row.detail))
            continue
        if row.thumbnail:
            audit.write_thumbnail(writer, name, row.thumbnail)
        caption = captions.get(name, "")
        writer.write(
            ImageRecord(
                id=row.sha256[:16],
                image=row.image,
                format=row.format,
                width=row.width,
                height=row.height,
                sha256=row.sha256,
                caption=caption,
                source=name,
            )
        )
        stats.kept += 1
        stats.captioned += bool(caption)
        stats.kept_sizes[size_bucket(row.width, row.height)] += 1
        stats.fixes.update(row.fixes)
        stats.stored_formats[row.format] += 1
        stats.re_encoded += row.re_encoded


def write_dropped_thumbnails(
    source: Input,
    writer: DatasetWriter,
    max_pixels: int,
    workers: int,
    audit: Audit,
    drops: Sequence[Drop],
) -> None:
    """The thumbnails of the dropped images that decode (too small, too wide, duplicates,
    dropped by the audit), so the report shows what was dropped: one reduced decode of each,
    as pass 2 does not see them."""
    decodable = {drop.file: drop for drop in drops if drop.reason not in UNDECODABLE}
    task = functools.partial(_thumbnail_task, max_pixels=max_pixels)
    for name, thumbnail in over_files(source, sorted(decodable), task, workers, "thumbnails"):
        if not thumbnail:
            continue
        if name in audit.dropped:
            audit.write_thumbnail(writer, name, thumbnail)
            decodable[name].thumbnail = audit.thumbnails[name]
        else:
            path = thumbnail_name(f"dropped-{hashlib.sha256(name.encode()).hexdigest()[:16]}")
            writer.write_extra(path, thumbnail)
            decodable[name].thumbnail = path


def _thumbnail_task(name: str, path: Path, max_pixels: int) -> bytes:
    try:
        data = path.read_bytes()
    except OSError:
        return b""
    return thumbnail_of(data, max_pixels)
