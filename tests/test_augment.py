"""``lorapipe augment``: mirrored copies, left/right in captions, and when not to mirror."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorapipe import image_bytes
from lorapipe.cli import main as cli_main
from lorapipe.dataset import DatasetWriter, ImageRecord, decode_image, read_records
from lorapipe.errors import DatasetError
from lorapipe.flip_rules import DEFAULT_SKIP_TAGS
from lorapipe.stages import augment
from lorapipe.stages.augment import AugmentConfig


def image_record(
    source: str,
    seed: int,
    *,
    caption: str = "",
    tags: list[str] | None = None,
    image_format: str = "png",
    size: tuple[int, int] = (48, 32),
) -> ImageRecord:
    """A record of random (so certainly asymmetric) pixels, as ingest and tag store it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format={"jpeg": "JPEG"}.get(image_format, image_format.upper()))
    digest = hashlib.sha256(image.tobytes()).hexdigest()
    tags = tags or []
    return ImageRecord(
        id=digest[:16],
        image=buffer.getvalue(),
        format=image_format,
        width=size[0],
        height=size[1],
        sha256=digest,
        caption=caption,
        tags=tags,
        tag_scores=[0.5] * len(tags),  # exact in float32, as stored
        source=source,
    )


def write_dataset(uri: str, records: list[ImageRecord]) -> str:
    with DatasetWriter(uri) as writer:
        for record in records:
            writer.write(record)
    return uri


def pixels(record: ImageRecord) -> np.ndarray:
    return np.asarray(decode_image(record))


def augmented(tmp_path: Path, *records: ImageRecord, **config: object) -> list[ImageRecord]:
    """Run augment on the records; the output records, in order."""
    dataset = write_dataset(str(tmp_path / "in"), list(records))
    augment.run(dataset, str(tmp_path / "out"), AugmentConfig(**config))
    return list(read_records(str(tmp_path / "out")))


def report_of(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "report.json").read_text())


# --------------------------------------------------------------------------- mirrored copies


def test_each_image_is_followed_by_its_mirrored_copy(tmp_path: Path) -> None:
    """The copy: id ``<id>-flip``, ``flipped=True``, ``parent_id`` the original's id, pixels
    mirrored left to right, the hash of its own pixels; size, format and source unchanged."""
    first = image_record("a.png", 1, tags=["1girl", "solo"])
    second = image_record("b.png", 2)

    records = augmented(tmp_path, first, second)

    assert [r.id for r in records] == [first.id, f"{first.id}-flip", second.id, f"{second.id}-flip"]
    original, copy = records[0], records[1]
    assert original == first
    assert (copy.flipped, copy.parent_id) == (True, first.id)
    assert np.array_equal(pixels(copy), pixels(first)[:, ::-1])
    assert copy.sha256 == hashlib.sha256(pixels(copy).tobytes()).hexdigest() != first.sha256
    assert (copy.format, copy.width, copy.height, copy.source) == ("png", 48, 32, "a.png")
    assert (copy.tags, copy.tag_scores) == (first.tags, first.tag_scores)


def test_a_jpeg_stays_a_jpeg(tmp_path: Path) -> None:
    """Lossy images are re-encoded at high quality: the copy is visually the mirror image."""
    smooth = np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], (32, 1, 3))
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, format="JPEG", quality=95)
    original = image_record("a.jpg", 1, image_format="jpeg")
    original.image = buffer.getvalue()

    _, copy = augmented(tmp_path, original)

    assert copy.format == "jpeg"
    assert Image.open(io.BytesIO(copy.image)).format == "JPEG"
    difference = pixels(copy).astype(int) - pixels(original)[:, ::-1].astype(int)
    assert np.abs(difference).mean() < 2


def test_a_lossless_row_has_a_lossless_mirror_in_its_own_format(tmp_path: Path) -> None:
    """PNG and lossless WebP rows (ingest keeps a photo's own PNG or WebP bytes, and
    re-encodes as lossless WebP) get exactly their mirror image, in their own format."""
    as_png = image_record("a.png", 1)
    as_webp = image_record("b.webp", 2, image_format="webp")
    buffer = io.BytesIO()
    Image.open(io.BytesIO(as_webp.image)).save(buffer, format="WEBP", lossless=True)
    as_webp.image = buffer.getvalue()

    for original in (as_png, as_webp):
        _, copy = augmented(tmp_path / original.format, original)
        assert copy.format == original.format
        assert np.array_equal(pixels(copy), pixels(original)[:, ::-1])
    assert not image_bytes.is_lossy(copy.image, "webp")


