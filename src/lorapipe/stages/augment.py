"""``lorapipe augment``: add a horizontally mirrored copy of every image where mirroring is safe.

Mirroring doubles a small dataset and evens out a subject's left/right bias (the seed article's
fix for faces and hands drawn one way). It is wrong for some images, which are copied but not
mirrored: text, logos and signatures come out backwards, and an asymmetric design (a single
earring, a side ponytail, heterochromia) would be learned both ways round. ``skip_tags`` lists
them as glob patterns; an image is skipped when one of its tags matches one, or, for
hand-captioned images, when its caption mentions one.

A mirrored copy gets ``flipped=True``, ``parent_id`` = the original's id, id ``<id>-flip``,
the sha256 of its own pixels, and its caption and tags with left and right swapped
(``left hand`` -> ``right hand``). Records that are mirrored copies, or whose copy is already in
the dataset, are not mirrored again, so running augment on its own output changes nothing.

Output: a dataset directory (local or s3://) plus ``report.json`` / ``report.md`` in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from PIL import Image, ImageOps
from tqdm import tqdm

from lorapipe import config as config_options
from lorapipe import image_bytes
from lorapipe.captions import swap_left_right
from lorapipe.config import option
from lorapipe.dataset import DatasetWriter, ImageRecord, count_rows, decode_image, read_records
from lorapipe.errors import DatasetError
from lorapipe.flip_rules import DEFAULT_SKIP_TAGS, flip_blocker

log = logging.getLogger(__name__)

FLIP_SUFFIX = "-flip"
# the mirror of a lossy row (JPEG, lossy WebP): visually lossless, so it adds no visible artifacts
LOSSY_QUALITY = 95


@dataclass
class AugmentConfig:
    """Which images ``lorapipe augment`` mirrors."""

    COMMAND: ClassVar[str] = "augment"

    skip_tags: tuple[str, ...] = option(
        DEFAULT_SKIP_TAGS,
        help="an image with a tag matching one of these glob patterns is not mirrored "
        "(comma-separated); setting it replaces the whole default list",
        default_text="text, logo, watermark, signature and asymmetry tags (see below)",
    )
    extra_skip_tags: tuple[str, ...] = option(
        (), help='patterns added to `skip_tags`, comma-separated (e.g. "holding sword, sign")'
    )

    @property
    def patterns(self) -> tuple[str, ...]:
        return self.skip_tags + self.extra_skip_tags


def run(dataset_uri: str, output_uri: str, config: AugmentConfig | None = None) -> dict:
    """Copy ``dataset_uri`` to ``output_uri`` with a mirrored copy of every eligible image;
    write the report next to it and return it."""
    config = config or AugmentConfig()
    total = count_rows(dataset_uri)
    if total == 0:
        raise DatasetError(f"dataset '{dataset_uri}' has no images; run lorapipe ingest first")
    mirrored_already = _ids_with_mirrored_copy(dataset_uri)
    stats = _AugmentStats()

    with (
        DatasetWriter(output_uri) as writer,
        tqdm(total=total, desc="augment", unit="image", disable=None) as progress,
    ):
        for record in read_records(dataset_uri):
            writer.write(record)
            progress.update(1)
            stats.rows += 1
            if record.flipped or record.id in mirrored_already:
                stats.already_mirrored += 1
                continue
            reason = flip_blocker(record, config.patterns)
            if reason:
                stats.skipped.append({"id": record.id, "source": record.source, "reason": reason})
                continue
            writer.write(mirror_record(record))
            stats.added += 1
        report = _report(dataset_uri, output_uri, config, stats)
        writer.write_extra("report.json", json.dumps(report, indent=2) + "\n")
        writer.write_extra("report.md", render_markdown(report))

    log.info(
        "mirrored %d of %d images (%d skipped); wrote %s",
        stats.added,
        stats.rows,
        len(stats.skipped),
        output_uri,
    )
    return report


def mirror_record(record: ImageRecord) -> ImageRecord:
    """The mirrored copy of a record: pixels, id, hash, caption and tags."""
    mirrored = ImageOps.mirror(decode_image(record))
    encoded, image_format = mirror_encoded(mirrored, record)
    return dataclasses.replace(
        record,
        id=record.id + FLIP_SUFFIX,
        image=encoded,
        format=image_format,
        sha256=_pixel_sha256(Image.open(io.BytesIO(encoded))),
        caption=swap_left_right(record.caption),
        tags=[swap_left_right(tag) for tag in record.tags],
        flipped=True,
        parent_id=record.id,
    )


def mirror_encoded(mirrored: Image.Image, record: ImageRecord) -> tuple[bytes, str]:
    """(bytes, format) of a mirror, encoded as its row was: a lossy row (JPEG, lossy WebP) in
    its format at ``LOSSY_QUALITY``, a PNG or lossless WebP row losslessly in its format (at
    ingest's fast settings), anything else with ingest's lossless re-encoding. A lossless
    photo's mirror is exactly its mirror image."""
    buffer = io.BytesIO()
    if image_bytes.is_lossy(record.image, record.format):
        pillow_format = "JPEG" if record.format == "jpeg" else "WEBP"
        mirrored.save(buffer, format=pillow_format, quality=LOSSY_QUALITY)
    elif record.format == "png":
        mirrored.save(buffer, format="PNG", compress_level=image_bytes.PNG_COMPRESS_LEVEL)
    elif record.format == "webp":
        mirrored.save(buffer, **image_bytes.RE_ENCODING)
    else:
        return image_bytes.re_encoded(mirrored)
    return buffer.getvalue(), record.format


def _pixel_sha256(image: Image.Image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def _ids_with_mirrored_copy(dataset_uri: str) -> set[str]:
    """Ids whose mirrored copy is already in the dataset (a rerun on augment's own output)."""
    return {
        record.parent_id
        for record in read_records(dataset_uri, columns=["flipped", "parent_id"])
        if record.flipped and record.parent_id
    }


# --------------------------------------------------------------------------- report


@dataclass
class _AugmentStats:
    rows: int = 0
    added: int = 0
    already_mirrored: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)


def _report(
    dataset_uri: str, output_uri: str, config: AugmentConfig, stats: _AugmentStats
) -> dict[str, Any]:
    return {
        "stage": "augment",
        "dataset": dataset_uri,
        "output": output_uri,
        "config": asdict(config),
        "input_rows": stats.rows,
        "mirrored": stats.added,
        "output_rows": stats.rows + stats.added,
        "already_mirrored": stats.already_mirrored,
        "skipped": stats.skipped,
    }


def render_markdown(report: dict[str, Any]) -> str:
    """A short summary and every skipped image with the reason."""
    lines = [
        "# lorapipe augment",
        "",
        f"- dataset: `{report['dataset']}` -> `{report['output']}`",
        f"- {report['input_rows']} images in, {report['mirrored']} mirrored copies added, "
        f"{report['output_rows']} images out",
        f"- not mirrored because they are (or have) a mirrored copy: {report['already_mirrored']}",
        f"- skipped because mirroring would be wrong: {len(report['skipped'])}",
    ]
    if report["skipped"]:
        lines += ["", "| image | why not mirrored |", "| --- | --- |"]
        for skipped in report["skipped"]:
            name = skipped["source"] or skipped["id"]
            lines.append(f"| {name} | {skipped['reason']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers the KFP UI shows for an augment."""
    return {"images_mirrored": report["mirrored"], "images_out": report["output_rows"]}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="input dataset (local or s3://)")
    parser.add_argument("--out", required=True, help="output dataset (local or s3://)")
    parser.add_argument("--config", help="YAML file of the options below")
    config_options.add_arguments(parser, AugmentConfig)


def main(args: argparse.Namespace) -> int:
    config = config_options.load(
        AugmentConfig, args.config, config_options.overrides_from_args(args, AugmentConfig)
    )
    report = run(args.dataset, args.out, config)
    print(
        f"{report['input_rows']} images in, {report['mirrored']} mirrored copies added, "
        f"{len(report['skipped'])} skipped (see report.md)"
    )
    return 0
