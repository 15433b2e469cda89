"""Sample images during training: every checkpoint holds ``samples/p<NN>_seed<S>.png`` (with
A1111's ``parameters`` text) and ``samples.json``, rendered by the LoRA being trained; rendering
changes nothing in training, a sample is reproduced from its checkpoint, and a resumed run does
not render a checkpoint again."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file
from test_train import write_folder

from lorapipe import store
from lorapipe.errors import ConfigError
from lorapipe.generation.infotext import parse_parameters
from lorapipe.stages.train import load_models, run
from lorapipe.train_config import TrainConfig, load_config, sample_prompts
from lorapipe.training.checkpoints import load_training_state
from lorapipe.training.data import load_examples, split_validation
from lorapipe.training.lora import lora_parameters
from lorapipe.training.samples import TrainingSamples, prompts_for_run

PROMPTS = [
    "a red circle, white background",
    "(a blue square:1.2), white background, <lora:another_lora:0.5>",
]
FILES = ["p01_seed1.png", "p01_seed2.png", "p02_seed1.png", "p02_seed2.png"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data") / "shapes", 8)


@pytest.fixture(scope="module")
def config(tiny_model_dir: Path, images: Path, tmp_path_factory: pytest.TempPathFactory):
    """4 steps, a checkpoint every 2, 2 prompts x 2 seeds."""
    return TrainConfig(
        base_model=str(tiny_model_dir),
        train_data_dir=str(images),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        batch_size=2,
        learning_rate=3e-3,
        validation_split=2,
        save_steps=2,
        max_train_steps=4,
        sample_prompts=PROMPTS,
        sample_seeds=[1, 2],
        sample_steps=10,
    )


@pytest.fixture(scope="module")
def sampled(config: TrainConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of ``config``'s run, with its report as ``report.json`` beside it."""
    output = tmp_path_factory.mktemp("sampled") / "out"
    report = run(config.train_data_dir, str(output), config)
    (output.parent / "report.json").write_text(json.dumps(report))
    return output


