"""The demo's claims, measured on stage outputs built here from world renders, so each claim is
seen to pass on outputs that show the effect and to fail on outputs that do not."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lorapipe.demo import claims, inputs, world
from lorapipe.demo.inputs import PLANTED_FILES

SCENE = world.Scene("circle", "red", 1, "middle", "white")


def _generated(folder: Path, cells: list[dict], render: Callable[[dict], Image.Image]) -> Path:
    """A generate output: ``index.parquet`` rows for ``cells`` and the image each names."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for number, cell in enumerate(cells):
        row = {"prompt_index": 1, "cfg_scale": 7.0, "seed": number, **cell}
        row["file"] = f"images/{number:03d}.png"
        render(row).save(folder / row["file"])
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), folder / "index.parquet")
    return folder


def test_the_style_claim_needs_a_clear_gain_at_0_8_and_a_rising_curve(tmp_path: Path) -> None:
    def learned(row: dict) -> Image.Image:
        scene = dataclasses.replace(SCENE, styled=row["lora_scale"] > 0)
        return world.render(scene, 64, seed=row["seed"])

    cells = [{"lora_scale": scale} for scale in (0.0, 0.8) for _ in range(3)]
    index = pq.read_table(_generated(tmp_path / "a", cells, learned) / "index.parquet")
    claim = claims.check_style(index.to_pylist(), tmp_path / "a")
    assert claim.passed, claim.line()

    nothing = _generated(
        tmp_path / "b", cells, lambda row: world.render(SCENE, 64, seed=row["seed"])
    )
    claim = claims.check_style(pq.read_table(nothing / "index.parquet").to_pylist(), nothing)
    assert not claim.passed and "style score by LoRA scale" in claim.measured


def test_the_negative_claims_compare_only_cells_whose_negative_names_the_defect(
    tmp_path: Path,
) -> None:
    def spoiled_without_negative(row: dict) -> Image.Image:
        defects = ("blurry",) if row["negative_preset"] == "none" else ()
        # at scale 0 the preset left "watermark" out: those images are marked either way
        if row["lora_scale"] == 0.0 or row["negative_preset"] == "none":
            defects += ("watermark",)
        return world.render(dataclasses.replace(SCENE, defects=defects), 64, seed=row["seed"])

    cells = [
        {"negative_preset": preset, "lora_scale": scale, "negative_prompt": negative, "seed": seed}
        for preset in ("none", "landscape")
        for scale, negative in ((0.0, "blurry"), (0.8, "blurry, watermark"))
        for seed in (1, 2)
    ]
    for cell in cells:
        if cell["negative_preset"] == "none":
            cell["negative_prompt"] = ""
    generated = _generated(tmp_path, cells, spoiled_without_negative)
    blur, watermark = claims.check_negatives(
        pq.read_table(generated / "index.parquet").to_pylist(), generated
    )
    assert blur.passed and "over 4 image pairs" in blur.measured, blur.line()
    assert watermark.passed and "over 2 image pairs" in watermark.measured, watermark.line()
    assert json.loads(json.dumps(dataclasses.asdict(blur)))["passed"] is True  # demo_checks.json


def _blur_claim(
    tmp_path: Path, *, seeds: int, render: Callable[[dict], Image.Image]
) -> claims.Claim:
    """The blur claim on ``seeds`` image pairs at LoRA scale 0.8, empty negative against the
    preset naming "blurry", each image drawn by ``render``."""
    cells = [
        {"negative_preset": preset, "lora_scale": 0.8, "negative_prompt": negative, "seed": seed}
        for preset, negative in (("none", ""), ("landscape", "blurry, watermark"))
        for seed in range(seeds)
    ]
    generated = _generated(tmp_path, cells, render)
    blur, _ = claims.check_negatives(
        pq.read_table(generated / "index.parquet").to_pylist(), generated
    )
    return blur


