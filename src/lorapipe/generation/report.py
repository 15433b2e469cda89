"""What people read after ``lorapipe generate``: ``report.json``, ``report.md`` and a one-file
HTML report that opens from disk, as a mail attachment and in the Kubeflow UI.

Everything the report shows is inside the file: images are base64 ``data:`` URIs, styles are
inline, there is no script and no external link that the page needs.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from lorapipe import store
from lorapipe.generation.grid import Cell
from lorapipe.generation.index import metrics_table
from lorapipe.generation.layout import IMAGES_DIR, SHEETS_DIR
from lorapipe.generation.loras import LoraSource
from lorapipe.prompts.negatives import Lint

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
.warning { color: #9a5b00; } .info { color: #555; }
.pass { color: #1a7f37; font-weight: 600; } .fail { color: #b42318; font-weight: 600; }
figure { margin: 16px 0 32px; } figure img { max-width: 100%; border: 1px solid #ccc; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; }
code { background: #f6f6f6; padding: 0 3px; }
.muted { color: #777; }
"""


@dataclass
class SheetSection:
    """One contact sheet and the prompts that made it."""

    title: str
    prompt: str
    image: Image.Image
    file: str  # where the full-size sheet is, relative to the report
    # (which images, e.g. "LoRA scale 0.5", the negative prompt they used)
    negatives: Sequence[tuple[str, str]] = ()


@dataclass
class ReportPage:
    """Everything the HTML report shows."""

    title: str
    summary: Mapping[str, Any]
    sheets: Sequence[SheetSection]
    # rows of {"level", "rule", "message", "count", "where"}
    lints: Sequence[Mapping[str, Any]] = ()
    # column name -> header text, in display order
    metric_columns: Mapping[str, str] = field(default_factory=dict)
    metric_rows: Sequence[Mapping[str, Any]] = ()
    reproduce_command: str = ""
    job_text: str = ""


def image_data_uri(image: Image.Image, *, quality: int = 85) -> str:
    """A JPEG ``data:`` URI of ``image`` (contact sheets compress well enough as JPEG)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_report(page: ReportPage) -> str:
    """The complete HTML document."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(page.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(page.title)}</h1>",
        _summary(page.summary),
        _lints(page.lints),
        _sheets(page.sheets),
        _metrics(page.metric_columns, page.metric_rows),
        _reproduce(page.reproduce_command, page.job_text),
        "</body></html>",
    ]
    return "\n".join(parts)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _summary(summary: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in summary.items())
    return f"<table>{rows}</table>"


def _lints(lints: Sequence[Mapping[str, Any]]) -> str:
    if not lints:
        return "<h2>Prompt checks</h2><p>No warnings: the negative prompts follow the rules.</p>"
    rows = "".join(
        f'<tr class="{_e(lint["level"])}"><td>{_e(lint["level"])}</td>'
        f"<td><code>{_e(lint['rule'])}</code></td><td>{_e(lint['message'])}</td>"
        f'<td class="num">{_e(lint["count"])}</td><td class="muted">{_e(lint["where"])}</td></tr>'
        for lint in lints
    )
    return (
        "<h2>Prompt checks</h2><table><tr><th>level</th><th>rule</th><th>message</th>"
        f"<th>cells</th><th>for example</th></tr>{rows}</table>"
    )


def _sheets(sheets: Sequence[SheetSection]) -> str:
    parts = [
        "<h2>Contact sheets</h2>",
        '<p class="muted">Columns and rows: the job\'s grid_x and grid_y (LoRA scale and seed '
        "unless chosen); one sheet per combination of the other axes' values.</p>",
    ]
    for sheet in sheets:
        negatives = "".join(
            f"<tr><td>{_e(label)}</td><td>{_e(text) or '<i>(empty)</i>'}</td></tr>"
            for label, text in sheet.negatives
        )
        parts.append(
            f"<figure><h3>{_e(sheet.title)}</h3>"
            f"<p><b>Prompt:</b> {_e(sheet.prompt)}</p>"
            f"<table><tr><th>images</th><th>negative prompt</th></tr>{negatives}</table>"
            f'<img src="{image_data_uri(sheet.image)}" alt="{_e(sheet.title)}">'
            f'<figcaption class="muted">full size: {_e(sheet.file)}</figcaption></figure>'
        )
    return "\n".join(parts)


