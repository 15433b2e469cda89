"""Small JPEG copies of the images a stage report flags, published with the stage's dataset.

A report names a flagged image by its file and shows it: the Markdown report links
``flagged/<record id>.jpg`` beside it, the JSON report gives the same relative path, so a
person reading either (in the KFP UI, a file browser, or the run report) sees what was
flagged without decoding the dataset.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from PIL import Image

THUMBNAIL_DIR = "flagged"
THUMBNAIL_SIDE = 160  # the longer side, in pixels
THUMBNAIL_QUALITY = 85
# a Markdown image whose target is a thumbnail beside the report: ![alt](flagged/<id>.jpg)
_THUMBNAIL_LINK = re.compile(r"(!\[(?:[^\]\\]|\\.)*\])\((" + THUMBNAIL_DIR + r"/[^)\s/]+\.jpg)\)")


def thumbnail_name(record_id: str) -> str:
    """The path, relative to the dataset, of the thumbnail of the record ``record_id``."""
    return f"{THUMBNAIL_DIR}/{record_id}.jpg"


def thumbnail_jpeg(image: Image.Image, side: int = THUMBNAIL_SIDE) -> bytes:
    """``image`` shrunk (never enlarged) to ``side`` px on its longer side, as JPEG bytes."""
    small = image.convert("RGB")
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


def markdown_image(path: str, alt: str) -> str:
    """A Markdown image of the thumbnail at ``path``, with ``alt`` made safe for a table cell."""
    safe_alt = " ".join(alt.split()).replace("|", "\\|").replace("]", "\\]")
    return f"![{safe_alt}]({path})"


def inline_images(markdown: str, folder: Path) -> str:
    """``markdown`` with each thumbnail it links (relative to ``folder``) inlined as a data
    URI, for a viewer that shows the report without the files beside it (the KFP UI's
    Markdown artifact). A link to a missing file is left as it is."""

    def inline(match: re.Match[str]) -> str:
        path = folder / match.group(2)
        if not path.is_file():
            return match.group(0)
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"{match.group(1)}(data:image/jpeg;base64,{encoded})"

    return _THUMBNAIL_LINK.sub(inline, markdown)
