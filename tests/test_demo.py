"""The sample inputs of `make run`: raw images as a user hands them over, bad files included."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

from PIL import Image

from lorapipe.demo import TRIGGER, sample_image, sample_scenes, write_sample_folder
from lorapipe.stages.ingest import perceptual_hash


def test_the_sample_folder_holds_captioned_512px_images_and_three_files_to_drop(
    tmp_path: Path,
) -> None:
    folder = write_sample_folder(tmp_path / "raw")
    with (folder / "metadata.csv").open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 9
    for row in rows:
        assert row["text"].startswith(f"{TRIGGER}, a ")
        with Image.open(folder / row["filename"]) as image:
            assert image.size == (512, 512)
    planted = {"copy_of_first.png", "truncated.jpg", "too_small.png"}
    assert {path.name for path in folder.iterdir()} == {
        "metadata.csv",
        *planted,
        *(row["filename"] for row in rows),
    }


def test_no_two_sample_scenes_are_near_duplicates() -> None:
    hashes = [
        perceptual_hash(sample_image(*scene, seed=i)) for i, scene in enumerate(sample_scenes())
    ]
    distances = [bin(a ^ b).count("1") for a, b in itertools.combinations(hashes, 2)]
    assert min(distances) > 12  # ingest's default near-duplicate threshold is 6 bits
