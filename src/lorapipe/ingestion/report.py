"""The report of ``lorapipe ingest``: ``report.json`` (every count, every dropped file with
its reason, the metadata.csv rows not used, the quality audit with each flagged image's
values, thresholds and thumbnail) and ``report.md``, rendered from it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from lorapipe import quality
from lorapipe.thumbnails import markdown_image

if TYPE_CHECKING:
    from lorapipe.ingestion.audit import Audit
    from lorapipe.ingestion.captions import Captions
    from lorapipe.ingestion.writing import Stats
    from lorapipe.stages.ingest import IngestConfig

# shorter-side buckets of the size histogram: (label, lowest size in it), ascending
SIZE_BUCKETS = (
    ("<512", 0),
    ("512-767", 512),
    ("768-1023", 768),
    ("1024-1535", 1024),
    (">=1536", 1536),
)


def size_bucket(width: int, height: int) -> str:
    short = min(width, height)
    return [label for label, lowest in SIZE_BUCKETS if short >= lowest][-1]


def build_report(
    input_uri: str,
    output_uri: str,
    config: IngestConfig,
    stats: Stats,
    captions: Captions,
    audit: Audit,
    reasons: Sequence[str],
) -> dict[str, Any]:
    """The ``report.json`` of a run; ``reasons`` are the drop reasons in the report's order."""
    order = {reason: position for position, reason in enumerate(reasons)}
    drops = sorted(stats.drops, key=lambda drop: drop.file)
    by_reason = Counter(drop.reason for drop in drops)
    return {
        "stage": "ingest",
        "input": input_uri,
        "output": output_uri,
        "config": asdict(config),
        "files": stats.files,
        "kept": stats.kept,
        "dropped": len(drops),
        "dropped_by_reason": dict(sorted(by_reason.items(), key=lambda item: order[item[0]])),
        "dropped_files": [
            {key: value for key, value in asdict(drop).items() if value is not None}
            for drop in drops
        ],
        "short_side_histogram": {
            "decoded": {label: stats.decoded_sizes[label] for label, _ in SIZE_BUCKETS},
            "kept": {label: stats.kept_sizes[label] for label, _ in SIZE_BUCKETS},
        },
        "fixes": dict(sorted(stats.fixes.items())),
        "stored": {
            "formats": dict(sorted(stats.stored_formats.items())),
            "re_encoded": stats.re_encoded,
        },
        "captions": {
            "metadata": captions.source,
            "rows": captions.rows,
            "captioned_images": stats.captioned,
            "uncaptioned_images": stats.kept - stats.captioned,
            "missing_files": captions.missing,
            "refused_rows": captions.refused,
            "duplicate_rows": captions.duplicate_rows,
        },
        "quality": _quality_section(audit),
    }


def _quality_section(audit: Audit) -> dict[str, Any]:
    """The thresholds, the set's median focus, counts per code and every flagged image."""
    counts = Counter(flag.code for flags in audit.flags.values() for flag in flags)
    median = audit.median_focus
    return {
        "action": audit.action,
        "normalised_side": quality.NORMALISED_SIDE,
        "thresholds": asdict(audit.thresholds),
        "audited": audit.audited,
        "median_focus": None if median is None else round(median, 4),
        "flagged_images": len(audit.flags),
        "flagged_by_code": {code: counts[code] for code in quality.CODES},
        "flagged": [_flagged_entry(audit, name) for name in sorted(audit.flags)],
    }


def _flagged_entry(audit: Audit, name: str) -> dict[str, Any]:
    flags = audit.flags[name]
    entry = {
        "file": name,
        "codes": [flag.code for flag in flags],
        "measures": audit.measures[name].as_dict(),
        "flags": [flag.as_dict() for flag in flags],
        "action": "dropped" if name in audit.dropped else "reported",
    }
    if name in audit.thumbnails:
        entry["thumbnail"] = audit.thumbnails[name]
    return entry


