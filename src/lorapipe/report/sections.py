"""One :class:`Section` per stage, read from what the stage wrote: its ``report.json`` and the
files beside it (thumbnails, charts, samples, contact sheets). A section reads only its own
stage's output, so a stage's page and the run's page show the same thing."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lorapipe import charts, store
from lorapipe.checkpoint_layout import (
    LOSS_LOG_NAME,
    TRAINING_REPORT_NAME,
    CheckpointLosses,
    checkpoint_name,
    complete_checkpoints,
    read_losses,
)
from lorapipe.errors import InputError
from lorapipe.report.page import PageLinks, Picture, Section, picture_of_file, png_picture
from lorapipe.stages.select_runs import overrides_text

if TYPE_CHECKING:
    from lorapipe.demo.claims import Claim

FLAGGED_SIDE = 160  # thumbnails of flagged or dropped images
SAMPLE_SIDE = 192  # training samples, a row per checkpoint
SHEET_SIDE = 1400  # a contact sheet's longer side in the page; full size on click
# the columns of generate's metrics table (name in report.json -> header)
METRIC_COLUMNS = {
    "negative_preset": "negative preset",
    "size": "size",
    "checkpoint": "checkpoint",
    "sampler": "sampler",
    "steps": "steps",
    "lora_scale": "LoRA scale",
    "cfg_scale": "CFG",
    "images": "images",
    "sharpness": "sharpness (var. of Laplacian)",
    "highlight_clipping": "highlight clipping",
    "shadow_clipping": "shadow clipping",
    "mean_luminance": "mean luminance",
    "colorfulness": "colorfulness",
    "clip_score": "CLIP score",
}


def metric_columns(config: Mapping[str, Any]) -> dict[str, str]:
    """The metrics table's columns (name -> header): checkpoint, sampler and steps only when
    the grid has several, the CLIP score only when it was measured."""
    several = {"checkpoint": "checkpoints", "sampler": "samplers", "steps": "steps"}
    hidden = {column for column, key in several.items() if len(config.get(key) or []) < 2}
    if not config.get("clip_model"):
        hidden.add("clip_score")
    return {name: title for name, title in METRIC_COLUMNS.items() if name not in hidden}


def read_report(output_uri: str, name: str = "report.json") -> dict[str, Any]:
    """A stage's JSON report; a missing or damaged one is a one-line InputError."""
    uri = store.join(output_uri, name)
    if not store.exists(uri):
        raise InputError(f"{uri} is missing; give the stage's output folder (it writes {name})")
    try:
        return json.loads(store.read_text(uri))
    except json.JSONDecodeError as error:
        raise InputError(f"{uri} is not JSON ({error}); run the stage again") from error


def _thumbnail(output_uri: str, relative: str | None, alt: str, links: PageLinks) -> Picture | None:
    if not relative:
        return None
    return picture_of_file(
        store.join(output_uri, relative), alt, max_side=FLAGGED_SIDE, links=links
    )


# --------------------------------------------------------------------------- fingerprint


def fingerprint_section(output_uri: str, links: PageLinks) -> Section:
    """What the run read (each input's digest) and whether it had anything new to train."""
    report = read_report(output_uri)
    settings = json.dumps(report["fingerprint"]["settings"], indent=2, sort_keys=True)
    return Section("fingerprint", {"report": report, "settings_text": settings})


# --------------------------------------------------------------------------- ingest


def ingest_section(output_uri: str, links: PageLinks) -> Section:
    """Kept and dropped, why each drop, the size histogram and the quality audit."""
    report = read_report(output_uri)
    drops = [
        {**drop, "picture": _thumbnail(output_uri, drop.get("thumbnail"), drop["file"], links)}
        for drop in report["dropped_files"]
    ]
    audit = report["quality"]
    flagged = [
        {**entry, "picture": _thumbnail(output_uri, entry.get("thumbnail"), entry["file"], links)}
        for entry in audit["flagged"]
    ]
    return Section("ingest", {"report": report, "drops": drops, "audit": audit, "flagged": flagged})


# --------------------------------------------------------------------------- tag


def tag_section(output_uri: str, links: PageLinks) -> Section:
    """What the tagger wrote (a tag frequency chart) and the images its audit flagged."""
    report = read_report(output_uri)
    audit = report.get("audit") or {}
    flagged = [
        {**entry, "picture": _thumbnail(output_uri, entry.get("thumbnail"), entry["file"], links)}
        for entry in audit.get("flagged", [])
    ]
    chart = None
    if report.get("tag_frequency"):
        png = charts.draw_tag_frequency(report["tag_frequency"], report["rows"])
        chart = png_picture(png, "tag frequency")
    return Section("tag", {"report": report, "audit": audit, "flagged": flagged, "chart": chart})


