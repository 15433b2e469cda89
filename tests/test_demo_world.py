"""The procedural world: deterministic, truthful captions and tags, square, portrait and
landscape frames, and one statistic per defect (and for the style) that separates it from
clean renders at 64 and at 512 px, in every frame."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from lorapipe.demo import world
from lorapipe.demo.world import Scene

SCORES = {
    "blurry": world.blur_score,
    "grainy": world.grain_score,
    "overexposed": world.overexposure_score,
    "watermark": world.watermark_score,
}


def _pixels(image) -> np.ndarray:
    return np.asarray(image)


def test_render_is_deterministic_rgb_and_sized():
    scene = Scene("triangle", "red", 2, "left", "grey", defects=("grainy",), styled=True)
    first = world.render(scene, 128, seed=3)
    assert first.mode == "RGB" and first.size == (128, 128)
    assert np.array_equal(_pixels(first), _pixels(world.render(scene, 128, seed=3)))
    assert not np.array_equal(_pixels(first), _pixels(world.render(scene, 128, seed=4)))


def test_a_square_frame_renders_as_its_int_size_and_a_frame_is_width_by_height():
    scene = Scene("circle", "red", 2, "left", "grey", defects=("watermark",), styled=True)
    square = world.render(scene, 128, seed=3)
    assert np.array_equal(_pixels(world.render(scene, (128, 128), seed=3)), _pixels(square))
    assert world.render(scene, (128, 192), seed=3).size == (128, 192)
    with pytest.raises(ValueError, match="16 px"):
        world.render(scene, (128, 8))


def _object_mask(image) -> np.ndarray:
    """Where a red object is drawn (on an unstyled white or grey background)."""
    pixels = _pixels(image).astype(int)
    return (pixels[..., 0] > 150) & (pixels[..., 1] < 100)


@pytest.mark.parametrize("frame", [(256, 384), (384, 256)])
def test_a_portrait_or_landscape_keeps_its_circles_round_and_its_column_in_place(frame):
    """Positions are fractions of each side and the radius one length in pixels, so a circle
    is as wide as it is tall in any frame and stays in its column."""
    scene = Scene("circle", "red", 1, "right", "white")
    mask = _object_mask(world.render(scene, frame, seed=2))
    rows, columns = np.nonzero(mask)
    tall, wide = np.ptp(rows) + 1, np.ptp(columns) + 1
    assert abs(tall - wide) <= 1, (tall, wide)
    assert columns.min() > frame[0] / 2  # on the right


def test_a_portrait_has_content_in_its_top_and_bottom_that_a_centre_square_crop_removes():
    """What bucketed training keeps and square training loses: a portrait's column of objects
    runs over its whole height, and its watermark plate sits in the bottom-right corner of the
    frame, outside the centre square."""
    scene = Scene("circle", "red", 3, "left", "grey")
    portrait = world.render(scene, (256, 384), seed=0)
    crop_top, crop_bottom = 64, 320  # the centre 256 x 256
    object_rows = np.nonzero(_object_mask(portrait))[0]
    assert object_rows.min() < crop_top  # the column's top object reaches above the crop
    assert object_rows.max() > 0.7 * 384  # and the column runs down the whole frame
    watermarked = world.render(dataclasses.replace(scene, defects=("watermark",)), (256, 384))
    # the plate is the only thing near white on grey
    plate_rows, plate_columns = np.nonzero(_pixels(watermarked.convert("L")) > 190)
    assert plate_rows.min() >= crop_bottom and plate_columns.min() > 128
    assert world.watermark_score(watermarked) > 0.15


def test_the_vignette_follows_the_frame():
    """The style darkens a portrait or landscape towards its corners along an ellipse that fits
    the frame, as it does a square: the middle of the top edge as much as the middle of a side
    edge. So style_score reads a styled one as styled, an unstyled one as not."""
    scene = Scene("square", "blue", 2, "right", "grey")
    for width, height in ((128, 192), (192, 128)):
        assert world.style_score(world.render(scene, (width, height))) < 0.2
        styled = world.render(dataclasses.replace(scene, styled=True), (width, height))
        assert world.style_score(styled) > 1.5
        luma = _pixels(styled.convert("L")).astype(float)
        top_middle = np.median(luma[:3, width // 2 - 2 : width // 2 + 2])
        left_middle = np.median(luma[height // 2 - 2 : height // 2 + 2, :3])
        corner = np.median(luma[:3, :3])
        assert abs(top_middle - left_middle) < 6 and corner < top_middle - 15


def test_sample_scenes_is_deterministic_varied_and_balanced():
    scenes = world.sample_scenes(30, seed=1, styled_fraction=0.5, defect_rate=0.4)
    assert scenes == world.sample_scenes(30, seed=1, styled_fraction=0.5, defect_rate=0.4)
    assert scenes != world.sample_scenes(30, seed=2, styled_fraction=0.5, defect_rate=0.4)
    contents = [(s.shape, s.colour, s.count, s.position, s.background) for s in scenes]
    assert len(set(contents)) == 30
    for attribute, values in [
        ("shape", world.SHAPES),
        ("colour", world.COLOURS),
        ("position", world.POSITIONS),
        ("background", world.BACKGROUNDS),
        ("count", (1, 2, 3)),
    ]:
        assert len({getattr(s, attribute) for s in scenes}) == len(values), attribute
    assert sum(s.styled for s in scenes) == 15
    defective = [s for s in scenes if s.defects]
    assert len(defective) == 12
    assert all(len(s.defects) == 1 for s in defective)
    assert {s.defects[0] for s in defective} == set(world.DEFECTS)
    # defects go to unstyled scenes while there are any, so the styled subset trains clean
    assert not any(s.styled for s in defective)
    assert not any(s.styled or s.defects for s in world.sample_scenes(10, seed=0))


def test_scene_rejects_unknown_attributes():
    with pytest.raises(ValueError, match="shape"):
        Scene("hexagon", "red", 1, "left", "grey")
    with pytest.raises(ValueError, match="count"):
        Scene("circle", "red", 4, "left", "grey")
    with pytest.raises(ValueError, match="defects"):
        Scene("circle", "red", 1, "left", "grey", defects=("dusty",))


def test_caption_and_tags_reflect_the_scene():
    scene = Scene("circle", "red", 2, "left", "white", defects=("blurry",), styled=True)
    assert (
        world.caption(scene) == "filmstyle, two red circles on the left, white background, blurry"
    )
    assert world.caption(scene, trigger="sks").startswith("sks, ")
    plain = Scene("square", "blue", 1, "middle", "black")
    assert world.caption(plain) == "a blue square in the middle, black background"
    assert world.tags(scene) == [
        "red circle",
        "circle",
        "red",
        "two objects",
        "multiple objects",
        "on the left",
        "white background",
        "blurry",
        "filmstyle",
    ]
    assert world.tags(plain) == [
        "blue square",
        "square",
        "blue",
        "one object",
        "in the middle",
        "black background",
    ]


def test_render_draws_the_objects_in_their_colour_and_column():
    for position, columns in [("left", slice(0, 40)), ("right", slice(88, 128))]:
        scene = Scene("square", "blue", 1, position, "white")
        pixels = _pixels(world.render(scene, 128)).astype(int)
        blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
        assert blue.sum() > 0.03 * blue.size
        assert blue[:, columns].sum() > 0.9 * blue.sum()


def _separation(score, defect, scenes, size):
    clean = [score(world.render(s, size, seed=i)) for i, s in enumerate(scenes)]
    spoiled = [
        score(world.render(dataclasses.replace(s, defects=(defect,)), size, seed=i))
        for i, s in enumerate(scenes)
    ]
    return max(clean), min(spoiled)


FRAMES = [(64, 20), (128, 20), (512, 4), ((128, 192), 20), ((192, 128), 20), ((512, 768), 4)]


@pytest.mark.parametrize("defect", world.DEFECTS)
@pytest.mark.parametrize(("size", "count"), FRAMES)
def test_each_statistic_separates_its_defect(defect, size, count):
    scenes = world.sample_scenes(count, seed=11, styled_fraction=0.5)
    clean, spoiled = _separation(SCORES[defect], defect, scenes, size)
    assert spoiled > clean, (defect, size, clean, spoiled)


@pytest.mark.parametrize(("frame", "trained"), [(512, (64, 64)), ((512, 768), (64, 96))])
def test_statistics_survive_the_resize_a_512px_image_gets_for_64px_training(frame, trained):
    """The statistics measure an image at its own aspect, 64 px on the short side, so a
    portrait bucket's 64 x 96 reads as the 512 x 768 image it was resized from."""
    scenes = world.sample_scenes(4, seed=5, styled_fraction=0.5)
    for defect, score in SCORES.items():
        clean = [
            score(world.render(s, frame, seed=i).resize(trained)) for i, s in enumerate(scenes)
        ]
        spoiled = [
            score(
                world.render(dataclasses.replace(s, defects=(defect,)), frame, seed=i).resize(
                    trained
                )
            )
            for i, s in enumerate(scenes)
        ]
        assert min(spoiled) > max(clean), defect