def test_pairs_where_the_blur_statistic_cannot_tell_are_left_out(tmp_path: Path) -> None:
    def flat_with_negative_once(row: dict) -> Image.Image:
        if row["negative_preset"] == "landscape" and row["seed"] == 0:
            return Image.new("RGB", (64, 64), (128, 128, 128))
        defects = ("blurry",) if row["negative_preset"] == "none" else ()
        return world.render(dataclasses.replace(SCENE, defects=defects), 64, seed=row["seed"])

    blur = _blur_claim(tmp_path, seeds=4, render=flat_with_negative_once)
    assert blur.passed, blur.line()
    assert "over 3 image pairs (1 where it cannot tell left out)" in blur.measured


def test_a_negative_that_helps_some_images_and_hurts_as_many_shows_nothing(
    tmp_path: Path,
) -> None:
    """The mean may still drop (one blurred image weighs more than another sharpened); paired
    image by image, the drop is noise and the claim fails."""

    def mixed(row: dict) -> Image.Image:
        blurred_preset = "none" if row["seed"] % 2 else "landscape"
        defects = ("blurry",) if row["negative_preset"] == blurred_preset else ()
        return world.render(dataclasses.replace(SCENE, defects=defects), 64, seed=row["seed"])

    blur = _blur_claim(tmp_path, seeds=6, render=mixed)
    assert not blur.passed and "over 6 image pairs" in blur.measured, blur.line()


def test_ingest_must_drop_every_planted_file_and_no_scene() -> None:
    dropped = [{"file": name, "reason": "r"} for name in PLANTED_FILES]
    assert claims.check_ingest({"dropped_files": dropped}, {"filmstyle_00.png"}).passed
    short = claims.check_ingest({"dropped_files": dropped[1:]}, {"filmstyle_00.png"})
    assert not short.passed
    lost = dropped + [{"file": "filmstyle_00.png", "reason": "near_duplicate"}]
    claim = claims.check_ingest({"dropped_files": lost}, {"filmstyle_00.png"})
    assert not claim.passed and "also dropped filmstyle_00.png" in claim.measured


