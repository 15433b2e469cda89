"""``lorapipe ingest`` on a generated corpus of good and bad input: exactly the good images are
kept, every other file is reported with the right reason, nothing outside the input is read."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFilter, PngImagePlugin

from lorapipe import store
from lorapipe.cli import main as cli_main
from lorapipe.dataset import ImageRecord, read_records
from lorapipe.errors import ConfigError, DatasetError, InputError
from lorapipe.image_bytes import strip_metadata
from lorapipe.ingestion.decoding import perceptual_hash
from lorapipe.stages.ingest import IngestConfig, run
from lorapipe.stages.ingest import metrics as ingest_metrics

# ------------------------------------------------------------------------- image makers


def _pattern(seed: int, width: int, height: int, block: int = 32) -> np.ndarray:
    """Random coloured blocks: distinct seeds give distinct perceptual hashes, and the blocks
    survive resizing, so a resized copy stays a near duplicate."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (height // block + 1, width // block + 1, 3), dtype=np.uint8)
    return np.repeat(np.repeat(cells, block, axis=0), block, axis=1)[:height, :width]


def _image(seed: int, width: int = 600, height: int = 560) -> Image.Image:
    return Image.fromarray(_pattern(seed, width, height))


def _save(image: Image.Image, path: Path, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_header(path: Path, side: int = 100_000) -> None:
    """A PNG that only claims to be side x side pixels (no pixel data at all)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))


def _rotated_jpeg(path: Path) -> np.ndarray:
    """A JPEG stored 640x520 with EXIF orientation 6 (display rotated 90 degrees clockwise) and
    a GPS position; returns the stored pixels as decoded."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 31.0, 12.0)
    _save(_image(4, 640, 520), path, format="JPEG", quality=95, exif=exif)
    with Image.open(path) as stored:
        return np.asarray(stored.convert("RGB"))


def _palette_png(path: Path) -> None:
    """A palette PNG whose index 0 (red in the palette) is transparent, top-left block."""
    indices = _pattern(3, 600, 600)[..., 0].copy()
    indices[indices == 0] = 1
    indices[:64, :64] = 0
    image = Image.fromarray(indices, mode="P")
    palette = np.random.default_rng(3).integers(0, 256, (256, 3), dtype=np.uint8)
    palette[0] = (255, 0, 0)
    image.putpalette(palette.flatten().tolist())
    _save(image, path, transparency=0)


def _sixteen_bit_png(path: Path) -> np.ndarray:
    """A 16-bit grey PNG; returns the 8-bit values it should come out as."""
    grey = _pattern(6, 600, 600)[..., 1]
    _save(Image.fromarray(grey.astype(np.uint16) * 257), path)
    return grey


def _animated_gif(path: Path) -> None:
    frames = [_image(7, 560, 560), _image(8, 560, 560)]
    _save(frames[0], path, save_all=True, append_images=frames[1:], duration=100)


def _truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    _image(9).save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


METADATA = (
    "FileName,TEXT\n"
    'photo.jpg,"a photo, with ""quotes""\nand a second line"\n'
    "rotated.jpg,rotated portrait\n"
    "../outside.png,escape attempt\n"
    "/etc/passwd,absolute path\n"
    "x.png,a symlink leaving the input\n"
    "missing.png,no such file\n"
    "nested/scan.bmp,a scan\n"
)

KEPT = {
    "photo.jpg",
    "cmyk.jpg",
    "palette.png",
    "rotated.jpg",
    "deep.png",
    "anim.gif",
    "lossless.png",
    "landscape.png",
    "nested/photo.webp",
    "nested/scan.bmp",
    "nested/scan.tiff",
}
DROPPED = {
    "a_landscape_small.jpg": "near_duplicate",
    "z_copy.bmp": "exact_duplicate",
    "a_scan_copy.png": "exact_duplicate",
    "bad/truncated.jpg": "truncated",
    "bad/page.jpg": "not_an_image",
    "bad/empty.png": "zero_byte",
    "bad/bomb.png": "decompression_bomb",
    "bad/huge.png": "decompression_bomb",
    "bad/small.png": "too_small",
    "bad/banner.png": "extreme_aspect",
    "x.png": "unsafe_path",
    "linked": "unsafe_path",
}
# 1500x800 is over this limit (Pillow's warning range), everything kept is under it
MAX_PIXELS = 1_100_000


def _build_corpus(base: Path) -> Path:
    """Every kind of good and bad input the issue lists, under base/raw."""
    root = base / "raw"
    outside = base / "outside"
    _save(_image(30), outside / "secret.png")
    _save(_image(31), base / "outside.png")

    _save(_image(1), root / "photo.jpg", quality=95)
    _save(_image(2).convert("CMYK"), root / "cmyk.jpg", quality=95)
    _palette_png(root / "palette.png")
    _rotated_jpeg(root / "rotated.jpg")
    _sixteen_bit_png(root / "deep.png")
    _animated_gif(root / "anim.gif")
    _save(_image(5, 640, 640), root / "lossless.png")
    _save(_image(5, 640, 640), root / "z_copy.bmp")
    landscape = _image(10, 1000, 800)
    _save(landscape, root / "landscape.png")
    _save(landscape.resize((700, 560), Image.Resampling.LANCZOS), root / "a_landscape_small.jpg")
    _save(_image(11), root / "nested" / "photo.webp", lossless=True)
    _save(_image(12), root / "nested" / "scan.bmp")
    _save(_image(12), root / "a_scan_copy.png")
    _save(_image(13), root / "nested" / "scan.tiff")

    _truncated_jpeg(root / "bad" / "truncated.jpg")
    (root / "bad" / "page.jpg").write_text("<!doctype html><html><body>404</body></html>")
    (root / "bad" / "empty.png").write_bytes(b"")
    _bomb_header(root / "bad" / "bomb.png")
    _save(_image(14, 1500, 800), root / "bad" / "huge.png")
    _save(_image(15, 300, 300), root / "bad" / "small.png")
    _save(_image(16, 2100, 512), root / "bad" / "banner.png")
    (root / "x.png").symlink_to("/etc/passwd")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + METADATA.encode("utf-8"))
    return root


