"""``lorapipe tag``: DeepDanbooru tags, tag normalization and captions, end to end.

The tagger is a real DeepDanbooru-architecture Keras model, built with deepdanbooru's own
builders (``resnet_original_bottleneck_model`` + ``conv_gap``, as its ``resnet_custom_*``
models are), tiny (64x64 input) and saved as a project folder the way DeepDanbooru ships one:
``project.json``, ``model-<name>.h5`` / ``.keras``, ``tags.txt`` and ``tags-general.txt`` /
``tags-character.txt``.

For exact assertions, ``scripted_project`` fixes the network's weights so that it gives every
image the same score per tag (see ``SCRIPTED_LOGITS``). ``random_project`` keeps random
weights: its scores differ per image, which checks that batching keeps each image's scores.
``colour_project`` scores an image by its colour (``COLOUR_LOGITS``), so a test decides which
images are watermarked photos, clean photos or paintings.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorapipe import store
from lorapipe.cli import main as cli_main
from lorapipe.dataset import DatasetWriter, ImageRecord, read_records
from lorapipe.errors import ConfigError, DatasetError, LorapipeError, ModelError
from lorapipe.stages import tag
from lorapipe.stages.tag import DeepDanbooruTagger, TagConfig

INPUT_SIZE = 64
MODEL_NAME = "tiny"

# tags.txt of the scripted model, in output order, with the logit it gives every image.
SCRIPTED_LOGITS = {
    "1girl": 6.0,  # 0.998
    "Long_Hair": 5.0,  # 0.993, spelled "long hair" in captions
    "rating:safe": 8.0,  # 0.9997, the best score, but a rating says nothing about the pixels
    "highres": 4.0,  # 0.982, file metadata: blacklisted too
    "smiling": 3.0,  # 0.953, an alias of "smile"
    "smile": 2.0,  # 0.881, merged into the alias, which keeps the better score
    "solo": 1.0,  # 0.731
    "Hatsune_Miku_(Vocaloid)": 0.5,  # 0.622, a character tag
    "hat": -0.1,  # 0.475, just under the default threshold of 0.5
    "red_eyes": -5.0,  # 0.007
}
GENERAL_TAGS = ["1girl", "Long_Hair", "highres", "smiling", "smile", "solo", "hat", "red_eyes"]
CHARACTER_TAGS = ["Hatsune_Miku_(Vocaloid)"]
# what the scripted model tags every image with at the default threshold, best first
DEFAULT_TAGS = ["1girl", "long hair", "smile", "solo", "hatsune miku (vocaloid)"]

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0)}
# tags.txt of the colour model, with the logit it gives an image of each colour: red is a clean
# photo, green a watermarked photo with text, blue a painting, black has no style tag
COLOUR_LOGITS = {
    "1girl": {"red": 4.0, "green": 4.0, "blue": 4.0, "black": 4.0},  # 0.982
    "photo_(medium)": {"red": 5.0, "green": 5.0, "blue": -6.0, "black": -6.0},  # 0.993
    "realistic": {"red": 3.0, "green": 2.0, "blue": -6.0, "black": -6.0},
    "watermark": {"red": -6.0, "green": 3.0, "blue": -6.0, "black": -6.0},  # 0.953
    "english_text": {"red": -6.0, "green": 1.0, "blue": -6.0, "black": -6.0},  # 0.731
    "traditional_media": {"red": -6.0, "green": -6.0, "blue": 3.0, "black": -6.0},
    "painting_(medium)": {"red": -6.0, "green": -6.0, "blue": 2.0, "black": -6.0},
}


def sigmoid(logit: float) -> float:
    return 1 / (1 + math.exp(-logit))


# --------------------------------------------------------------------------- fixtures


def build_project(
    folder: Path,
    tags: list[str],
    *,
    logits: list[float] | None = None,
    suffix: str = ".h5",
    seed: int = 0,
) -> Path:
    """A DeepDanbooru project folder holding a tiny ``resnet_custom``-style model.

    With ``logits`` the weights are fixed so that tag ``i`` scores ``sigmoid(logits[i])`` on
    every image: the batch norms of the last stage output a constant (gamma 0, beta 0.5), so
    the features entering ``conv_gap`` are one constant, and the 1x1 kernel scales it to the
    logits. Without ``logits`` the weights are random (seeded).
    """
    import deepdanbooru as dd
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    inputs = tf.keras.Input(shape=(INPUT_SIZE, INPUT_SIZE, 3), dtype=tf.float32)
    x = dd.model.resnet.resnet_original_bottleneck_model(
        inputs, filter_sizes=[16], repeat_sizes=[1], final_pool=False
    )
    x = dd.model.layers.conv_gap(x, len(tags))
    outputs = tf.keras.layers.Activation("sigmoid", dtype="float32")(x)
    model = tf.keras.Model(inputs=inputs, outputs=outputs, name=MODEL_NAME)

    if logits is not None:
        head = model.layers[-3]  # conv_gap's Conv2D: features (.., 16) -> one map per tag
        assert isinstance(head, tf.keras.layers.Conv2D)
        channels = head.input.shape[-1]
        for layer in model.layers:
            if isinstance(layer, tf.keras.layers.BatchNormalization):
                gamma, beta, mean, variance = layer.get_weights()
                if gamma.shape[0] == channels:
                    layer.set_weights([gamma * 0, beta * 0 + 0.5, mean, variance])
        features = tf.keras.Model(inputs, head.input)(np.zeros((1, 64, 64, 3), np.float32))
        constant = float(np.asarray(features).flat[0])
        kernel = np.array(logits, np.float32) / (channels * constant)
        head.set_weights([np.tile(kernel, (1, 1, channels, 1))])

    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / f"model-{MODEL_NAME}{suffix}")
    project = {"image_width": INPUT_SIZE, "image_height": INPUT_SIZE, "model": MODEL_NAME}
    (folder / "project.json").write_text(json.dumps(project), encoding="utf-8")
    (folder / "tags.txt").write_text("\n".join(tags) + "\n", encoding="utf-8")
    return folder


def build_colour_project(folder: Path, logits: dict[str, dict[str, float]]) -> Path:
    """A DeepDanbooru project folder whose model scores an image by its mean colour: tag ``t``
    scores ``sigmoid(logits[t][colour])`` on an image of one of ``COLOURS``.

    The tag stage needs only DeepDanbooru's project layout and a Keras model from images to
    per-tag sigmoids, so this one is a global average pool and a dense layer: on black (0, 0,
    0) the logits are the bias, on pure red the bias plus the kernel's red row, and so on.
    """
    import tensorflow as tf

    tags = list(logits)
    bias = np.array([logits[tag]["black"] for tag in tags], np.float32)
    kernel = np.array(
        [[logits[tag][colour] for tag in tags] for colour in ("red", "green", "blue")], np.float32
    )
    inputs = tf.keras.Input(shape=(INPUT_SIZE, INPUT_SIZE, 3), dtype=tf.float32)
    pooled = tf.keras.layers.GlobalAveragePooling2D()(inputs)
    dense = tf.keras.layers.Dense(len(tags))
    outputs = tf.keras.layers.Activation("sigmoid")(dense(pooled))
    model = tf.keras.Model(inputs=inputs, outputs=outputs, name=MODEL_NAME)
    dense.set_weights([kernel - bias, bias])

    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / f"model-{MODEL_NAME}.keras")
    project = {"image_width": INPUT_SIZE, "image_height": INPUT_SIZE, "model": MODEL_NAME}
    (folder / "project.json").write_text(json.dumps(project), encoding="utf-8")
    (folder / "tags.txt").write_text("\n".join(tags) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def colour_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project whose model scores an image by its colour (``COLOUR_LOGITS``)."""
    pytest.importorskip("deepdanbooru")
    pytest.importorskip("tensorflow")
    return build_colour_project(tmp_path_factory.mktemp("dd") / "colour", COLOUR_LOGITS)


