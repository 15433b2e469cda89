"""Validation loss: fixed images, timesteps and noise, so a model always gets the same number."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from PIL import Image
from test_training_encoders import sd1_caption_encoder

from lorapipe.models import load_base_model
from lorapipe.training.data import Example
from lorapipe.training.encoders import EncodeEveryStep
from lorapipe.training.validation import Validator, eval_mode


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path):  # a diffusers StableDiffusionPipeline
    return load_base_model(str(tiny_model_dir))


def validator(pipeline, tmp_path: Path, count: int) -> Validator:
    examples = []
    for index in range(count):
        path = tmp_path / f"{index}.png"
        size = ((64, 64), (48, 80))[index % 2]  # each is validated at its own bucket
        Image.new("RGB", size, (index * 60, 100, 0)).save(path)
        examples.append(
            Example(
                f"img{index}", path, str(index) * 64, "a red circle", (), f"img{index}", True,
                path.name, size, size,
            )
        )  # fmt: skip
    return Validator(
        examples=examples,
        timesteps=[100, 500, 900],
        latent_parameters=EncodeEveryStep(pipeline.vae).latent_parameters,
        encode_captions=sd1_caption_encoder(pipeline),
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        latent_scale=pipeline.vae.config.scaling_factor,
        added_conditioning=False,
    )


def test_the_same_model_gets_the_same_loss_every_time(pipeline, tmp_path: Path) -> None:
    validate = validator(pipeline, tmp_path, 3)
    with eval_mode(pipeline.unet):
        first = validate(pipeline.unet, Accelerator(cpu=True))
        torch.manual_seed(123)  # the global generator plays no part
        second = validate(pipeline.unet, Accelerator(cpu=True))
    assert first == second
    assert list(first.by_timestep) == ["100", "500", "900"]
    assert first.mean == pytest.approx(sum(first.by_timestep.values()) / 3)


def test_another_model_gets_another_loss(pipeline, tmp_path: Path) -> None:
    validate = validator(pipeline, tmp_path, 2)
    before = validate(pipeline.unet, Accelerator(cpu=True))
    with torch.no_grad():
        pipeline.unet.conv_out.bias += 0.1
    try:
        assert validate(pipeline.unet, Accelerator(cpu=True)).mean != before.mean
    finally:
        with torch.no_grad():
            pipeline.unet.conv_out.bias -= 0.1


def test_without_held_out_images_there_is_no_validation_loss(pipeline, tmp_path: Path) -> None:
    assert validator(pipeline, tmp_path, 0)(pipeline.unet, Accelerator(cpu=True)) is None


def test_eval_mode_restores_training_mode() -> None:
    model = torch.nn.Dropout(0.5)
    model.train()
    with eval_mode(model):
        assert not model.training
    assert model.training