def _records(uri: str) -> dict[str, ImageRecord]:
    return {record.source: record for record in read_records(uri)}


def _pixels(record: ImageRecord) -> np.ndarray:
    with Image.open(io.BytesIO(record.image)) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


class _ReadSpy:
    """Records every file read through ``Path.read_bytes``, as ingest reads every image (the
    decoding runs in this process with workers=1)."""

    def __init__(self, patch: pytest.MonkeyPatch) -> None:
        self.paths: list[Path] = []
        original = Path.read_bytes

        def read_bytes(path: Path) -> bytes:
            self.paths.append(path)
            return original(path)

        patch.setattr(Path, "read_bytes", read_bytes)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict, list[Path]]:
    """The corpus ingested once with workers=1: (input, dataset, report, read paths)."""
    base = tmp_path_factory.mktemp("corpus")
    root = _build_corpus(base)
    output = str(base / "dataset")
    with pytest.MonkeyPatch.context() as patch:
        spy = _ReadSpy(patch)
        report = run(str(root), output, IngestConfig(max_pixels=MAX_PIXELS, workers=1))
    return root, output, report, spy.paths


# ------------------------------------------------------------------------- the bad-input corpus


def test_exactly_the_good_images_are_kept(corpus: tuple) -> None:
    _, output, report, _ = corpus
    assert set(_records(output)) == KEPT
    assert report["kept"] == len(KEPT)
    assert report["files"] == len(KEPT) + len(DROPPED)


def test_every_other_file_is_reported_with_its_reason(corpus: tuple) -> None:
    _, _, report, _ = corpus
    reasons = {drop["file"]: drop["reason"] for drop in report["dropped_files"]}
    assert reasons == DROPPED
    assert sum(report["dropped_by_reason"].values()) == len(DROPPED)
    details = {drop["file"]: drop["detail"] for drop in report["dropped_files"]}
    assert "/etc/passwd" in details["x.png"]
    assert "shorter side 300 < min_size 512" in details["bad/small.png"]


