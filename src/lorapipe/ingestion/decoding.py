"""Decoding one file for ``lorapipe ingest``, as few times as the memory bound allows.

Pass 1 (``decode_file``) reads each file once and decodes it fully once, as 8-bit RGB: the
exact-duplicate hash (sha256 of the pixels), the size, the quality measures and the
perceptual hash (from the audit's reduced copy) all come from that one decode. A file whose
bytes a row can keep (``lorapipe.image_bytes``) is decoded from its stripped bytes, so the
hash is of exactly what the dataset will hold; pass 2 (``lorapipe.ingestion.writing``) then
copies those bytes without decoding again. Every other file's pixels change (EXIF
orientation, mode, transparency, depth), and pass 2 decodes and re-encodes it. Thumbnails
(flagged and dropped images) come from a reduced decode (``draft``: a JPEG decoded at 1/2 to
1/8 scale).

Nothing here raises for a broken file: Pillow may raise anything from OSError to
struct.error inside a damaged one, and the file comes back with a reason instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from lorapipe import image_bytes
from lorapipe import quality as image_quality
from lorapipe.ingestion.drops import (
    DECOMPRESSION_BOMB,
    NOT_AN_IMAGE,
    TRUNCATED,
    UNREADABLE,
    ZERO_BYTE,
    one_line,
)
from lorapipe.thumbnails import THUMBNAIL_SIDE, thumbnail_jpeg

PHASH_BITS = 64
JPEG_FORMATS = ("JPEG", "MPO")  # formats whose quantisation tables Pillow reads
# modes that carry transparency, composited on white
TRANSPARENT_MODES = {"RGBA", "RGBa", "LA", "La", "PA", "P"}
WHITE = (255, 255, 255, 255)
UPRIGHT = 1  # the EXIF orientation of an image stored the way it is shown
# a reduced decode for a thumbnail keeps at least twice its side, so the shrink stays sharp
THUMBNAIL_DECODE = (2 * THUMBNAIL_SIDE, 2 * THUMBNAIL_SIDE)
HASH_STRIP_BYTES = 1 << 18  # of Pillow's pixels, packed and hashed at a time


@dataclass
class Decoded:
    """What pass 1 learned about one file: why it is unusable, or its size, hashes, quality
    measures and whether its row keeps the file's own bytes."""

    reason: str | None = None
    detail: str = ""
    width: int = 0
    height: int = 0
    sha256: str = ""  # of the 8-bit RGB pixels
    phash: int = 0
    fixes: tuple[str, ...] = ()
    measures: image_quality.Measures | None = None
    kept_format: str | None = None  # "jpeg" / "png" / "webp": the row keeps the stripped bytes
    kept_sha256: str = ""  # of those stripped bytes: pass 2 copies them only while they match

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass
class Picture:
    """One file decoded: its upright 8-bit RGB pixels, the fixes that took, its JPEG tables,
    and the stripped bytes a row keeps (None: the pixels changed, so it is re-encoded)."""

    rgb: Image.Image
    fixes: tuple[str, ...]
    tables: dict[int, list[int]] | None
    kept_format: str | None = None
    kept: bytes | None = None


def decode_file(path: Path, max_pixels: int) -> Decoded:
    """Pass 1 of one file: everything choosing the keepers needs, from one full decode."""
    try:
        data = path.read_bytes()
        if not data:
            return Decoded(ZERO_BYTE, "the file is empty")
        picture = decode_picture(data, max_pixels)
    except Exception as error:
        return Decoded(*failure(error, max_pixels))
    rgb = picture.rgb
    small = image_quality.normalised(rgb)
    return Decoded(
        width=rgb.width,
        height=rgb.height,
        sha256=pixel_sha256(rgb),
        phash=perceptual_hash(small),
        fixes=picture.fixes,
        measures=image_quality.measure(rgb, picture.tables, small),
        kept_format=picture.kept_format,
        kept_sha256=hashlib.sha256(picture.kept).hexdigest() if picture.kept else "",
    )


def decode_picture(data: bytes, max_pixels: int, *, keep: bool = True) -> Picture:
    """``data`` decoded once, as upright 8-bit RGB; with ``keep``, from its stripped bytes
    when a row may keep them. Raises what Pillow raises for a broken file."""
    with opened(data, max_pixels) as image:
        orientation = exif_orientation(image)
        tables = dict(image.quantization) if image.format in JPEG_FORMATS else None
        kept_format = image_bytes.kept_format(image, orientation) if keep else None
        if kept_format:
            kept = _kept_picture(data, kept_format, image.size, tables)
            if kept:
                return kept
        image.load()
        rgb, fixes = normalize(image, orientation)
        return Picture(rgb, fixes, tables)


def _kept_picture(
    data: bytes, kept_format: str, size: tuple[int, int], tables: dict[int, list[int]] | None
) -> Picture | None:
    """The picture decoded from ``data`` stripped of its metadata, or None where stripping
    or decoding the stripped bytes fails, or they decode to something else (the caller then
    decodes the original, which says what is wrong with it, or re-encodes)."""
    try:
        kept = image_bytes.strip_metadata(data, kept_format)
        rgb = Image.open(io.BytesIO(kept))
        rgb.load()
    except Exception:  # whatever it is, decoding the original tells
        return None
    if rgb.mode != "RGB" or rgb.size != size:
        return None
    return Picture(rgb, (), tables, kept_format, kept)