@pytest.fixture(scope="session")
def scripted_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project whose model scores every image by ``SCRIPTED_LOGITS`` (a legacy .h5)."""
    pytest.importorskip("deepdanbooru")
    pytest.importorskip("tensorflow")
    folder = build_project(
        tmp_path_factory.mktemp("dd") / "scripted",
        list(SCRIPTED_LOGITS),
        logits=list(SCRIPTED_LOGITS.values()),
    )
    (folder / "tags-general.txt").write_text("\n".join(GENERAL_TAGS) + "\n", encoding="utf-8")
    (folder / "tags-character.txt").write_text("\n".join(CHARACTER_TAGS) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def random_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with random weights, saved in the native .keras format."""
    pytest.importorskip("deepdanbooru")
    pytest.importorskip("tensorflow")
    tags = [f"tag_{i}" for i in range(6)]
    return build_project(tmp_path_factory.mktemp("dd") / "random", tags, suffix=".keras")


def image_record(source: str, seed: int, *, caption: str = "", size=(96, 64)) -> ImageRecord:
    """A PNG of random pixels, as ingest stores it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    digest = hashlib.sha256(image.tobytes()).hexdigest()
    return ImageRecord(
        id=digest[:16],
        image=buffer.getvalue(),
        format="png",
        width=size[0],
        height=size[1],
        sha256=digest,
        caption=caption,
        source=source,
    )


def colour_record(source: str, colour: str, *, caption: str = "") -> ImageRecord:
    """A 48x32 PNG of one of ``COLOURS``; its id comes from ``source`` (the pixels of two
    images of one colour are the same)."""
    image = Image.new("RGB", (48, 32), COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return ImageRecord(
        id=hashlib.sha256(source.encode()).hexdigest()[:16],
        image=buffer.getvalue(),
        format="png",
        width=48,
        height=32,
        sha256=hashlib.sha256(image.tobytes()).hexdigest(),
        caption=caption,
        source=source,
    )


def write_dataset(uri: str, records: list[ImageRecord]) -> str:
    with DatasetWriter(uri) as writer:
        for record in records:
            writer.write(record)
    return uri


@pytest.fixture
def tag_images(tmp_path: Path, scripted_project: Path) -> Callable[..., list[ImageRecord]]:
    """Tag records with the scripted project; returns the output records in order."""

    def run(*records: ImageRecord, **config: object) -> list[ImageRecord]:
        dataset = write_dataset(str(tmp_path / "in"), list(records))
        tag.run(dataset, str(tmp_path / "out"), TagConfig(project=str(scripted_project), **config))
        return list(read_records(str(tmp_path / "out")))

    return run


@pytest.fixture
def tag_colours(tmp_path: Path, colour_project: Path) -> Callable[..., dict]:
    """Tag records with the colour project into ``tmp_path / "out"``; returns the report."""

    def run(*records: ImageRecord, **config: object) -> dict:
        dataset = write_dataset(str(tmp_path / "in"), list(records))
        return tag.run(
            dataset, str(tmp_path / "out"), TagConfig(project=str(colour_project), **config)
        )

    return run


def read_metadata(folder: Path) -> dict[str, str]:
    """metadata.csv as ``{filename: caption}``."""
    with (folder / "metadata.csv").open(encoding="utf-8", newline="") as file:
        return {row["filename"]: row["text"] for row in csv.DictReader(file)}


def captions(records: list[ImageRecord]) -> list[str]:
    return [record.caption for record in records]


# --------------------------------------------------------------------------- auto tags


def test_auto_tags_are_thresholded_normalized_and_ordered_by_score(tag_images) -> None:
    """Tags at or above 0.5, spelled with spaces and lower case, aliases applied ("smiling" is
    "smile", which keeps the better of the two scores), rating and metadata tags dropped."""
    (record,) = tag_images(image_record("a.png", 1))

    assert record.tags == DEFAULT_TAGS
    expected_scores = [sigmoid(SCRIPTED_LOGITS[t]) for t in ("1girl", "Long_Hair", "smiling")]
    expected_scores += [sigmoid(1.0), sigmoid(0.5)]
    assert record.tag_scores == pytest.approx(expected_scores, abs=1e-5)
    assert record.caption == ", ".join(DEFAULT_TAGS)


def test_a_lower_threshold_admits_more_tags(tag_images) -> None:
    (record,) = tag_images(image_record("a.png", 1), threshold=0.4)

    assert record.tags == [*DEFAULT_TAGS, "hat"]


def test_max_tags_keeps_the_best_tags_after_the_blacklist(tag_images) -> None:
    """rating:safe scores highest but is dropped before counting, so it takes no place."""
    (record,) = tag_images(image_record("a.png", 1), max_tags=2)

    assert record.tags == ["1girl", "long hair"]
    assert record.caption == "1girl, long hair"


def test_extra_blacklist_patterns_add_to_the_default_rules(tag_images) -> None:
    (record,) = tag_images(image_record("a.png", 1), extra_blacklist=("Long_Hair", "*(vocaloid)"))

    assert record.tags == ["1girl", "smile", "solo"]


def test_a_tag_rules_file_replaces_the_default_rules(tmp_path: Path, tag_images) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("aliases:\n  solo: solo_focus\nblacklist:\n  - '*hair'\n  - smil*\n")

    (record,) = tag_images(image_record("a.png", 1), tag_rules=str(rules), threshold=0.6)

    assert record.tags == [
        "rating:safe",
        "1girl",
        "highres",
        "solo focus",
        "hatsune miku (vocaloid)",
    ]


def test_images_are_fed_to_the_model_as_deepdanbooru_does(scripted_project: Path) -> None:
    """Resized to fit the 64x64 input keeping the aspect ratio, edge-padded, values in [0, 1]."""
    tagger = DeepDanbooruTagger.load(str(scripted_project))
    wide = Image.new("RGB", (200, 100), (255, 0, 0))

    array = tagger.model_input(wide)

    assert (tagger.width, tagger.height, tagger.model_file) == (64, 64, "model-tiny.h5")
    assert array.shape == (64, 64, 3)
    assert np.allclose(array, [1.0, 0.0, 0.0])


def test_each_image_keeps_its_own_scores_across_batches(tmp_path: Path, random_project) -> None:
    """Three different images in batches of two: every record gets the scores the model gives
    that image alone (a .keras model; random weights, so scores differ per image)."""
    records = [image_record(f"{i}.png", i, size=(40 + 30 * i, 64)) for i in range(3)]
    dataset = write_dataset(str(tmp_path / "in"), records)
    config = TagConfig(project=str(random_project), threshold=1e-6, max_tags=99, batch_size=2)

    tag.run(dataset, str(tmp_path / "out"), config)

    tagger = DeepDanbooruTagger.load(str(random_project), threshold=1e-6)
    assert tagger.model_file == "model-tiny.keras"
    tagged = list(read_records(str(tmp_path / "out")))
    assert [r.source for r in tagged] == ["0.png", "1.png", "2.png"]
    for original, record in zip(records, tagged, strict=True):
        (alone,) = tagger.predict([Image.open(io.BytesIO(original.image))])
        names = [name.replace("_", " ") for name in tagger.tags]
        expected = sorted(zip(names, alone, strict=True), key=lambda pair: -pair[1])
        assert record.tags == [name for name, _ in expected]
        assert record.tag_scores == pytest.approx([score for _, score in expected], abs=1e-5)
    assert len({tuple(r.tag_scores) for r in tagged}) == 3


# --------------------------------------------------------------------------- captions


def test_hand_written_captions_are_normalized_by_the_same_rules(tag_images) -> None:
    """The seed's fix for unnormalized metadata.csv: one spelling per concept, no ratings."""
    hand = "Long_Hair, 1 girl,  Smiling , rating:explicit, highres, long hair, Blonde_Hair"

    (record,) = tag_images(image_record("a.png", 1, caption=hand))

    assert record.caption == "long hair, 1girl, smile, blonde hair"
    assert record.tags == DEFAULT_TAGS  # the auto tags are stored whatever the merge policy