def test_every_dropped_image_that_decodes_has_a_thumbnail_and_no_other_does(
    corpus: tuple,
) -> None:
    """The report shows what was dropped; a file that is no image is never decoded again."""
    _, output, report, _ = corpus
    thumbnails = {drop["file"]: drop.get("thumbnail") for drop in report["dropped_files"]}
    decodes = {
        "bad/small.png",
        "bad/banner.png",
        "z_copy.bmp",
        "a_scan_copy.png",
        "a_landscape_small.jpg",
    }
    assert decodes <= {name for name, path in thumbnails.items() if path}
    assert thumbnails["x.png"] is None and thumbnails["bad/bomb.png"] is None
    for name in decodes:
        with Image.open(Path(output) / thumbnails[name]) as thumbnail:
            assert thumbnail.format == "JPEG" and max(thumbnail.size) <= 160


def test_duplicates_name_the_kept_image(corpus: tuple) -> None:
    _, _, report, _ = corpus
    kept = {drop["file"]: drop.get("kept") for drop in report["dropped_files"]}
    assert kept["z_copy.bmp"] == "lossless.png"
    # the copy sorts first, but metadata.csv captions the original
    assert kept["a_scan_copy.png"] == "nested/scan.bmp"
    # the resized copy sorts first but is smaller: the larger original is kept
    assert kept["a_landscape_small.jpg"] == "landscape.png"


def test_nothing_outside_the_input_is_read(corpus: tuple) -> None:
    root, _, _, read = corpus
    assert read, "the spy saw no reading"
    for path in read:
        assert path.resolve().is_relative_to(root.resolve()), path


def test_metadata_csv_captions_and_unused_rows(corpus: tuple) -> None:
    _, output, report, _ = corpus
    records = _records(output)
    assert records["photo.jpg"].caption == 'a photo, with "quotes"\nand a second line'
    assert records["rotated.jpg"].caption == "rotated portrait"
    assert records["nested/scan.bmp"].caption == "a scan"
    assert records["cmyk.jpg"].caption == ""
    captions = report["captions"]
    assert captions["rows"] == 7
    assert captions["missing_files"] == [{"line": 8, "filename": "missing.png"}]
    refused = {row["line"]: row["filename"] for row in captions["refused_rows"]}
    assert refused == {5: "../outside.png", 6: "/etc/passwd", 7: "x.png"}
    assert captions["captioned_images"] == 3


def test_a_file_named_twice_keeps_its_first_caption_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "raw"
    _save(_image(31), root / "a.png")
    _save(_image(32), root / "b.png")
    (root / "metadata.csv").write_text(
        "filename,text\na.png,first caption\nb.png,a bee\na.png,second caption\n"
        "./a.png,third caption\n"  # the same file, spelled otherwise
    )
    caplog.set_level(logging.WARNING, logger="lorapipe")
    output = str(tmp_path / "out")
    captions = run(str(root), output, IngestConfig(workers=1))["captions"]

    assert _records(output)["a.png"].caption == "first caption"
    assert captions["duplicate_rows"] == 2 and captions["captioned_images"] == 2
    refused = {row["line"]: row["reason"] for row in captions["refused_rows"]}
    assert set(refused) == {4, 5}
    assert all("the caption of line 2 is kept" in reason for reason in refused.values())
    (warning,) = [r.getMessage() for r in caplog.records if "named on lines" in r.getMessage()]
    assert "'a.png' is named on lines 2, 4, 5" in warning
    assert "the caption of line 2 (the first) is kept" in warning
    assert "2 repeating a file name" in store.read_text(store.join(output, "report.md"))


def test_exif_orientation_applied_and_stripped(corpus: tuple) -> None:
    root, output, _, _ = corpus
    record = _records(output)["rotated.jpg"]
    assert (record.width, record.height) == (520, 640)
    with Image.open(root / "rotated.jpg") as stored:
        upright = np.rot90(np.asarray(stored.convert("RGB")), k=-1)
    assert np.abs(_pixels(record).astype(int) - upright).mean() < 1
    with Image.open(io.BytesIO(record.image)) as image:
        assert image.format == "WEBP"
        assert not image.getexif()
        assert "exif" not in image.info