# --------------------------------------------------------------------------- augment


def augment_section(output_uri: str, links: PageLinks) -> Section:
    """How many rows were mirrored and every row that was not, with the reason."""
    return Section("augment", {"report": read_report(output_uri)})


# --------------------------------------------------------------------------- train


def train_section(output_uri: str, links: PageLinks) -> Section:
    """Loss by step, validation loss by timestep, throughput and the aspect buckets."""
    report = read_report(output_uri, TRAINING_REPORT_NAME)
    checkpoints = _checkpoint_losses(output_uri)
    loss_chart = png_picture(
        charts.draw_training_loss(_loss_log(output_uri), checkpoints), "training loss by step"
    )
    by_timestep = charts.draw_validation_by_timestep(checkpoints)
    config = report.get("config", {})
    return Section(
        "train",
        {
            "report": report,
            "config": config,
            "loss_chart": loss_chart,
            "timestep_chart": png_picture(by_timestep, "validation loss by timestep")
            if by_timestep
            else None,
            "checkpoints": checkpoints,
        },
    )


def _checkpoint_losses(output_uri: str) -> list[CheckpointLosses]:
    return [
        read_losses(uri, step) for step, uri in sorted(complete_checkpoints(output_uri).items())
    ]


def _loss_log(output_uri: str) -> list[tuple[int, float]]:
    """(step, loss) of every step in ``loss_log.csv``; the last row of a step a resumed run
    logged twice wins."""
    uri = store.join(output_uri, LOSS_LOG_NAME)
    if not store.exists(uri):
        return []
    by_step: dict[int, float] = {}
    for row in csv.DictReader(io.StringIO(store.read_text(uri))):
        try:
            by_step[int(row["step"])] = float(row["loss"])
        except (KeyError, TypeError, ValueError):
            continue  # a torn last line of a killed run
    return sorted(by_step.items())


# --------------------------------------------------------------------------- select


def select_section(output_uri: str, links: PageLinks) -> Section:
    """The rule, the table behind it, the loss curve and a row of samples per checkpoint
    with the chosen one marked, so a person can judge the choice by eye; with several runs,
    first their ranking and every run's validation loss."""
    report = read_report(output_uri)
    curve_uri = store.join(output_uri, report["files"]["loss_curve"])
    loss_curve = png_picture(store.read_bytes(curve_uri), "loss by step, the chosen checkpoint")
    runs_chart = None
    if "runs_loss" in report["files"]:
        runs_uri = store.join(output_uri, report["files"]["runs_loss"])
        runs_chart = png_picture(store.read_bytes(runs_uri), "validation loss of every run")
    sample_rows = []
    for row in report.get("samples", []):
        pictures = [
            picture_of_file(
                store.join(output_uri, sample["file"]),
                f"{checkpoint_name(row['step'])}, prompt {sample['prompt_index'] + 1}, "
                f"seed {sample['seed']}",
                max_side=SAMPLE_SIDE,
                links=links,
            )
            for sample in row["files"]
        ]
        sample_rows.append({**row, "pictures": pictures})
    columns = [
        f"prompt {sample['prompt_index'] + 1}, seed {sample['seed']}"
        for sample in (report["samples"][0]["files"] if report.get("samples") else [])
    ]
    return Section(
        "select",
        {
            "report": report,
            "loss_curve": loss_curve,
            "runs_chart": runs_chart,
            "overrides": {
                run["name"]: overrides_text(run["overrides"]) for run in report.get("runs", [])
            },
            "sample_rows": sample_rows,
            "sample_columns": columns,
            "sample_prompts": report.get("sample_prompts", []),
        },
    )


# --------------------------------------------------------------------------- generate


def generate_section(output_uri: str, links: PageLinks) -> Section:
    """The contact sheets (full size on click), the prompt checks and the metrics table."""
    report = read_report(output_uri)
    job_uri = store.join(output_uri, report["files"]["job"])
    sheets = []
    for sheet in report.get("sheet_pages", []):
        sheets.append(
            {
                **sheet,
                "picture": picture_of_file(
                    store.join(output_uri, sheet["file"]),
                    sheet["title"],
                    max_side=SHEET_SIDE,
                    links=links,
                ),
            }
        )
    return Section(
        "generate",
        {
            "report": report,
            "config": report["config"],
            "sheets": sheets,
            "metric_columns": metric_columns(report["config"]),
            "job_text": store.read_text(job_uri) if store.exists(job_uri) else "",
        },
    )


# --------------------------------------------------------------------------- demo claims


def claims_section(claims: Sequence[Claim]) -> Section:
    """The demo's measured claims: what this run shows, each PASS or FAIL as measured."""
    return Section("claims", {"claims": list(claims)})
