"""The world model's pretraining script: a few steps give a complete, loadable SD pipeline."""

from __future__ import annotations

import json
from pathlib import Path

from lorapipe.models import load_base_model
from lorapipe.world_model import PretrainConfig, pretrain


def test_pretraining_writes_a_diffusers_model_with_its_measured_latent_scale(
    tmp_path: Path,
) -> None:
    config = PretrainConfig(scenes=8, vae_steps=2, unet_steps=2, batch_size=4)
    model = pretrain(tmp_path / "world-sd", config)

    vae_config = json.loads((model / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215  # measured on the rendered scenes
    pipeline = load_base_model(str(model))
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == 64
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    image = pipeline(
        "a red circle on the left, white background", num_inference_steps=2, output_type="pil"
    ).images[0]
    assert image.size == (64, 64)
