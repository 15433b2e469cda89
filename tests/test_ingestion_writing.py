"""Pass 2 of ingest: a keeper whose bytes its row keeps is copied, stripped, without decoding;
a keeper whose pixels must change (EXIF rotation, CMYK, alpha, 16-bit) is decoded again and
re-encoded losslessly (WebP) with the right pixels; a file changed since pass 1 is decoded
again rather than trusted."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile

from lorapipe.image_bytes import strip_metadata
from lorapipe.ingestion.decoding import decode_file
from lorapipe.ingestion.writing import Row, stored_row

MAX_PIXELS = 10**8


def _pattern(width: int = 600, height: int = 520, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (height // 40 + 1, width // 40 + 1, 3), dtype=np.uint8)
    return np.repeat(np.repeat(cells, 40, axis=0), 40, axis=1)[:height, :width]


def _both_passes(path: Path, thumbnail: bool = False) -> Row:
    found = decode_file(path, MAX_PIXELS)
    assert found.reason is None, found.detail
    return stored_row(path, found, MAX_PIXELS, thumbnail)


def _pixels(row: Row) -> np.ndarray:
    with Image.open(io.BytesIO(row.image)) as image:
        assert image.mode == "RGB" and image.format.lower() == row.format
        pixels = np.asarray(image)
    assert row.sha256 == hashlib.sha256(pixels.tobytes()).hexdigest()
    assert (row.width, row.height) == pixels.shape[1::-1]
    return pixels


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The format of every full decode (``ImageFile.load`` of undecoded pixels)."""
    seen: list[str] = []
    original = ImageFile.ImageFile.load

    def load(image: ImageFile.ImageFile) -> object:
        if image.tile:
            seen.append(image.format or "")
        return original(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return seen


def test_a_kept_file_is_copied_stripped_without_a_decode(tmp_path: Path, loads: list) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(_pattern()).save(path, quality=92, comment=b"a secret comment")
    found = decode_file(path, MAX_PIXELS)
    loads.clear()
    row = stored_row(path, found, MAX_PIXELS, thumbnail=False)
    assert loads == []
    assert row.image == strip_metadata(path.read_bytes(), "jpeg")
    assert (row.format, row.sha256, row.re_encoded) == ("jpeg", found.sha256, False)
    _pixels(row)


def test_a_kept_flagged_file_gets_its_thumbnail_from_a_reduced_decode(tmp_path: Path) -> None:
    path = tmp_path / "photo.webp"
    Image.fromarray(_pattern()).save(path, lossless=True)
    row = _both_passes(path, thumbnail=True)
    assert row.format == "webp"
    with Image.open(io.BytesIO(row.thumbnail)) as thumbnail:
        assert thumbnail.format == "JPEG" and max(thumbnail.size) == 160


def test_a_file_changed_since_pass_1_is_decoded_again(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(_pattern(seed=1)).save(path, quality=92)
    found = decode_file(path, MAX_PIXELS)
    Image.fromarray(_pattern(seed=2)).save(path, quality=92)
    row = stored_row(path, found, MAX_PIXELS, thumbnail=False)
    assert row.re_encoded and row.format == "webp"
    with Image.open(path) as now:
        assert np.array_equal(_pixels(row), np.asarray(now.convert("RGB")))
    assert row.sha256 != found.sha256


def test_a_rotated_jpeg_is_re_encoded_upright(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # shown rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(_pattern()).save(path, quality=95, exif=exif)
    row = _both_passes(path)
    with Image.open(path) as stored:
        upright = np.rot90(np.asarray(stored.convert("RGB")), k=-1)
    assert row.re_encoded and row.fixes == ("applied EXIF orientation",)
    assert np.array_equal(_pixels(row), upright)
    assert not Image.open(io.BytesIO(row.image)).getexif()


def test_a_cmyk_jpeg_is_re_encoded_as_its_rgb(tmp_path: Path) -> None:
    path = tmp_path / "print.jpg"
    Image.fromarray(_pattern()).convert("CMYK").save(path, quality=95)
    row = _both_passes(path)
    with Image.open(path) as stored:
        assert np.array_equal(_pixels(row), np.asarray(stored.convert("RGB")))
    assert row.fixes == ("converted CMYK to RGB",)


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.dstack([_pattern(), np.full((520, 600), 255, dtype=np.uint8)])
    rgba[:40, :40, 3] = 0  # a transparent corner
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba).save(path)
    pixels = _pixels(_both_passes(path))
    assert (pixels[:40, :40] == 255).all()
    assert np.array_equal(pixels[40:, 40:], _pattern()[40:, 40:])


def test_16_bit_grey_is_scaled_to_8_bits(tmp_path: Path) -> None:
    grey = _pattern()[..., 0]
    path = tmp_path / "deep.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    row = _both_passes(path)
    pixels = _pixels(row)
    assert row.format == "webp" and row.fixes == ("converted I;16 to RGB",)
    assert all(np.array_equal(pixels[..., channel], grey) for channel in range(3))