@pytest.mark.parametrize(
    ("merge", "expected"),
    [
        ("keep", ["blonde hair, smile", ", ".join(DEFAULT_TAGS)]),
        (
            "append",
            [
                "blonde hair, smile, 1girl, long hair, solo, hatsune miku (vocaloid)",
                ", ".join(DEFAULT_TAGS),
            ],
        ),
        ("replace", [", ".join(DEFAULT_TAGS)] * 2),
    ],
)
def test_merge_policy_decides_between_hand_caption_and_auto_tags(
    tag_images, merge: str, expected: list[str]
) -> None:
    """keep: the hand caption wins, tags only fill empty captions; append: hand caption, then
    the tags it lacks; replace: tags only."""
    records = tag_images(
        image_record("hand.png", 1, caption="Blonde_Hair, smiling"),
        image_record("bare.png", 2),
        merge=merge,
    )

    assert captions(records) == expected


def test_the_trigger_word_comes_first_then_the_keep_tags(tag_images) -> None:
    """The trigger word is written as given; keep tags lead in the order given when present
    (in any spelling: "one girl" is an alias of "1girl"); absent keep tags are ignored."""
    records = tag_images(
        image_record("a.png", 1),
        image_record("b.png", 2, caption="sks_style, hat, 1girl"),
        trigger_word="sks_style",
        keep_tags=("solo", "Long_Hair", "one girl", "red eyes"),
    )

    assert captions(records) == [
        "sks_style, solo, long hair, 1girl, smile, hatsune miku (vocaloid)",
        "sks_style, 1girl, hat",
    ]


