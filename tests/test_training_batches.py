"""Micro-batches: the same samples always make the same batch, cached or not, and the target
is what the scheduler's prediction type asks for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from PIL import Image
from test_training_encoders import sd1_caption_encoder

from lorapipe.models import load_base_model
from lorapipe.train_config import TrainConfig
from lorapipe.training.batches import TrainingBatches
from lorapipe.training.data import Example, Sample, draw
from lorapipe.training.encoders import EncodeEveryStep, LatentCache


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path):  # a diffusers StableDiffusionPipeline
    return load_base_model(str(tiny_model_dir))


@pytest.fixture
def examples(tmp_path: Path) -> list[Example]:
    made = []
    for index, color in enumerate(("red", "blue")):
        Image.new("RGB", (64, 80), color).save(tmp_path / f"{color}.png")
        made.append(
            Example(
                color,
                tmp_path / f"{color}.png",
                str(index) * 64,
                f"a {color} square, left side",
                (),
                color,
                True,
                f"{color}.png",
                (64, 80),
                (48, 64),
            )
        )
    return made


def batches(pipeline, examples: list[Example], latents, **config: object) -> TrainingBatches:
    return TrainingBatches(
        config=TrainConfig(**config),
        examples=examples,
        latent_parameters=latents.latent_parameters,
        encode_captions=sd1_caption_encoder(pipeline),
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        added_conditioning=False,
        latent_channels=4,
        vae_scale_factor=8,
        latent_scale=pipeline.vae.config.scaling_factor,
        accelerator=Accelerator(cpu=True),
    )


SAMPLES = [Sample(0, epoch=0, position=0), Sample(1, epoch=0, position=1)]


def test_the_same_samples_make_the_same_batch_cached_or_not(
    pipeline, examples: list[Example], tmp_path: Path
) -> None:
    cache = LatentCache(tmp_path / "latents", pipeline.vae, "vae")
    cache.fill([(e, f) for e in examples for f in (False, True)], 0, 1)
    cached = batches(pipeline, examples, cache, flip_aug=True)(SAMPLES)
    again = batches(pipeline, examples, cache, flip_aug=True)(SAMPLES)
    encoded = batches(pipeline, examples, EncodeEveryStep(pipeline.vae), flip_aug=True)(SAMPLES)
    assert torch.equal(cached.noisy_latents, again.noisy_latents)
    torch.testing.assert_close(cached.noisy_latents, encoded.noisy_latents, atol=1e-4, rtol=0)
    assert cached.noisy_latents.shape == (2, 4, 8, 6) and cached.hidden_states.shape == (2, 77, 32)


def test_epsilon_targets_are_the_drawn_noise_at_the_drawn_timesteps(
    pipeline, examples: list[Example]
) -> None:
    config = {"min_timestep": 300, "max_timestep": 400}
    batch = batches(pipeline, examples, EncodeEveryStep(pipeline.vae), **config)(SAMPLES)
    draws = [draw(TrainConfig(**config), s, examples[s.example_index], (4, 8, 6)) for s in SAMPLES]
    assert torch.equal(batch.target, torch.stack([d.noise for d in draws]))
    assert batch.timesteps.tolist() == [d.timestep for d in draws]
    assert all(300 <= t < 400 for t in batch.timesteps.tolist())
    assert batch.loss_weights.tolist() == [1.0, 1.0]


def test_min_snr_weights_the_samples(pipeline, examples: list[Example]) -> None:
    batch = batches(
        pipeline, examples, EncodeEveryStep(pipeline.vae), snr_gamma=5.0, max_timestep=50
    )(SAMPLES)
    assert torch.all(batch.loss_weights < 1.0)


def test_a_stand_in_sample_weighs_nothing(pipeline, examples: list[Example]) -> None:
    stand_in = [Sample(0, epoch=0, position=0, counts=False)]
    batch = batches(pipeline, examples, EncodeEveryStep(pipeline.vae))(stand_in)
    assert batch.loss_weights.tolist() == [0.0]
