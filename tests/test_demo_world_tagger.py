"""The world tagger: DeepDanbooru's architecture trained on the procedural world, saved as a
project the tag stage loads unchanged, and scored against the world's ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorapipe.demo import world
from lorapipe.demo.world_tagger import (
    TaggerConfig,
    evaluate,
    main,
    micro_f1,
    mixed_scenes,
    tag_vocabulary,
    train_tagger,
)
from lorapipe.errors import ConfigError, InputError

pytest.importorskip("deepdanbooru")
pytest.importorskip("tensorflow")

# seconds to train, not a useful tagger: enough to check the files and the load path
QUICK = TaggerConfig(scenes=48, epochs=1, batch_size=16, filter_sizes=(8, 16), repeat_sizes=(1, 1))


def test_the_vocabulary_holds_every_tag_the_world_gives_once() -> None:
    vocabulary = tag_vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    scenes = world.sample_scenes(200, seed=3, styled_fraction=0.5, defect_rate=0.5)
    assert {tag for scene in scenes for tag in world.tags(scene)} <= set(vocabulary)
    assert {"red circle", "on the left", "watermark", world.STYLE} <= set(vocabulary)


def test_micro_f1_counts_every_image_tag_pair_after_normalization() -> None:
    assert micro_f1([["Red_Circle", "circle"]], [["red circle", "circle"]]) == 1.0
    # 1 right of 2 guessed, 1 of 3 true: 2 * 1 / (2 + 3)
    assert micro_f1([["circle", "blue"]], [["circle", "red", "one object"]]) == 0.4
    assert micro_f1([["square"]], [["circle"]]) == 0.0
    assert micro_f1([[]], [[]]) == 1.0


def test_training_writes_a_deepdanbooru_project_the_tag_stage_loads(tmp_path: Path) -> None:
    project = train_tagger(tmp_path / "tagger", QUICK)

    assert json.loads((project / "project.json").read_text()) == {
        "image_width": 64,
        "image_height": 64,
        "model": "world_tagger",
    }
    tags = (project / "tags.txt").read_text().split()
    assert tags == [tag.replace(" ", "_") for tag in tag_vocabulary()]
    assert (project / "tags-general.txt").read_text().split() == tags
    assert (project / "model-world_tagger.keras").stat().st_size < 2_000_000

    report = evaluate(project, world.sample_scenes(4, seed=9), threshold=0.5)
    assert report["images"] == 4
    assert 0.0 <= report["micro_f1"] <= 1.0
    assert set(report) == {"images", "threshold", "micro_f1", "precision", "recall", "per_tag_f1"}
    assert list(report["per_tag_f1"].values()) == sorted(report["per_tag_f1"].values())


def test_retraining_replaces_the_project_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    (tmp_path / "tagger").mkdir()
    (tmp_path / "tagger" / "stale.txt").write_text("from an older run")
    train_tagger(tmp_path / "tagger", QUICK)
    assert not (tmp_path / "tagger" / "stale.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tagger"]


def test_a_world_folder_is_scored_by_its_ground_truth(tmp_path: Path) -> None:
    project = train_tagger(tmp_path / "tagger", QUICK)
    folder = world.write_world_folder(tmp_path / "held-out", 3, seed=5, size=128)
    assert evaluate(project, folder)["images"] == 3

    (folder / "ground_truth.json").unlink()
    with pytest.raises(InputError, match="ground_truth.json"):
        evaluate(project, folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"learning_rate": 0.0}, "learning_rate must be positive"),
        ({"repeat_sizes": (1,)}, "one entry per stage"),
        ({"filter_sizes": (6, 16)}, "multiples of 4"),
        ({"threshold": 1.5}, r"threshold 1.5 must be in \(0, 1\]"),
    ],
)
def test_a_bad_config_is_refused_before_training(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    import dataclasses

    with pytest.raises(ConfigError, match=message):
        train_tagger(tmp_path / "tagger", dataclasses.replace(QUICK, **change))
    assert not (tmp_path / "tagger").exists()


def test_the_committed_tagger_tags_held_out_scenes() -> None:
    """The demo's tagger (``make world-tagger``), on scenes of a seed it never trained on,
    styled and unstyled with defects alike: it finds the watermark on both, which is what the
    tag stage's defect audit needs to clean the demo's scraped set."""
    from lorapipe.demo.inputs import WORLD_TAGGER

    held_out = mixed_scenes(60, seed=11, styled_fraction=0.5, defect_rate=0.6)
    report = evaluate(WORLD_TAGGER, held_out, seed=11)
    assert report["micro_f1"] >= 0.85
    assert report["per_tag_f1"]["watermark"] >= 0.8


def test_the_tagger_sees_defects_on_styled_scenes_too() -> None:
    scenes = mixed_scenes(400, seed=3, styled_fraction=0.5, defect_rate=0.6)
    styled = [scene for scene in scenes if scene.styled]
    assert len(styled) == 200
    assert sum(bool(scene.defects) for scene in styled) == 120
    assert sum(bool(scene.defects) for scene in scenes if not scene.styled) == 120


@pytest.mark.slow
def test_the_cli_trains_the_default_tagger_to_its_stated_f1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(tmp_path / "tagger")]) == 0
    printed = capsys.readouterr().out
    f1 = float(printed.split("held-out micro F1 ")[1].split()[0])
    assert f1 >= 0.85