# --------------------------------------------------------------------------- outputs


def test_the_output_dataset_keeps_every_other_column(tmp_path: Path, tag_images) -> None:
    original = image_record("photos/a.png", 1, caption="smile")

    (record,) = tag_images(original)

    for name in ("id", "image", "format", "width", "height", "sha256", "source", "flipped"):
        assert getattr(record, name) == getattr(original, name)
    assert record.parent_id is None


def test_metadata_csv_is_what_lora_scripts_reads(tmp_path: Path, scripted_project) -> None:
    """``filename,text``: the image's source name (or ``<id>.png``) and its caption, quoted
    by csv where the caption has commas."""
    records = [
        image_record("dir/a.png", 1, caption='a "quoted", two-part caption'),
        image_record("", 2),
    ]
    dataset = write_dataset(str(tmp_path / "in"), records)

    tag.run(dataset, str(tmp_path / "out"), TagConfig(project=str(scripted_project)))

    with (tmp_path / "out" / "metadata.csv").open(encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows == [
        {"filename": "dir/a.png", "text": 'a "quoted", two-part caption'},
        {"filename": f"{records[1].id}.png", "text": ", ".join(DEFAULT_TAGS)},
    ]


def test_the_report_has_the_tag_frequency_table(tmp_path: Path, scripted_project) -> None:
    """Counts of every caption tag over the dataset, most frequent first (the LoRA's
    ``ss_tag_frequency`` later), in report.json and as a table in report.md."""
    records = [
        image_record("a.png", 1),
        image_record("b.png", 2),
        image_record("c.png", 3, caption="blonde hair, smile"),
    ]
    dataset = write_dataset(str(tmp_path / "in"), records)
    config = TagConfig(project=str(scripted_project), trigger_word="sks")

    report = tag.run(dataset, str(tmp_path / "out"), config)

    assert list(report["tag_frequency"].items()) == [
        ("sks", 3),
        ("smile", 3),
        ("1girl", 2),
        ("hatsune miku (vocaloid)", 2),
        ("long hair", 2),
        ("solo", 2),
        ("blonde hair", 1),
    ]
    assert report["tag_categories"] == {
        "smile": "general",
        "1girl": "general",
        "hatsune miku (vocaloid)": "character",
        "long hair": "general",
        "solo": "general",
    }
    assert report["rows"] == 3
    assert report["hand_captions"] == 1
    assert report["mean_auto_tags"] == 5
    assert "rating:*" in report["blacklist"]
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written == json.loads(json.dumps(report))
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| tag | images | category |" in markdown
    assert "| sks | 3 |  |" in markdown
    assert "| hatsune miku (vocaloid) | 2 | character |" in markdown


def test_images_with_no_tag_above_the_threshold_are_reported(tmp_path: Path, tag_images) -> None:
    tag_images(image_record("a.png", 1), extra_blacklist=("*",))

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["untagged"] == ["a.png"]
    assert report["empty_captions"] == ["a.png"]
    assert (
        "**1 images no tag above the threshold**: a.png"
        in (tmp_path / "out" / "report.md").read_text()
    )


# --------------------------------------------------------------------------- defects

MARKED_AUTO = "photo (medium), 1girl, watermark, realistic, english text"


def test_caption_policy_writes_defect_tags_into_hand_captions(tmp_path: Path, tag_colours):
    """The default. With ``merge: keep`` a hand caption drops the auto tags, so a watermarked
    image would train as clean and the LoRA draw watermarks everywhere: its defect tags are
    added after the caption's own; a caption of auto tags has them already (once)."""
    report = tag_colours(
        colour_record("clean.png", "red", caption="a woman, Smiling"),
        colour_record("marked.png", "green", caption="a woman, Smiling"),
        colour_record("auto.png", "green"),
    )

    out = tmp_path / "out"
    assert captions(list(read_records(str(out)))) == [
        "a woman, smile",
        "a woman, smile, watermark, english text",
        MARKED_AUTO,
    ]
    assert read_metadata(out)["marked.png"] == "a woman, smile, watermark, english text"
    flagged = report["audit"]["flagged"]
    assert [(entry["file"], entry["action"]) for entry in flagged] == [
        ("marked.png", "captioned"),
        ("auto.png", "captioned"),
    ]
    assert flagged[0]["defects"] == [
        {"tag": "watermark", "score": pytest.approx(sigmoid(3.0), abs=1e-4)},
        {"tag": "english text", "score": pytest.approx(sigmoid(1.0), abs=1e-4)},
    ]


def test_caption_policy_is_not_cut_by_max_tags_or_the_blacklist(tag_colours, tmp_path) -> None:
    tag_colours(colour_record("marked.png", "green"), max_tags=1, extra_blacklist=("watermark",))

    (record,) = read_records(str(tmp_path / "out"))
    assert record.tags == ["photo (medium)"]
    assert record.caption == "photo (medium), watermark, english text"


def test_caption_policy_does_not_repeat_a_defect_the_caption_mentions(tag_colours, tmp_path):
    tag_colours(colour_record("marked.png", "green", caption="a sign with English_Text"))

    (record,) = read_records(str(tmp_path / "out"))
    assert record.caption == "a sign with english text, watermark"


def test_report_policy_leaves_captions_as_merge_made_them(tmp_path: Path, tag_colours) -> None:
    report = tag_colours(
        colour_record("clean.png", "red", caption="a woman"),
        colour_record("marked.png", "green", caption="a woman"),
        defects="report",
    )

    assert captions(list(read_records(str(tmp_path / "out")))) == ["a woman", "a woman"]
    assert [(e["file"], e["action"]) for e in report["audit"]["flagged"]] == [
        ("marked.png", "reported")
    ]


def test_drop_policy_leaves_flagged_images_out(tmp_path: Path, tag_colours) -> None:
    report = tag_colours(
        colour_record("clean.png", "red", caption="a woman"),
        colour_record("marked.png", "green", caption="a woman"),
        colour_record("auto.png", "green"),
        defects="drop",
    )

    out = tmp_path / "out"
    assert [record.source for record in read_records(str(out))] == ["clean.png"]
    assert read_metadata(out) == {"clean.png": "a woman"}
    assert (report["images"], report["rows"], report["audit"]["images_dropped"]) == (3, 1, 2)
    assert [(e["file"], e["action"]) for e in report["audit"]["flagged"]] == [
        ("marked.png", "dropped"),
        ("auto.png", "dropped"),
    ]
    assert list(report["tag_frequency"]) == ["a woman"]  # of the images kept
    for entry in report["audit"]["flagged"]:
        assert (out / entry["thumbnail"]).is_file()  # a dropped image is still shown


def test_dropping_every_image_is_a_dataset_error_naming_the_report(
    tmp_path: Path, colour_project: Path
) -> None:
    """Nothing is published; the report and thumbnails say why, and the next run into the
    folder replaces them."""
    records = [colour_record("a.png", "green"), colour_record("b.png", "green")]
    dataset = write_dataset(str(tmp_path / "in"), records)
    out = tmp_path / "out"

    with pytest.raises(DatasetError, match="dropped every image") as raised:
        tag.run(dataset, str(out), TagConfig(project=str(colour_project), defects="drop"))

    assert "\n" not in str(raised.value)
    assert f"see {out / 'report.md'}" in str(raised.value)
    assert sorted(p.name for p in out.iterdir()) == ["flagged", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert [entry["file"] for entry in report["audit"]["flagged"]] == ["a.png", "b.png"]
    assert all((out / entry["thumbnail"]).is_file() for entry in report["audit"]["flagged"])

    tag.run(dataset, str(out), TagConfig(project=str(colour_project)))
    assert len(list(read_records(str(out)))) == 2


def test_dropping_every_image_leaves_an_older_dataset_whole(
    tmp_path: Path, colour_project: Path
) -> None:
    out = write_dataset(str(tmp_path / "out"), [colour_record("old.png", "red")])
    dataset = write_dataset(str(tmp_path / "in"), [colour_record("a.png", "green")])

    with pytest.raises(DatasetError, match="the older dataset at .* is left as it was"):
        tag.run(dataset, out, TagConfig(project=str(colour_project), defects="drop"))

    assert [record.source for record in read_records(out)] == ["old.png"]


# --------------------------------------------------------------------------- S3


def test_project_dataset_and_output_on_s3(tmp_path: Path, scripted_project, s3_bucket) -> None:
    project = f"{s3_bucket}/models/deepdanbooru"
    store.put_dir(scripted_project, project)
    dataset = write_dataset(f"{s3_bucket}/data/clean", [image_record("a.png", 1)])
    output = f"{s3_bucket}/data/tagged"

    report = tag.run(dataset, output, TagConfig(project=project, trigger_word="sks"))

    (record,) = read_records(output)
    assert record.caption == "sks, " + ", ".join(DEFAULT_TAGS)
    rows = list(csv.reader(io.StringIO(store.read_text(f"{output}/metadata.csv"))))
    assert rows == [["filename", "text"], ["a.png", record.caption]]
    written = json.loads(store.read_text(f"{output}/report.json"))
    assert written == json.loads(json.dumps(report))
    assert store.read_text(f"{output}/report.md").startswith("# lorapipe tag")


def test_thumbnails_and_a_failed_report_on_s3(colour_project: Path, s3_bucket: str) -> None:
    """Thumbnails are published with the dataset; a run that drops every image leaves its
    report and thumbnails under the prefix, and the next run replaces them."""
    project = f"{s3_bucket}/models/colour"
    store.put_dir(colour_project, project)
    records = [colour_record("clean.png", "red"), colour_record("marked.png", "green")]
    dataset = write_dataset(f"{s3_bucket}/data/clean", records)

    report = tag.run(dataset, f"{s3_bucket}/data/tagged", TagConfig(project=project))
    (entry,) = report["audit"]["flagged"]
    thumbnail = store.read_bytes(f"{s3_bucket}/data/tagged/{entry['thumbnail']}")
    assert thumbnail.startswith(b"\xff\xd8")  # a JPEG

    failed = f"{s3_bucket}/data/failed"
    marked = write_dataset(f"{s3_bucket}/data/marked", records[1:])
    with pytest.raises(DatasetError, match=f"see {failed}/report.md"):
        tag.run(marked, failed, TagConfig(project=project, defects="drop"))
    assert store.exists(f"{failed}/{entry['thumbnail']}")
    tag.run(dataset, failed, TagConfig(project=project, defects="drop"))
    assert [record.source for record in read_records(failed)] == ["clean.png"]


# --------------------------------------------------------------------------- bad input


def copy_project(source: Path, target: Path, *, without: str = "") -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.name != without:
            (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("project.json", "has no project.json"),
        ("model-tiny.h5", "has no model-tiny.h5 or model-tiny.keras; copy the model file"),
        ("tags.txt", "has no tags.txt"),
    ],
)
def test_a_project_folder_missing_a_file_is_a_one_line_error(
    tmp_path: Path, scripted_project: Path, missing: str, message: str
) -> None:
    project = copy_project(scripted_project, tmp_path / "project", without=missing)

    with pytest.raises(ModelError, match=message) as raised:
        DeepDanbooruTagger.load(str(project))

    assert "\n" not in str(raised.value)
    assert str(project) in str(raised.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("rename_model", r"has no model-tiny\.h5 .*found model-other\.h5: rename it"),
        ("bad_json", r"project\.json: not valid JSON"),
        ("no_model_name", r'project\.json: has no "model" name'),
        ("corrupt_model", r"model-tiny\.h5: Keras cannot load it"),
        ("extra_tag", r"tags\.txt: has 11 tags but model-tiny\.h5 outputs 10 scores"),
    ],
)
def test_a_broken_project_folder_is_a_one_line_model_error(
    tmp_path: Path, scripted_project: Path, change: str, message: str
) -> None:
    project = copy_project(scripted_project, tmp_path / "project")
    if change == "rename_model":
        (project / "model-tiny.h5").rename(project / "model-other.h5")
    elif change == "bad_json":
        (project / "project.json").write_text("{not json")
    elif change == "no_model_name":
        (project / "project.json").write_text('{"image_width": 64}')
    elif change == "corrupt_model":
        (project / "model-tiny.h5").write_bytes(b"not an HDF5 file")
    elif change == "extra_tag":
        with (project / "tags.txt").open("a") as file:
            file.write("one_more_tag\n")

    with pytest.raises(ModelError, match=message) as raised:
        DeepDanbooruTagger.load(str(project))

    assert "\n" not in str(raised.value)