def test_a_lossy_webp_row_has_a_lossy_webp_mirror(tmp_path: Path) -> None:
    original = image_record("a.webp", 1, image_format="webp")
    assert image_bytes.is_lossy(original.image, "webp")

    _, copy = augmented(tmp_path, original)

    assert copy.format == "webp"
    assert image_bytes.is_lossy(copy.image, "webp")


def test_an_image_in_another_format_is_mirrored_into_ingests_lossless_encoding(
    tmp_path: Path,
) -> None:
    """Only PNG, JPEG and WebP are written back; the copy's format says what its bytes are."""
    original = image_record("a.bmp", 1, image_format="bmp")

    _, copy = augmented(tmp_path, original)

    assert copy.format == "webp"
    assert Image.open(io.BytesIO(copy.image)).format == "WEBP"
    assert np.array_equal(pixels(copy), pixels(original)[:, ::-1])


def test_left_and_right_swap_in_captions_and_tags_as_whole_words(tmp_path: Path) -> None:
    """Case is kept; "cleft", "bright" and "leftover" only contain the words and stay."""
    original = image_record(
        "a.png",
        1,
        caption="left hand on hip, Facing Left, LEFT eye closed, rightwards, cleft chin, bright",
        tags=["hand on own left cheek", "leftover food", "looking to the side"],
    )

    _, copy = augmented(tmp_path, original)

    assert copy.caption == (
        "right hand on hip, Facing Right, RIGHT eye closed, leftwards, cleft chin, bright"
    )
    assert copy.tags == ["hand on own right cheek", "leftover food", "looking to the side"]


# --------------------------------------------------------------------------- skipped images


@pytest.mark.parametrize(
    ("tag", "pattern"),
    [
        ("text", "text"),
        ("english text", "* text"),
        ("logo", "*logo"),
        ("company logo", "*logo"),
        ("watermark", "*watermark"),
        ("signature", "signature"),
        ("artist name", "artist name"),
        ("asymmetrical legwear", "asymmetrical *"),
        ("single earring", "single earring"),
        ("side ponytail", "side ponytail"),
        ("heterochromia", "heterochromia"),
        ("hair over one eye", "hair over one eye"),
    ],
)
def test_images_with_text_or_asymmetry_tags_are_not_mirrored(
    tmp_path: Path, tag: str, pattern: str
) -> None:
    """Text comes out backwards and a one-sided design would be learned both ways round."""
    original = image_record("a.png", 1, tags=["1girl", tag])

    records = augmented(tmp_path, original)

    assert records == [original]
    report = report_of(tmp_path)
    assert report["skipped"] == [
        {"id": original.id, "source": "a.png", "reason": f"tag '{tag}' matches '{pattern}'"}
    ]
    assert (report["mirrored"], report["output_rows"]) == (0, 1)


@pytest.mark.parametrize(
    ("caption", "skip_tags", "reason"),
    [
        (
            "A photo of a cat, a Watermark in the corner",
            DEFAULT_SKIP_TAGS,
            "caption mentions 'watermark' (matches '*watermark')",
        ),
        (
            "a shop sign with english_text",
            ("* text",),
            "caption mentions 'english text' (matches '* text')",
        ),
        (
            "girl with asymmetrical hair and a hat",
            DEFAULT_SKIP_TAGS,
            "caption mentions 'asymmetrical hair' (matches 'asymmetrical *')",
        ),
    ],
)
def test_a_caption_that_mentions_a_skip_tag_prevents_mirroring(
    tmp_path: Path, caption: str, skip_tags: tuple[str, ...], reason: str
) -> None:
    """Hand-written captions are searched for the phrase, not just whole tags, and the report
    quotes the words that matched."""
    original = image_record("a.png", 1, caption=caption)

    records = augmented(tmp_path, original, skip_tags=skip_tags)

    assert records == [original]
    (skipped,) = report_of(tmp_path)["skipped"]
    assert skipped["reason"] == reason


def test_words_that_only_contain_a_skip_tag_do_not_prevent_mirroring(tmp_path: Path) -> None:
    original = image_record("a.png", 1, caption="textured wall, context, clockwise spin")

    records = augmented(tmp_path, original)

    assert [r.flipped for r in records] == [False, True]


