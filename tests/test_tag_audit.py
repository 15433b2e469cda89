"""The defect and style-outlier audit: findings per image, the style majority, and the tag
stage's report of them (thumbnails, Markdown, metrics) on the colour-scripted tagger of
``test_tag`` (red: clean photo, green: watermarked photo with text, blue: painting, black: no
style tag)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from test_tag import (
    COLOUR_LOGITS,
    build_colour_project,
    colour_record,
    read_metadata,
    write_dataset,
)

from lorapipe.captions import TagRules
from lorapipe.stages import tag
from lorapipe.stages.tag import TagConfig
from lorapipe.tag_audit import Findings, StyleCounts, TagAudit
from lorapipe.thumbnails import THUMBNAIL_SIDE, thumbnail_name

# the caption of a green image (a watermarked photo) with no hand caption
MARKED_CAPTION = "photo (medium), 1girl, watermark, realistic, english text"

# --------------------------------------------------------------------------- findings


def test_defects_are_found_in_any_spelling_even_when_blacklisted() -> None:
    """Aliases and globs apply (``sample_watermark`` is ``*watermark``); the blacklist does not,
    since a blacklisted defect still spoils the pixels."""
    rules = TagRules.default().with_blacklist(["*watermark"])
    scored = [("1girl", 0.99), ("sample_watermark", 0.7), ("English_Text", 0.9), ("text", 0.6)]

    findings = Findings.of(scored, rules)

    assert findings.defects == (("english text", 0.9), ("sample watermark", 0.7), ("text", 0.6))
    assert findings.style is None


def test_an_images_style_is_the_group_of_its_best_scoring_style_tag() -> None:
    scored = [("traditional_media", 0.6), ("photo_(medium)", 0.8), ("realistic", 0.7)]

    findings = Findings.of(scored, TagRules.default())

    assert (findings.style, findings.style_tags) == ("photo", ("photo (medium)", "realistic"))


def test_the_majority_style_flags_the_others() -> None:
    styles = StyleCounts.of(["photo"] * 41 + ["painting"] * 6 + ["sketch"] * 2 + [None])

    assert styles.majority == ("photo",)
    assert styles.off_style("photo") is None
    assert styles.off_style(None) is None  # no style tag says nothing against the set
    assert styles.off_style("painting") == "painting in a photo set (majority photo: 41 of 50)"


def test_in_a_set_mostly_without_style_tags_a_styled_image_is_off_style() -> None:
    """An anime set: DeepDanbooru gives most images no medium tag; the photo stands out."""
    styles = StyleCounts.of([None] * 9 + ["photo"])

    assert styles.off_style("photo") == (
        "photo in a set mostly without a style tag (no style tag: 9 of 10)"
    )


def test_styles_tied_for_most_common_are_all_the_majority() -> None:
    styles = StyleCounts.of(["photo"] * 4 + ["painting"] * 4 + ["sketch"] * 2)

    assert styles.majority == ("painting", "photo")
    assert styles.off_style("photo") is None
    assert styles.off_style("painting") is None
    assert styles.off_style("sketch") == (
        "sketch in a painting/photo set (majority painting/photo: 4 of 10 each)"
    )


def test_a_policy_decides_the_action_and_the_caption_tags() -> None:
    rules = TagRules.default()
    for policy, action, tags in [
        ("caption", "captioned", ["watermark", "traditional media"]),
        ("drop", "dropped", []),
        ("report", "reported", []),
    ]:
        audit = TagAudit(rules, policy)
        for index in range(3):
            audit.add(f"p{index}", f"p{index}.png", [("photo (medium)", 0.9)])
        audit.add("w", "w.png", [("traditional media", 0.8), ("watermark", 0.7)])
        audit.add("c", "c.png", [("photo (medium)", 0.9)])

        outcome = audit.decide()

        verdict = outcome.verdicts[3]
        assert (verdict.action, verdict.caption_tags()) == (action, tags)
        assert [v.flagged for v in outcome.verdicts] == [False, False, False, True, False]
        assert outcome.kept == (4 if policy == "drop" else 5)


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def colour_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("deepdanbooru")
    pytest.importorskip("tensorflow")
    return build_colour_project(tmp_path_factory.mktemp("dd") / "colour", COLOUR_LOGITS)


def run_tag(tmp_path: Path, project: Path, colours: list[str], **config: object) -> dict:
    """Tag one image per colour (``0-red.png``, ``1-red.png``...) into ``tmp_path / "out"``."""
    records = [colour_record(f"{i}-{colour}.png", colour) for i, colour in enumerate(colours)]
    dataset = write_dataset(str(tmp_path / "in"), records)
    return tag.run(dataset, str(tmp_path / "out"), TagConfig(project=str(project), **config))


def test_a_painting_in_a_photo_set_is_off_style_and_captioned_so(
    tmp_path: Path, colour_project: Path
) -> None:
    report = run_tag(tmp_path, colour_project, ["red", "red", "green", "red", "blue"])

    audit = report["audit"]
    assert audit["style_counts"] == {"photo": 4, "painting": 1}
    assert audit["majority_style"] == ["photo"]
    painting = next(entry for entry in audit["flagged"] if entry["file"] == "4-blue.png")
    assert painting["off_style"] == "painting in a photo set (majority photo: 4 of 5)"
    assert (painting["style"], painting["defects"], painting["action"]) == (
        "painting",
        [],
        "captioned",
    )
    assert (audit["images_flagged_defect"], audit["images_flagged_style"]) == (1, 1)
    assert tag.metrics(report) == {
        "images_tagged": 5,
        "distinct_tags": 7,
        "images_flagged_defect": 1,
        "images_flagged_style": 1,
        "images_dropped": 0,
    }


def test_an_off_style_image_with_a_hand_caption_gets_its_style_tags(
    tmp_path: Path, colour_project: Path
) -> None:
    records = [colour_record(f"{i}.png", "red", caption="a woman") for i in range(3)]
    records.append(colour_record("painted.png", "blue", caption="a woman"))
    dataset = write_dataset(str(tmp_path / "in"), records)

    tag.run(dataset, str(tmp_path / "out"), TagConfig(project=str(colour_project)))

    assert read_metadata(tmp_path / "out")["painted.png"] == (
        "a woman, traditional media, painting (medium)"
    )


def test_a_photo_in_a_set_without_style_tags_is_off_style(
    tmp_path: Path, colour_project: Path
) -> None:
    report = run_tag(tmp_path, colour_project, ["black", "black", "black", "red"])

    (entry,) = report["audit"]["flagged"]
    assert entry["file"] == "3-red.png"
    assert entry["off_style"] == "photo in a set mostly without a style tag (no style tag: 3 of 4)"


def test_without_style_or_defect_tags_nothing_is_flagged(
    tmp_path: Path, colour_project: Path
) -> None:
    report = run_tag(tmp_path, colour_project, ["black", "black"], defects="drop")

    assert report["audit"]["flagged"] == []
    assert report["audit"]["style_counts"] == {"no style tag": 2}
    assert report["rows"] == 2
    assert not (tmp_path / "out" / "flagged").exists()
    assert "No image is flagged." in (tmp_path / "out" / "report.md").read_text()


def test_flagged_images_have_thumbnails_the_reports_show(
    tmp_path: Path, colour_project: Path
) -> None:
    report = run_tag(tmp_path, colour_project, ["red", "red", "green", "blue"], defects="drop")

    out = tmp_path / "out"
    flagged = report["audit"]["flagged"]
    assert [entry["file"] for entry in flagged] == ["2-green.png", "3-blue.png"]
    markdown = (out / "report.md").read_text()
    assert "## Defects and style outliers" in markdown
    assert "Policy `drop`: flagged images are left out of the dataset" in markdown
    for entry in flagged:
        assert entry["thumbnail"] == thumbnail_name(entry["id"])
        with Image.open(io.BytesIO((out / entry["thumbnail"]).read_bytes())) as thumbnail:
            assert thumbnail.format == "JPEG"
            assert max(thumbnail.size) <= THUMBNAIL_SIDE
        assert f"![{entry['file']}]({entry['thumbnail']}) | {entry['file']} |" in markdown
    assert "| watermark (0.95); english text (0.73) | dropped |" in markdown
    assert "| painting in a photo set (majority photo: 3 of 4) | dropped |" in markdown
    assert json.loads((out / "report.json").read_text())["audit"] == json.loads(
        json.dumps(report["audit"])
    )


def test_a_rules_file_sets_the_defect_list_with_globs(tmp_path: Path, colour_project: Path) -> None:
    """Its ``defects`` replace lorapipe's: ``watermark`` is no longer one, ``*_text`` is."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("defects:\n  - '*_text'\nstyles:\n  painting: [traditional_media]\n")

    report = run_tag(tmp_path, colour_project, ["green", "red"], tag_rules=str(rules))

    audit = report["audit"]
    assert audit["defect_tags"] == ["* text"]
    assert audit["defect_counts"] == {"english text": 1}
    assert [d["tag"] for d in audit["flagged"][0]["defects"]] == ["english text"]
    assert read_metadata(tmp_path / "out")["0-green.png"] == MARKED_CAPTION


def test_a_rules_file_without_defects_or_styles_loads_and_says_so(
    tmp_path: Path, colour_project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules = tmp_path / "old-rules.yaml"
    rules.write_text("aliases:\n  smiling: smile\nblacklist:\n  - highres\n")

    with caplog.at_level(logging.WARNING, logger="lorapipe.stages.tag"):
        report = run_tag(tmp_path, colour_project, ["green", "blue"], tag_rules=str(rules))

    assert report["audit"]["flagged"] == []
    assert f"{rules} has no 'defects' or 'styles': no image is flagged by them" in caplog.text
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "- defects: none checked (the tag rules have no `defects` list)" in markdown