def test_a_missing_project_folder_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no-such-project' not found; give the folder"):
        DeepDanbooruTagger.load(str(tmp_path / "no-such-project"))


def test_a_missing_project_prefix_on_s3_is_a_model_error(s3_bucket: str) -> None:
    with pytest.raises(ModelError, match="no-such-project' not found; give the folder"):
        DeepDanbooruTagger.load(f"{s3_bucket}/no-such-project")


@pytest.mark.parametrize(
    "config",
    [
        {"threshold": 0.0},
        {"threshold": 1.5},
        {"threshold": float("nan")},
        {"max_tags": 0},
        {"batch_size": 0},
        {"merge": "merge"},
        {"defects": "remove"},
        {"project": ""},
    ],
)
def test_bad_settings_are_config_errors_before_anything_loads(tmp_path: Path, config) -> None:
    settings = {"project": str(tmp_path / "nowhere"), **config}

    with pytest.raises(ConfigError):
        tag.run(str(tmp_path / "nowhere"), str(tmp_path / "out"), TagConfig(**settings))


def test_a_bad_tag_rules_file_is_a_config_error(tmp_path: Path, scripted_project) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("aliases: [not, a, mapping]\n")
    dataset = write_dataset(str(tmp_path / "in"), [image_record("a.png", 1)])
    config = TagConfig(project=str(scripted_project), tag_rules=str(rules))

    with pytest.raises(ConfigError, match="rules.yaml: 'aliases' must map tag to tag"):
        tag.run(dataset, str(tmp_path / "out"), config)


