"""The encoded bytes a dataset row holds: a photo's own bytes where that is lossless, a fast
lossless re-encode (WebP lossless) where its pixels had to change.

Re-encoding is what made ingest slow and its datasets large (a PNG at Pillow's default level
costs about 50 decodes of a 1024x768 JPEG and stores about 6x its bytes, as
``bench/ingest_throughput.py`` measures), so a JPEG, PNG or WebP that
decodes to 8-bit RGB with no EXIF rotation to apply keeps its bytes. What must not survive is
cut out without touching the compressed data:

- JPEG: every APPn segment but the two that decoding reads (APP0 JFIF, with its thumbnail
  cut, and APP14 Adobe, which says how the colours are transformed), every COM segment, and
  whatever follows the end-of-image marker (an MPO's further pictures, appended data). EXIF,
  GPS, XMP, IPTC, ICC profiles and comments are APPn or COM segments.
- PNG: every ancillary chunk (``tEXt``/``zTXt``/``iTXt`` comments and XMP, ``eXIf``,
  ``tIME``, ``pHYs``, colour profiles); the critical ones (IHDR, PLTE, IDAT, IEND) are copied.
- WebP: a still image is written as a simple-format file holding only its ``VP8``/``VP8L``
  chunk, which drops ``EXIF``, ``XMP`` and ``ICCP``.

A colour profile goes with the rest: no stage colour-manages, so the stored values are what
training sees, and a viewer without the profile shows them as training does.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator

from PIL import Image

from lorapipe.errors import ImageBytesError

# Pillow's format name -> the dataset's ``format`` value, for the formats whose bytes are kept
KEPT_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}
# a re-encode: WebP lossless at its fastest effort, which bench/ingest_throughput.py measures
# faster than PNG at any zlib level that compresses (0 only stores) and smaller than Pillow's
# default PNG, on photos and on flat-colour drawings; PNG level 1 past WebP's size limit
RE_ENCODING = {"format": "WEBP", "lossless": True, "quality": 0, "method": 0}
WEBP_MAX_SIDE = 16383
PNG_COMPRESS_LEVEL = 1

_JPEG_SOI, _JPEG_EOI, _JPEG_SOS, _JPEG_COM = 0xD8, 0xD9, 0xDA, 0xFE
_JPEG_APP0, _JPEG_APP14, _JPEG_APP15 = 0xE0, 0xEE, 0xEF
# markers without a length: TEM and the restart markers RST0-7
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}
# the end of a scan's entropy-coded data: 0xFF that is neither stuffing (00) nor a restart
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_JFIF = b"JFIF\x00"
_JFIF_HEADER = 12  # identifier, version, units, densities: what precedes the thumbnail's size
_ADOBE = b"Adobe"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_RGB, _PNG_8_BIT = 2, 8
_WEBP_LOSSY_CHUNK = b"VP8 "
_WEBP_IMAGE_CHUNKS = (_WEBP_LOSSY_CHUNK, b"VP8L")
# chunks of a picture that is more than one opaque frame
_WEBP_REFUSED = {b"ALPH": "an alpha channel", b"ANIM": "an animation", b"ANMF": "an animation"}


def kept_format(image: Image.Image, orientation: int) -> str | None:
    """The ``format`` under which ``image``'s file keeps its own bytes (metadata stripped), or
    None where the pixels must change first: another mode, transparency, several frames,
    or an EXIF ``orientation`` (the tag's value, 1 when upright) to apply."""
    kept = KEPT_FORMATS.get(image.format or "")
    if kept is None or image.mode != "RGB" or orientation != 1:
        return None
    if "transparency" in image.info:
        return None
    if kept != "jpeg" and getattr(image, "is_animated", False):
        return None  # an MPO's further pictures are cut, its first is a plain JPEG
    return kept


def strip_metadata(data: bytes, image_format: str) -> bytes:
    """``data`` (a ``kept_format`` file) without its metadata, its compressed pixels copied as
    they are. Raises ImageBytesError for bytes it cannot parse or keep, so the caller
    re-encodes instead."""
    strip = {"jpeg": _strip_jpeg, "png": _strip_png, "webp": _strip_webp}.get(image_format)
    if strip is None:
        raise ImageBytesError(f"no way to keep the bytes of a {image_format!r} file")
    return strip(data)


def is_lossy(data: bytes, image_format: str) -> bool:
    """Whether a row's bytes hold a lossy encoding: a JPEG, or a WebP whose image chunk is
    VP8 (VP8L is WebP's lossless coding). Raises ImageBytesError for a WebP it cannot read."""
    if image_format == "jpeg":
        return True
    if image_format == "webp":
        return any(kind == _WEBP_LOSSY_CHUNK for kind, _ in _webp_chunks(data))
    return False


def re_encoded(image: Image.Image) -> tuple[bytes, str]:
    """(bytes, ``format``) of ``image`` encoded losslessly and fast, with no metadata at all:
    WebP lossless (``RE_ENCODING``), or PNG at ``PNG_COMPRESS_LEVEL`` for an image with a side
    over WebP's ``WEBP_MAX_SIDE``."""
    buffer = io.BytesIO()
    if max(image.size) > WEBP_MAX_SIDE:
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buffer.getvalue(), "png"
    image.save(buffer, **RE_ENCODING)
    return buffer.getvalue(), "webp"


# --------------------------------------------------------------------------- JPEG


def _strip_jpeg(data: bytes) -> bytes:
    """The JPEG's segments up to its end-of-image marker, less the metadata ones."""
    if data[:2] != b"\xff\xd8":
        raise ImageBytesError("not a JPEG: no start-of-image marker")
    kept = [data[:2]]
    position = 2
    while True:
        marker, position = _jpeg_marker(data, position)
        if marker == _JPEG_EOI:
            kept.append(b"\xff\xd9")
            return b"".join(kept)
        if marker in _JPEG_STANDALONE:
            kept.append(bytes((0xFF, marker)))
            continue
        end = _jpeg_segment_end(data, position)
        segment = _kept_jpeg_segment(marker, data[position + 2 : end])
        if segment is not None:
            kept.append(segment)
        position = end
        if marker == _JPEG_SOS:
            scan_end = _JPEG_SCAN_END.search(data, position)
            if scan_end is None:
                raise ImageBytesError("JPEG scan runs to the end of the file: truncated")
            kept.append(data[position : scan_end.start()])
            position = scan_end.start()


def _jpeg_marker(data: bytes, position: int) -> tuple[int, int]:
    """The marker at ``position`` (fill bytes 0xFF skipped) and the offset after it."""
    if data[position : position + 1] != b"\xff":
        raise ImageBytesError(f"JPEG: no marker at byte {position}")
    while data[position : position + 1] == b"\xff":
        position += 1
    if position >= len(data):
        raise ImageBytesError("JPEG ends inside a marker: truncated")
    return data[position], position + 1


def _jpeg_segment_end(data: bytes, position: int) -> int:
    """The end of the segment whose length field starts at ``position``."""
    if position + 2 > len(data):
        raise ImageBytesError("JPEG ends inside a segment: truncated")
    end = position + struct.unpack_from(">H", data, position)[0]
    if end > len(data) or end < position + 2:
        raise ImageBytesError(f"JPEG segment at byte {position} runs past the file: truncated")
    return end


def _kept_jpeg_segment(marker: int, payload: bytes) -> bytes | None:
    """The segment to write for ``marker`` with ``payload``, or None to drop it."""
    if marker == _JPEG_COM:
        return None
    if _JPEG_APP0 <= marker <= _JPEG_APP15:
        if marker == _JPEG_APP0 and payload.startswith(_JFIF) and len(payload) >= _JFIF_HEADER:
            payload = payload[:_JFIF_HEADER] + b"\x00\x00"  # no thumbnail
        elif not (marker == _JPEG_APP14 and payload.startswith(_ADOBE)):
            return None
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


# --------------------------------------------------------------------------- PNG


def _strip_png(data: bytes) -> bytes:
    """The PNG's critical chunks up to IEND; only an 8-bit RGB image is kept."""
    if not data.startswith(_PNG_SIGNATURE):
        raise ImageBytesError("not a PNG: no signature")
    kept = [_PNG_SIGNATURE]
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 12 + length  # length, type, data, CRC
        if end > len(data):
            raise ImageBytesError(f"PNG chunk {kind!r} runs past the file: truncated")
        if kind == b"IHDR":
            _check_png_header(data[position + 8 : position + 8 + length])
        if kind == b"tRNS":
            raise ImageBytesError("PNG has transparency (tRNS); it is composited, not kept")
        if (kind[0] & 0x20) == 0:  # an upper-case first letter: critical
            kept.append(data[position:end])
        if kind == b"IEND":
            return b"".join(kept)
        position = end
    raise ImageBytesError("PNG has no IEND chunk: truncated")


def _check_png_header(header: bytes) -> None:
    if len(header) < 10:
        raise ImageBytesError("PNG IHDR is too short")
    depth, colour = header[8], header[9]
    if (depth, colour) != (_PNG_8_BIT, _PNG_RGB):
        raise ImageBytesError(f"PNG is {depth}-bit colour type {colour}, not 8-bit RGB")


# --------------------------------------------------------------------------- WebP


def _strip_webp(data: bytes) -> bytes:
    """A simple-format WebP of the file's one image chunk, whatever else it held."""
    image_chunk = None
    for kind, chunk in _webp_chunks(data):
        if kind in _WEBP_REFUSED:
            raise ImageBytesError(f"WebP has {_WEBP_REFUSED[kind]}; it is re-encoded, not kept")
        if kind in _WEBP_IMAGE_CHUNKS:
            if image_chunk is not None:
                raise ImageBytesError("WebP has more than one image chunk")
            image_chunk = chunk
    if image_chunk is None:
        raise ImageBytesError("WebP has no VP8/VP8L image chunk")
    if len(image_chunk) & 1:
        image_chunk += b"\x00"
    return b"RIFF" + struct.pack("<I", 4 + len(image_chunk)) + b"WEBP" + image_chunk


def _webp_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(kind, the whole chunk with its header and padding) of each chunk of a WebP file."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ImageBytesError("not a WebP: no RIFF/WEBP header")
    position = 12
    while position + 8 <= len(data):
        kind, length = struct.unpack_from("<4sI", data, position)
        end = position + 8 + length + (length & 1)  # chunks are padded to even sizes
        if position + 8 + length > len(data):
            raise ImageBytesError(f"WebP chunk {kind!r} runs past the file: truncated")
        yield kind, data[position : min(end, len(data))]
        position = end
