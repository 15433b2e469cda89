"""What people look at after ``lorapipe generate``: labelled contact sheets and a one-file
HTML report that opens from disk, as a mail attachment and in the Kubeflow UI.

Everything the report shows is inside the file: images are base64 ``data:`` URIs, styles are
inline, there is no script and no external link that the page needs.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

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


SHEET_GAP = 4
SHEET_ROW_LABEL_WIDTH = 90
SHEET_TITLE_HEIGHT = 28
SHEET_HEADER_HEIGHT = 40


def draw_contact_sheet(
    title: str,
    rows: Sequence[str],
    columns: Sequence[str],
    subcolumns: Sequence[str],
    images: Mapping[tuple[int, int, int], Path],
    cell_size: int,
) -> Image.Image:
    """A labelled grid of thumbnails: ``rows`` down, ``columns`` across, each column holding
    one thumbnail per ``subcolumns`` entry. ``images`` maps (row, column, subcolumn) indices to
    image files of one size; the longest side of a thumbnail is ``cell_size``."""
    with Image.open(next(iter(images.values()))) as first:
        scale = cell_size / max(first.size)
        thumb_w, thumb_h = max(1, round(first.width * scale)), max(1, round(first.height * scale))
    gap = SHEET_GAP
    column_width = len(subcolumns) * (thumb_w + gap) + gap
    top = SHEET_TITLE_HEIGHT + SHEET_HEADER_HEIGHT
    width = max(400, SHEET_ROW_LABEL_WIDTH + len(columns) * column_width)
    height = top + len(rows) * (thumb_h + gap) + gap
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)

    draw.text((8, 6), _fit(draw, title, font, width - 16), fill="black", font=font)
    for c, column in enumerate(columns):
        x = SHEET_ROW_LABEL_WIDTH + c * column_width
        draw.line([(x, SHEET_TITLE_HEIGHT), (x, height)], fill="#bbbbbb")
        draw.text(
            (x + gap, SHEET_TITLE_HEIGHT), _fit(draw, column, font, column_width), "black", font
        )
        for s, subcolumn in enumerate(subcolumns):
            label = _fit(draw, subcolumn, small, thumb_w)
            draw.text(
                (x + gap + s * (thumb_w + gap), SHEET_TITLE_HEIGHT + 20), label, "#555", small
            )
    for r, row in enumerate(rows):
        y = top + r * (thumb_h + gap)
        draw.text(
            (8, y + thumb_h // 2 - 8),
            _fit(draw, row, font, SHEET_ROW_LABEL_WIDTH - 12),
            "black",
            font,
        )
    for (r, c, s), path in images.items():
        x = SHEET_ROW_LABEL_WIDTH + c * column_width + gap + s * (thumb_w + gap)
        with Image.open(path) as image:
            thumbnail = image.convert("RGB").resize((thumb_w, thumb_h), Image.Resampling.LANCZOS)
        sheet.paste(thumbnail, (x, top + r * (thumb_h + gap)))
    return sheet


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text``, shortened with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


@dataclass
class SheetSection:
    """One contact sheet and the prompts that made it."""

    title: str
    prompt: str
    image: Image.Image
    file: str  # where the full-size sheet is, relative to the report
    # (column label, negative prompt used in that column)
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
        '<p class="muted">Rows: CFG scale. Columns: LoRA scale, one image per seed.</p>',
    ]
    for sheet in sheets:
        negatives = "".join(
            f"<tr><td>{_e(label)}</td><td>{_e(text) or '<i>(empty)</i>'}</td></tr>"
            for label, text in sheet.negatives
        )
        parts.append(
            f"<figure><h3>{_e(sheet.title)}</h3>"
            f"<p><b>Prompt:</b> {_e(sheet.prompt)}</p>"
            f"<table><tr><th>column</th><th>negative prompt</th></tr>{negatives}</table>"
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
        "<h2>Metrics by preset, LoRA scale and CFG</h2>"
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
