"""Training data: examples from a folder + metadata.csv, the held-out split, the order each
process trains in, and the per-sample random draws that make runs reproducible."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorapipe.dataset import DatasetWriter, ImageRecord
from lorapipe.errors import ConfigError, InputError
from lorapipe.train_config import TrainConfig
from lorapipe.training.buckets import BucketRule, Size, source_box
from lorapipe.training.data import (
    Example,
    Sample,
    SamplePlan,
    draw,
    load_examples,
    load_pixels,
    split_validation,
    training_caption,
    upright_size,
    validation_noise,
)


def example(name: str, group: str | None = None, mirrorable: bool = True) -> Example:
    return Example(
        id=name, image_path=Path(f"{name}.png"), sha256=name * 4, caption="a cat, left paw",
        tags=(), group=group or name, mirrorable=mirrorable, name=f"{name}.png", size=(64, 64),
        bucket=(64, 64),
    )  # fmt: skip


def plan(buckets: list[Size], **changes: int) -> SamplePlan:
    options = {"batch_size": 2, "num_processes": 1, "accumulation_steps": 1, "seed": 0}
    return SamplePlan(buckets=tuple(buckets), **{**options, **changes})


def trained(plan: SamplePlan, step: int) -> list[Sample]:
    """Every sample of optimizer step ``step``, over all processes and micro-steps."""
    return [
        sample
        for rank in range(plan.num_processes)
        for micro_batch in plan.micro_batches(step, rank)
        for sample in micro_batch
    ]


def write_folder(folder: Path, csv_text: str, names: list[str]) -> TrainConfig:
    folder.mkdir()
    for index, name in enumerate(names):
        Image.new("RGB", (40 + index, 30), (index * 40, 0, 0)).save(folder / name)
    (folder / "metadata.csv").write_text(csv_text)
    return TrainConfig(train_data_dir=str(folder))


# --------------------------------------------------------------------------- folders


def test_a_folder_with_metadata_csv_gives_one_example_per_row(tmp_path: Path) -> None:
    config = write_folder(
        tmp_path / "data",
        '\ufefffilename,text\na.png,"street photo, 1970s"\nb.png,"woman, rainy street"\n\n',
        ["a.png", "b.png"],
    )
    examples = load_examples(config, tmp_path / "cache")
    assert [e.caption for e in examples] == ["street photo, 1970s", "woman, rainy street"]
    assert all(len(e.id) == 16 and e.group == e.id and e.mirrorable for e in examples)


def test_a_file_named_twice_trains_once_with_its_first_caption_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_folder(
        tmp_path / "data",
        "filename,text\na.png,first\nb.png,other\n./a.png,second\n",
        ["a.png", "b.png"],
    )
    examples = load_examples(config, tmp_path / "cache")
    assert [e.caption for e in examples] == ["first", "other"]
    assert (
        "'a.png' is named on lines 2, 4; the caption of line 2 (the first) is kept" in caplog.text
    )


def test_a_caption_mentioning_text_is_never_mirrored(tmp_path: Path) -> None:
    config = write_folder(tmp_path / "data", 'filename,text\na.png,"a sign with text"\n', ["a.png"])
    assert not load_examples(config, tmp_path / "cache")[0].mirrorable


@pytest.mark.parametrize(
    ("csv_text", "expected"),
    [
        ("filename,text\n../a.png,x\n", "metadata.csv line 2: '../a.png' leaves"),
        ("filename,text\nmissing.png,x\n", "metadata.csv line 2: 'missing.png' does not exist"),
        ("file,caption text\na.png,x\n", "metadata.csv line 1: the header must name the columns"),
    ],
)
def test_bad_metadata_rows_name_the_line(tmp_path: Path, csv_text: str, expected: str) -> None:
    config = write_folder(tmp_path / "data", csv_text, ["a.png"])
    with pytest.raises(InputError, match=expected.replace(".", r"\.")):
        load_examples(config, tmp_path / "cache")


def test_a_folder_without_metadata_csv_says_what_it_needs(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match="needs a metadata.csv"):
        load_examples(TrainConfig(train_data_dir=str(tmp_path / "data")), tmp_path / "cache")


def test_a_dataset_gives_examples_whose_images_are_copied_to_the_cache(tmp_path: Path) -> None:
    def record(record_id: str, tags: list[str], parent: str | None = None) -> ImageRecord:
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (len(record_id) * 20, 0, 0)).save(buffer, format="PNG")
        return ImageRecord(
            id=record_id, image=buffer.getvalue(), format="png", width=32, height=32,
            sha256=record_id.ljust(64, "0"), caption=", ".join(tags), tags=tags,
            flipped=parent is not None, parent_id=parent,
        )  # fmt: skip

    with DatasetWriter(str(tmp_path / "dataset")) as writer:
        writer.write(record("a", ["cat"]))
        writer.write(record("a-flip", ["cat"], parent="a"))
        writer.write(record("b", ["cat", "signature"]))
        writer.write(record("c", ["dog"]))
    examples = load_examples(
        TrainConfig(train_data_dir=str(tmp_path / "dataset")), tmp_path / "cache"
    )
    assert {e.id: (e.group, e.mirrorable) for e in examples} == {
        "a": ("a", False),  # augment already mirrored it
        "a-flip": ("a", False),
        "b": ("b", False),  # a signature comes out backwards
        "c": ("c", True),
    }
    assert all(
        e.image_path.parent == tmp_path / "cache" and e.image_path.is_file() for e in examples
    )


# --------------------------------------------------------------------------- held out


def test_an_image_and_its_mirror_are_held_out_together() -> None:
    examples = [example(f"img{i}") for i in range(5)] + [
        example(f"img{i}-flip", f"img{i}") for i in range(5)
    ]
    train, held_out = split_validation(examples, 2)
    assert len(held_out) == 4 and {e.group for e in held_out}.isdisjoint({e.group for e in train})


def test_the_held_out_images_do_not_depend_on_order() -> None:
    examples = [example(f"img{i}") for i in range(20)]
    held_out = {e.id for e in split_validation(examples, 0.1)[1]}
    assert held_out == {e.id for e in split_validation(examples[::-1], 0.1)[1]}
    assert len(split_validation(examples, 0.1)[1]) == 2
    assert split_validation(examples, 0) == (examples, [])


def test_holding_out_everything_is_refused() -> None:
    with pytest.raises(ConfigError, match="leaving none to train on"):
        split_validation([example("a"), example("b")], 2)


# --------------------------------------------------------------------------- order


def test_two_processes_share_out_the_global_batch_of_one() -> None:
    one = plan([(64, 64)] * 7, batch_size=4, seed=3)
    two = dataclasses.replace(one, batch_size=2, num_processes=2)
    for step in range(6):
        (together,) = one.micro_batches(step, 0)
        (first,) = two.micro_batches(step, 0)
        (second,) = two.micro_batches(step, 1)
        assert first + second == together


def test_an_epoch_visits_every_example_once_a_remainder_as_a_shorter_batch() -> None:
    square = plan([(64, 64)] * 7, accumulation_steps=2)
    assert square.steps_per_epoch == 2 and square.short_batches_per_epoch == 1
    epoch = [s for step in range(2) for batch in square.micro_batches(step, 0) for s in batch]
    assert sorted(s.example_index for s in epoch) == list(range(7))
    assert sorted(s.position for s in epoch) == list(range(7))
    assert sorted(square.step_samples(step) for step in range(2)) == [3, 4]
    assert square.order(0) != square.order(1)
    assert square.micro_batches(2, 0)[0][0].epoch == 1
    assert square.samples_seen(3) == 7 + square.step_samples(2)


def test_every_step_trains_on_one_bucket_and_the_order_is_a_function_of_seed_and_epoch() -> None:
    buckets = [(64, 64)] * 5 + [(48, 80)] * 3 + [(80, 48)] * 2
    mixed = plan(buckets, batch_size=1, num_processes=2)
    seen = []
    for step in range(mixed.steps_per_epoch):
        samples = [s for s in trained(mixed, step) if s.counts]
        assert len({buckets[s.example_index] for s in samples}) == 1
        seen += [s.example_index for s in samples]
    assert sorted(seen) == list(range(10)) and mixed.steps_per_epoch == 3 + 2 + 1
    assert mixed.short_batches_per_epoch == 2 and mixed.short_batches(12) == 4
    again = plan(buckets, batch_size=1, num_processes=2)
    assert [again.order(e) for e in (0, 1)] == [mixed.order(e) for e in (0, 1)]
    assert plan(buckets, seed=1).order(0) != plan(buckets).order(0)


def test_a_process_left_without_samples_joins_the_step_with_a_stand_in_that_counts_for_nothing() -> (
    None
):
    lone = plan([(64, 64)] * 2 + [(48, 80)], batch_size=1, num_processes=2)
    step = next(s for s in range(lone.steps_per_epoch) if lone.step_samples(s) == 1)
    (first,) = lone.micro_batches(step, 0)
    (second,) = lone.micro_batches(step, 1)
    assert first[0].counts and not second[0].counts
    assert plan([(64, 64)], batch_size=2).micro_batches(0, 0) == [[Sample(0, 0, 0)]]


# --------------------------------------------------------------------------- draws


def test_a_samples_draws_depend_only_on_seed_epoch_and_position() -> None:
    config = TrainConfig(flip_aug=True, noise_offset=0.1, min_timestep=100, max_timestep=200)
    a = draw(config, Sample(0, epoch=1, position=5), example("x"), (4, 8, 8))
    b = draw(config, Sample(3, epoch=1, position=5), example("x"), (4, 8, 8))
    c = draw(config, Sample(0, epoch=2, position=5), example("x"), (4, 8, 8))
    assert torch.equal(a.noise, b.noise) and a.timestep == b.timestep and a.flip == b.flip
    assert not torch.equal(a.noise, c.noise)
    assert 100 <= a.timestep < 200


def test_flip_aug_never_mirrors_an_image_that_must_not_be() -> None:
    config = TrainConfig(flip_aug=True)
    flips = [draw(config, Sample(0, 0, p), example("x"), (4, 2, 2)).flip for p in range(40)]
    assert 5 < sum(flips) < 35
    blocked = example("y", mirrorable=False)
    assert not any(draw(config, Sample(0, 0, p), blocked, (4, 2, 2)).flip for p in range(40))


def test_validation_noise_is_fixed_per_image() -> None:
    assert torch.equal(
        validation_noise(example("a"), (4, 8, 8)), validation_noise(example("a"), (4, 8, 8))
    )
    assert not torch.equal(
        validation_noise(example("a"), (4, 8, 8)), validation_noise(example("b"), (4, 8, 8))
    )


# --------------------------------------------------------------------------- captions and pixels


def test_a_mirrored_sample_swaps_left_and_right_in_its_caption() -> None:
    options = {"shuffle": False, "keep_tokens": 0, "dropout_rate": 0.0, "seed": 0}
    assert training_caption("cat, left paw", flip=True, **options) == "cat, right paw"


def test_shuffling_keeps_the_first_keep_tokens_in_place() -> None:
    caption = "sks style, a, b, c, d, e"
    shuffled = {
        training_caption(caption, flip=False, shuffle=True, keep_tokens=1, dropout_rate=0.0, seed=s)
        for s in range(20)
    }
    assert len(shuffled) > 1 and all(c.startswith("sks style, ") for c in shuffled)
    assert all(sorted(c.split(", ")) == sorted(caption.split(", ")) for c in shuffled)


def test_caption_dropout_empties_about_that_share_of_captions() -> None:
    captions = [
        training_caption(
            "a, b", flip=False, shuffle=False, keep_tokens=0, dropout_rate=0.25, seed=s
        )
        for s in range(400)
    ]
    assert 60 < captions.count("") < 140


def test_pixels_are_scaled_cropped_and_in_minus_one_to_one(tmp_path: Path) -> None:
    image = Image.new("RGB", (200, 100), "black")
    image.paste((255, 255, 255), (0, 0, 50, 100))  # a white left quarter
    image.save(tmp_path / "wide.png")
    centre = load_pixels(tmp_path / "wide.png", (64, 64), flip=False, crop_position=None)
    left = load_pixels(tmp_path / "wide.png", (64, 64), flip=False, crop_position=(0.0, 0.5))
    mirrored = load_pixels(tmp_path / "wide.png", (64, 64), flip=True, crop_position=(0.0, 0.5))
    assert centre.shape == (3, 64, 64) and centre.min() >= -1 and centre.max() <= 1
    assert centre.mean() < -0.9  # the centre crop misses the white quarter
    assert left[:, :, :8].mean() > 0.9 and mirrored[:, :, -8:].mean() > 0.9
    whole = load_pixels(tmp_path / "wide.png", (128, 64), flip=False, crop_position=None)
    assert whole.shape == (3, 64, 128) and whole[:, :, :30].mean() > 0.9  # a bucket keeps it


def test_a_portrait_keeps_the_bands_at_its_top_and_bottom_in_its_bucket(tmp_path: Path) -> None:
    """The issue's test image: 600x900 with coloured bands a tenth of its height at the top and
    bottom. The square crop used to train on the middle and drop both."""
    image = Image.new("RGB", (600, 900), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 600, 90))
    image.paste((0, 0, 255), (0, 810, 600, 900))
    image.save(tmp_path / "bands.png")
    rule = BucketRule(resolution=512)
    bucket = rule.bucket_for((600, 900))
    assert bucket == (384, 576) and source_box((600, 900), bucket, None) == (0, 0, 600, 900)
    pixels = load_pixels(tmp_path / "bands.png", bucket, flip=False, crop_position=None)
    red, blue = pixels[:, :50].mean(dim=(1, 2)), pixels[:, -50:].mean(dim=(1, 2))
    assert red[0] > 0.9 and red[2] < -0.9 and blue[2] > 0.9 and blue[0] < -0.9
    square = load_pixels(tmp_path / "bands.png", (512, 512), flip=False, crop_position=None)
    assert square[0, :10].mean() < 0.1 and square[2, -10:].mean() < 0.1  # no band in a square


def test_a_folder_image_s_size_is_as_displayed(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored landscape, shown portrait
    Image.new("RGB", (90, 60)).save(tmp_path / "turned.jpg", exif=exif)
    Image.new("RGB", (90, 60)).save(tmp_path / "plain.png")
    assert upright_size(tmp_path / "turned.jpg") == (60, 90)
    assert upright_size(tmp_path / "plain.png") == (90, 60)
