"""A dataset row keeps a photo's own bytes where that is lossless: metadata (EXIF, GPS, XMP,
comments, colour profiles) is cut out of JPEG, PNG and WebP files without re-encoding, the
pixels decode exactly as before, and what must change (rotation, mode, alpha, depth,
frames) is left to a re-encode."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image, PngImagePlugin

from lorapipe.errors import ImageBytesError
from lorapipe.image_bytes import (
    WEBP_MAX_SIDE,
    is_lossy,
    kept_format,
    re_encoded,
    strip_metadata,
)

SECRET_COMMENT = b"shot at home"
SECRET_XMP = b"<x:xmpmeta>author: Jane Doe</x:xmpmeta>"
SECRET_CAMERA = "SecretCam 3000"
ICC = b"a colour profile" * 8
# what no stored row may contain, in any encoding of it that a format uses
SECRETS = (SECRET_COMMENT, SECRET_XMP, SECRET_CAMERA.encode(), ICC[:16], b"Exif\x00")


def _photo(width: int = 96, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(width * height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _exif(orientation: int = 1) -> Image.Exif:
    """EXIF with a camera model, a GPS position and an orientation."""
    exif = Image.Exif()
    exif[ExifTags.Base.Model] = SECRET_CAMERA
    exif[ExifTags.Base.Orientation] = orientation
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 31.0, 12.0)
    return exif


def _encoded(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _jpeg_with_everything(**options: object) -> bytes:
    return _encoded(
        _photo(),
        "JPEG",
        quality=90,
        exif=_exif(),
        comment=SECRET_COMMENT,
        xmp=SECRET_XMP,
        icc_profile=ICC,
        **options,
    )


def _png_with_everything(image: Image.Image | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", SECRET_COMMENT.decode())
    info.add_text("Description", "zipped " + SECRET_COMMENT.decode(), zip=True)
    info.add_itxt("XML:com.adobe.xmp", SECRET_XMP.decode())
    return _encoded(image or _photo(), "PNG", pnginfo=info, exif=_exif(), icc_profile=ICC)


def _webp_with_everything(**options: object) -> bytes:
    return _encoded(_photo(), "WEBP", exif=_exif(), xmp=SECRET_XMP, icc_profile=ICC, **options)


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _assert_no_metadata(data: bytes) -> None:
    for secret in SECRETS:
        assert secret not in data, secret
    with Image.open(io.BytesIO(data)) as image:
        assert not image.getexif()
        for key in ("exif", "xmp", "comment", "icc_profile", "Comment", "XML:com.adobe.xmp"):
            assert key not in image.info, key


def _opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


# --------------------------------------------------------------------------- stripping


@pytest.mark.parametrize(
    "options",
    [{}, {"progressive": True}, {"restart_marker_blocks": 4}, {"subsampling": 0}],
    ids=["baseline", "progressive", "restart-markers", "4:4:4"],
)
def test_a_jpeg_loses_exif_gps_xmp_comments_and_profile_and_keeps_its_pixels(
    options: dict,
) -> None:
    original = _jpeg_with_everything(**options)
    stripped = strip_metadata(original, "jpeg")
    _assert_no_metadata(stripped)
    assert np.array_equal(_pixels(stripped), _pixels(original))
    assert len(stripped) < len(original)
    with _opened(stripped) as image:
        # the JFIF header stays (decoders read the colour space from it), without a thumbnail
        assert [marker for marker, _ in image.applist] == ["APP0"]
        assert image.applist[0][1].startswith(b"JFIF\x00")


def test_a_jpeg_keeps_the_adobe_segment_that_says_how_its_colours_are_stored() -> None:
    original = _encoded(_photo().convert("CMYK"), "JPEG", comment=SECRET_COMMENT)
    stripped = strip_metadata(original, "jpeg")
    with _opened(stripped) as image:
        assert [marker for marker, _ in image.applist] == ["APP14"]
    assert np.array_equal(_pixels(stripped), _pixels(original))


def test_a_jpeg_ends_at_its_end_of_image_marker() -> None:
    """What follows (an MPO's second picture, appended data) is not the picture."""
    original = _jpeg_with_everything()
    stripped = strip_metadata(original + b"appended: " + SECRET_COMMENT, "jpeg")
    assert stripped.endswith(b"\xff\xd9") and SECRET_COMMENT not in stripped


def test_a_png_keeps_only_its_critical_chunks() -> None:
    original = _png_with_everything()
    stripped = strip_metadata(original, "png")
    _assert_no_metadata(stripped)
    assert np.array_equal(_pixels(stripped), _pixels(original))
    kinds = []
    position = 8
    while position < len(stripped):
        length = int.from_bytes(stripped[position : position + 4], "big")
        kinds.append(stripped[position + 4 : position + 8])
        position += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]


@pytest.mark.parametrize(
    "options", [{"lossless": True}, {"quality": 80}], ids=["lossless", "lossy"]
)
def test_a_webp_becomes_its_image_chunk_alone(options: dict) -> None:
    original = _webp_with_everything(**options)
    stripped = strip_metadata(original, "webp")
    _assert_no_metadata(stripped)
    assert np.array_equal(_pixels(stripped), _pixels(original))
    assert stripped[12:16] in (b"VP8 ", b"VP8L")
    assert int.from_bytes(stripped[4:8], "little") == len(stripped) - 8


