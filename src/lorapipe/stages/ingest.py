"""``lorapipe ingest``: decode, clean and dedupe raw images (+ ``metadata.csv``) into a dataset.

(Over 1,000 lines for now: [9/9], which rewrites decoding for speed, moves input reading and
decoding into their own modules.)

Unclean data is what breaks a LoRA (the seed article's first lesson), so every file is decoded
for real and judged before anything trains on it:

- Input: a local folder (recursive), an s3:// prefix (objects are downloaded one at a time into
  a temporary folder as decoding goes), or a ``.zip`` / ``.tar`` / ``.tar.gz`` / ``.tgz``
  archive (local or s3://). Captions come from a lora-scripts ``metadata.csv``
  (``filename,text``) beside the images or given as ``metadata``; of rows naming the same file
  the first gives its caption, and the others are warned about and counted in the report.
- Nothing outside the input is ever read: a symlink leading out of the input, an archive member
  or S3 key with an absolute or ``..`` path, a link member, and a metadata row naming such a
  path are refused and reported (reason ``unsafe_path``).
- Drops, each with a reason code in the report: ``zero_byte``, ``not_an_image``, ``truncated``,
  ``unreadable``, ``decompression_bomb`` (more than ``max_pixels``; Pillow's warning counts as
  an error), ``too_small`` (shorter side below ``min_size``), ``extreme_aspect``,
  ``exact_duplicate`` (same decoded pixels) and ``near_duplicate`` (perceptual hashes at most
  ``near_dup_distance`` bits apart; of duplicates one the quality audit does not flag is
  kept, then the one with the most pixels). A duplicate's entry names the image that was kept.
- Quality audit (``lorapipe.quality``): every kept image is measured for ``blurry``,
  ``upscaled``, ``jpeg_artifacts``, ``overexposed``, ``underexposed`` and ``low_contrast``,
  against absolute thresholds and (focus) against the set's median; ``quality: report`` lists
  the flagged images with their values, thresholds and a thumbnail, ``drop`` drops them with
  the code as the reason.
- Fixes: EXIF orientation applied; every mode (CMYK, P, LA, RGBA, 16-bit, float) becomes 8-bit
  RGB with transparency composited on white; the stored bytes are a freshly encoded PNG, so no
  EXIF or GPS data survives. GIFs and multi-page TIFFs contribute their first frame.

Memory stays bounded with two passes: pass 1 decodes every file in a process pool and keeps
only its size, hashes and quality measures; the keepers are chosen (near duplicates and the
relative focus check need every image first); pass 2 decodes the keepers again and streams
them, and the thumbnails of flagged ones, into the dataset (a dropped flagged image is decoded
once more for its thumbnail).

Output: a dataset directory (local or s3://) plus ``report.json`` / ``report.md`` in it. When no
image survives, only the report is written and the run fails, pointing to it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import stat
import tarfile
import tempfile
import warnings
import zipfile
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar, TypeVar

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from lorapipe import config as config_options
from lorapipe import metadata_csv, store
from lorapipe import quality as image_quality
from lorapipe.config import Where, option
from lorapipe.dataset import DatasetWriter, ImageRecord, is_dataset
from lorapipe.errors import DatasetError, InputError
from lorapipe.metadata_csv import METADATA_CSV
from lorapipe.stages.ingest_report import build_report, render_markdown, size_bucket
from lorapipe.thumbnails import thumbnail_jpeg, thumbnail_name

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
REPORT_FILES = ("report.json", "report.md")
# Pillow's own limit: about 89 megapixels, a 256 MiB RGB buffer
DEFAULT_MAX_PIXELS = 89_478_485
PHASH_BITS = 64
# tasks in flight per worker process: keeps the pool busy while bounding memory
WINDOW_PER_WORKER = 4

# drop reasons, in the order the report lists them
UNSAFE_PATH = "unsafe_path"
ZERO_BYTE = "zero_byte"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
UNREADABLE = "unreadable"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
EXTREME_ASPECT = "extreme_aspect"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
# drops whose file is never decoded again, not even for a thumbnail
UNDECODABLE = {UNSAFE_PATH, ZERO_BYTE, NOT_AN_IMAGE, TRUNCATED, UNREADABLE, DECOMPRESSION_BOMB}
REASONS = (
    UNSAFE_PATH,
    ZERO_BYTE,
    NOT_AN_IMAGE,
    TRUNCATED,
    UNREADABLE,
    DECOMPRESSION_BOMB,
    TOO_SMALL,
    EXTREME_ASPECT,
    EXACT_DUPLICATE,
    NEAR_DUPLICATE,
    *image_quality.CODES,
)

NEAR_DUPLICATE_RULE = (
    " (kept: one the quality audit does not flag, then the larger, or of equal size the"
    " captioned or first-named)"
)
QUALITY_REPORT, QUALITY_DROP = "report", "drop"
JPEG_FORMATS = ("JPEG", "MPO")  # formats whose quantisation tables Pillow reads
DEFAULT_THRESHOLDS = image_quality.Thresholds()
# modes that carry transparency, composited on white
TRANSPARENT_MODES = {"RGBA", "RGBa", "LA", "La", "PA", "P"}
WHITE = (255, 255, 255, 255)


@dataclass
class IngestConfig:
    """What ``lorapipe ingest`` keeps."""

    COMMAND: ClassVar[str] = "ingest"

    metadata: str | None = option(
        None,
        help="lora-scripts `metadata.csv` (`filename,text`), local or `s3://`",
        aliases=("metadata_uri",),
        default_text="the metadata.csv beside the images, if any",
    )
    min_size: int = option(
        512,
        help="drop images whose shorter side is below this many pixels (the seed's 512)",
        minimum=1,
    )
    max_aspect: float = option(
        4.0,
        help="drop images whose longer side is more than this many times the shorter",
        minimum=1,
    )
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        help="drop images with more pixels than this, as decompression bombs (Pillow's limit)",
        minimum=1,
    )
    near_dup_distance: int = option(
        6,
        help=f"perceptual-hash bits (of {PHASH_BITS}) within which images are near duplicates",
        minimum=0,
        maximum=PHASH_BITS // 2,
    )
    workers: int = option(0, help="decoding processes; `0`: one per CPU core", minimum=0)
    quality: str = option(
        QUALITY_REPORT,
        help="what the quality audit does with a flagged image: `report` keeps it and lists it "
        "(values, thresholds, thumbnail) in the report, `drop` drops it with the code as reason",
        choices=(QUALITY_REPORT, QUALITY_DROP),
    )
    min_focus: float = option(
        DEFAULT_THRESHOLDS.min_focus,
        help="`blurry` below this focus (Laplacian over gradient energy of the luma at "
        f"{image_quality.NORMALISED_SIDE} px; about 0.7 / edge width in px; contrast does not "
        "move it)",
        minimum=0,
    )
    min_detail: float = option(
        DEFAULT_THRESHOLDS.min_detail,
        help="`upscaled` below this share of spectral energy above a third of Nyquist (at "
        f"{image_quality.NORMALISED_SIDE} px; an image enlarged from a thumbnail has almost "
        "none)",
        minimum=0,
        maximum=1,
    )
    min_jpeg_quality: int = option(
        DEFAULT_THRESHOLDS.min_jpeg_quality,
        help="`jpeg_artifacts` for a JPEG whose quantisation tables match an IJG quality "
        "below this",
        minimum=0,
        maximum=100,
    )
    max_blockiness: float = option(
        DEFAULT_THRESHOLDS.max_blockiness,
        help="`jpeg_artifacts` for another format whose 8x8-grid blockiness (strongest over next "
        "phase of neighbour differences, 1 when clean) is above this",
        minimum=1,
    )
    max_clipped_highlights: float = option(
        DEFAULT_THRESHOLDS.max_clipped_highlights,
        help="`overexposed` above this fraction of pixels with a channel at 250 or more",
        minimum=0,
        maximum=1,
    )
    max_clipped_shadows: float = option(
        DEFAULT_THRESHOLDS.max_clipped_shadows,
        help="`underexposed` above this fraction of pixels with every channel at 5 or less",
        minimum=0,
        maximum=1,
    )
    min_contrast: float = option(
        DEFAULT_THRESHOLDS.min_contrast,
        help="`low_contrast` below this 1st-99th percentile luma range (1: black to white)",
        minimum=0,
        maximum=1,
    )
    relative_focus: float = option(
        DEFAULT_THRESHOLDS.relative_focus,
        help="`blurry` below this times the median focus of the set (of at least "
        f"{image_quality.MIN_RELATIVE_SET} images); `0`: no relative check",
        minimum=0,
        maximum=1,
    )

    def validate(self, where: Where | None = None) -> None:
        """Refuse settings that would make the cleaning meaningless, naming the flag."""
        config_options.check_fields(
            self, where or (lambda key: f"{key} ({config_options.flag(key)})")
        )

    def thresholds(self) -> image_quality.Thresholds:
        """The quality audit's thresholds, as set here."""
        return image_quality.Thresholds(
            **{item.name: getattr(self, item.name) for item in fields(image_quality.Thresholds)}
        )