def test_blur_score_measures_how_wide_the_object_edges_are():
    scenes = world.sample_scenes(40, seed=2, styled_fraction=0.5)
    clean = [world.render(s, 64, seed=i) for i, s in enumerate(scenes)]
    blurred = [
        world.render(dataclasses.replace(s, defects=("blurry",)), 64, seed=i)
        for i, s in enumerate(scenes)
    ]
    assert max(map(world.blur_score, clean)) < 0.15 < 0.35 < min(map(world.blur_score, blurred))
    # an over-sharpened edge, with a halo that slopes the other way, is still sharp (a
    # negative "blurry" can overshoot like this)
    sharpened = [image.filter(ImageFilter.UnsharpMask(3, 300, 0)) for image in clean]
    assert max(map(world.blur_score, sharpened)) < 0.15
    # a darker, flatter picture of the same edges is as sharp (a negative prompt's pull on
    # contrast must not read as removed blur)
    pixels = [np.asarray(image, dtype=float) for image in blurred[:12]]
    flattened = [world.blur_score(0.7 * image + 10) for image in pixels]
    assert abs(np.nanmean(flattened) - np.nanmean([world.blur_score(p) for p in pixels])) < 0.03
    # a flat image has no edge to measure
    assert np.isnan(world.blur_score(np.full((64, 64, 3), 128.0)))