def test_an_empty_dataset_is_a_dataset_error(tmp_path: Path, scripted_project) -> None:
    dataset = write_dataset(str(tmp_path / "in"), [])

    with pytest.raises(DatasetError, match="has no images"):
        tag.run(dataset, str(tmp_path / "out"), TagConfig(project=str(scripted_project)))


# --------------------------------------------------------------------------- CLI


def test_the_cli_tags_a_dataset(tmp_path: Path, scripted_project, capsys) -> None:
    records = [image_record("a.png", 1), image_record("b.png", 2, caption="Blonde_Hair")]
    dataset = write_dataset(str(tmp_path / "in"), records)
    out = tmp_path / "out"

    code = cli_main(
        [
            "tag",
            dataset,
            "--out",
            str(out),
            "--project",
            str(scripted_project),
            "--threshold",
            "0.9",
            "--max-tags",
            "3",
            "--trigger-word",
            "sks_style",
            "--keep-tags",
            "smile, long_hair",
            "--merge",
            "append",
            "--extra-blacklist",
            "1girl",
        ]
    )

    assert code == 0
    assert captions(list(read_records(str(out)))) == [
        "sks_style, smile, long hair",
        "sks_style, smile, long hair, blonde hair",
    ]
    printed = capsys.readouterr().out
    assert "tagged 2 images; most frequent tags: long hair, sks_style, smile" in printed
    assert (out / "metadata.csv").is_file()
    assert (out / "report.md").is_file()


