"""Small JPEG copies of the images a stage report flags, published with the stage's dataset.

A report names a flagged image by its file and shows it: the Markdown report links
``flagged/<record id>.jpg`` beside it, the JSON report gives the same relative path and the HTML
pages (``lorapipe.report``) embed it, so a person reading any of them sees what was flagged
without decoding the dataset.
"""

from __future__ import annotations

import io

from PIL import Image

THUMBNAIL_DIR = "flagged"
THUMBNAIL_SIDE = 160  # the longer side, in pixels
THUMBNAIL_QUALITY = 85


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