@dataclass
class _Drop:
    """A file that is not in the dataset, and why."""

    file: str
    reason: str
    detail: str
    kept: str | None = None  # for duplicates: the file kept instead
    thumbnail: str | None = None  # relative to the dataset, for a drop that decodes


def run(input_uri: str, output_uri: str, config: IngestConfig | None = None) -> dict:
    """Clean the images of ``input_uri`` into a dataset at ``output_uri``; write the report
    next to it and return it. Raises DatasetError (after writing the report) if none is kept."""
    config = config or IngestConfig()
    config.validate()
    _remove_failed_report(output_uri)
    # the writer opens first, so an unusable output stops the run before any decoding
    with _open_input(input_uri) as source, DatasetWriter(output_uri) as writer:
        captions = _read_captions(source, config.metadata)
        workers = min(config.workers or os.cpu_count() or 1, max(1, len(source.names)))
        decoded = list(
            _decode_all(source, source.names, workers, "check", config.max_pixels, measure=True)
        )
        usable, drops = _usable(decoded, config)
        audit = _Audit.of(usable, config)
        kept, duplicates = _choose(
            usable, config.near_dup_distance, set(captions.by_name), set(audit.flags)
        )
        kept, flagged_drops = audit.settle(kept)
        drops += duplicates + flagged_drops
        stats = _Stats(files=len(source.names) + len(source.drops), drops=source.drops + drops)
        stats.decoded_sizes.update(
            size_bucket(d.width, d.height) for _, d in decoded if not d.reason
        )
        if kept:
            _write_kept(source, kept, captions.by_name, writer, config, workers, stats, audit)
            _write_dropped_thumbnails(source, writer, config, workers, audit, drops)
        report = build_report(input_uri, output_uri, config, stats, captions, audit, REASONS)
        if kept:
            writer.write_extra("report.json", json.dumps(report, indent=2) + "\n")
            writer.write_extra("report.md", render_markdown(report))
        else:
            writer.abort()  # an empty dataset is never published

    if not report["kept"]:
        raise DatasetError(_nothing_kept(input_uri, output_uri, report))
    log.info("kept %d of %d files; wrote %s", report["kept"], report["files"], output_uri)
    return report