def test_the_report_names_every_skipped_image_and_why(tmp_path: Path) -> None:
    kept = image_record("kept.png", 1, tags=["1girl"])
    signed = image_record("signed.png", 2, tags=["signature"])
    eyepatch = image_record("pirate.png", 3, tags=["eyepatch"])

    records = augmented(tmp_path, kept, signed, eyepatch)

    assert [r.id for r in records] == [kept.id, f"{kept.id}-flip", signed.id, eyepatch.id]
    report = report_of(tmp_path)
    assert (report["input_rows"], report["mirrored"], report["output_rows"]) == (3, 1, 4)
    assert [s["source"] for s in report["skipped"]] == ["signed.png", "pirate.png"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "- 3 images in, 1 mirrored copies added, 4 images out" in markdown
    assert "| signed.png | tag 'signature' matches 'signature' |" in markdown
    assert "| pirate.png | tag 'eyepatch' matches 'eyepatch' |" in markdown


def test_skip_tags_replace_the_defaults_and_extra_skip_tags_add_to_them(tmp_path: Path) -> None:
    text = image_record("text.png", 1, tags=["text"])
    sword = image_record("sword.png", 2, tags=["holding_sword"])

    replaced = augmented(tmp_path, text, sword, skip_tags=("holding sword",))
    assert [r.id for r in replaced] == [text.id, f"{text.id}-flip", sword.id]

    added = augmented(tmp_path, text, sword, extra_skip_tags=("Holding_Sword",))
    assert [r.id for r in added] == [text.id, sword.id]
    assert AugmentConfig(extra_skip_tags=("x",)).patterns == (*DEFAULT_SKIP_TAGS, "x")


# --------------------------------------------------------------------------- reruns and errors


def test_augmenting_its_own_output_adds_nothing(tmp_path: Path) -> None:
    """Copies are never mirrored again, nor are originals whose copy is already there."""
    records = [image_record("a.png", 1), image_record("b.png", 2, tags=["signature"])]
    once = write_dataset(str(tmp_path / "in"), records)
    augment.run(once, str(tmp_path / "once"))

    report = augment.run(str(tmp_path / "once"), str(tmp_path / "twice"))

    assert list(read_records(str(tmp_path / "twice"))) == list(read_records(str(tmp_path / "once")))
    assert (report["input_rows"], report["mirrored"], report["output_rows"]) == (3, 0, 3)
    assert report["already_mirrored"] == 2
    assert [s["source"] for s in report["skipped"]] == ["b.png"]


def test_an_empty_dataset_is_a_dataset_error(tmp_path: Path) -> None:
    dataset = write_dataset(str(tmp_path / "in"), [])

    with pytest.raises(DatasetError, match="has no images"):
        augment.run(dataset, str(tmp_path / "out"))


def test_a_missing_dataset_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is not a lorapipe dataset"):
        augment.run(str(tmp_path / "nowhere"), str(tmp_path / "out"))


def test_dataset_and_output_on_s3(s3_bucket: str) -> None:
    from lorapipe import store

    original = image_record("a.png", 1, caption="left arm up")
    dataset = write_dataset(f"{s3_bucket}/clean", [original])

    report = augment.run(dataset, f"{s3_bucket}/augmented")

    _, copy = read_records(f"{s3_bucket}/augmented")
    assert (copy.parent_id, copy.caption) == (original.id, "right arm up")
    assert np.array_equal(pixels(copy), pixels(original)[:, ::-1])
    assert json.loads(store.read_text(f"{s3_bucket}/augmented/report.json")) == json.loads(
        json.dumps(report)
    )
    assert store.read_text(f"{s3_bucket}/augmented/report.md").startswith("# lorapipe augment")


# --------------------------------------------------------------------------- CLI


def test_the_cli_augments_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [image_record("a.png", 1, tags=["hat"]), image_record("b.png", 2, tags=["text"])]
    dataset = write_dataset(str(tmp_path / "in"), records)
    out = str(tmp_path / "out")

    assert cli_main(["augment", dataset, "--out", out, "--extra-skip-tags", "hat, sword"]) == 0
    assert len(list(read_records(out))) == 2
    assert "2 images in, 0 mirrored copies added, 2 skipped" in capsys.readouterr().out

    assert cli_main(["augment", dataset, "--out", out, "--skip-tags", "hat"]) == 0
    assert [r.id for r in read_records(out)] == [
        records[0].id,
        records[1].id,
        f"{records[1].id}-flip",
    ]


def test_the_cli_prints_an_empty_dataset_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = write_dataset(str(tmp_path / "in"), [])

    assert cli_main(["augment", dataset, "--out", str(tmp_path / "out")]) == DatasetError.exit_code
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("lorapipe augment: error: dataset ") and "has no images" in line