def _sixteen_bit_rgb_png() -> bytes:
    """An 8x8 16-bit RGB PNG: Pillow reads it as 8-bit RGB, so only its header tells."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    rows = b"".join(b"\x00" + bytes(8 * 6) for _ in range(8))
    header = struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def _translucent() -> Image.Image:
    photo = _photo().convert("RGBA")
    photo.putalpha(128)
    return photo


REFUSED = {
    "16-bit RGB PNG": (_sixteen_bit_rgb_png, "png"),
    "PNG with tRNS": (lambda: _encoded(_photo(), "PNG", transparency=(0, 0, 0)), "png"),
    "WebP with alpha": (lambda: _encoded(_translucent(), "WEBP", quality=80), "webp"),
    "truncated JPEG": (lambda: _jpeg_with_everything()[:-200], "jpeg"),
    "truncated PNG": (lambda: _png_with_everything()[:-20], "png"),
    "truncated WebP": (lambda: _webp_with_everything(lossless=True)[:-50], "webp"),
    "not a JPEG": (lambda: b"GIF89a", "jpeg"),
    "an unknown format": (lambda: _encoded(_photo(), "BMP"), "bmp"),
}


@pytest.mark.parametrize("label", REFUSED)
def test_what_cannot_be_kept_losslessly_is_refused_for_a_re_encode(label: str) -> None:
    make, image_format = REFUSED[label]
    with pytest.raises(ImageBytesError):
        strip_metadata(make(), image_format)


# --------------------------------------------------------------------------- what is kept


def test_upright_8_bit_rgb_jpeg_png_and_webp_keep_their_bytes() -> None:
    kept = {
        "jpeg": _jpeg_with_everything(),
        "png": _png_with_everything(),
        "webp": _webp_with_everything(lossless=True),
    }
    for image_format, data in kept.items():
        with _opened(data) as image:
            assert kept_format(image, orientation=1) == image_format


def test_pixels_that_must_change_are_not_kept() -> None:
    photo = _photo()
    frames = [photo, _photo(96, 64).rotate(90)]
    must_change = {
        "rotated by EXIF": (_jpeg_with_everything(), 6),
        "CMYK": (_encoded(photo.convert("CMYK"), "JPEG"), 1),
        "greyscale": (_encoded(photo.convert("L"), "JPEG"), 1),
        "alpha": (_encoded(_translucent(), "PNG"), 1),
        "WebP alpha": (_encoded(_translucent(), "WEBP", lossless=True), 1),
        "palette": (_encoded(photo.convert("P"), "PNG"), 1),
        "transparent colour": (_encoded(photo, "PNG", transparency=(0, 0, 0)), 1),
        "16-bit grey": (_encoded(Image.fromarray(np.zeros((8, 8), np.uint16)), "PNG"), 1),
        "animated PNG": (_encoded(photo, "PNG", save_all=True, append_images=frames[1:]), 1),
        "animated WebP": (_encoded(photo, "WEBP", save_all=True, append_images=frames[1:]), 1),
        "GIF": (_encoded(photo, "GIF"), 1),
        "BMP": (_encoded(photo, "BMP"), 1),
        "TIFF": (_encoded(photo, "TIFF"), 1),
    }
    for label, (data, orientation) in must_change.items():
        with _opened(data) as image:
            assert kept_format(image, orientation) is None, label


def test_a_re_encode_is_lossless_webp_and_bare() -> None:
    photo = _photo()
    data, image_format = re_encoded(photo)
    assert image_format == "webp" and data[12:16] == b"VP8L"  # the lossless bitstream
    assert np.array_equal(_pixels(data), np.asarray(photo))
    with _opened(data) as image:
        assert image.format == "WEBP" and not {"exif", "xmp", "icc_profile"} & set(image.info)


def test_an_image_too_wide_for_webp_is_re_encoded_as_png() -> None:
    banner = Image.new("RGB", (WEBP_MAX_SIDE + 1, 8), (200, 30, 40))
    data, image_format = re_encoded(banner)
    assert image_format == "png"
    assert np.array_equal(_pixels(data), np.asarray(banner))


def test_a_row_is_lossy_when_it_holds_a_jpeg_or_a_vp8_webp() -> None:
    """What augment encodes a mirror by: lossy rows stay lossy, lossless ones lossless, and
    a WebP's metadata chunks (VP8X, EXIF) do not hide which coding its image has."""
    photo = _photo()
    assert is_lossy(_encoded(photo, "JPEG"), "jpeg")
    assert is_lossy(_webp_with_everything(), "webp")
    assert not is_lossy(_webp_with_everything(lossless=True), "webp")
    assert not is_lossy(_encoded(photo, "PNG"), "png")
    with pytest.raises(ImageBytesError, match="not a WebP"):
        is_lossy(b"RIFF", "webp")