# --------------------------------------------------------------------------- input


@dataclass
class _Input:
    """The input as a local folder: every name is a file under ``root`` (for S3 once fetched)."""

    root: Path
    names: list[str]  # candidate image files, relative POSIX paths, sorted
    drops: list[_Drop]  # files refused before reading them
    metadata: tuple[str, str] | None  # (uri, name for messages) of the metadata.csv beside them
    s3_prefix: str | None = None

    def path(self, name: str) -> Path:
        """The local file for ``name``; an S3 object is downloaded now, one at a time."""
        local = self.root / name
        if self.s3_prefix is not None and not local.exists():
            store.download_file(store.join(self.s3_prefix, name), local)
        return local

    def escapes(self, name: str) -> bool:
        """Whether ``name`` resolves outside the input, through a symlink or otherwise."""
        return not (self.root / name).resolve().is_relative_to(self.root)

    def known(self) -> set[str]:
        return set(self.names) | {drop.file for drop in self.drops}


@contextlib.contextmanager
def _open_input(input_uri: str) -> Iterator[_Input]:
    """The input as a local folder: a folder as it is, an archive extracted, an S3 prefix
    fetched lazily into a temporary folder."""
    if input_uri.lower().endswith(ARCHIVE_SUFFIXES):
        with (
            store.local_file(input_uri) as archive,
            tempfile.TemporaryDirectory(prefix="lorapipe-ingest-") as tmp,
        ):
            yield _extract_archive(archive, Path(tmp).resolve(), input_uri)
    elif store.is_s3(input_uri):
        with tempfile.TemporaryDirectory(prefix="lorapipe-ingest-") as tmp:
            yield _s3_input(input_uri, Path(tmp).resolve())
    else:
        yield _local_input(input_uri)


def _local_input(input_uri: str) -> _Input:
    given = Path(input_uri.removeprefix("file://"))
    if not given.is_dir():
        problem = "is not a folder" if given.exists() else "does not exist"
        raise InputError(
            f"input '{input_uri}' {problem}; give a folder of images, an archive "
            f"({', '.join(ARCHIVE_SUFFIXES)}) or an s3:// prefix"
        )
    root = given.resolve()
    names: list[str] = []
    drops: list[_Drop] = []
    # os.walk does not descend into symlinked folders; one leading outside is reported
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        drops += [drop for entry in subdirs if (drop := _escape(here / entry, root))]
        for entry in files:
            path = here / entry
            drop = _escape(path, root)
            if drop is None and not path.is_file():
                name = path.relative_to(root).as_posix()
                drop = _Drop(name, UNREADABLE, "not a regular file (or a broken link)")
            if drop:
                drops.append(drop)
            else:
                names.append(path.relative_to(root).as_posix())
    return _with_metadata(root, sorted(names), drops, str(root / METADATA_CSV))