def thumbnail_of(data: bytes, max_pixels: int) -> bytes:
    """A thumbnail JPEG of an encoded image, upright, from a reduced decode; empty for a
    file that does not decode."""
    try:
        with opened(data, max_pixels) as image:
            image.draft(None, THUMBNAIL_DECODE)
            image.load()
            rgb, _ = normalize(image, exif_orientation(image))
    except Exception:
        return b""
    return thumbnail_jpeg(rgb)


@contextlib.contextmanager
def opened(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """``data`` opened (not yet decoded), refused as a decompression bomb when it has more
    than ``max_pixels`` pixels (Pillow itself refuses twice ``Image.MAX_IMAGE_PIXELS``)."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise Image.DecompressionBombError(f"Image size ({pixels} pixels) is too large")
        yield image


def failure(error: Exception, max_pixels: int) -> tuple[str, str]:
    """The drop reason and detail of a file whose decoding raised ``error``."""
    if isinstance(error, Image.DecompressionBombError):
        return DECOMPRESSION_BOMB, _bomb_detail(error, max_pixels)
    if isinstance(error, UnidentifiedImageError):
        return NOT_AN_IMAGE, "not an image format Pillow can read"
    message = one_line(error)
    truncated = isinstance(error, EOFError) or "truncated" in message.lower()
    return (TRUNCATED if truncated else UNREADABLE), message


def _bomb_detail(error: Exception, max_pixels: int) -> str:
    """``1,200,000 pixels > max_pixels 1,000,000``, from Pillow's message or ours."""
    claimed = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(claimed.group(1)):,} pixels" if claimed else "more pixels"
    return f"{size} > max_pixels {max_pixels:,}; raise --max-pixels if the image is real"


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """For the length of a run: Pillow's own limit at ``max_pixels``, so that it opens what
    the run allows (``opened`` refuses the rest itself), and its warning past the limit
    silenced, as ``opened`` turns that case into a drop. Set once around every decoding
    thread, never per file: both are process-wide."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 to 8), or ``UPRIGHT`` where there is none or it is bad."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, UPRIGHT)
    return orientation if orientation in range(1, 9) else UPRIGHT


def normalize(image: Image.Image, orientation: int) -> tuple[Image.Image, tuple[str, ...]]:
    """The (loaded) image upright and in 8-bit RGB, and the fixes that took."""
    fixes = []
    if orientation != UPRIGHT:
        image = ImageOps.exif_transpose(image)
        fixes.append("applied EXIF orientation")
    if image.mode != "RGB":
        fixes.append(f"converted {image.mode} to RGB")
    return _to_rgb(image), tuple(fixes)


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparent pixels become white, as a training image has no alpha."""
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_rgb(image)
    if image.mode in TRANSPARENT_MODES or "transparency" in image.info:
        white = Image.new("RGBA", image.size, WHITE)
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer, read as 16-bit range) and float (0..1) grey to 8-bit RGB;
    Pillow's own conversion would clip instead of scale."""
    full_scale = 1.0 if image.mode == "F" else 65535.0
    values = np.asarray(image, dtype=np.float64) * (255.0 / full_scale)
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def pixel_sha256(rgb: Image.Image) -> str:
    """The exact-duplicate hash and a row's ``sha256``: of the packed 8-bit RGB pixels,
    hashed a strip of rows at a time (``HASH_STRIP_BYTES``): the same digest as hashing
    ``rgb.tobytes()``, without packing the whole image into one buffer first (a strip stays in
    the CPU's cache between packing and hashing: about 1.4 ms less of a 1024x768 image)."""
    digest = hashlib.sha256()
    rows = max(1, HASH_STRIP_BYTES // (4 * max(1, rgb.width)))  # 4 bytes a pixel in Pillow
    for top in range(0, rgb.height, rows):
        digest.update(rgb.crop((0, top, rgb.width, min(top + rows, rgb.height))).tobytes())
    return digest.hexdigest()


def _dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``M @ x`` is the DCT of ``x``."""
    k = np.arange(size)[:, None]
    i = np.arange(size)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * size)) * np.sqrt(2 / size)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT_32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash: whether each of the 8x8 lowest DCT frequencies of a 32x32 grey thumbnail
    is above their median. Resizing, re-encoding and small edits change few bits. The
    thumbnail is shrunk from the quality audit's reduced copy (``quality.normalised``), so
    ingest hashes the copy it already made and gets the same bits as hashing the image."""
    thumbnail = image_quality.normalised(image).resize((32, 32), Image.Resampling.BOX)
    frequencies = _DCT_32 @ np.asarray(thumbnail.convert("L"), dtype=np.float64) @ _DCT_32.T
    lowest = frequencies[:8, :8]
    bits = (lowest > np.median(lowest)).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")
