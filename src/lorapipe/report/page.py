"""The HTML page every lorapipe report is: Jinja2 templates (``report/templates``), pictures
embedded as small ``data:`` JPEGs so the one file opens anywhere (disk, mail, the Kubeflow UI),
each linked to its full-size file when that file lies beside the page.

A page is a list of :class:`Section`, one per stage: a stage's own report is its section
alone, the run report is every section in DAG order.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from PIL import Image

from lorapipe import store
from lorapipe.thumbnails import thumbnail_jpeg

TEMPLATES = Path(__file__).with_name("templates")
STAGE_TITLES = {
    "fingerprint": "Inputs",
    "ingest": "Ingest / clean",
    "tag": "Auto-tag",
    "augment": "Flip-augment",
    "train": "Train",
    "select": "Select checkpoint",
    "generate": "Generate",
    "claims": "What this run shows",
}


@dataclass(frozen=True)
class Picture:
    """An image in the page: a thumbnail embedded as a data URI, and where its full-size
    file is, relative to the page (None when the file is not beside it)."""

    src: str
    alt: str
    width: int
    height: int
    href: str | None = None


@dataclass(frozen=True)
class Section:
    """One stage's part of a report: ``templates/<stage>.html.j2`` rendered with ``context``."""

    stage: str
    context: Mapping[str, Any]

    @property
    def title(self) -> str:
        return STAGE_TITLES[self.stage]


@dataclass(frozen=True)
class PageLinks:
    """Where the page will be written: full-size files under this folder get relative links.
    ``folder=None``: the page travels alone (a KFP artifact), so nothing links out."""

    folder: Path | None = None

    def href(self, uri: str) -> str | None:
        if self.folder is None or store.is_s3(uri):
            return None
        path = Path(uri.removeprefix("file://")).resolve()
        return Path(os.path.relpath(path, self.folder.resolve())).as_posix()


@dataclass(frozen=True)
class Page:
    title: str
    sections: Sequence[Section]
    subtitle: str = ""


def picture(
    data: bytes | Image.Image, alt: str, *, max_side: int, href: str | None = None
) -> Picture:
    """A :class:`Picture` of ``data`` (encoded image bytes or an image) as a JPEG of at most
    ``max_side`` pixels on its longer side (``thumbnails.thumbnail_jpeg``); a JPEG that small
    already (a stage's stored thumbnail) is embedded as it is, not encoded again."""
    image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    if isinstance(data, bytes) and image.format == "JPEG" and max(image.size) <= max_side:
        jpeg, size = data, image.size
    else:
        jpeg = thumbnail_jpeg(image, max_side)
        size = Image.open(io.BytesIO(jpeg)).size
    encoded = base64.b64encode(jpeg).decode("ascii")
    return Picture(f"data:image/jpeg;base64,{encoded}", alt, *size, href)


def picture_of_file(uri: str, alt: str, *, max_side: int, links: PageLinks) -> Picture | None:
    """The picture of the image file at ``uri`` (local or s3://), or None when it is gone
    (a pruned checkpoint, a file a retention rule removed)."""
    if not store.exists(uri):
        return None
    return picture(store.read_bytes(uri), alt, max_side=max_side, href=links.href(uri))


def png_picture(png: bytes, alt: str) -> Picture:
    """A chart, embedded as it was drawn (PNG keeps its lines sharp)."""
    with Image.open(io.BytesIO(png)) as image:
        width, height = image.size
    encoded = base64.b64encode(png).decode("ascii")
    return Picture(f"data:image/png;base64,{encoded}", alt, width, height)


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["number"] = format_number
    return environment


def format_number(value: Any, digits: int = 4) -> str:
    """Numbers as a person reads them in a table: ints whole, floats to ``digits`` figures."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render(page: Page) -> str:
    """The complete HTML document of ``page``."""
    return _environment().get_template("page.html.j2").render(page=page)