def _escape(path: Path, root: Path) -> _Drop | None:
    """The drop for a symlink under ``root`` that leads outside it, or None."""
    if path.resolve().is_relative_to(root):
        return None
    target = os.readlink(path) if path.is_symlink() else path.resolve()
    detail = f"symlink to {target}, outside the input"
    return _Drop(path.relative_to(root).as_posix(), UNSAFE_PATH, detail)


def _s3_input(prefix_uri: str, root: Path) -> _Input:
    prefix = prefix_uri.rstrip("/")
    objects = store.list_objects(prefix)
    if not objects:
        raise InputError(f"no objects under '{prefix_uri}'; check the bucket and the prefix")
    names: list[str] = []
    drops: list[_Drop] = []
    for info in objects:
        name = info.uri[len(prefix) + 1 :]
        if name.endswith("/"):
            continue  # a "folder" marker object
        unsafe = _unsafe_name(name)
        if unsafe:
            drops.append(_Drop(name, UNSAFE_PATH, f"key has {unsafe}"))
        else:
            names.append(_clean_name(name))
    source = _with_metadata(root, names, drops, store.join(prefix, METADATA_CSV))
    source.s3_prefix = prefix
    return source


def _extract_archive(archive: Path, root: Path, input_uri: str) -> _Input:
    """Extract the regular members with safe names into ``root``; report the others."""
    names: list[str] = []
    drops: list[_Drop] = []
    try:
        if input_uri.lower().endswith(".zip"):
            _extract_zip(archive, root, names, drops)
        else:
            _extract_tar(archive, root, names, drops)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
        raise InputError(
            f"'{input_uri}' is not a readable archive ({_one_line(error)}); check the file"
        ) from None
    source = _with_metadata(root, sorted(set(names)), drops, str(root / METADATA_CSV))
    if source.metadata:
        source.metadata = (source.metadata[0], f"{METADATA_CSV} in {input_uri}")
    return source


def _extract_zip(archive: Path, root: Path, names: list[str], drops: list[_Drop]) -> None:
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.infolist():
            if member.is_dir():
                continue
            is_link = stat.S_ISLNK(member.external_attr >> 16)
            refused = _member_refusal(member.filename, "a symlink" if is_link else None)
            if refused:
                drops.append(refused)
                continue
            _extract_member(lambda m=member: bundle.open(m), member.filename, root, names, drops)


def _extract_tar(archive: Path, root: Path, names: list[str], drops: list[_Drop]) -> None:
    with tarfile.open(archive, "r:*") as bundle:
        for member in bundle:
            if member.isdir():
                continue
            kind = None
            if member.issym() or member.islnk():
                kind = "a link"
            elif not member.isfile():
                kind = "a special file"
            refused = _member_refusal(member.name, kind)
            if refused:
                drops.append(refused)
                continue
            _extract_member(lambda m=member: bundle.extractfile(m), member.name, root, names, drops)


def _member_refusal(name: str, kind: str | None) -> _Drop | None:
    """A drop for an archive member that would write outside the folder (zip-slip) or is not a
    plain file, or None for a member that is safe to extract."""
    unsafe = _unsafe_name(name)
    if unsafe:
        return _Drop(name, UNSAFE_PATH, f"archive member with {unsafe}; not extracted")
    if kind:
        return _Drop(name, UNSAFE_PATH, f"archive member is {kind}; not extracted")
    return None


def _extract_member(
    open_member: Callable[[], Any], name: str, root: Path, names: list[str], drops: list[_Drop]
) -> None:
    """Stream one member to disk; a damaged member is dropped, the rest still extracts."""
    clean = _clean_name(name)
    target = root / clean
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open_member() as member, open(target, "wb") as out:
            shutil.copyfileobj(member, out)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
        drops.append(_Drop(clean, UNREADABLE, f"damaged archive member ({_one_line(error)})"))
        return
    names.append(clean)


def _with_metadata(root: Path, names: list[str], drops: list[_Drop], uri: str) -> _Input:
    """The input with ``metadata.csv`` taken out of the images and remembered as captions."""
    metadata = None
    if METADATA_CSV in names:
        names = [name for name in names if name != METADATA_CSV]
        metadata = (uri, uri)
    return _Input(root, names, drops, metadata)


def _unsafe_name(name: str) -> str | None:
    """Why a path from an archive, an S3 key or metadata.csv could leave the input, or None."""
    slashed = name.replace("\\", "/")
    if slashed.startswith("/") or PureWindowsPath(name).drive:
        return "an absolute path"
    if ".." in slashed.split("/"):
        return "'..' in the path"
    return None


def _clean_name(name: str) -> str:
    """``./a//b.png`` and ``a\\b.png`` -> ``a/b.png``: one spelling per file."""
    return PurePosixPath(name.replace("\\", "/")).as_posix()


# --------------------------------------------------------------------------- metadata.csv