@pytest.mark.parametrize(("chosen_step", "passed"), [(100, True), (50, False)])
def test_selection_is_checked_against_the_losses_training_recorded(
    tmp_path: Path, chosen_step: int, passed: bool
) -> None:
    for step, loss in ((50, 0.30), (100, 0.201), (150, 0.200)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        record = {"step": step, "val_loss": loss}
        (tmp_path / f"checkpoint-{step}" / "record.json").write_text(json.dumps(record))
    selection = {"chosen": {"step": chosen_step}, "epsilon": 0.01}
    claim = claims.check_selection(tmp_path, selection)
    assert claim.passed is passed
    assert "minimum at step 150" in claim.measured


def _bucket(width: int, height: int, images: int, cropped: float, square: float) -> dict:
    """A ``buckets`` entry of ``training_report.json``, as train writes it."""
    return {
        "resolution": [width, height],
        "images": images,
        "mean_crop_fraction": cropped,
        "square_crop_fraction": square,
    }


def test_the_portrait_claim_weighs_the_portrait_buckets_by_their_images() -> None:
    """Square and landscape buckets do not count, however much they crop; the measured text
    also gives what square training would have cropped of the same portraits."""
    report = {
        "enable_bucket": True,
        "buckets": [
            _bucket(48, 72, 6, 0.0, 1 / 3),
            _bucket(56, 72, 2, 0.08, 0.22),
            _bucket(64, 64, 20, 0.0, 0.0),
            _bucket(72, 48, 4, 0.3, 1 / 3),
        ],
    }
    claim = claims.check_portrait_crop(report)
    assert claim.passed, claim.line()
    assert claim.measured == (
        "2.0% of pixels cropped (square training: 30.5%) over 8 images in the portrait "
        "buckets 48x72, 56x72"
    )
    assert claim.threshold == "at most 5%"


def test_the_portrait_claim_fails_when_the_crop_takes_more_than_5_percent() -> None:
    claim = claims.check_portrait_crop(
        {"enable_bucket": True, "buckets": [_bucket(56, 72, 8, 0.12, 0.22)]}
    )
    assert not claim.passed and claim.measured.startswith("12.0% of pixels cropped")


def test_without_a_portrait_bucket_the_portrait_claim_fails_and_says_why() -> None:
    square_only = {"enable_bucket": False, "buckets": [_bucket(64, 64, 40, 0.125, 0.125)]}
    claim = claims.check_portrait_crop(square_only)
    assert not claim.passed
    assert (
        claim.measured == "no portrait bucket: training ran without buckets (enable_bucket false)"
    )
    no_portraits = {"enable_bucket": True, "buckets": [_bucket(64, 64, 30, 0, 0)]}
    claim = claims.check_portrait_crop(no_portraits)
    assert not claim.passed and claim.measured == "no portrait bucket among the buckets 64x64"


@pytest.mark.parametrize("enable_bucket", [True, False])
def test_on_the_demo_frames_bucketed_training_keeps_the_portraits_whole_and_square_training_cannot(
    enable_bucket: bool,
) -> None:
    """The claim read on what train reports for the demo's images at the demo's resolution."""
    from lorapipe.training.buckets import BucketRule, Placed, bucket_report

    rule = BucketRule.for_training(
        64,
        enable_bucket=enable_bucket,
        min_bucket_reso=None,
        max_bucket_reso=None,
        bucket_reso_steps=None,
        bucket_no_upscale=False,
    )
    frames = [frame for *_, frame in inputs.demo_scenes(8)]
    placed = [Placed(f"{n}.png", frame, rule.bucket_for(frame)) for n, frame in enumerate(frames)]
    claim = claims.check_portrait_crop(bucket_report(rule, placed))
    assert claim.passed is enable_bucket, claim.line()
    if enable_bucket:
        assert claim.measured.startswith("0.0% of pixels cropped (square training: 33.3%)")


def test_a_claim_reads_as_one_line_with_its_verdict_and_threshold() -> None:
    claim = claims.Claim("the LoRA learned the style", "0.1 -> 1.2", ">= 0.5", True)
    assert claim.line() == "PASS the LoRA learned the style: 0.1 -> 1.2 (needs >= 0.5)"


def _watermark_grid(folder: Path, marked: Callable[[str, int], bool], seeds: int = 8) -> list:
    """A generate output at LoRA scale 1.0, empty negative and the preset, ``seeds`` cells
    each; ``marked(preset, seed)`` says which images carry the watermark (on grey, where the
    white plate shows: watermark_score 0.23, against 0.07 on white)."""

    def render(row: dict) -> Image.Image:
        defects = ("watermark",) if marked(row["negative_preset"], row["seed"]) else ()
        scene = dataclasses.replace(SCENE, background="grey", defects=defects)
        return world.render(scene, 64, seed=row["seed"])

    cells = [
        {"negative_preset": preset, "lora_scale": 1.0, "negative_prompt": "", "seed": seed}
        for preset in ("none", "landscape")
        for seed in range(seeds)
    ]
    generated = _generated(folder, cells, render)
    return [pq.read_table(generated / "index.parquet").to_pylist(), generated]


def test_cleaning_holds_when_it_removes_the_watermark_as_well_as_the_preset(
    tmp_path: Path,
) -> None:
    """Scraped: every image marked, the preset removes it from half; cleaned: none marked."""
    scraped = _watermark_grid(tmp_path / "s", lambda preset, seed: preset == "none" or seed % 2)
    cleaned = _watermark_grid(tmp_path / "c", lambda preset, seed: False)
    claim = claims.check_cleaning(*cleaned, *scraped)
    assert claim.passed, claim.line()
    assert "as scraped 8 of 8, as scraped with the preset 4, cleaned 0" in claim.measured
    assert "cleaned with the preset 0 of 8" in claim.measured


def test_cleaning_fails_when_it_does_less_than_the_preset(tmp_path: Path) -> None:
    """Cleaning removes the watermark from a quarter, the preset from all: it measurably
    helps in neither pairing enough, and the preset's rate is lower."""
    scraped = _watermark_grid(tmp_path / "s", lambda preset, seed: preset == "none")
    cleaned = _watermark_grid(tmp_path / "c", lambda preset, seed: seed % 4 != 0)
    claim = claims.check_cleaning(*cleaned, *scraped)
    assert not claim.passed, claim.line()
    assert "as scraped 8 of 8, as scraped with the preset 0, cleaned 6" in claim.measured