def test_watermark_score_sees_the_plate_in_either_corner_and_cancels_the_vignette():
    """Flip augmentation mirrors the watermark into the left corner; the style's vignette and
    the world's light falloff are left-right symmetric, so a clean styled corner scores ~0."""
    scene = Scene("circle", "red", 1, "left", "grey", styled=True)
    clean = [world.watermark_score(world.render(scene, 64, seed=seed)) for seed in range(10)]
    watermarked = world.render(dataclasses.replace(scene, defects=("watermark",)), 64, seed=0)
    mirrored = ImageOps.mirror(watermarked)
    assert max(clean) < 0.01
    assert world.watermark_score(watermarked) > 0.15
    assert world.watermark_score(mirrored) == pytest.approx(world.watermark_score(watermarked))


@pytest.mark.parametrize(("size", "count"), FRAMES)
def test_style_score_separates_styled_from_unstyled(size, count):
    scenes = world.sample_scenes(count, seed=13)
    plain = [world.style_score(world.render(s, size, seed=i)) for i, s in enumerate(scenes)]
    styled = [
        world.style_score(world.render(dataclasses.replace(s, styled=True), size, seed=i))
        for i, s in enumerate(scenes)
    ]
    assert max(plain) < 0.2
    assert min(styled) > 1.5


def test_write_world_folder_writes_images_metadata_and_ground_truth(tmp_path):
    folder = world.write_world_folder(
        tmp_path / "world", 6, seed=2, size=64, styled_fraction=0.5, defect_rate=0.5
    )
    with (folder / "metadata.csv").open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    truth = json.loads((folder / "ground_truth.json").read_text())
    scenes = world.sample_scenes(6, seed=2, styled_fraction=0.5, defect_rate=0.5)
    assert (
        [row["filename"] for row in rows]
        == sorted(truth)
        == sorted(p.name for p in folder.glob("*.png"))
    )
    assert any(scene.styled for scene in scenes) and any(scene.defects for scene in scenes)
    for row, scene in zip(rows, scenes, strict=True):
        assert row["text"] == world.caption(scene)
        recorded = truth[row["filename"]]
        assert recorded["tags"] == world.tags(scene)
        assert (
            Scene(**{**recorded["scene"], "defects": tuple(recorded["scene"]["defects"])}) == scene
        )
        with Image.open(folder / row["filename"]) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
    again = world.write_world_folder(
        tmp_path / "again", 6, seed=2, size=64, styled_fraction=0.5, defect_rate=0.5
    )
    for name in truth:
        assert (folder / name).read_bytes() == (again / name).read_bytes()