@dataclass
class _Captions:
    """Captions from metadata.csv by image name, and the rows that could not be used."""

    source: str | None = None
    rows: int = 0
    by_name: dict[str, str] = field(default_factory=dict)
    missing: list[dict[str, Any]] = field(default_factory=list)  # file not in the input
    refused: list[dict[str, Any]] = field(default_factory=list)  # unsafe or repeated rows
    duplicate_rows: int = 0  # rows naming a file an earlier row captions


def _read_captions(source: _Input, metadata_uri: str | None) -> _Captions:
    """Match metadata.csv rows to the input's files, refusing rows that point outside it. Of
    rows naming one file the first gives its caption; the others are refused, counted and
    warned about (a silently dropped caption is a LoRA trained on the wrong text)."""
    located = (metadata_uri, metadata_uri) if metadata_uri else source.metadata
    if located is None:
        return _Captions()
    uri, label = located
    rows = metadata_csv.parse(store.read_bytes(uri), label)
    captions = _Captions(source=label, rows=len(rows))
    known = source.known()
    lines_of: dict[str, list[int]] = {}  # captioned file -> its rows' lines, the kept one first
    for line, filename, text in ((row.line, row.filename, row.text) for row in rows):
        entry = {"line": line, "filename": filename}
        name = _clean_name(filename)
        why = _unsafe_name(filename)
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


# --------------------------------------------------------------------------- decoding


@dataclass
class _Decoded:
    """What a worker learned about one file: why it is unusable, or its size, hashes and
    quality measures."""

    reason: str | None = None
    detail: str = ""
    width: int = 0
    height: int = 0
    sha256: str = ""  # of the 8-bit RGB pixels
    phash: int = 0
    png: bytes = b""  # only when asked for (pass 2)
    fixes: tuple[str, ...] = ()
    measures: image_quality.Measures | None = None  # only when asked for (pass 1)
    thumbnail: bytes = b""  # only when asked for (flagged images)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _decode_task(task: tuple[Path, bool], max_pixels: int, encode: bool, measure: bool) -> _Decoded:
    """``_decode_file`` of (path, whether to make its thumbnail)."""
    path, thumbnail = task
    return _decode_file(path, max_pixels, encode=encode, measure=measure, thumbnail=thumbnail)


def _decode_file(
    path: Path,
    max_pixels: int,
    *,
    encode: bool = False,
    measure: bool = False,
    thumbnail: bool = False,
) -> _Decoded:
    """Decode one file completely, as 8-bit RGB; never raises: a broken file (which may raise
    anything from OSError to struct.error inside Pillow) comes back with a reason. The quality
    measures read the file's JPEG quantisation tables, so they are taken here."""
    try:
        if path.stat().st_size == 0:
            return _Decoded(ZERO_BYTE, "the file is empty")
        with _pixel_limit(max_pixels), Image.open(path) as image:
            image.load()
            rgb, fixes = _normalize(image)
            tables = image.quantization if image.format in JPEG_FORMATS else None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return _Decoded(DECOMPRESSION_BOMB, _bomb_detail(error, max_pixels))
    except UnidentifiedImageError:
        return _Decoded(NOT_AN_IMAGE, "not an image format Pillow can read")
    except Exception as error:
        message = _one_line(error)
        reason = (
            TRUNCATED
            if isinstance(error, EOFError) or "truncated" in message.lower()
            else UNREADABLE
        )
        return _Decoded(reason, message)
    return _Decoded(
        width=rgb.width,
        height=rgb.height,
        sha256=hashlib.sha256(rgb.tobytes()).hexdigest(),
        phash=perceptual_hash(rgb),
        png=_png(rgb) if encode else b"",
        fixes=fixes,
        measures=image_quality.measure(rgb, tables) if measure else None,
        thumbnail=thumbnail_jpeg(rgb) if thumbnail else b"",
    )