def test_modes_become_8_bit_rgb(corpus: tuple) -> None:
    root, output, report, _ = corpus
    records = _records(output)
    palette = _pixels(records["palette.png"])
    assert tuple(palette[10, 10]) == (255, 255, 255)  # transparent block composited on white
    deep = _pixels(records["deep.png"])
    assert np.array_equal(deep[..., 0], _pattern(6, 600, 600)[..., 1])
    with Image.open(root / "anim.gif") as gif:
        first_frame = np.asarray(gif.convert("RGB"))
    assert np.array_equal(_pixels(records["anim.gif"]), first_frame)
    assert report["fixes"]["converted CMYK to RGB"] == 1
    assert report["fixes"]["converted I;16 to RGB"] == 1
    assert report["fixes"]["applied EXIF orientation"] == 1


def test_records_are_keyed_by_their_pixels(corpus: tuple) -> None:
    _, output, _, _ = corpus
    for record in _records(output).values():
        pixels = _pixels(record)
        assert record.sha256 == hashlib.sha256(pixels.tobytes()).hexdigest()
        assert record.id == record.sha256[:16]
        assert (record.width, record.height) == pixels.shape[1::-1]


# what each kept file's row holds: its own bytes (8-bit RGB, upright) or a lossless WebP
KEPT_BYTES = {"photo.jpg": "jpeg", "lossless.png": "png", "landscape.png": "png"}
KEPT_BYTES["nested/photo.webp"] = "webp"
RE_ENCODED = KEPT - set(KEPT_BYTES)  # rotated, CMYK, palette, 16-bit, GIF, BMP, TIFF


def test_photos_keep_their_own_bytes_and_changed_pixels_are_re_encoded(corpus: tuple) -> None:
    root, output, report, _ = corpus
    records = _records(output)
    for name, image_format in KEPT_BYTES.items():
        record = records[name]
        assert record.format == image_format
        assert record.image == strip_metadata((root / name).read_bytes(), image_format)
    for name in RE_ENCODED:
        assert records[name].format == "webp"
    for record in records.values():
        with Image.open(io.BytesIO(record.image)) as image:
            assert image.format.lower() == record.format
    assert report["stored"] == {
        "formats": {"jpeg": 1, "png": 2, "webp": 1 + len(RE_ENCODED)},
        "re_encoded": len(RE_ENCODED),
    }


# written as text into the files (the GPS position is binary: no EXIF at all must survive)
SECRETS = ("SecretCam", "Jane Doe", "shot at home")


def _metadata_laden(folder: Path) -> dict[str, str]:
    """Photos carrying a camera model, a GPS position, XMP and a comment, in every format
    whose bytes a row keeps, and one whose EXIF rotation makes it re-encoded; by name, the
    format its row should hold."""
    exif = Image.Exif()
    exif[ExifTags.Base.Model] = "SecretCam"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 31.0, 12.0)
    xmp = b"<x:xmpmeta>creator: Jane Doe</x:xmpmeta>"
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "shot at home")
    text.add_itxt("XML:com.adobe.xmp", xmp.decode())
    rotated = Image.Exif()
    rotated.update(exif)
    rotated[ExifTags.Base.Orientation] = 6
    _save(_image(60), folder / "a.jpg", exif=exif, xmp=xmp, comment=b"shot at home")
    _save(_image(61), folder / "b.png", exif=exif, pnginfo=text)
    _save(_image(62), folder / "c.webp", exif=exif, xmp=xmp, lossless=True)
    _save(_image(63), folder / "d.jpg", exif=rotated, comment=b"shot at home")
    return {"a.jpg": "jpeg", "b.png": "png", "c.webp": "webp", "d.jpg": "webp"}


