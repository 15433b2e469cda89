"""The demo's inputs: world scenes as a user hands them over, bad files included, and the
committed world model and tagger."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
from PIL import Image

from lorapipe.demo import inputs, world
from lorapipe.errors import InputError
from lorapipe.ingestion.decoding import perceptual_hash


def test_the_sample_folder_holds_captioned_512px_styled_scenes_some_watermarked_and_three_files_to_drop(
    tmp_path: Path,
) -> None:
    folder = inputs.write_sample_folder(tmp_path / "raw", count=8)
    with (folder / "metadata.csv").open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8
    truth = json.loads(inputs.truth_file(folder).read_text())
    assert set(truth) == {row["filename"] for row in rows}
    for index, row in enumerate(rows):
        assert row["text"].startswith(f"{inputs.TRIGGER}, ")
        assert inputs.TRIGGER in truth[row["filename"]]["tags"]
        # like scraped images: a watermark on every third, which its caption does not mention
        watermarked = index % inputs.WATERMARK_EVERY == 0
        assert ("watermark" in truth[row["filename"]]["tags"]) == watermarked
        assert "watermark" not in row["text"]
        with Image.open(folder / row["filename"]) as image:
            # 512 px on the short side (ingest's minimum), in the frames' turn
            assert image.size == inputs.FRAMES[index % len(inputs.FRAMES)]
            assert world.style_score(image) > 1.5
            assert (world.watermark_score(image) > 0.02) == watermarked
    assert {path.name for path in folder.iterdir()} == {
        "metadata.csv",
        *inputs.PLANTED_FILES,
        *(row["filename"] for row in rows),
    }


def test_a_quarter_of_the_scenes_are_portrait_and_an_eighth_landscape() -> None:
    """So training has portrait and landscape buckets to fill, and the demo's claim that
    bucketed training keeps a portrait's top and bottom has portraits to show it on."""
    frames = [frame for *_, frame in inputs.demo_scenes()]
    assert frames.count(inputs.PORTRAIT) == inputs.DEMO_IMAGES // 4
    assert frames.count(inputs.LANDSCAPE) == inputs.DEMO_IMAGES // 8
    assert inputs.PORTRAIT == (512, 768) and inputs.LANDSCAPE == (768, 512)


def test_no_two_demo_scenes_are_near_duplicates_to_ingest(tmp_path: Path) -> None:
    folder = inputs.write_sample_folder(tmp_path / "raw")
    hashes = [perceptual_hash(Image.open(path)) for path in sorted(folder.glob("filmstyle_*"))]
    assert len(hashes) == inputs.DEMO_IMAGES
    distances = [bin(a ^ b).count("1") for a, b in itertools.combinations(hashes, 2)]
    assert min(distances) > 6  # ingest's default near-duplicate distance


def test_the_inputs_are_the_committed_world_model_and_tagger(tmp_path: Path) -> None:
    folder, model, tagger = inputs.prepare_inputs(tmp_path)
    assert (model / "model_index.json").is_file()
    assert (tagger / "project.json").is_file()
    assert folder == tmp_path / "raw-images"


def test_without_the_committed_assets_the_error_says_how_to_rebuild_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inputs, "WORLD_MODEL", tmp_path / "missing")
    with pytest.raises(InputError, match="python -m lorapipe.demo.world_model --out"):
        inputs.prepare_inputs(tmp_path)
