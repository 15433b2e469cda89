"""Pass 1 of ingest decodes each file fully once: its hashes, size and quality measures come
from that one decode, a keepable file is decoded from the very bytes its row will hold, and a
broken file comes back with a reason instead of raising."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile

from lorapipe import quality
from lorapipe.image_bytes import strip_metadata
from lorapipe.ingestion.decoding import (
    decode_file,
    perceptual_hash,
    pixel_limit,
    thumbnail_of,
)


def _photo(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def _save(image: Image.Image, path: Path, **options: object) -> Path:
    image.save(path, **options)
    return path


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Model] = "SecretCam"
    return exif


class _Decodes:
    """Counts full decodes (``ImageFile.load``) and the size each decoded at."""

    def __init__(self, patch: pytest.MonkeyPatch) -> None:
        self.sizes: list[tuple[int, int]] = []
        original = ImageFile.ImageFile.load

        def load(image: ImageFile.ImageFile) -> object:
            if image.tile:  # not yet decoded
                self.sizes.append(image.size)
            return original(image)

        patch.setattr(ImageFile.ImageFile, "load", load)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> _Decodes:
    return _Decodes(monkeypatch)


def test_an_upright_jpeg_is_decoded_once_from_the_bytes_its_row_keeps(
    tmp_path: Path, decodes: _Decodes
) -> None:
    path = _save(_photo(), tmp_path / "photo.jpg", quality=90, exif=_exif(1), comment=b"hi")
    found = decode_file(path, max_pixels=10**8)
    assert decodes.sizes == [(640, 480)]
    kept = strip_metadata(path.read_bytes(), "jpeg")
    assert (found.kept_format, found.kept_sha256) == ("jpeg", hashlib.sha256(kept).hexdigest())
    with Image.open(io.BytesIO(kept)) as image:
        assert found.sha256 == hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()
    assert (found.width, found.height, found.fixes) == (640, 480, ())
    assert found.measures is not None and found.measures.jpeg_quality == 90


def test_a_rotated_jpeg_is_decoded_once_and_turned_upright(
    tmp_path: Path, decodes: _Decodes
) -> None:
    path = _save(_photo(), tmp_path / "rotated.jpg", quality=90, exif=_exif(6))
    found = decode_file(path, max_pixels=10**8)
    assert len(decodes.sizes) == 1
    assert found.kept_format is None and found.kept_sha256 == ""
    assert (found.width, found.height) == (480, 640)
    assert found.fixes == ("applied EXIF orientation",)


def test_a_broken_file_comes_back_with_its_reason(tmp_path: Path) -> None:
    whole = _save(_photo(), tmp_path / "whole.jpg")
    files = {
        "empty.jpg": (b"", "zero_byte"),
        "page.jpg": (b"<html>404</html>", "not_an_image"),
        "half.jpg": (whole.read_bytes()[: whole.stat().st_size // 2], "truncated"),
    }
    for name, (data, reason) in files.items():
        (tmp_path / name).write_bytes(data)
        assert decode_file(tmp_path / name, max_pixels=10**8).reason == reason, name


def test_more_pixels_than_the_limit_is_a_decompression_bomb(tmp_path: Path) -> None:
    path = _save(_photo(), tmp_path / "big.png")
    with pixel_limit(100_000):
        found = decode_file(path, max_pixels=100_000)
    assert found.reason == "decompression_bomb"
    assert found.detail.startswith("307,200 pixels > max_pixels 100,000")


def test_the_perceptual_hash_of_an_image_is_that_of_the_audits_reduced_copy() -> None:
    """Ingest hashes the copy the audit already made; anyone hashing the image gets the same."""
    photo = _photo(1024, 768)
    assert perceptual_hash(photo) == perceptual_hash(quality.normalised(photo))


def test_a_thumbnail_comes_from_a_reduced_decode_upright(tmp_path: Path, decodes: _Decodes) -> None:
    path = _save(_photo(2560, 1920), tmp_path / "large.jpg", exif=_exif(6))
    thumbnail = thumbnail_of(path.read_bytes(), max_pixels=10**8)
    assert decodes.sizes[0] == (640, 480)  # a quarter of each side
    with Image.open(io.BytesIO(thumbnail)) as image:
        assert image.format == "JPEG" and image.size == (120, 160)
    assert thumbnail_of(b"not an image", max_pixels=10**8) == b""