def _metrics(columns: Mapping[str, str], rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    header = "".join(f"<th>{_e(title)}</th>" for title in columns.values())
    body = "".join(
        "<tr>" + "".join(_cell(row.get(name)) for name in columns) + "</tr>" for row in rows
    )
    return (
        "<h2>Metrics by preset, size, LoRA scale and CFG</h2>"
        '<p class="muted">Means over prompts and seeds; compare rows, not absolute values.</p>'
        f"<table><tr>{header}</tr>{body}</table>"
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{_e('' if value is None else value)}</td>"


def _reproduce(command: str, job_text: str) -> str:
    if not command:
        return ""
    job = f"<p>job.yaml:</p><pre>{_e(job_text)}</pre>" if job_text else ""
    return f"<h2>Reproduce</h2><pre>{_e(command)}</pre>{job}"


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


METRIC_COLUMNS = {
    "negative_preset": "negative preset",
    "size": "size",
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


def report_page(
    report: Mapping[str, Any], sheets: Sequence[SheetSection], job_text: str
) -> ReportPage:
    config = report["config"]
    columns = dict(METRIC_COLUMNS)
    if not config.get("clip_model"):
        columns.pop("clip_score")
    loras = ", ".join(f"{name} ({lora['webui_hash']})" for name, lora in report["loras"].items())
    return ReportPage(
        title=f"lorapipe generate: {report['images']} images",
        summary={
            "base model": f"{report['base_model']} (hash {report['model_hash']})",
            "LoRAs": loras or "none",
            "sampler": f"{', '.join(config['samplers'])}, "
            f"{', '.join(str(steps) for steps in config['steps'])} steps",
            "sizes": ", ".join(config["sizes"]),
            "guidance rescale": config["guidance_rescale"],
            "grid": f"{len(config['prompts'])} prompts x {len(config['negative_presets'])} "
            f"presets x {len(config['sizes'])} sizes x "
            f"{len(config['lora_scales'] or [None])} LoRA scales x "
            f"{len(config['cfg_scales'])} CFG x {len(config['seeds'])} seeds",
            "time": f"{report['seconds']:.1f} s ({report['images_per_second']} images/s rendering)",
            "device": f"{report['environment']['device']}, {report['environment']['dtype']}",
        },
        sheets=sheets,
        lints=report["lints"],
        metric_columns=columns,
        metric_rows=report["metrics"],
        reproduce_command=report["reproduce"],
        job_text=job_text,
    )


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
    """``report.json`` of a run: what it rendered with, the checks, the metrics, the timing."""
    return {
        "base_model": base_model_uri,
        "model_hash": model_hash,
        "loras": {lora.name: asdict(lora) for lora in loras},
        "output": output_uri,
        "images": len(rows),
        "sheets": [sheet.file for sheet in sheets],
        "lints": list(lints),
        "metrics": metrics_table(rows),
        "reproduce": f"lorapipe generate --job {store.join(output_uri, 'job.yaml')} "
        f"--out {output_uri}",
        "environment": dict(environment),
        "render_seconds": round(render_seconds, 3),
        "images_per_second": round(len(rows) / render_seconds, 4) if render_seconds else None,
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


def write_reports(
    directory: Path, report: Mapping[str, Any], sheets: Sequence[SheetSection], job_text: str
) -> None:
    """``report.json``, ``report.md`` and the self-contained ``report.html``."""
    (directory / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (directory / "report.md").write_text(render_markdown(report), encoding="utf-8")
    page = report_page(report, sheets, job_text)
    (directory / "report.html").write_text(render_report(page), encoding="utf-8")