def render_markdown(report: dict[str, Any]) -> str:
    """A short summary, the size histogram, every dropped file, every unused caption row and
    the quality audit's flagged images."""
    captions = report["captions"]
    reasons = ", ".join(
        f"{reason} {count}" for reason, count in report["dropped_by_reason"].items()
    )
    fixes = ", ".join(f"{fix} {count}" for fix, count in report["fixes"].items())
    stored = ", ".join(f"{count} {kind}" for kind, count in report["stored"]["formats"].items())
    lines = [
        "# lorapipe ingest",
        "",
        f"- input: `{report['input']}` -> `{report['output']}`",
        f"- {report['files']} files: {report['kept']} kept, {report['dropped']} dropped"
        + (f" ({reasons})" if reasons else ""),
        f"- fixes: {fixes or 'none needed'}",
        f"- stored: {stored or 'nothing'}; {report['stored']['re_encoded']} re-encoded (their "
        "pixels changed), the others their own bytes with the metadata cut out",
        f"- captions: `{captions['metadata']}` has {captions['rows']} rows; "
        f"{captions['captioned_images']} kept images captioned, "
        f"{captions['uncaptioned_images']} without; rows naming a missing file: "
        f"{len(captions['missing_files'])}, refused rows: {len(captions['refused_rows'])} "
        f"({captions['duplicate_rows']} repeating a file name: the first row's caption is kept)"
        if captions["metadata"]
        else "- captions: no metadata.csv; every caption is empty",
        "",
        "| shorter side (px) | decoded | kept |",
        "| --- | --- | --- |",
    ]
    histogram = report["short_side_histogram"]
    for label in histogram["decoded"]:
        lines.append(f"| {label} | {histogram['decoded'][label]} | {histogram['kept'][label]} |")
    if report["dropped_files"]:
        lines += ["", "| dropped file | reason | detail |", "| --- | --- | --- |"]
        for drop in report["dropped_files"]:
            lines.append(f"| {_cell(drop['file'])} | {drop['reason']} | {_cell(drop['detail'])} |")
    unused = [(row, "file not in the input") for row in captions["missing_files"]]
    unused += [(row, row["reason"]) for row in captions["refused_rows"]]
    if unused:
        lines += ["", "| metadata.csv line | filename | not used because |", "| --- | --- | --- |"]
        for row, why in sorted(unused, key=lambda item: item[0]["line"]):
            lines.append(f"| {row['line']} | {_cell(row['filename'])} | {_cell(why)} |")
    return "\n".join(lines + _quality_lines(report["quality"])) + "\n"


def _quality_lines(audit: dict[str, Any]) -> list[str]:
    """The audit's summary and a row per flag: thumbnail, file, code, value, threshold."""
    counts = ", ".join(f"{code} {n}" for code, n in audit["flagged_by_code"].items() if n)
    median = audit["median_focus"]
    thresholds = ", ".join(f"{key} {value:g}" for key, value in audit["thresholds"].items())
    lines = [
        "",
        "## Quality audit",
        "",
        "A blurry, upscaled or over-compressed image teaches the LoRA its defect; cleaning it "
        "out of the data beats patching the negative prompt later.",
        "",
        f"- `quality: {audit['action']}`: {audit['flagged_images']} of {audit['audited']} "
        "audited images flagged" + (f" ({counts})" if counts else ""),
        f"- measured at {audit['normalised_side']} px on the shorter side; set median focus "
        + (f"{median:.3g}" if median is not None else "not used (too few images)"),
        f"- thresholds: {thresholds}",
    ]
    if not audit["flagged"]:
        return lines
    lines += [
        "",
        "| thumbnail | file | code | measured | threshold | action |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for entry in audit["flagged"]:
        thumbnail = entry.get("thumbnail")
        image = markdown_image(thumbnail, entry["file"]) if thumbnail else ""
        for flag in entry["flags"]:
            measured = f"{flag['measure']} {flag['value']:.3g}"
            lines.append(
                f"| {image} | {_cell(entry['file'])} | {flag['code']} | {measured} "
                f"| {_cell(flag['rule'])} | {entry['action']} |"
            )
            image = ""  # the thumbnail once per image
    return lines


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")
