"""What people read after ``lorapipe generate``: ``report.json`` (what the HTML page of
``lorapipe.report`` is rendered from), ``report.md`` and ``report.html``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorapipe import store
from lorapipe.generation.grid import Cell
from lorapipe.generation.index import metrics_table
from lorapipe.generation.layout import IMAGES_DIR, SHEETS_DIR
from lorapipe.generation.loras import LoraSource
from lorapipe.prompts.negatives import Lint


@dataclass
class SheetSection:
    """One contact sheet and the prompts that made it."""

    title: str
    prompt: str
    file: str  # where the full-size sheet is, relative to the report
    # (which images, e.g. "LoRA scale 0.5", the negative prompt they used)
    negatives: Sequence[tuple[str, str]] = ()


def lint_table(cells: Sequence[Cell], job_lints: Sequence[Lint]) -> list[dict[str, Any]]:
    """Every distinct lint message with how many grid cells (seeds not counted) it concerns
    and one of them; warnings first."""
    found: dict[tuple[str, str, str], list[str]] = {}
    for lint in job_lints:
        found.setdefault((lint.level, lint.rule, lint.message), []).append("the job")
    seen = set()
    for cell in cells:
        if cell.label in seen:
            continue
        seen.add(cell.label)
        for lint in cell.negative.lints:
            found.setdefault((lint.level, lint.rule, lint.message), []).append(cell.label)
    rows = [
        {"level": level, "rule": rule, "message": message, "count": len(where), "where": where[0]}
        for (level, rule, message), where in found.items()
    ]
    return sorted(rows, key=lambda row: (row["level"] != "warning", -row["count"]))


def summary(
    *,
    base_model_uri: str,
    model_hash: str,
    loras: Sequence[LoraSource],
    job: Mapping[str, Any],
    images: int,
    seconds: float,
    images_per_second: float | None,
    environment: Mapping[str, str],
) -> dict[str, str]:
    """The facts at the top of the report: what rendered, with what, how long it took."""
    lora_names = ", ".join(f"{lora.name} ({lora.webui_hash})" for lora in loras)
    return {
        "base model": f"{base_model_uri} (hash {model_hash})",
        "LoRAs": lora_names or "none",
        "sampler": f"{', '.join(job['samplers'])}, "
        f"{', '.join(str(steps) for steps in job['steps'])} steps",
        "sizes": ", ".join(job["sizes"]),
        "guidance rescale": str(job["guidance_rescale"]),
        "grid": f"{len(job['prompts'])} prompts x {len(job['negative_presets'])} presets x "
        f"{len(job['sizes'])} sizes x {len(job['lora_scales'] or [None])} LoRA scales x "
        f"{len(job['cfg_scales'])} CFG x {len(job['seeds'])} seeds x "
        f"{len(job['samplers'])} samplers x {len(job['steps'])} step counts = {images} images",
        "sheets": f"X: {job['grid_x']}, Y: {job['grid_y']}; one sheet per value of every other "
        "axis that has several",
        "time": f"{seconds:.1f} s ({images_per_second} images/s rendering)",
        "device": f"{environment['device']}, {environment['dtype']}",
    }


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = [
        f"# lorapipe generate: {report['images']} images",
        "",
        f"- base model: `{report['base_model']}` (hash {report['model_hash']})",
        f"- LoRAs: {', '.join(report['loras']) or 'none'}",
        f"- sizes: {', '.join(report['config']['sizes'])}",
        f"- contact sheets: {', '.join(report['sheets'])}",
        "- index: `index.parquet`; full report: `report.html`",
        f"- reproduce: `{report['reproduce']}`",
        "",
        "## Prompt checks",
        "",
    ]
    lines += [
        f"- **{lint['level']}** `{lint['rule']}` ({lint['count']} cells): {lint['message']}"
        for lint in report["lints"]
    ] or ["No warnings."]
    return "\n".join(lines) + "\n"


def run_report(
    *,
    base_model_uri: str,
    output_uri: str,
    job: Mapping[str, Any],
    model_hash: str,
    loras: Sequence[LoraSource],
    lints: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    sheets: Sequence[SheetSection],
    environment: Mapping[str, str],
    render_seconds: float,
    seconds: float,
) -> dict[str, Any]:
    """``report.json`` of a run: what it rendered with, the checks, the sheets, the metrics,
    the timing."""
    images_per_second = round(len(rows) / render_seconds, 4) if render_seconds else None
    return {
        "base_model": base_model_uri,
        "model_hash": model_hash,
        "loras": {lora.name: asdict(lora) for lora in loras},
        "output": output_uri,
        "images": len(rows),
        "sheets": [sheet.file for sheet in sheets],
        "sheet_pages": [
            {
                "title": sheet.title,
                "prompt": sheet.prompt,
                "file": sheet.file,
                "negatives": [list(pair) for pair in sheet.negatives],
            }
            for sheet in sheets
        ],
        "summary": summary(
            base_model_uri=base_model_uri,
            model_hash=model_hash,
            loras=loras,
            job=job,
            images=len(rows),
            seconds=seconds,
            images_per_second=images_per_second,
            environment=environment,
        ),
        "lints": list(lints),
        "metrics": metrics_table(rows),
        "reproduce": f"lorapipe generate --job {store.join(output_uri, 'job.yaml')} "
        f"--out {output_uri}",
        "environment": dict(environment),
        "render_seconds": round(render_seconds, 3),
        "images_per_second": images_per_second,
        "seconds": round(seconds, 3),
        "config": job,
        "files": {
            "images": f"{IMAGES_DIR}/",
            "sheets": f"{SHEETS_DIR}/",
            "index": "index.parquet",
            "html": "report.html",
            "job": "job.yaml",
        },
    }


def write_reports(directory: Path, report: Mapping[str, Any]) -> None:
    """``report.json``, ``report.md`` and ``report.html`` (the generate section of the run
    report, alone; sheets embedded, linked to their full-size files beside it)."""
    from lorapipe.report.page import PageLinks
    from lorapipe.report.run_report import stage_page

    (directory / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (directory / "report.md").write_text(render_markdown(report), encoding="utf-8")
    html = stage_page("generate", str(directory), PageLinks(directory))
    (directory / "report.html").write_text(html, encoding="utf-8")
