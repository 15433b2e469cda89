"""``lorapipe ingest``: decode, clean and dedupe raw images (+ ``metadata.csv``) into a dataset.

Unclean data is what breaks a LoRA (the seed article's first lesson), so every file is decoded
for real and judged before anything trains on it:

- Input (``lorapipe.ingestion.inputs``): a local folder (recursive), an s3:// prefix (objects
  are downloaded one at a time into a temporary folder as decoding goes), or a ``.zip`` /
  ``.tar`` / ``.tar.gz`` / ``.tgz`` archive (local or s3://). Captions come from a
  lora-scripts ``metadata.csv`` (``filename,text``) beside the images or given as
  ``metadata``; of rows naming the same file the first gives its caption, and the others are
  warned about and counted in the report.
- Nothing outside the input is ever read: a symlink leading out of the input, an archive member
  or S3 key with an absolute or ``..`` path, a link member, and a metadata row naming such a
  path are refused and reported (reason ``unsafe_path``).
- Drops, each with a reason code in the report: ``zero_byte``, ``not_an_image``, ``truncated``,
  ``unreadable``, ``decompression_bomb`` (more than ``max_pixels``), ``too_small`` (shorter
  side below ``min_size``), ``extreme_aspect``, ``exact_duplicate`` (same decoded pixels) and
  ``near_duplicate`` (perceptual hashes at most ``near_dup_distance`` bits apart; of
  duplicates one the quality audit does not flag is kept, then the one with the most pixels).
  A duplicate's entry names the image that was kept.
- Quality audit (``lorapipe.quality``): every kept image is measured for ``blurry``,
  ``upscaled``, ``jpeg_artifacts``, ``overexposed``, ``underexposed`` and ``low_contrast``,
  against absolute thresholds and (focus) against the set's median; ``quality: report`` lists
  the flagged images with their values, thresholds and a thumbnail, ``drop`` drops them with
  the code as the reason.
- Rows (``lorapipe.image_bytes``): a JPEG, PNG or WebP that decodes to 8-bit RGB with no EXIF
  rotation keeps its own bytes, with EXIF, GPS, XMP, comments and colour profiles cut out
  without re-encoding; every other image has its fixes applied (EXIF orientation; every mode,
  CMYK, P, LA, RGBA, 16-bit, float, to 8-bit RGB with transparency composited on white) and is
  stored re-encoded losslessly (WebP lossless at its fastest; PNG past WebP's 16383 px). No
  metadata survives in any row; the ``format`` column says what each holds. GIFs and
  multi-page TIFFs contribute their first frame.

Memory stays bounded with two passes over the files, on ``workers`` threads: pass 1 decodes
every file once (``lorapipe.ingestion.decoding``) and keeps only its size, hashes and quality
measures; the keepers are chosen (near duplicates and the relative focus check need every
image first); pass 2 (``lorapipe.ingestion.writing``) streams them into the dataset, copying a
kept file's stripped bytes without decoding it again, and writes the thumbnails of flagged
and dropped images from reduced decodes.

Output: a dataset directory (local or s3://) plus ``report.json`` / ``report.md`` in it. When no
image survives, only the report is written and the run fails, pointing to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from lorapipe import config as config_options
from lorapipe import quality as image_quality
from lorapipe import store
from lorapipe.config import Where, option
from lorapipe.dataset import DatasetWriter, is_dataset
from lorapipe.errors import DatasetError
from lorapipe.ingestion.audit import QUALITY_DROP, QUALITY_REPORT, Audit
from lorapipe.ingestion.captions import read_captions
from lorapipe.ingestion.choosing import choose, usable
from lorapipe.ingestion.decoding import PHASH_BITS, Decoded, decode_file, pixel_limit
from lorapipe.ingestion.drops import REASONS
from lorapipe.ingestion.inputs import open_input
from lorapipe.ingestion.parallel import over_files
from lorapipe.ingestion.report import build_report, render_markdown, size_bucket
from lorapipe.ingestion.writing import Stats, write_dropped_thumbnails, write_kept

log = logging.getLogger(__name__)

REPORT_FILES = ("report.json", "report.md")
# Pillow's own limit: about 89 megapixels, a 256 MiB RGB buffer
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_THRESHOLDS = image_quality.Thresholds()


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
    workers: int = option(0, help="decoding threads; `0`: one per CPU core", minimum=0)
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


def run(input_uri: str, output_uri: str, config: IngestConfig | None = None) -> dict:
    """Clean the images of ``input_uri`` into a dataset at ``output_uri``; write the report
    next to it and return it. Raises DatasetError (after writing the report) if none is kept."""
    config = config or IngestConfig()
    config.validate()
    _remove_failed_report(output_uri)
    # the writer opens first, so an unusable output stops the run before any decoding
    with (
        open_input(input_uri) as source,
        DatasetWriter(output_uri) as writer,
        pixel_limit(config.max_pixels),
    ):
        captions = read_captions(source, config.metadata)
        workers = min(config.workers or os.cpu_count() or 1, max(1, len(source.names)))

        def task(name: str, path: Path) -> Decoded:
            return decode_file(path, config.max_pixels)

        decoded = list(over_files(source, source.names, task, workers, "check"))
        found, drops = usable(decoded, config)
        audit = Audit.of(found, config)
        kept, duplicates = choose(
            found, config.near_dup_distance, set(captions.by_name), set(audit.flags)
        )
        kept, flagged_drops = audit.settle(kept)
        drops += duplicates + flagged_drops
        stats = Stats(files=len(source.names) + len(source.drops), drops=source.drops + drops)
        stats.decoded_sizes.update(
            size_bucket(d.width, d.height) for _, d in decoded if not d.reason
        )
        if kept:
            by_name = dict(found)
            keepers = {name: by_name[name] for name in kept}
            write_kept(
                source, keepers, captions.by_name, writer, config.max_pixels, workers, stats, audit
            )
            write_dropped_thumbnails(source, writer, config.max_pixels, workers, audit, drops)
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