def test_the_cli_prints_a_bad_project_as_one_line(tmp_path: Path, capsys) -> None:
    dataset = write_dataset(str(tmp_path / "in"), [image_record("a.png", 1)])
    (tmp_path / "project").mkdir()

    code = cli_main(
        ["tag", dataset, "--out", str(tmp_path / "out"), "--project", str(tmp_path / "project")]
    )

    assert code == LorapipeError.exit_code
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lorapipe tag: error: DeepDanbooru project")
    assert "has no project.json" in error


def test_the_cli_drops_flagged_images_with_defects_drop(
    tmp_path: Path, colour_project: Path, capsys
) -> None:
    """A photo set: the watermarked photo and the painting go, the clean photo stays."""
    records = [
        colour_record("clean.png", "red"),
        colour_record("marked.png", "green"),
        colour_record("painted.png", "blue"),
    ]
    dataset = write_dataset(str(tmp_path / "in"), records)
    out = tmp_path / "out"

    code = cli_main(
        ["tag", dataset, "--out", str(out), "--project", str(colour_project), "--defects", "drop"]
    )

    assert code == 0
    assert [record.source for record in read_records(str(out))] == ["clean.png"]
    printed = capsys.readouterr().out
    assert "tagged 3 images; most frequent tags:" in printed
    assert "flagged 1 for defects and 1 off-style (defects: drop); 2 dropped, 1 in the output" in (
        printed
    )