def test_no_exif_gps_xmp_or_comment_survives_in_any_row(tmp_path: Path) -> None:
    expected = _metadata_laden(tmp_path / "raw")
    output = str(tmp_path / "out")
    report = run(str(tmp_path / "raw"), output, IngestConfig(workers=2))
    records = _records(output)
    assert {name: record.format for name, record in records.items()} == expected
    assert report["stored"]["re_encoded"] == 1
    originals = b"".join(path.read_bytes() for path in (tmp_path / "raw").iterdir())
    assert all(secret.encode() in originals for secret in SECRETS)
    for record in records.values():
        for secret in SECRETS:
            assert secret.encode() not in record.image, (record.source, secret)
        with Image.open(io.BytesIO(record.image)) as image:
            assert not image.getexif(), record.source
            assert not {"exif", "xmp", "comment", "Comment"} & set(image.info), record.source


def test_report_files_and_histogram(corpus: tuple) -> None:
    _, output, report, _ = corpus
    assert json.loads(store.read_text(store.join(output, "report.json"))) == report
    markdown = store.read_text(store.join(output, "report.md"))
    for name in DROPPED:
        assert name in markdown
    histogram = report["short_side_histogram"]
    assert sum(histogram["kept"].values()) == len(KEPT)
    assert histogram["decoded"]["<512"] == 1  # bad/small.png
    assert histogram["kept"]["768-1023"] == 1  # landscape.png


def test_two_worker_threads_give_the_same_dataset(corpus: tuple, tmp_path: Path) -> None:
    root, output, report, _ = corpus
    again = str(tmp_path / "again")
    report_again = run(str(root), again, IngestConfig(max_pixels=MAX_PIXELS, workers=2))
    assert report_again["dropped_files"] == report["dropped_files"]
    first, second = list(read_records(output)), list(read_records(again))
    assert [r.source for r in first] == sorted(KEPT)
    assert first == second


def test_perceptual_hash_tolerates_resizing() -> None:
    original = _image(40, 900, 700)
    resized = original.resize((600, 467), Image.Resampling.BILINEAR)
    other = _image(41, 900, 700)
    assert (perceptual_hash(original) ^ perceptual_hash(resized)).bit_count() <= 6
    assert (perceptual_hash(original) ^ perceptual_hash(other)).bit_count() > 12


# ------------------------------------------------------------------------- archives and S3