@pytest.fixture(scope="module")
def unsampled(config: TrainConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run with ``sample_prompts: []``."""
    output = tmp_path_factory.mktemp("unsampled") / "out"
    report = run(config.train_data_dir, str(output), dataclasses.replace(config, sample_prompts=[]))
    (output.parent / "report.json").write_text(json.dumps(report))
    return output


def samples_json(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "samples" / "samples.json").read_text())


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --------------------------------------------------------------------------- what a checkpoint holds


def test_each_checkpoint_holds_prompts_x_seeds_with_their_parameters(sampled: Path) -> None:
    for step in (2, 4):
        folder = sampled / f"checkpoint-{step}" / "samples"
        assert sorted(p.name for p in folder.iterdir()) == [*FILES, "samples.json"]
        index = samples_json(folder.parent)
        assert index["step"] == step and index["seconds"] > 0
        assert [s["file"] for s in index["samples"]] == FILES

    second = samples_json(sampled / "checkpoint-4")["samples"][2]
    assert second == {
        "file": "p02_seed1.png",
        "prompt_index": 1,
        "prompt": "(a blue square:1.2), white background",  # <lora:> tags are dropped
        "negative_prompt": "low quality, worst quality, blurry, noisy, grainy, overexposed, "
        "underexposed",  # generate's base layer
        "seed": 1,
        "sampler": "DPM++ 2M Karras",
        "steps": 10,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
    }
    image = Image.open(sampled / "checkpoint-4" / "samples" / "p02_seed1.png")
    assert image.size == (64, 64)
    parameters = parse_parameters(image.text["parameters"])  # what WebUI's PNG Info reads
    assert parameters["prompt"] == second["prompt"]
    assert parameters["negative_prompt"] == second["negative_prompt"]
    assert (parameters["Steps"], parameters["Sampler"], parameters["CFG scale"]) == (
        "10",
        "DPM++ 2M Karras",
        "7",
    )
    assert (parameters["Seed"], parameters["Size"], parameters["Model"]) == (
        "1",
        "64x64",
        "tiny-sd",
    )


def test_seeds_and_prompts_give_different_images(sampled: Path) -> None:
    folder = sampled / "checkpoint-4" / "samples"
    rendered = [pixels(folder / name) for name in FILES]
    assert all(not np.array_equal(a, b) for i, a in enumerate(rendered) for b in rendered[i + 1 :])


def test_tensorboard_shows_each_sample_at_its_checkpoint_step(sampled: Path) -> None:
    # TensorBoard's TF-free reading, as progress writes it (importing TensorFlow takes seconds)
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(sampled / "logs"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == [f"samples/{name.removesuffix('.png')}" for name in FILES]
    assert [event.step for event in events.Images("samples/p01_seed1")] == [2, 4]


def test_the_report_counts_sampling_time_apart_from_training_throughput(sampled: Path) -> None:
    report = json.loads((sampled.parent / "report.json").read_text())
    rendered = [samples_json(sampled / f"checkpoint-{step}")["seconds"] for step in (2, 4)]
    assert report["sample_seconds"] == pytest.approx(sum(rendered), abs=0.01)
    assert report["samples_per_second"] > 0


# --------------------------------------------------------------------------- training is unchanged


def test_an_empty_list_renders_nothing_and_training_is_identical_either_way(
    sampled: Path, unsampled: Path
) -> None:
    assert not list(unsampled.glob("checkpoint-*/samples"))
    assert json.loads((unsampled.parent / "report.json").read_text())["sample_seconds"] == 0
    assert (sampled / "loss_log.csv").read_text() == (unsampled / "loss_log.csv").read_text()
    for step in (2, 4):
        with_samples, without = (out / f"checkpoint-{step}" for out in (sampled, unsampled))
        records = [json.loads((c / "record.json").read_text()) for c in (with_samples, without)]
        for record in records:
            record.pop("wall_time")
        assert records[0] == records[1]
        states = [json.loads((c / "training_state" / "state.json").read_text()) for c in (with_samples, without)]  # fmt: skip
        assert states[0]["rng"] == states[1]["rng"]  # every random state as it was
        weights = [load_file(c / "pytorch_lora_weights.safetensors") for c in (with_samples, without)]  # fmt: skip
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_a_sample_is_reproduced_from_its_checkpoint_and_rendering_restores_the_state(
    sampled: Path, config: TrainConfig
) -> None:
    models = load_models(config, Accelerator(cpu=True))
    trainable, _, _ = load_training_state(sampled / "checkpoint-4")
    for name, parameter in lora_parameters(models.unet, {}).items():
        parameter.data.copy_(trainable[name])
    models.unet.train()
    sample_images = TrainingSamples(config, models, PROMPTS[:1], enabled=True)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()

    first = sample_images.render(4, last=True)
    second = sample_images.render(4, last=True)

    assert models.unet.training
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    saved = pixels(sampled / "checkpoint-4" / "samples" / "p01_seed1.png")
    assert np.array_equal(np.asarray(first.samples[0].image), saved)
    assert np.array_equal(np.asarray(second.samples[0].image), saved)


# --------------------------------------------------------------------------- which checkpoints


def test_a_resumed_run_does_not_render_a_checkpoint_again(
    sampled: Path, config: TrainConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = tmp_path / "out"
    shutil.copytree(sampled, output)
    before = {step: samples_json(output / f"checkpoint-{step}") for step in (2, 4)}
    longer = dataclasses.replace(config, max_train_steps=6, resume="latest")
    with caplog.at_level(logging.INFO, logger="lorapipe"):
        run(config.train_data_dir, str(output), longer)  # from checkpoint-4
        run(config.train_data_dir, str(output), longer)  # finished: nothing to do
    rendered = [r.getMessage() for r in caplog.records if "sample images in" in r.getMessage()]
    assert len(rendered) == 1 and rendered[0].startswith("step 6: 4 sample images")
    assert {step: samples_json(output / f"checkpoint-{step}") for step in (2, 4)} == before
    assert samples_json(output / "checkpoint-6")["step"] == 6


def test_default_prompts_are_validation_captions_and_every_n_steps_skips_checkpoints(
    config: TrainConfig, tmp_path: Path
) -> None:
    defaults = dataclasses.replace(
        config,
        sample_prompts=None,
        sample_seeds=[1],
        max_train_steps=6,
        sample_every_n_steps=4,
    )
    run(defaults.train_data_dir, str(tmp_path / "out"), defaults)
    assert not (tmp_path / "out" / "checkpoint-2" / "samples").exists()
    assert samples_json(tmp_path / "out" / "checkpoint-4")["step"] == 4
    assert samples_json(tmp_path / "out" / "checkpoint-6")["step"] == 6  # the last, always

    _, held_out = split_validation(load_examples(defaults, tmp_path / "images"), 2)
    prompts = [s["prompt"] for s in samples_json(tmp_path / "out" / "checkpoint-6")["samples"]]
    assert prompts == [example.caption for example in held_out[:2]]


def test_default_prompts_fall_back_to_training_captions_taken_literally() -> None:
    def data(val: list[str], train: list[str]) -> SimpleNamespace:
        return SimpleNamespace(
            val_examples=[SimpleNamespace(caption=caption) for caption in val],
            train_examples=[SimpleNamespace(caption=caption) for caption in train],
        )

    config = TrainConfig()
    assert prompts_for_run(config, data(["a", "b", "c"], ["d"])) == ["a", "b"]
    # a caption's brackets are words, not emphasis
    assert prompts_for_run(config, data([], ["hat (object)", "x [y]", "z"])) == [
        r"hat \(object\)",
        r"x \[y\]",
    ]
    assert prompts_for_run(TrainConfig(sample_prompts=["mine"]), data(["a"], [])) == ["mine"]


def test_sdxl_with_trained_text_encoders_samples_and_trains_the_same(
    config: TrainConfig, tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    sdxl = dataclasses.replace(
        config,
        base_model=str(tiny_sdxl_dir),
        train_text_encoder=True,
        target_modules=["to_q", "to_v", "q_proj", "v_proj"],
        max_train_steps=2,
        save_steps=1,
        sample_seeds=[1],
    )
    run(sdxl.train_data_dir, str(tmp_path / "on"), sdxl)
    run(sdxl.train_data_dir, str(tmp_path / "off"), dataclasses.replace(sdxl, sample_prompts=[]))
    index = samples_json(tmp_path / "on" / "checkpoint-1")
    assert [s["file"] for s in index["samples"]] == ["p01_seed1.png", "p02_seed1.png"]
    image = Image.open(tmp_path / "on" / "checkpoint-1" / "samples" / "p01_seed1.png")
    assert image.size == (64, 64)
    on, off = (load_file(tmp_path / out / "checkpoint-2" / "pytorch_lora_weights.safetensors") for out in ("on", "off"))  # fmt: skip
    assert any(key.startswith("text_encoder_2.") for key in on)
    assert on.keys() == off.keys() and all(torch.equal(on[key], off[key]) for key in on)


# --------------------------------------------------------------------------- the config


def test_prompts_come_from_a_text_file_local_or_on_s3(tmp_path: Path, s3_bucket: str) -> None:
    text = "# sample prompts\na red circle, white background\n\n  (a blue square:1.2)  \n"
    local = tmp_path / "prompts.txt"
    local.write_text(text)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"sample_prompts: {local}\n")  # a string: the file
    expected = ["a red circle, white background", "(a blue square:1.2)"]
    assert sample_prompts(load_config(str(config_file))) == expected
    store.write_text(f"{s3_bucket}/prompts.txt", text)
    assert sample_prompts(TrainConfig(sample_prompts=[f"{s3_bucket}/prompts.txt"])) == expected
    assert sample_prompts(TrainConfig(sample_prompts=[""])) == []  # --sample-prompts '': none


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "sample_sampler: Euler b\n",
            "line 1: key 'sample_sampler' is 'Euler b'; did you mean 'Euler a'? use one of ",
        ),
        ("sample_steps: 0\n", "line 1: key 'sample_steps' must be at least 1, got 0"),
        ("sample_seeds: []\n", "line 1: key 'sample_seeds' is empty; give at least one seed"),
        ("sample_seeds: [1, 1]\n", "line 1: key 'sample_seeds' lists 1 twice; keep one"),
        (
            "sample_prompts: ['(a red circle']\n",
            "line 1: key 'sample_prompts' prompt 1, column 1: '(' is never closed",
        ),
        (
            "sample_negative_prompt: 'blurry:1.2)'\n",
            "line 1: key 'sample_negative_prompt', column 7: weight ':1.2)' closes no '('",
        ),
        ("sample_prompts: {empty}\n", "holds no prompts; write one a line, or give"),
        (
            "sample_prompts: missing.txt\n",
            "line 1: key 'sample_prompts': cannot read 'missing.txt'",
        ),
    ],
)
def test_bad_sample_values_are_one_line_config_errors(
    yaml_text: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml_text.format(empty=tmp_path / "empty.txt"))
    with pytest.raises(ConfigError) as error:
        load_config(str(config_file))
    assert "\n" not in str(error.value) and expected in str(error.value)