def _bomb_detail(error: Exception, max_pixels: int) -> str:
    """``1,200,000 pixels > max_pixels 1,000,000``: Pillow's own message names twice the limit
    when it raises rather than warns."""
    claimed = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(claimed.group(1)):,} pixels" if claimed else "more pixels"
    return f"{size} > max_pixels {max_pixels:,}; raise --max-pixels if the image is real"


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow refuses images over ``max_pixels``: its DecompressionBombWarning (past the
    limit; past twice the limit it raises anyway) becomes an error."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _normalize(image: Image.Image) -> tuple[Image.Image, tuple[str, ...]]:
    """The image upright and in 8-bit RGB, and the fixes that took."""
    fixes = []
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
        fixes.append("applied EXIF orientation")
    if image.mode != "RGB":
        fixes.append(f"converted {image.mode} to RGB")
    return _to_rgb(image), tuple(fixes)


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparent pixels become white, as a training image has no alpha."""
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_rgb(image)
    if image.mode in TRANSPARENT_MODES or "transparency" in image.info:
        white = Image.new("RGBA", image.size, WHITE)
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer, read as 16-bit range) and float (0..1) grey to 8-bit RGB;
    Pillow's own conversion would clip instead of scale."""
    full_scale = 1.0 if image.mode == "F" else 65535.0
    values = np.asarray(image, dtype=np.float64) * (255.0 / full_scale)
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``M @ x`` is the DCT of ``x``."""
    k = np.arange(size)[:, None]
    i = np.arange(size)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * size)) * np.sqrt(2 / size)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT_32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash: whether each of the 8x8 lowest DCT frequencies of a 32x32 grey thumbnail
    is above their median. Resizing, re-encoding and small edits change few bits."""
    thumbnail = image.resize((32, 32), Image.Resampling.BOX).convert("L")
    frequencies = _DCT_32 @ np.asarray(thumbnail, dtype=np.float64) @ _DCT_32.T
    lowest = frequencies[:8, :8]
    bits = (lowest > np.median(lowest)).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


T = TypeVar("T")
R = TypeVar("R")