def test_zip_slip_members_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "deep" / "images.zip"
    archive.parent.mkdir()
    link = zipfile.ZipInfo("link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("good/a.png", _png_bytes(_image(20)))
        bundle.writestr("b.png", _png_bytes(_image(21)))
        bundle.writestr("../evil.png", _png_bytes(_image(22)))
        bundle.writestr("/abs.png", _png_bytes(_image(23)))
        bundle.writestr(link, "/etc/passwd")

    report = run(str(archive), str(tmp_path / "ds"), IngestConfig(workers=1))

    assert set(_records(str(tmp_path / "ds"))) == {"good/a.png", "b.png"}
    reasons = {drop["file"]: drop["reason"] for drop in report["dropped_files"]}
    assert reasons == {
        "../evil.png": "unsafe_path",
        "/abs.png": "unsafe_path",
        "link.png": "unsafe_path",
    }
    assert not (tmp_path / "evil.png").exists()


def test_tar_gz_with_metadata(tmp_path: Path) -> None:
    archive = tmp_path / "images.tar.gz"

    def add(bundle: tarfile.TarFile, name: str, data: bytes) -> None:
        member = tarfile.TarInfo(name)
        member.size = len(data)
        bundle.addfile(member, io.BytesIO(data))

    with tarfile.open(archive, "w:gz") as bundle:
        add(bundle, "imgs/a.png", _png_bytes(_image(24)))
        add(bundle, "../evil.png", _png_bytes(_image(25)))
        add(bundle, "metadata.csv", b"filename,text\nimgs/a.png,a caption\n")
        link = tarfile.TarInfo("imgs/link.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        bundle.addfile(link)

    report = run(str(archive), str(tmp_path / "ds"), IngestConfig(workers=1))

    records = _records(str(tmp_path / "ds"))
    assert {name: r.caption for name, r in records.items()} == {"imgs/a.png": "a caption"}
    assert {drop["file"] for drop in report["dropped_files"]} == {"../evil.png", "imgs/link.png"}
    assert not (tmp_path / "evil.png").exists()


def test_s3_prefix_in_and_dataset_out(s3_bucket: str) -> None:
    raw = f"{s3_bucket}/raw"
    store.write_bytes(f"{raw}/a.png", _png_bytes(_image(26)))
    store.write_bytes(f"{raw}/sub/b.png", _png_bytes(_image(27)))
    store.write_bytes(f"{raw}/bad.jpg", b"<html>not an image</html>")
    store.write_bytes(f"{raw}/metadata.csv", b"filename,text\nsub/b.png,from s3\nc.png,gone\n")
    output = f"{s3_bucket}/datasets/clean"

    report = run(raw, output, IngestConfig(workers=1))

    records = _records(output)
    assert {name: r.caption for name, r in records.items()} == {"a.png": "", "sub/b.png": "from s3"}
    assert report["dropped_by_reason"] == {"not_an_image": 1}
    assert report["captions"]["missing_files"] == [{"line": 3, "filename": "c.png"}]
    assert json.loads(store.read_text(f"{output}/report.json"))["kept"] == 2


# ------------------------------------------------------------------------- errors


def _one_image_folder(path: Path, seed: int = 50) -> Path:
    _save(_image(seed), path / "a.png")
    return path


def test_non_utf8_metadata_names_the_line(tmp_path: Path) -> None:
    folder = _one_image_folder(tmp_path / "raw")
    (folder / "metadata.csv").write_bytes(b"filename,text\na.png,fine\nb.png,caf\xe9\n")
    with pytest.raises(InputError, match=r"metadata.csv line 3: not UTF-8") as error:
        run(str(folder), str(tmp_path / "ds"), IngestConfig(workers=1))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "ds").exists()


def test_metadata_without_filename_column(tmp_path: Path) -> None:
    folder = _one_image_folder(tmp_path / "raw")
    metadata = tmp_path / "captions.csv"
    metadata.write_text("file,text\na.png,fine\n", encoding="utf-8")
    config = IngestConfig(metadata=str(metadata), workers=1)
    with pytest.raises(InputError, match=r"captions.csv line 1: no 'filename' column"):
        run(str(folder), str(tmp_path / "ds"), config)


def test_bad_config_is_refused(tmp_path: Path) -> None:
    folder = _one_image_folder(tmp_path / "raw")
    with pytest.raises(ConfigError, match="--min-size"):
        run(str(folder), str(tmp_path / "ds"), IngestConfig(min_size=0))


def test_no_survivors_writes_the_report_and_fails(tmp_path: Path) -> None:
    folder = tmp_path / "raw"
    _save(_image(51, 200, 200), folder / "tiny.png")
    output = tmp_path / "ds"
    with pytest.raises(DatasetError, match="no images survived.*report.md"):
        run(str(folder), str(output), IngestConfig(workers=1))
    assert "too_small" in (output / "report.md").read_text()
    assert not (output / "_dataset.json").exists()

    _one_image_folder(folder)  # fixed input: the next run replaces the failed report
    assert run(str(folder), str(output), IngestConfig(workers=1))["kept"] == 1
    assert (output / "_dataset.json").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _one_image_folder(tmp_path / "raw")
    _save(_image(52, 100, 100), folder / "small.png")
    output = tmp_path / "ds"
    code = cli_main(["ingest", str(folder), "--out", str(output), "--workers", "1"])
    assert code == 0
    assert "1 of 2 files kept, 1 dropped (1 too_small)" in capsys.readouterr().out

    code = cli_main(["ingest", str(tmp_path / "nowhere"), "--out", str(output)])
    assert code != 0
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert error.startswith("lorapipe ingest: error: input") and "does not exist" in error


# ------------------------------------------------------------------------- the quality audit

PHOTO_MIN_SIZE = 256  # scikit-image's photos are 300-512 px on the short side
CLEAN_PHOTOS = {"astronaut.png", "coffee.png", "chelsea.png", "coins.png", "grace_hopper.jpg"}
FLAGGED_PHOTOS = {
    "blurred_grass.png": "blurry",
    "enlarged_rocket.png": "upscaled",
    "compressed_camera.jpg": "jpeg_artifacts",
}


def _enlarged(image: Image.Image, thumbnail: int = 128, side: int = 768) -> Image.Image:
    """``image`` shrunk to a ``thumbnail`` px short side and enlarged to ``side``."""
    small = image.copy()
    small.thumbnail((thumbnail * max(image.size) // min(image.size),) * 2)
    factor = side / min(small.size)
    size = (round(small.width * factor), round(small.height * factor))
    return small.resize(size, Image.Resampling.BICUBIC)


def _photo_folder(folder: Path) -> Path:
    """Real photos, clean and degraded, plus an enlarged thumbnail of a clean one (a near
    duplicate with more pixels)."""
    import matplotlib
    import skimage
    import skimage.data

    def photo(name: str) -> Image.Image:
        return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")

    for name in ("astronaut", "coffee", "chelsea", "coins"):
        _save(photo(name), folder / f"{name}.png")
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    (folder / "grace_hopper.jpg").write_bytes(hopper.read_bytes())
    _save(photo("grass").filter(ImageFilter.GaussianBlur(3)), folder / "blurred_grass.png")
    rocket = Image.open(Path(skimage.__file__).parent / "data" / "rocket.jpg").convert("RGB")
    _save(_enlarged(rocket), folder / "enlarged_rocket.png")
    _save(photo("camera"), folder / "compressed_camera.jpg", quality=5)
    _save(_enlarged(photo("astronaut")), folder / "astronaut_enlarged.png")
    return folder


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _photo_folder(tmp_path_factory.mktemp("photos") / "raw")


@pytest.fixture(scope="module")
def reported(photo_folder: Path) -> tuple[Path, dict]:
    """The photos ingested with the default ``quality: report``."""
    output = photo_folder.parent / "reported"
    return output, run(
        str(photo_folder), str(output), IngestConfig(min_size=PHOTO_MIN_SIZE, workers=1)
    )


def test_quality_report_keeps_and_lists_flagged_images_with_values_and_thumbnails(
    reported: tuple[Path, dict],
) -> None:
    output, report = reported
    assert set(_records(str(output))) == CLEAN_PHOTOS | set(FLAGGED_PHOTOS)
    audit = report["quality"]
    assert audit["action"] == "report" and audit["audited"] == 8
    assert audit["median_focus"] is not None
    flagged = {entry["file"]: entry for entry in audit["flagged"]}
    assert set(flagged) == set(FLAGGED_PHOTOS)
    for name, code in FLAGGED_PHOTOS.items():
        entry = flagged[name]
        assert code in entry["codes"] and entry["action"] == "reported"
        for flag in entry["flags"]:
            assert entry["measures"][flag["measure"]] == flag["value"]
        with Image.open(output / entry["thumbnail"]) as thumbnail:
            assert thumbnail.format == "JPEG" and max(thumbnail.size) == 160
    compressed = flagged["compressed_camera.jpg"]
    assert compressed["codes"] == ["jpeg_artifacts"]
    assert compressed["measures"]["jpeg_quality"] == 5
    assert compressed["flags"][0]["threshold"] == audit["thresholds"]["min_jpeg_quality"]
    assert audit["flagged_by_code"]["jpeg_artifacts"] == 1
    # beside them: the thumbnails of the dropped images (here a near-duplicate)
    shown = [entry["thumbnail"] for entry in [*flagged.values(), *report["dropped_files"]]]
    assert sorted(f"flagged/{path.name}" for path in (output / "flagged").iterdir()) == sorted(
        shown
    )

    markdown = (output / "report.md").read_text()
    assert "## Quality audit" in markdown
    thumbnail = compressed["thumbnail"]
    assert (
        f"| ![compressed_camera.jpg]({thumbnail}) | compressed_camera.jpg | jpeg_artifacts "
        "| jpeg_quality 5 | < min_jpeg_quality 30 | reported |"
    ) in markdown
    metrics = ingest_metrics(report)
    assert metrics["images_flagged_quality"] == 3
    assert metrics["images_flagged_jpeg_artifacts"] == 1


def test_a_clean_near_duplicate_is_kept_over_a_larger_flagged_one(
    reported: tuple[Path, dict],
) -> None:
    """The 768 px enlargement of the 512 px astronaut has more pixels, but is flagged."""
    _, report = reported
    drops = {drop["file"]: drop for drop in report["dropped_files"]}
    assert drops["astronaut_enlarged.png"]["reason"] == "near_duplicate"
    assert drops["astronaut_enlarged.png"]["kept"] == "astronaut.png"
    assert "astronaut_enlarged.png" not in {e["file"] for e in report["quality"]["flagged"]}


def test_quality_drop_drops_flagged_images_with_the_code_as_reason(
    photo_folder: Path, tmp_path: Path
) -> None:
    output = tmp_path / "dropped"
    config = IngestConfig(min_size=PHOTO_MIN_SIZE, quality="drop", workers=2)
    report = run(str(photo_folder), str(output), config)
    assert set(_records(str(output))) == CLEAN_PHOTOS
    drops = {drop["file"]: drop for drop in report["dropped_files"]}
    flagged = {entry["file"]: entry for entry in report["quality"]["flagged"]}
    for name, code in FLAGGED_PHOTOS.items():
        # the reason is the first code in the report's order; the detail names every flag
        assert code in flagged[name]["codes"]
        assert drops[name]["reason"] == flagged[name]["codes"][0]
        assert drops[name]["detail"].count(" < ") == len(flagged[name]["codes"])
    assert drops["compressed_camera.jpg"]["detail"] == "jpeg_quality 5 < min_jpeg_quality 30"
    assert re.fullmatch(
        r"focus 0\.\d+ < min_focus 0\.9(; .*)?", drops["blurred_grass.png"]["detail"]
    )
    assert report["dropped_by_reason"]["jpeg_artifacts"] == 1
    markdown = (output / "report.md").read_text()
    assert "| compressed_camera.jpg | jpeg_artifacts | jpeg_quality 5 < min_jpeg_quality 30 |" in (
        markdown
    )
    for entry in report["quality"]["flagged"]:
        assert entry["action"] == "dropped"
        assert (output / entry["thumbnail"]).is_file()  # decoded once more for it


def test_quality_cli_flags(
    photo_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stricter --min-focus drops the softer clean photos too, naming the flag's value."""
    output = tmp_path / "ds"
    argv = ["ingest", str(photo_folder), "--out", str(output), "--min-size", str(PHOTO_MIN_SIZE)]
    code = cli_main([*argv, "--quality", "drop", "--min-focus", "1.6", "--workers", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "blurry" in printed and "quality audit flagged" in printed
    report = json.loads((output / "report.json").read_text())
    assert report["config"]["min_focus"] == 1.6
    strict = {drop["file"] for drop in report["dropped_files"] if drop["reason"] == "blurry"}
    assert {"blurred_grass.png", "grace_hopper.jpg"} <= strict  # focus 1.5: clean, yet softer
    assert {"coffee.png", "coins.png"} <= set(_records(str(output)))  # focus 1.8 and 1.7
    for drop in report["dropped_files"]:
        if drop["file"] in strict:
            assert drop["detail"].startswith("focus ") and "< min_focus 1.6" in drop["detail"]

    assert cli_main([*argv, "--quality", "delete"]) != 0
    assert "use one of report, drop" in capsys.readouterr().err
    assert cli_main([*argv, "--min-jpeg-quality", "101"]) != 0
    assert "--min-jpeg-quality" in capsys.readouterr().err


def test_quality_of_the_demo_world_flags_nothing(tmp_path: Path) -> None:
    """The demo's procedural scenes (flat shapes on plain, vignetted backgrounds, a third
    watermarked) are clean: the audit flags none, so ingest drops only the planted files."""
    from lorapipe.demo.inputs import PLANTED_FILES, write_sample_folder

    folder = write_sample_folder(tmp_path / "demo", count=8)
    report = run(str(folder), str(tmp_path / "ds"), IngestConfig(quality="drop", workers=2))
    assert report["quality"]["flagged"] == []
    assert {drop["file"] for drop in report["dropped_files"]} == set(PLANTED_FILES)