def _bounded_map(function: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map`` in input order over a process pool, with at most WINDOW_PER_WORKER tasks per
    worker in flight: ``items`` is consumed lazily and results never pile up in memory.

    Workers are spawned, not forked: by now boto3 and tqdm have threads, and forking a
    threaded process can deadlock."""
    if workers <= 1:
        yield from map(function, items)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= workers * WINDOW_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _decode_all(
    source: _Input,
    names: list[str],
    workers: int,
    step: str,
    max_pixels: int,
    *,
    encode: bool = False,
    measure: bool = False,
    thumbnails: Collection[str] = (),
) -> Iterator[tuple[str, _Decoded]]:
    """(name, decoded) for each name, in order, decoded by ``workers`` processes; ``encode``:
    with the PNG, ``measure``: with the quality measures, and a thumbnail for ``thumbnails``."""
    decode = functools.partial(_decode_task, max_pixels=max_pixels, encode=encode, measure=measure)
    tasks = ((source.path(name), name in thumbnails) for name in names)
    results = zip(names, _bounded_map(decode, tasks, workers), strict=True)
    return tqdm(results, total=len(names), desc=f"ingest: {step}", unit="image", disable=None)


# --------------------------------------------------------------------------- choosing


def _usable(
    decoded: list[tuple[str, _Decoded]], config: IngestConfig
) -> tuple[list[tuple[str, _Decoded]], list[_Drop]]:
    """The decoded files of a usable size, and a drop for every other one."""
    usable: list[tuple[str, _Decoded]] = []
    drops: list[_Drop] = []
    for name, result in decoded:
        drop = _unusable(name, result, config)
        if drop:
            drops.append(drop)
        else:
            usable.append((name, result))
    return usable, drops


def _choose(
    usable: list[tuple[str, _Decoded]], distance: int, captioned: set[str], flagged: set[str]
) -> tuple[list[str], list[_Drop]]:
    """The names to keep (sorted) and a drop for every duplicate.

    Of duplicates, exact or near, one the quality audit does not flag is kept, then the image
    with the most pixels, then one that metadata.csv captions, then the first by name; a
    duplicate names its final keeper."""

    def preference(item: tuple[str, _Decoded]) -> tuple[bool, int, bool, str]:
        name, result = item
        return (name in flagged, -result.pixels, name not in captioned, name)

    drops: list[_Drop] = []
    by_pixels: dict[str, list[tuple[str, _Decoded]]] = defaultdict(list)
    for name, result in usable:
        by_pixels[result.sha256].append((name, result))

    unique: list[tuple[str, _Decoded]] = []
    exact: list[tuple[str, str]] = []  # (duplicate, kept)
    for group in by_pixels.values():
        keeper, *copies = sorted(group, key=preference)
        unique.append(keeper)
        exact += [(name, keeper[0]) for name, _ in copies]

    index = _NearDuplicateIndex(distance)
    replaced_by: dict[str, str] = {}
    for name, result in sorted(unique, key=preference):
        match = index.find(result.phash)
        if match:
            kept, distance = match
            replaced_by[name] = kept
            detail = f"perceptual hash {distance} bits from {kept}" + NEAR_DUPLICATE_RULE
            drops.append(_Drop(name, NEAR_DUPLICATE, detail, kept))
        else:
            index.add(result.phash, name)
    for name, kept in exact:
        final = replaced_by.get(kept, kept)
        drops.append(_Drop(name, EXACT_DUPLICATE, f"same pixels as {kept}", final))
    kept_names = sorted(name for name, _ in unique if name not in replaced_by)
    return kept_names, drops


def _unusable(name: str, result: _Decoded, config: IngestConfig) -> _Drop | None:
    """The drop for a file that failed to decode or has the wrong size, or None."""
    if result.reason:
        return _Drop(name, result.reason, result.detail)
    size = f"{result.width}x{result.height}"
    short, long = sorted((result.width, result.height))
    if short < config.min_size:
        return _Drop(name, TOO_SMALL, f"{size}: shorter side {short} < min_size {config.min_size}")
    if long / short > config.max_aspect:
        ratio = long / short
        return _Drop(
            name, EXTREME_ASPECT, f"{size}: aspect {ratio:.2f} > max_aspect {config.max_aspect:g}"
        )
    return None


class _NearDuplicateIndex:
    """Kept perceptual hashes, searchable within ``distance`` bits without comparing with every
    kept image: the 64 bits are cut into ``distance + 1`` blocks, and two hashes that close
    agree on at least one whole block (pigeonhole), so only hashes sharing a block are compared.
    """

    def __init__(self, distance: int) -> None:
        self.distance = distance
        blocks = distance + 1
        edges = [round(i * PHASH_BITS / blocks) for i in range(blocks + 1)]
        self._blocks = list(itertools.pairwise(edges))
        self._buckets: dict[tuple[int, int], list[tuple[int, int, str]]] = defaultdict(list)
        self._count = 0

    def _keys(self, phash: int) -> list[tuple[int, int]]:
        return [(lo, (phash >> lo) & ((1 << (hi - lo)) - 1)) for lo, hi in self._blocks]

    def add(self, phash: int, name: str) -> None:
        for key in self._keys(phash):
            self._buckets[key].append((self._count, phash, name))
        self._count += 1

    def find(self, phash: int) -> tuple[str, int] | None:
        """(name, distance) of the earliest added hash within ``distance`` bits, or None."""
        matches = [
            (order, name, (phash ^ kept).bit_count())
            for key in self._keys(phash)
            for order, kept, name in self._buckets.get(key, ())
            if (phash ^ kept).bit_count() <= self.distance
        ]
        if not matches:
            return None
        _, name, distance = min(matches)
        return name, distance


# --------------------------------------------------------------------------- quality audit


@dataclass
class _Audit:
    """The quality audit of a run: the measures of every usable image, the flags of those
    that survive deduplication, what was done with them and where their thumbnails went."""

    thresholds: image_quality.Thresholds
    action: str
    measures: dict[str, image_quality.Measures]  # every usable image that could be measured
    median_focus: float | None  # of those; None for a set too small to compare with
    flags: dict[str, list[image_quality.Flag]]  # flagged images only
    ids: dict[str, str]  # record id of each flagged image, naming its thumbnail
    audited: int = 0  # measured images among the keepers
    dropped: set[str] = field(default_factory=set)
    thumbnails: dict[str, str] = field(default_factory=dict)  # written, relative to the dataset

    @classmethod
    def of(cls, usable: list[tuple[str, _Decoded]], config: IngestConfig) -> _Audit:
        thresholds = config.thresholds()
        measures = {name: result.measures for name, result in usable if result.measures}
        median = image_quality.set_median_focus([found.focus for found in measures.values()])
        flags = {
            name: found
            for name, measured in measures.items()
            if (found := image_quality.verdict(measured, thresholds, median))
        }
        ids = {name: result.sha256[:16] for name, result in usable if name in flags}
        return cls(thresholds, config.quality, measures, median, flags, ids)

    def settle(self, kept: list[str]) -> tuple[list[str], list[_Drop]]:
        """The keepers after the audit, and its drops (with ``drop``). Only keepers keep their
        flags: a duplicate is reported as a duplicate, not for its quality."""
        self.audited = sum(name in self.measures for name in kept)
        self.flags = {name: self.flags[name] for name in kept if name in self.flags}
        if self.action != QUALITY_DROP:
            return kept, []
        self.dropped = set(self.flags)
        drops = [
            _Drop(name, flags[0].code, "; ".join(flag.detail for flag in flags))
            for name, flags in self.flags.items()
        ]
        return [name for name in kept if name not in self.dropped], drops

    def write_thumbnail(self, writer: DatasetWriter, name: str, jpeg: bytes) -> None:
        path = thumbnail_name(self.ids[name])
        writer.write_extra(path, jpeg)
        self.thumbnails[name] = path


# --------------------------------------------------------------------------- writing


@dataclass
class _Stats:
    files: int
    drops: list[_Drop]
    decoded_sizes: Counter = field(default_factory=Counter)
    kept_sizes: Counter = field(default_factory=Counter)
    fixes: Counter = field(default_factory=Counter)
    kept: int = 0
    captioned: int = 0


def _write_kept(
    source: _Input,
    kept: list[str],
    captions: dict[str, str],
    writer: DatasetWriter,
    config: IngestConfig,
    workers: int,
    stats: _Stats,
    audit: _Audit,
) -> None:
    """Pass 2: decode the keepers again and stream them, as PNG, into the dataset, with the
    thumbnails of the flagged ones."""
    decoded = _decode_all(
        source, kept, workers, "write", config.max_pixels, encode=True, thumbnails=audit.flags
    )
    for name, result in decoded:
        if result.reason:  # the file changed since pass 1
            stats.drops.append(_Drop(name, result.reason, result.detail))
            continue
        if result.thumbnail:
            audit.write_thumbnail(writer, name, result.thumbnail)
        caption = captions.get(name, "")
        writer.write(
            ImageRecord(
                id=result.sha256[:16],
                image=result.png,
                format="png",
                width=result.width,
                height=result.height,
                sha256=result.sha256,
                caption=caption,
                source=name,
            )
        )
        stats.kept += 1
        stats.captioned += bool(caption)
        stats.kept_sizes[size_bucket(result.width, result.height)] += 1
        stats.fixes.update(result.fixes)


def _write_dropped_thumbnails(
    source: _Input,
    writer: DatasetWriter,
    config: IngestConfig,
    workers: int,
    audit: _Audit,
    drops: Sequence[_Drop],
) -> None:
    """The thumbnails of the dropped images that decode (too small, too wide, duplicates,
    dropped by the audit), so the report shows what was dropped: one more decode of each, as
    pass 2 does not see them."""
    decodable = {drop.file: drop for drop in drops if drop.reason not in UNDECODABLE}
    decoded = _decode_all(
        source, sorted(decodable), workers, "thumbnails", config.max_pixels, thumbnails=decodable
    )
    for name, result in decoded:
        if not result.thumbnail:
            continue
        if name in audit.dropped:
            audit.write_thumbnail(writer, name, result.thumbnail)
            decodable[name].thumbnail = audit.thumbnails[name]
        else:
            path = thumbnail_name(f"dropped-{hashlib.sha256(name.encode()).hexdigest()[:16]}")
            writer.write_extra(path, result.thumbnail)
            decodable[name].thumbnail = path


def _nothing_kept(input_uri: str, output_uri: str, report: dict[str, Any]) -> str:
    """The error of a run that kept no image. Its report goes to the output folder when that
    holds no dataset; an older dataset there is left whole, so the reasons go in the message."""
    reasons = ", ".join(f"{n} {reason}" for reason, n in report["dropped_by_reason"].items())
    summary = f"no images survived ingest of '{input_uri}' ({report['files']} files: {reasons})"
    if is_dataset(output_uri):
        return f"{summary}; the older dataset at {output_uri} is left as it was"
    store.write_text(store.join(output_uri, "report.json"), json.dumps(report, indent=2) + "\n")
    store.write_text(store.join(output_uri, "report.md"), render_markdown(report))
    return f"{summary}; see {store.join(output_uri, 'report.md')} for why each was dropped"


def _remove_failed_report(output_uri: str) -> None:
    """A run that kept nothing leaves only its report in the output folder; remove it, since
    a dataset is published only into an empty folder or over an older dataset."""
    base = output_uri.rstrip("/") + "/"
    found = {uri.removeprefix(base): uri for uri in store.list_uris(output_uri)}
    if found and set(found) <= set(REPORT_FILES):
        store.delete_many(list(found.values()))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --------------------------------------------------------------------------- CLI


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers the KFP UI shows for an ingest."""
    audit = report["quality"]
    return {
        "images_kept": report["kept"],
        "images_dropped": report["dropped"],
        "images_flagged_quality": audit["flagged_images"],
        **{f"images_flagged_{code}": count for code, count in audit["flagged_by_code"].items()},
    }


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", help="folder of images, .zip/.tar/.tar.gz archive, or s3:// prefix"
    )
    parser.add_argument("--out", required=True, help="output dataset (local or s3://)")
    parser.add_argument("--config", help="YAML file of the options below")
    config_options.add_arguments(parser, IngestConfig)


def main(args: argparse.Namespace) -> int:
    config = config_options.load(
        IngestConfig, args.config, config_options.overrides_from_args(args, IngestConfig)
    )
    report = run(args.input, args.out, config)
    reasons = ", ".join(
        f"{count} {reason}" for reason, count in report["dropped_by_reason"].items()
    )
    audit = report["quality"]
    codes = ", ".join(f"{n} {code}" for code, n in audit["flagged_by_code"].items() if n)
    print(
        f"{report['kept']} of {report['files']} files kept, {report['dropped']} dropped"
        + (f" ({reasons})" if reasons else "")
        + (f"; quality audit flagged {audit['flagged_images']} ({codes})" if codes else "")
        + f"; see {store.join(args.out, 'report.md')}"
    )
    return 0
